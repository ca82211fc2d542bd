// Input validation shared by every op: runs before any tensor is written.
#include "memopt/common.h"

#include "memopt/state_codes.h"
#include "memopt/int8_weights.h"
#include "memopt/layout.h"
#include "memopt/rounding.h"

namespace memopt {

void check_adam_hparams(double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "Invalid beta1 (betas[0]): ", beta1,
                    " (must be in [0, 1))");
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "Invalid beta2 (betas[1]): ", beta2,
                    " (must be in [0, 1))");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "Invalid eps: ", eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0.0,
                    "Invalid weight_decay: ", weight_decay);
}

double read_lr(const Tensor& lr) {
  TORCH_CHECK_VALUE(lr.numel() == 1, "lr must be a single value, got a tensor of ", lr.numel());
  return lr.item<double>();
}

Rounding::Rounding(at::IntArrayRef rounding, size_t n, const char* op)
    : values_(rounding.begin(), rounding.end()) {
  TORCH_CHECK_VALUE(values_.empty() || values_.size() == n + 2, op, ": rounding must be [] "
                    "(round to nearest) or [seed, counter] and one id per parameter (", n + 2,
                    " values), got ", values_.size(), " values");
}

uint64_t Rounding::key(size_t i, double step) const {
  return rounding_key(values_[0], values_[1], values_[2 + i], static_cast<int64_t>(step));
}

static bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

const Tensor& weight_scale(TensorList weight_scales, size_t i) {
  static const Tensor none;
  return i < weight_scales.size() ? weight_scales[i] : none;
}

int64_t int8_group(const Tensor& codes, const Tensor& scales) {
  return codes.numel() / scales.numel();
}

void check_weight_scales(const char* op, TensorList params, TensorList grads,
                         TensorList weight_scales) {
  TORCH_CHECK_VALUE(weight_scales.empty() || weight_scales.size() == params.size(), op,
                    ": weight_scales must be [] or one per parameter (", params.size(),
                    "), got ", weight_scales.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &s = weight_scale(weight_scales, i);
    const bool coded = int8_scales(s);
    TORCH_CHECK_TYPE(coded == (p.scalar_type() == at::kChar), op, ": parameter ", i, " has dtype ",
                     p.scalar_type(), coded ? " but int8 weight scales were given for it"
                                            : "; int8 codes need their weight_scales");
    if (!coded) continue;
    TORCH_CHECK_VALUE(p.dim() == 2 && p.is_contiguous() && p.numel() > 0, op, ": int8 parameter ",
                      i, " must be a non-empty contiguous matrix, got shape ", p.sizes());
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                          s.size(0) == p.size(0) && p.size(1) % s.size(1) == 0 &&
                          s.device() == p.device(),
                      op, ": the scales of int8 parameter ", i, " must be a contiguous float32 "
                      "(rows, cols / group) tensor beside it, got ", s.scalar_type(), " ",
                      s.sizes(), " for codes ", p.sizes());
    const int64_t group = int8_group(p, s);
    TORCH_CHECK_VALUE(group >= kInt8MinGroup && group <= kInt8MaxGroup, op, ": int8 parameter ",
                      i, " has groups of ", group, " elements; groups of ", kInt8MinGroup,
                      " to ", kInt8MaxGroup, " are supported");
    TORCH_CHECK_TYPE(i < grads.size() && (grads[i].scalar_type() == at::kFloat ||
                                          grads[i].scalar_type() == at::kBFloat16),
                     op, ": the gradient of int8 parameter ", i,
                     " must be float32 or bfloat16");
  }
}

void check_param_lists(const char* op, TensorList params, TensorList grads, TensorList steps,
                       TensorList weight_scales) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && steps.size() == n, op,
                    ": params, grads and steps must have the same length (got ", n, ", ",
                    grads.size(), ", ", steps.size(), ")");
  check_weight_scales(op, params, grads, weight_scales);
  for (size_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i], &s = steps[i];
    const at::ScalarType pt = value_dtype(p, g);
    TORCH_CHECK_TYPE(supported_float(pt), op, ": parameter ", i, " has dtype ", pt,
                     "; only float32, bfloat16, float16 and float64 are supported");
    // Any non-overlapping layout (memopt/layout.h decides how the kernels see it).
    check_param_layout(std::string(op) + ": parameter " + std::to_string(i), p);
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, op, ": gradient ", i,
                      " is sparse; memopt optimizers support dense gradients only");
    TORCH_CHECK_TYPE(!g.is_complex(), op, ": gradient ", i,
                     " is complex; memopt optimizers support real parameters only");
    TORCH_CHECK_TYPE(g.scalar_type() == pt, op, ": gradient ", i, " has dtype ",
                     g.scalar_type(), " but its parameter has ", pt);
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": gradient ", i, " has shape ", g.sizes(),
                      " but its parameter has ", p.sizes());
    TORCH_CHECK_VALUE(g.device() == p.device() && p.device() == params[0].device(), op,
                      ": tensor ", i, " is on another device; one call takes one device");
    // Steps live on the CPU (read on the host) or, for device-resident/fake tensors, beside p.
    TORCH_CHECK_VALUE(s.numel() == 1 && s.scalar_type() == at::kFloat &&
                          (s.device().is_cpu() || s.device() == p.device()),
                      op, ": step ", i, " must be a one-element float32 tensor on the CPU");
  }
}

