// APOLLO's torch op (memopt::apollo_): input validation, schema, CPU and Meta kernels.
#include <torch/library.h>

#include "define_op.h"
#include "memopt/apollo.h"

namespace memopt {

namespace {

// The checks of apollo_ and of the shard ops. offsets/global_sizes/shard_dims (null: whole
// tensors) place each parameter as a run of rows (dim 0) or columns (dim 1) of the full
// weight: the projector and P are the full weight's; moments split like the weight when the
// shard splits R's channels, whole when it splits P's contraction.
void check_apollo_lists(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                        TensorList limiter_norms, TensorList steps, const ApolloConfig& cfg,
                        const at::IntArrayRef* offsets, const at::IntArrayRef* global_sizes,
                        const at::IntArrayRef* shard_dims, TensorList weight_scales = {}) {
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
  if (offsets)
    TORCH_CHECK_VALUE(offsets->size() == n && global_sizes->size() == n &&
                          shard_dims->size() == n,
                      op, ": ", offsets->size(), " offsets, ", global_sizes->size(),
                      " global_sizes and ", shard_dims->size(), " shard_dims for ", n, " params");
  // Parameters, gradients and steps follow every op's rules; the moments have R's shape
  // (checked below).
  check_param_lists(op, params, grads, steps, weight_scales);
  for (size_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const at::ScalarType pt = value_dtype(p, grads[i]);
    TORCH_CHECK_VALUE(p.dim() == 2 || !offsets, op, ": parameter ", i, " has shape ",
                      p.sizes(), "; a projected parameter must be 2-D (a weight matrix)");
    std::vector<int64_t> global = p.sizes().vec();
    int64_t dim = 0;
    if (offsets) {
      dim = (*shard_dims)[i];
      TORCH_CHECK_VALUE(dim == 0 || dim == 1, op, ": shard_dims[", i, "] is ", dim,
                        "; a weight is sharded by rows (0) or columns (1)");
      const int64_t at = (*offsets)[i], size = (*global_sizes)[i];
      TORCH_CHECK_VALUE(at >= 0 && size >= 1 && at + p.size(dim) <= size, op, ": parameter ",
                        i, " is a shard of ", p.size(dim), (dim ? " columns" : " rows"), " at ",
                        at, ", which does not fit in a weight of ", size,
                        (dim ? " columns" : " rows"));
      global[dim] = size;
    }
    const Projector proj(cfg.proj, cfg.proj_type, cfg.rank, global);  // 2-D, valid keys
    auto low = proj.low_rank_shape();
    if (offsets) {
      TORCH_CHECK_VALUE(dim == 0 || proj.side() == ProjSide::Left, op, ": parameter ", i,
                        " (full shape ", at::IntArrayRef(global), ") is projected from the "
                        "right and sharded by columns, which P contracts; shard it by rows");
      if (!apollo_shard_sums_r(proj, dim)) low[dim] = p.size(dim);  // R's channels: the shard's
    }
    for (const Tensor* s : {&m, &v})
      TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef(low) && s->is_contiguous() &&
                            s->device() == p.device(),
                        op, ": Adam moments of parameter ", i, " (shape ", p.sizes(),
                        ") must be contiguous with the projected shape ", at::IntArrayRef(low),
                        ", got ", s->sizes());
    TORCH_CHECK_TYPE((m.scalar_type() == pt || m.scalar_type() == at::kFloat) &&
                         v.scalar_type() == m.scalar_type(),
                     op, ": Adam moments of parameter ", i, " must both be float32 or ", pt);
    if (!projs.empty()) {
      const auto ps = proj.proj_shape();
      TORCH_CHECK_VALUE(projs[i].sizes() == at::IntArrayRef(ps) && projs[i].is_contiguous() &&
                            projs[i].scalar_type() == pt && projs[i].device() == p.device(),
                        op, ": projection of parameter ", i, " must be a contiguous ", pt,
                        " tensor of shape ", at::IntArrayRef(ps), ", got ",
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

}  // namespace

void check_apollo_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                         TensorList limiter_norms, TensorList steps, const ApolloConfig& cfg,
                         TensorList weight_scales) {
  check_apollo_lists("apollo_update_", params, grads, exp_avgs, exp_avg_sqs, projs, seeds,
                     limiter_norms, steps, cfg, nullptr, nullptr, nullptr, weight_scales);
}

void check_apollo_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                               TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                               TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                               at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                               const Tensor& stats, const ApolloConfig& cfg) {
  const char* op = "apollo_shard";
  TORCH_CHECK_VALUE(cfg.proj == "random", op, ": proj='svd' is not supported on sharded "
                    "(FSDP2) parameters: its refresh needs the whole gradient; use "
                    "proj='random'");
  check_apollo_lists(op, params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                     cfg, &offsets, &global_sizes, &shard_dims);
  TORCH_CHECK_VALUE(!cfg.rounding.stochastic() || params.empty() || !params[0].is_cuda(), op,
                    ": stochastic rounding is not implemented for sharded (FSDP2) parameters on "
                    "CUDA; train them in fp32 or bf16 rounded to nearest");
  int64_t want = 0;
  for (size_t i = 0; i < params.size(); ++i)
    want += apollo_shard_stats_numel(
        apollo_shard_global_shape(params[i], shard_dims[i], global_sizes[i]), cfg, shard_dims[i]);
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kDouble && stats.dim() == 1 &&
                        stats.is_contiguous() && stats.numel() == want &&
                        (stats.device().is_meta() || params.empty() ||
                         stats.device() == params[0].device()),
                    op, ": stats must be a contiguous 1-D float64 tensor on the parameters' "
                    "device of ", want,
                    " values (apollo_shard_stats_numel per tensor), got ", stats.scalar_type(),
                    " of shape ", stats.sizes(), " on ", stats.device());
}

void check_found_inf_refreshes_nothing(TensorList steps, const ApolloConfig& cfg,
                                       const std::optional<Tensor>& found_inf) {
  if (!found_inf.has_value()) return;
  for (size_t i = 0; i < steps.size(); ++i) {
    if (!steps[i].device().is_cpu()) continue;  // (a device counter is not read)
    const auto before = static_cast<int64_t>(steps[i].item<float>());
    TORCH_CHECK_VALUE(!Projector::refresh_due(before, cfg.update_proj_gap),
                      "apollo_: tensor ", i, " is due for a projection refresh at step ", before,
                      " (update_proj_gap ", cfg.update_proj_gap, "), which a call with found_inf "
                      "cannot make; make this call without found_inf (skip decided on the host)");
  }
}

namespace {

void apollo_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                const Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t rank, c10::string_view proj, c10::string_view proj_type,
                c10::string_view scale_type, int64_t update_proj_gap, double scale,
                double norm_growth_limit, bool scale_front, at::IntArrayRef rounding,
                OptionalTensors weight_scales, const std::optional<Tensor>& found_inf) {
  const ApolloConfig cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap,
                                              scale, norm_growth_limit, scale_front, rounding,
                                              params.size());
  check_found_inf("apollo_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, cfg, found_inf);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                        cfg, listed(weight_scales));
    check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
    return;
  }
  apollo_update_(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps, lr,
                 beta1, beta2, eps, weight_decay, cfg, listed(weight_scales));
}

