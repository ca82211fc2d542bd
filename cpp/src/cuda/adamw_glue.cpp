// memopt::adamw_ for the CUDA dispatch key: validates like the CPU op (the rule first), advances
// the step counters, computes each tensor's scalars in double and launches cuda/adamw.cu.
#include <torch/library.h>

#include "launch.h"
#include "memopt/adamw.h"

namespace memopt::cuda {
namespace {

constexpr int64_t kChunk = 65536;

void adamw_kernels(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, const Tensor& lr_t, double beta1, double beta2, double eps,
                double weight_decay, c10::string_view rule_name, const Rounding& rounding,
                TensorList weight_scales) {
  const AdamWRule rule = parse_adamw_rule(rule_name);
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, weight_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  check_same_cuda_device("adamw_update_", {params, grads, exp_avgs, exp_avg_sqs});
  const c10::DeviceGuard guard(params[0].device());
  const Stream stream = current_stream(params[0].device());

  const AdamStepInputs in =
      adam_step_inputs(grads, steps, lr, beta1, beta2, eps, weight_decay, rule);
  const auto& g = in.grads;
  const auto& s = in.scalars;
  AdamWParams prm{};
  prm.beta1 = beta1, prm.beta2 = beta2, prm.eps = eps;
  prm.decay_after = rule == AdamWRule::kApollo;
  prm.stochastic = rounding.stochastic();
  for (const TensorBatch& batch : by_dtypes(params, grads, exp_avgs, weight_scales)) {
    const auto& idx = batch.idx;
    prm.param_dtype = batch.value_dtype, prm.state_dtype = batch.state_dtype;
    prm.int8_group = static_cast<int32_t>(batch.int8_group);
    launch_chunked(
        "adamw_update_", prm, static_cast<int64_t>(idx.size()), batch.chunk(kChunk),
        [&](int64_t k) { return params[idx[k]].numel(); },
        [&](int slot, int64_t k) {
          const int64_t i = idx[k];
          prm.p[slot] = params[i].data_ptr();
          prm.scales[slot] = TensorBatch::scales(weight_scales, i);
          prm.g[slot] = g[i].data_ptr();
          prm.m[slot] = exp_avgs[i].data_ptr();
          prm.v[slot] = exp_avg_sqs[i].data_ptr();
          prm.decay[slot] = s[i].decay;
          prm.step_size[slot] = s[i].step_size;
          prm.bc2_sqrt[slot] = s[i].bc2_sqrt;
          prm.round_key[slot] = rounding.stochastic() ? rounding.key(i, s[i].step) : 0;
          prm.round_first[slot] = 0;
        },
        [&](const AdamWParams& launch) { return launch_adamw(launch, stream); });
  }
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, const Tensor& lr, double beta1, double beta2, double eps,
                double weight_decay, c10::string_view rule, at::IntArrayRef rounding,
                OptionalTensors weight_scales, OptionalTensors state_scales) {
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, listed(weight_scales),
                     listed(state_scales));
  check_no_state_codes("adamw_update_", listed(state_scales));
  const Rounding round(rounding, params.size(), "adamw_update_");
  ParamLayouts layouts(params, {exp_avgs, exp_avg_sqs}, any_order);
  adamw_kernels(layouts.params(), layouts.follow(grads), layouts.written(0), layouts.written(1),
                steps, lr, beta1, beta2, eps, weight_decay, rule, round, listed(weight_scales));
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("adamw_", &memopt::cuda::adamw_cuda); }
