// FRUGAL on row shards (FSDP2): left projections sum P[rows]^T G[rows] over the shards, the rest
// of the update is frugal_update_'s own loop (frugal.cpp, frugal_project.cpp). See frugal.h.
#include "frugal_impl.h"

namespace memopt {

int64_t frugal_shard_stats_numel(TensorList exp_avgs, at::IntArrayRef modes) {
  TORCH_CHECK_VALUE(exp_avgs.size() == modes.size(), "frugal_shard: ", exp_avgs.size(),
                    " exp_avgs for ", modes.size(), " modes");
  int64_t n = 0;
  for (size_t i = 0; i < modes.size(); ++i)
    if (modes[i] == static_cast<int64_t>(FrugalMode::ProjLeft)) n += exp_avgs[i].numel();
  return n;
}

void check_frugal_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                               TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                               at::IntArrayRef modes, const Tensor& stats, double proj_lr_scale,
                               double free_lr_scale, int64_t rule, bool read_data) {
  check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                      proj_lr_scale, free_lr_scale, rule, read_data);
  const int64_t want = frugal_shard_stats_numel(exp_avgs, modes);
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kDouble && stats.dim() == 1 &&
                        stats.is_contiguous() && stats.numel() == want &&
                        (stats.device().is_meta() || params.empty() ||
                         stats.device() == params[0].device()),
                    "frugal_shard: stats must be a contiguous 1-D float64 tensor on the "
                    "parameters' device of ", want,
                    " values (the moments' size of every left-projected tensor), got ",
                    stats.scalar_type(), " of shape ", stats.sizes(), " on ", stats.device());
}

void frugal_shard_stats_(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                         at::IntArrayRef modes, const Tensor& stats, double proj_lr_scale,
                         double free_lr_scale, int64_t rule) {
  check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                            proj_lr_scale, free_lr_scale, rule);
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "frugal_shard_stats_: no kernel for device ",
              params[0].device(), " in this build");
  Workspace::Lease lease(Workspace::of(params[0].device()));
  int64_t at = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (modes[i] != static_cast<int64_t>(FrugalMode::ProjLeft)) continue;
    const Tensor &p = params[i], &m = exp_avgs[i];
    lease.reserve(cpu::staging_bytes(grads[i]) + frugal_projected_bytes(p, subspaces[i], m));
    const Tensor g = cpu::contiguous_grad(lease, grads[i]);
    frugal_left_partial(p, g, subspaces[i], stats.narrow(0, at, m.numel()).view(m.sizes()), lease);
    at += m.numel();
  }
}

void frugal_shard_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                          at::IntArrayRef modes, const Tensor& stats, const Tensor& lr_t,
                          double beta1, double beta2, double eps, double weight_decay,
                          double proj_lr_scale, double free_lr_scale, int64_t rule,
                          at::IntArrayRef rounding) {
  check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                            proj_lr_scale, free_lr_scale, rule);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  frugal_update_loop(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, lr, beta1,
                     beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule, &stats,
                     Rounding(rounding, params.size(), "frugal_shard_update_"));
}

}  // namespace memopt
