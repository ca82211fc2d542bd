// torch.ops.memopt.int8_encode_: float weights to int8 codes and group scales, to nearest, as
// every op re-encodes them (memopt/int8_weights.h; cpu_params.h has the loop). The front end's
// quantize_weights_ makes int8 weights with it, so a weight has one encoding from its first step.
#include <torch/library.h>

#include "cpu_params.h"
#include "define_op.h"

namespace memopt {

void check_int8_encode(const Tensor& values, const Tensor& codes, const Tensor& scales) {
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
                   "int8_encode_: values must be float32 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && codes.sizes() == values.sizes(),
                    "int8_encode_: values must be a matrix shaped like codes, got ",
                    values.sizes(), " and ", codes.sizes());
  // codes and scales as an op's weight_scales argument takes them (common.h)
  check_weight_scales("int8_encode_", {codes}, {values}, {scales});
}

namespace {

void int8_encode_cpu(const Tensor& values, const Tensor& codes, const Tensor& scales) {
  check_int8_encode(values, codes, scales);
  const Tensor x = values.to(at::kFloat).contiguous();  // one weight, once: not a step
  const int64_t rows = codes.size(0), cols = codes.size(1), group = int8_group(codes, scales);
  const float* xp = x.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      cpu::int8_encode_span(xp + r * cols, group, cols, cp + r * cols, sp + r * (cols / group),
                            /*stochastic=*/false, 0, r * cols);
  });
}

void int8_encode_check(const Tensor& values, const Tensor& codes, const Tensor& scales) {
  check_int8_encode(values, codes, scales);
}

}  // namespace
}  // namespace memopt

TORCH_LIBRARY_FRAGMENT(memopt, m) {
  memopt::define_op(m, "int8_encode_(Tensor values, Tensor(a!) codes, Tensor(b!) scales) -> ()",
                    &memopt::int8_encode_check);
}

TORCH_LIBRARY_IMPL(memopt, CPU, m) { m.impl("int8_encode_", &memopt::int8_encode_cpu); }
TORCH_LIBRARY_IMPL(memopt, Meta, m) { m.impl("int8_encode_", &memopt::int8_encode_check); }
