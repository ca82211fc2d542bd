// memopt::adamw_ for the CUDA dispatch key: validates like the CPU op (the rule first), advances
// the step counters and computes each tensor's scalars in double (on the host, or on the device
// with found_inf: launch.h StepPlan) and launches cuda/adamw.cu.
#include <torch/library.h>

#include "adamw_coded.h"
#include "memopt/adamw.h"

namespace memopt::cuda {

bool coded_moments(TensorList state_scales, int64_t i) {
  return !state_scales.empty() && coded_state(state_scales, state_scales.size() / 2, 0, i);
}

void check_coded_cuda(const char* op, TensorList params, TensorList weight_scales,
                      TensorList state_scales) {
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    if (!coded_moments(state_scales, i)) continue;
    const Tensor& ws = weight_scale(weight_scales, i);
    TORCH_CHECK_NOT_IMPLEMENTED(!int8_scales(ws) || kStateChunk % int8_group(params[i], ws) == 0,
                                op, ": 8-bit states of an int8 weight whose group (",
                                int8_scales(ws) ? int8_group(params[i], ws) : 0, " elements) does "
                                "not divide ", kStateChunk, " run on the CPU only");
  }
}

void adamw_coded_kernels(TensorList params, const std::vector<Tensor>& grads,
                         TensorList exp_avgs, TensorList exp_avg_sqs, const StepPlan& steps,
                         const AdamWParams& base, TensorList state_scales,
                         TensorList weight_scales, Stream stream) {
  const size_t count = params.size();
  for (Dtype dtype : {Dtype::kFloat32, Dtype::kBFloat16, Dtype::kFloat16, Dtype::kFloat64}) {
    std::vector<int64_t> idx;  // (by value dtype: an int8 weight's is its gradient's)
    for (size_t i = 0; i < count; ++i)
      if (coded_moments(state_scales, i) && dtype_of(value_dtype(params[i], grads[i])) == dtype)
        idx.push_back(i);
    if (idx.empty()) continue;
    AdamWCodedParams prm{};
    prm.param_dtype = dtype;
    prm.beta1 = base.beta1, prm.beta2 = base.beta2, prm.eps = base.eps;
    prm.decay_after = base.decay_after;
    prm.stochastic = base.stochastic;
    prm.device = steps.device;
    launch_chunked(
        "adamw_update_", prm, static_cast<int64_t>(idx.size()), kStateChunk,
        [&](int64_t k) { return params[idx[k]].numel(); },
        [&](int slot, int64_t k) {
          const int64_t i = idx[k];
          prm.p[slot] = params[i].data_ptr();
          prm.g[slot] = grads[i].data_ptr();
          prm.m[slot] = exp_avgs[i].data_ptr<int8_t>();
          prm.v[slot] = exp_avg_sqs[i].data_ptr<uint8_t>();
          prm.m_scales[slot] = state_scale(state_scales, count, 0, i).data_ptr<float>();
          prm.v_scales[slot] = state_scale(state_scales, count, 1, i).data_ptr<float>();
          prm.scalars[slot] = steps.of(i);
          prm.tensor[slot] = static_cast<int32_t>(i);
          const Tensor& ws = weight_scale(weight_scales, i);
          prm.w_scales[slot] = TensorBatch::scales(weight_scales, i);
          prm.int8_group[slot] =
              int8_scales(ws) ? static_cast<int32_t>(int8_group(params[i], ws)) : 0;
        },
        [&](const AdamWCodedParams& launch) { return launch_adamw_coded(launch, stream); });
  }
}

namespace {

constexpr int64_t kChunk = 65536;

void adamw_kernels(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, const Tensor& lr_t, double beta1, double beta2, double eps,
                double weight_decay, c10::string_view rule_name, const Rounding& rounding,
                TensorList weight_scales, TensorList state_scales,
                const std::optional<Tensor>& found_inf) {
  const AdamWRule rule = parse_adamw_rule(rule_name);
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, weight_scales, state_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  check_same_cuda_device("adamw_update_", {params, grads, exp_avgs, exp_avg_sqs});
  const c10::DeviceGuard guard(params[0].device());
  const Stream stream = current_stream(params[0].device());

  const std::vector<Tensor> g = contiguous_grads(grads);
  const StepPlan s = plan_steps(steps, lr, beta1, beta2, weight_decay, rule, rounding, found_inf,
                                stream);
  AdamWParams prm{};
  prm.beta1 = beta1, prm.beta2 = beta2, prm.eps = eps;
  prm.decay_after = rule == AdamWRule::kApollo;
  prm.stochastic = rounding.stochastic();
  prm.device = s.device;
  adamw_coded_kernels(params, g, exp_avgs, exp_avg_sqs, s, prm, state_scales, weight_scales,
                      stream);
  for (const TensorBatch& batch : by_dtypes(params, grads, exp_avgs, weight_scales,
                                            [&](int64_t i) { return !coded_moments(state_scales, i); })) {
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
          prm.scalars[slot] = s.of(i);
          prm.tensor[slot] = static_cast<int32_t>(i);
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
                OptionalTensors weight_scales, OptionalTensors state_scales,
                const std::optional<Tensor>& found_inf) {
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, listed(weight_scales),
                     listed(state_scales));
  check_found_inf("adamw_update_", found_inf, params, steps);
  check_coded_cuda("adamw_update_", params, listed(weight_scales), listed(state_scales));
  const Rounding round(rounding, params.size(), "adamw_update_");
  ParamLayouts layouts(params, {exp_avgs, exp_avg_sqs}, any_order);
  adamw_kernels(layouts.params(), layouts.follow(grads), layouts.written(0), layouts.written(1),
                steps, lr, beta1, beta2, eps, weight_decay, rule, round, listed(weight_scales),
                listed(state_scales), found_inf);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("adamw_", &memopt::cuda::adamw_cuda); }
