// AdamW: fused multi-tensor update on CPU (torch.optim.AdamW's rule, or apollo-torch's).
#include "memopt/adamw.h"

#include "cpu_params.h"
#include "cpu_states.h"
#include "memopt/layout.h"

namespace memopt {

void check_adamw_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList steps, TensorList weight_scales,
                        TensorList state_scales) {
  check_update_lists("adamw_update_", params, grads, exp_avgs, steps, weight_scales,
                     state_scales);
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == params.size(), "adamw_update_: ", exp_avg_sqs.size(),
                    " exp_avg_sqs for ", params.size(), " params");
  check_adam_codes("adamw_update_", params, exp_avgs, exp_avg_sqs, state_scales);
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i) {
    const bool coded = coded_state(state_scales, n, 0, i);
    TORCH_CHECK_VALUE(exp_avg_sqs[i].sizes() == params[i].sizes() &&
                          (coded || exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type()) &&
                          exp_avg_sqs[i].device() == params[i].device(),
                      "adamw_update_: exp_avg_sq ", i, " must match exp_avg in shape and dtype");
    check_param_layout("adamw_update_: exp_avg_sq " + std::to_string(i), exp_avg_sqs[i]);
  }
}

AdamWRule parse_adamw_rule(c10::string_view rule) {
  if (rule == "torch") return AdamWRule::kTorch;
  TORCH_CHECK_VALUE(rule == "apollo", "adamw_rule must be 'apollo' (apollo-torch's AdamW: eps "
                    "before bias correction, decay after the update) or 'torch' "
                    "(torch.optim.AdamW's), got '", std::string(rule), "'");
  return AdamWRule::kApollo;
}

void adamw_update_(TensorList params_in, TensorList grads_in, TensorList exp_avgs_in,
                   TensorList exp_avg_sqs_in, TensorList steps, const Tensor& lr_t, double beta1,
                   double beta2, double eps, double weight_decay, AdamWRule rule,
                   at::IntArrayRef rounding_arg, TensorList weight_scales,
                   TensorList state_scales) {
  check_adamw_inputs(params_in, grads_in, exp_avgs_in, exp_avg_sqs_in, steps, weight_scales,
                     state_scales);
  const Rounding rounding(rounding_arg, params_in.size(), "adamw_update_");
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params_in.empty()) return;
  TORCH_CHECK(params_in[0].device().is_cpu(), "adamw_update_: no kernel for device ",
              params_in[0].device(), " in this build");
  // Elementwise: any dense layout is stepped in its memory order (memopt/layout.h).
  ParamLayouts layouts(params_in, {exp_avgs_in, exp_avg_sqs_in}, any_order);
  const auto grads_seen = layouts.follow(grads_in);
  TensorList params = layouts.params(), grads = grads_seen, exp_avgs = layouts.written(0),
             exp_avg_sqs = layouts.written(1);

  Workspace::Lease lease(Workspace::of(params[0].device()));
  const size_t count = params.size();
  for (size_t i = 0; i < count; ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const Tensor& scales = weight_scale(weight_scales, i);
    const bool coded = coded_state(state_scales, count, 0, i);
    const int64_t span =
        coded ? cpu::state_span(int8_scales(scales) ? int8_group(p, scales) : 1) : 0;
    const int64_t buffer = cpu::int8_buffer_elements(p, scales, span);
    lease.reserve(cpu::staging_bytes(grads[i]) + cpu::int8_buffer_bytes(buffer) +
                  cpu::int8_buffer_bytes(coded ? cpu::kAdamCodedFloats : 0));
    const Tensor g = cpu::contiguous_grad(lease, grads[i]);
    float* buffers = cpu::int8_buffers(lease, buffer);
    float* state_buffers = cpu::int8_buffers(lease, coded ? cpu::kAdamCodedFloats : 0);
    const auto s = AdamScalars::make(lr, beta1, beta2, eps, weight_decay,
                                     cpu::advance_step(steps[i]), rule);
    const at::ScalarType state_dtype = coded ? at::kFloat : m.scalar_type();
    MEMOPT_DISPATCH_PARAM_STATE(value_dtype(p, g), state_dtype, "adamw_update_", [&] {
      const auto* gp = g.data_ptr<scalar_t>();
      cpu::with_param_store<scalar_t>(p, scales, rounding, i, s.step, buffers, buffer,
                                      [&](const auto& store) {
        if (coded) {
          cpu::adamw_coded<scalar_t, opmath_t>(
              store, gp,
              {m.data_ptr<int8_t>(), state_scale(state_scales, count, 0, i).data_ptr<float>()},
              {v.data_ptr<uint8_t>(), state_scale(state_scales, count, 1, i).data_ptr<float>()},
              p.numel(), span, state_buffers, s);
          return;
        }
        auto* mp = m.data_ptr<state_t>();
        auto* vp = v.data_ptr<state_t>();
        store.for_spans(0, p.numel(), [&](auto* pv, const auto& round, int64_t b, int64_t n) {
          cpu::adamw_span<std::remove_pointer_t<decltype(pv)>, state_t, opmath_t>(
              pv, gp + b, mp + b, vp + b, n, s, round);
        });
      });
    });
  }
  layouts.write_back();
}

}  // namespace memopt