void apollo_check(TensorList params, TensorList grads, TensorList exp_avgs,
                  TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                  TensorList limiter_norms, TensorList steps, const Tensor& lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t rank,
                  c10::string_view proj, c10::string_view proj_type, c10::string_view scale_type,
                  int64_t update_proj_gap, double scale, double norm_growth_limit,
                  bool scale_front, at::IntArrayRef rounding, OptionalTensors weight_scales,
                  const std::optional<Tensor>& found_inf) {
  const ApolloConfig cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap,
                                              scale, norm_growth_limit, scale_front, rounding,
                                              params.size());
  check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                      cfg, listed(weight_scales));
  check_found_inf("apollo_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, cfg, found_inf);
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void apollo_meta(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                 const Tensor&, double, double, double, double, int64_t rank,
                 c10::string_view proj, c10::string_view proj_type, c10::string_view scale_type,
                 int64_t update_proj_gap, double scale, double norm_growth_limit,
                 bool scale_front, at::IntArrayRef rounding, OptionalTensors weight_scales,
                 const std::optional<Tensor>& found_inf) {
  const auto cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap, scale,
                                      norm_growth_limit, scale_front, rounding, params.size());
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, projs, listed(weight_scales)})) {
    check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                        cfg, listed(weight_scales));
    check_found_inf("apollo_", found_inf, params, steps);
  }
}

