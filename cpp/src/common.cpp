// Input validation shared by every op: runs before any tensor is written.
#include "memopt/common.h"
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

void check_update_lists(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && steps.size() == n, op,
                    ": params, grads, exp_avgs and steps must have the same length (got ", n, ", ",
                    grads.size(), ", ", exp_avgs.size(), ", ", steps.size(), ")");
  for (size_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &s = steps[i];
    TORCH_CHECK_TYPE(supported_float(p.scalar_type()), op, ": parameter ", i, " has dtype ",
                     p.scalar_type(), "; only float32, bfloat16, float16 and float64 are supported");
    // Any non-overlapping layout (memopt/layout.h decides how the kernels see it).
    check_param_layout(std::string(op) + ": parameter " + std::to_string(i), p);
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, op, ": gradient ", i,
                      " is sparse; memopt optimizers support dense gradients only");
    TORCH_CHECK_TYPE(!g.is_complex(), op, ": gradient ", i,
                     " is complex; memopt optimizers support real parameters only");
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": gradient ", i, " has dtype ",
                     g.scalar_type(), " but its parameter has ", p.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": gradient ", i, " has shape ", g.sizes(),
                      " but its parameter has ", p.sizes());
    TORCH_CHECK_VALUE(m.sizes() == p.sizes(), op, ": exp_avg ", i,
                      " must have the parameter's shape ", p.sizes(), ", got ", m.sizes());
    check_param_layout(std::string(op) + ": exp_avg " + std::to_string(i), m);
    TORCH_CHECK_TYPE(m.scalar_type() == p.scalar_type() || m.scalar_type() == at::kFloat, op,
                     ": exp_avg ", i, " has dtype ", m.scalar_type(),
                     "; state must be float32 or the parameter dtype ", p.scalar_type());
    TORCH_CHECK_VALUE(g.device() == p.device() && m.device() == p.device() &&
                          p.device() == params[0].device(),
                      op, ": tensor ", i, " is on another device; one call takes one device");
    // Steps live on the CPU (read on the host) or, for device-resident/fake tensors, beside p.
    TORCH_CHECK_VALUE(s.numel() == 1 && s.scalar_type() == at::kFloat &&
                          (s.device().is_cpu() || s.device() == p.device()),
                      op, ": step ", i, " must be a one-element float32 tensor on the CPU");
  }
}

}  // namespace memopt
