// memopt::int8_encode_ for the CUDA dispatch key: validates like the CPU op, then
// cuda/int8_encode.cu on the values (made contiguous: one weight, at quantization, not a step).
#include <torch/library.h>

#include "launch.h"

namespace memopt::cuda {
namespace {

void int8_encode_cuda(const Tensor& values, const Tensor& codes, const Tensor& scales) {
  check_int8_encode(values, codes, scales);
  check_same_cuda_device("int8_encode_", {{values, codes, scales}});
  const c10::DeviceGuard guard(codes.device());
  const Tensor x = values.contiguous();
  Int8EncodeParams prm{};
  prm.dtype = dtype_of(x.scalar_type());
  prm.values = x.data_ptr();
  prm.codes = codes.data_ptr<int8_t>();
  prm.scales = scales.data_ptr<float>();
  prm.numel = codes.numel(), prm.group = int8_group(codes, scales);
  check_launch(launch_int8_encode(prm, current_stream(codes.device())), "int8_encode_");
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("int8_encode_", &memopt::cuda::int8_encode_cuda); }
