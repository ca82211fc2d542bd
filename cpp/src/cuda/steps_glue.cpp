// Host side of the step counters of the Adam-family CUDA ops (launch.h StepPlan): on the host,
// or on the device with the op's found_inf (cuda/step_scalars.cu).
#include "launch.h"

namespace memopt::cuda {

StepPlan StepPlan::on_host(const std::vector<AdamScalars>& scalars, const Rounding& rounding) {
  StepPlan plan;
  plan.host.reserve(scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) {
    const AdamScalars& s = scalars[i];
    plan.host.push_back({s.decay, s.step_size, s.bc2_sqrt,
                         rounding.stochastic() ? rounding.key(i, s.step) : 0});
  }
  return plan;
}

StepPlan plan_steps(TensorList steps, at::ArrayRef<double> lr, double beta1, double beta2,
                    double weight_decay, AdamWRule rule, const Rounding& rounding,
                    const std::optional<Tensor>& found_inf, Stream stream,
                    std::optional<double> decay) {
  const size_t n = steps.size();
  TORCH_CHECK(lr.size() == 1 || lr.size() == n, "plan_steps: ", lr.size(), " learning rates for ",
              n, " tensors");
  auto lr_of = [&](size_t i) { return lr.size() == 1 ? lr[0] : lr[i]; };
  StepPlan plan;
  if (!found_inf.has_value()) {
    plan.host.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (steps[i].numel() == 0) {  // no counter (FRUGAL's state-free tensors)
        plan.host.push_back(StepScalars{});
        continue;
      }
      const double t = advance_step(steps[i]);
      StepScalars s = adam_step_scalars(lr_of(i), beta1, beta2, weight_decay, t,
                                        rule == AdamWRule::kApollo);
      s.round_key = rounding.stochastic() ? rounding.key(i, t) : 0;
      if (decay) s.decay = *decay;
      plan.host.push_back(s);
    }
    return plan;
  }
  plan.host.assign(n, StepScalars{});
  // n StepScalars (32 bytes each) as doubles: the caching allocator's, not the workspace's,
  // since the kernels that read them may outlive this call's workspace lease.
  static_assert(sizeof(StepScalars) == 4 * sizeof(double), "StepScalars packs as 4 doubles");
  plan.buffer = at::empty({static_cast<int64_t>(std::max<size_t>(n, 1)) * 4},
                          found_inf->options().dtype(at::kDouble));
  auto* out = reinterpret_cast<StepScalars*>(plan.buffer.data_ptr<double>());
  plan.device = {out, found_inf->data_ptr<float>()};
  StepScalarsParams prm{};
  prm.found_inf = plan.device.found_inf;
  prm.apollo_rule = rule == AdamWRule::kApollo;
  prm.stochastic = rounding.stochastic();
  if (rounding.stochastic()) {
    prm.round_seed = rounding.values()[0];
    prm.round_counter = rounding.values()[1];
  }
  prm.beta1 = beta1, prm.beta2 = beta2, prm.weight_decay = weight_decay;
  prm.fixed_decay = decay.has_value(), prm.decay = decay.value_or(0.0);
  for (size_t first = 0; first < n; first += StepScalarsParams::kMaxTensors) {
    prm.n = static_cast<int32_t>(std::min<size_t>(StepScalarsParams::kMaxTensors, n - first));
    prm.out = out + first;
    for (int32_t k = 0; k < prm.n; ++k) {
      const Tensor& step = steps[first + k];
      prm.step[k] = step.numel() == 0 ? nullptr : step.data_ptr<float>();
      prm.lr[k] = lr_of(first + k);
      prm.round_id[k] = rounding.stochastic() ? rounding.values()[2 + first + k] : 0;
    }
    check_launch(launch_step_scalars(prm, stream), "step counters");
  }
  return plan;
}

std::vector<Tensor> contiguous_grads(TensorList grads) {
  std::vector<Tensor> out;
  out.reserve(grads.size());
  for (const Tensor& g : grads) out.push_back(contiguous_grad(g));
  return out;
}

}  // namespace memopt::cuda