void apollo_shard_check(MEMOPT_APOLLO_SHARD_ARGS) {
  const ApolloConfig cfg = MEMOPT_APOLLO_SHARD_CONFIG;
  check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                            steps, offsets, global_sizes, shard_dims, stats, cfg);
  check_found_inf("apollo_shard_update_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, cfg, found_inf);
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void apollo_shard_stats_cpu(MEMOPT_APOLLO_SHARD_ARGS) {
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
  check_found_inf("apollo_shard_stats_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, MEMOPT_APOLLO_SHARD_CONFIG, found_inf);
  apollo_shard_stats_(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                      offsets, global_sizes, shard_dims, stats, beta1, beta2, eps,
                      MEMOPT_APOLLO_SHARD_CONFIG);
}

void apollo_shard_update_cpu(MEMOPT_APOLLO_SHARD_ARGS) {
  check_found_inf("apollo_shard_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    apollo_shard_check(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                       offsets, global_sizes, shard_dims, stats, lr, beta1, beta2, eps,
                       weight_decay, rank, proj, proj_type, scale_type, update_proj_gap, scale,
                       norm_growth_limit, scale_front, rounding, found_inf);
    return;
  }
  check_found_inf_refreshes_nothing(steps, MEMOPT_APOLLO_SHARD_CONFIG, found_inf);
  apollo_shard_update_(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                       offsets, global_sizes, shard_dims, stats, lr, beta1, beta2, eps,
                       weight_decay, MEMOPT_APOLLO_SHARD_CONFIG);
}

void apollo_shard_meta(MEMOPT_APOLLO_SHARD_ARGS) {
  const auto cfg = MEMOPT_APOLLO_SHARD_CONFIG;
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, projs})) {
    check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                              steps, offsets, global_sizes, shard_dims, stats, cfg);
    check_found_inf("apollo_shard_update_", found_inf, params, steps);
  }
}

}  // namespace
}  // namespace memopt

TORCH_LIBRARY_FRAGMENT(memopt, m) {
  using memopt::define_op;
  define_op(m, "apollo_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] projs, Tensor(e!)[] seeds, "
        "Tensor(f!)[] limiter_norms, Tensor(g!)[] steps, Tensor lr, float beta1, float beta2, "
        "float eps, float weight_decay, int rank, str proj, str proj_type, str scale_type, "
        "int update_proj_gap, float scale, float norm_growth_limit, bool scale_front, "
        "int[] rounding=[], Tensor(h!)[]? weight_scales=None, Tensor? found_inf=None) -> ()",
            &memopt::apollo_check);
  // Sharded APOLLO (FSDP2): partial statistics into `stats`, then the update from their sum;
  // found_inf: apollo_'s, for the update (the statistics are made whatever it says).
#define MEMOPT_SHARD_TAIL                                                                     \
  "Tensor lr, float beta1, float beta2, float eps, float weight_decay, int rank, str proj, "  \
  "str proj_type, str scale_type, int update_proj_gap, float scale, float norm_growth_limit, " \
  "bool scale_front, int[] rounding=[], Tensor? found_inf=None) -> ()"
  define_op(m, "apollo_shard_stats_(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, "
        "Tensor[] exp_avg_sqs, Tensor[] projs, Tensor[] seeds, Tensor[] limiter_norms, "
        "Tensor[] steps, int[] offsets, int[] global_sizes, int[] shard_dims, Tensor(a!) stats, "
        MEMOPT_SHARD_TAIL, &memopt::apollo_shard_check);
  define_op(m, "apollo_shard_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] projs, Tensor(e!)[] seeds, "
        "Tensor(f!)[] limiter_norms, Tensor(g!)[] steps, int[] offsets, int[] global_sizes, "
        "int[] shard_dims, Tensor stats, " MEMOPT_SHARD_TAIL, &memopt::apollo_shard_check);
}

TORCH_LIBRARY_IMPL(memopt, CPU, m) {
  m.impl("apollo_", &memopt::apollo_cpu);
  m.impl("apollo_shard_stats_", &memopt::apollo_shard_stats_cpu);
  m.impl("apollo_shard_update_", &memopt::apollo_shard_update_cpu);
}

TORCH_LIBRARY_IMPL(memopt, Meta, m) {
  m.impl("apollo_", &memopt::apollo_meta);
  m.impl("apollo_shard_stats_", &memopt::apollo_shard_meta);
  m.impl("apollo_shard_update_", &memopt::apollo_shard_meta);
}
