// APOLLO's torch op (memopt::apollo_): input validation, schema, CPU and Meta kernels.
#include <torch/library.h>

#include "memopt/apollo.h"

namespace memopt {

void check_apollo_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                         TensorList limiter_norms, TensorList steps, const ApolloConfig& cfg) {
  const char* op = "apollo_update_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                        limiter_norms.size() == n && steps.size() == n,
                    op, ": params, grads, exp_avgs, exp_avg_sqs, limiter_norms and steps must "
                    "have the same length (got ", n, ", ", grads.size(), ", ", exp_avgs.size(),
                    ", ", exp_avg_sqs.size(), ", ", limiter_norms.size(), ", ", steps.size(), ")");
  const bool random = cfg.proj == "random";
  TORCH_CHECK_VALUE(projs.empty() || projs.size() == n, op, ": ", projs.size(),
                    " projections for ", n, " params (give one per param, or none)");
  TORCH_CHECK_VALUE(random || n == 0 || !projs.empty(), op,
                    ": proj='svd' needs the stored projection (store_projection=True): an SVD "
                    "basis cannot be regenerated from a seed");
  TORCH_CHECK_VALUE(random ? seeds.size() == n : seeds.empty(), op, ": ", seeds.size(),
                    " seeds for ", n, " params (one per param for proj='random', none for 'svd')");
  // Parameters, gradients and steps follow every op's rules; the moments have R's shape, so the
  // parameters stand in for the list that check_update_lists shapes like them (always valid).
  check_update_lists(op, params, grads, params, steps);
  for (size_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const Projector proj(cfg.proj, cfg.proj_type, cfg.rank, p.sizes());  // 2-D, valid keys
    const auto low = proj.low_rank_shape();
    for (const Tensor* s : {&m, &v})
      TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef(low) && s->is_contiguous() &&
                            s->device() == p.device(),
                        op, ": Adam moments of parameter ", i, " (shape ", p.sizes(),
                        ") must be contiguous with the projected shape ", at::IntArrayRef(low),
                        ", got ", s->sizes());
    TORCH_CHECK_TYPE((m.scalar_type() == p.scalar_type() || m.scalar_type() == at::kFloat) &&
                         v.scalar_type() == m.scalar_type(),
                     op, ": Adam moments of parameter ", i, " must both be float32 or ",
                     p.scalar_type());
    if (!projs.empty()) {
      const auto ps = proj.proj_shape();
      TORCH_CHECK_VALUE(projs[i].sizes() == at::IntArrayRef(ps) && projs[i].is_contiguous() &&
                            projs[i].scalar_type() == p.scalar_type() &&
                            projs[i].device() == p.device(),
                        op, ": projection of parameter ", i, " must be a contiguous ",
                        p.scalar_type(), " tensor of shape ", at::IntArrayRef(ps), ", got ",
                        projs[i].sizes());
    }
    if (random)
      TORCH_CHECK_VALUE(seeds[i].numel() == 1 && seeds[i].scalar_type() == at::kLong &&
                            (seeds[i].device().is_cpu() || seeds[i].device() == p.device()),
                        op, ": seed ", i, " must be a one-element int64 tensor on the CPU");
    TORCH_CHECK_VALUE(limiter_norms[i].numel() == 1 &&
                          (limiter_norms[i].scalar_type() == at::kFloat ||
                           limiter_norms[i].scalar_type() == at::kDouble) &&
                          (limiter_norms[i].device().is_cpu() || limiter_norms[i].device() == p.device()),
                      op, ": limiter_norm ", i, " must be a one-element float32/64 tensor on the CPU");
  }
}

namespace {

void apollo_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                const Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t rank, c10::string_view proj, c10::string_view proj_type,
                c10::string_view scale_type, int64_t update_proj_gap, double scale,
                double norm_growth_limit, bool scale_front) {
  apollo_update_(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps, lr,
                 beta1, beta2, eps, weight_decay,
                 make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap, scale,
                           norm_growth_limit, scale_front));
}

void apollo_meta(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                 const Tensor&, double, double, double, double, int64_t rank,
                 c10::string_view proj, c10::string_view proj_type, c10::string_view scale_type,
                 int64_t update_proj_gap, double scale, double norm_growth_limit,
                 bool scale_front) {
  const auto cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap, scale,
                             norm_growth_limit, scale_front);
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, projs}))
    check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                        cfg);
}

}  // namespace
}  // namespace memopt

TORCH_LIBRARY_FRAGMENT(memopt, m) {
  m.def("apollo_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] projs, Tensor(e!)[] seeds, "
        "Tensor(f!)[] limiter_norms, Tensor(g!)[] steps, Tensor lr, float beta1, float beta2, "
        "float eps, float weight_decay, int rank, str proj, str proj_type, str scale_type, "
        "int update_proj_gap, float scale, float norm_growth_limit, bool scale_front) -> ()");
}

TORCH_LIBRARY_IMPL(memopt, CPU, m) { m.impl("apollo_", &memopt::apollo_cpu); }

TORCH_LIBRARY_IMPL(memopt, Meta, m) { m.impl("apollo_", &memopt::apollo_meta); }