const Tensor& state_scale(TensorList state_scales, size_t n_params, size_t moment, size_t i) {
  static const Tensor none;
  const size_t at = moment * n_params + i;
  return i < n_params && at < state_scales.size() ? state_scales[at] : none;
}

void check_state_scales(const char* op, TensorList params, TensorList state_scales,
                        const std::vector<std::pair<TensorList, at::ScalarType>>& moments) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(state_scales.empty() || state_scales.size() == moments.size() * n, op,
                    ": state_scales must be [] or ", moments.size(), " list(s) of one per "
                    "parameter (", moments.size() * n, " tensors), got ", state_scales.size());
  for (size_t k = 0; k < moments.size(); ++k) {
    const auto& [states, code_dtype] = moments[k];
    for (size_t i = 0; i < n && i < states.size(); ++i) {
      if (!coded_state(state_scales, n, k, i)) continue;
      const Tensor &c = states[i], &s = state_scale(state_scales, n, k, i);
      const char* what = k == 0 ? "exp_avg" : "exp_avg_sq";  // the ops' moment order
      TORCH_CHECK_TYPE(c.scalar_type() == code_dtype, op, ": 8-bit ", what, " of tensor ", i,
                       " must hold ", code_dtype == at::kChar ? "int8" : "uint8",
                       " codes, got ", c.scalar_type());
      TORCH_CHECK_VALUE(c.numel() == params[i].numel() && c.device() == params[i].device(), op,
                        ": 8-bit ", what, " of tensor ", i, " must have the parameter's ",
                        params[i].numel(), " elements on its device, got ", c.sizes());
      // (any shape: the plan shapes them [rows, blocks per row] where rows are whole blocks)
      TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.is_contiguous() &&
                            s.numel() == state_blocks(c.numel()) && s.device() == c.device(),
                        op, ": the block scales of 8-bit ", what, " of tensor ", i,
                        " must be a contiguous float32 tensor of ", state_blocks(c.numel()),
                        " entries (one per ", kStateBlock, " elements) beside it, got ",
                        s.scalar_type(), " ", s.sizes());
    }
  }
}

void check_update_lists(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList steps, TensorList weight_scales, TensorList state_scales) {
  check_param_lists(op, params, grads, steps, weight_scales);
  TORCH_CHECK_VALUE(exp_avgs.size() == params.size(), op, ": ", exp_avgs.size(),
                    " exp_avgs for ", params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i];
    const at::ScalarType pt = value_dtype(p, grads[i]);
    TORCH_CHECK_VALUE(m.sizes() == p.sizes(), op, ": exp_avg ", i,
                      " must have the parameter's shape ", p.sizes(), ", got ", m.sizes());
    check_param_layout(std::string(op) + ": exp_avg " + std::to_string(i), m);
    const bool coded = coded_state(state_scales, params.size(), 0, i);
    TORCH_CHECK_TYPE(coded ? m.scalar_type() == at::kChar
                           : (m.scalar_type() == pt || m.scalar_type() == at::kFloat ||
                              m.scalar_type() == at::kBFloat16),
                     op, ": exp_avg ", i, " has dtype ", m.scalar_type(), "; state must be ",
                     coded ? "int8 codes (block scales were given for it)"
                           : "float32, bfloat16 or the parameter dtype");
    TORCH_CHECK_VALUE(m.device() == p.device(), op, ": exp_avg ", i,
                      " is on another device; one call takes one device");
  }
}

void check_adam_codes(const char* op, TensorList params, TensorList exp_avgs,
                      TensorList exp_avg_sqs, TensorList state_scales) {
  check_state_scales(op, params, state_scales, {{exp_avgs, at::kChar}, {exp_avg_sqs, at::kByte}});
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(coded_state(state_scales, n, 0, i) == coded_state(state_scales, n, 1, i),
                      op, ": tensor ", i, ": exp_avg and exp_avg_sq are 8-bit together or not "
                      "at all");
}

void check_found_inf(const char* op, const std::optional<Tensor>& found_inf, TensorList params,
                     TensorList steps) {
  if (!found_inf.has_value()) return;
  const Tensor& f = *found_inf;
  TORCH_CHECK_VALUE(f.numel() == 1 && f.scalar_type() == at::kFloat, op,
                    ": found_inf must be a one-element float32 tensor, got ", f.scalar_type(),
                    " of shape ", f.sizes());
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(f.device() == device, op, ": found_inf must be on the parameters' device ",
                    device, ", got ", f.device());
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK_VALUE(steps[i].device() == device, op, ": with found_inf, step ", i,
                      " must be on the parameters' device ", device,
                      " (the kernels advance it there), got ", steps[i].device());
}

bool found_on_host(const std::optional<Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->device().is_cpu() && found_inf->item<float>() != 0.0f;
}

}  // namespace memopt
