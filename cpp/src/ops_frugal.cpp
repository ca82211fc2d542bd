// torch op registration for FRUGAL: torch.ops.memopt.frugal_ (CPU and Meta kernels; CUDA in
// cuda/frugal_glue.cpp) and its row-sharded pair frugal_shard_stats_ / frugal_shard_update_
// (CUDA in cuda/frugal_shard_glue.cpp).
#include <torch/library.h>

#include "define_op.h"
#include "memopt/frugal.h"

namespace memopt {
namespace {

void frugal_check(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                  TensorList steps, TensorList subspaces, at::IntArrayRef modes, const Tensor& lr,
                  double beta1, double beta2, double eps, double weight_decay,
                  double proj_lr_scale, double free_lr_scale, int64_t rule,
                  at::IntArrayRef rounding, OptionalTensors weight_scales,
                  OptionalTensors state_scales, const std::optional<Tensor>& found_inf) {
  check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                      proj_lr_scale, free_lr_scale, rule, true, listed(weight_scales),
                      listed(state_scales));
  check_found_inf("frugal_update_", found_inf, params, steps);
  Rounding(rounding, params.size(), "frugal_update_");
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void frugal_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, TensorList subspaces, at::IntArrayRef modes, const Tensor& lr,
                double beta1, double beta2, double eps, double weight_decay, double proj_lr_scale,
                double free_lr_scale, int64_t rule, at::IntArrayRef rounding,
                OptionalTensors weight_scales, OptionalTensors state_scales,
                const std::optional<Tensor>& found_inf) {
  check_found_inf("frugal_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    frugal_check(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, lr, beta1, beta2,
                 eps, weight_decay, proj_lr_scale, free_lr_scale, rule, rounding, weight_scales,
                 state_scales, found_inf);
    return;
  }
  frugal_update_(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, lr, beta1, beta2,
                 eps, weight_decay, proj_lr_scale, free_lr_scale, rule, rounding,
                 listed(weight_scales), listed(state_scales));
}

void frugal_meta(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList steps, TensorList subspaces, at::IntArrayRef modes, const Tensor&,
                 double, double, double, double, double proj_lr_scale, double free_lr_scale,
                 int64_t rule, at::IntArrayRef rounding, OptionalTensors weight_scales,
                 OptionalTensors state_scales, const std::optional<Tensor>& found_inf) {
  Rounding(rounding, params.size(), "frugal_update_");
  TORCH_CHECK_VALUE(grads.size() == params.size() && subspaces.size() == params.size() &&
                        modes.size() == params.size(),
                    "frugal_update_: list lengths differ");
  if (!has_symbolic_shapes(
          {params, grads, exp_avgs, exp_avg_sqs, subspaces, listed(weight_scales)})) {
    check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                        proj_lr_scale, free_lr_scale, rule, /*read_data=*/false,
                        listed(weight_scales), listed(state_scales));
    check_found_inf("frugal_update_", found_inf, params, steps);
  }
}

void frugal_shard_check(MEMOPT_FRUGAL_SHARD_ARGS) {
  Rounding(rounding, params.size(), "frugal_shard_update_");
  check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                            proj_lr_scale, free_lr_scale, rule);
  check_found_inf("frugal_shard_update_", found_inf, params, steps);
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void frugal_shard_stats_cpu(MEMOPT_FRUGAL_SHARD_ARGS) {
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);  // before stats is written
  frugal_shard_stats_(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                      proj_lr_scale, free_lr_scale, rule);
}

void frugal_shard_update_cpu(MEMOPT_FRUGAL_SHARD_ARGS) {
  check_found_inf("frugal_shard_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    frugal_shard_check(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats, lr,
                       beta1, beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule,
                       rounding, found_inf);
    return;
  }
  frugal_shard_update_(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats, lr,
                       beta1, beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule,
                       rounding);
}

void frugal_shard_meta(MEMOPT_FRUGAL_SHARD_ARGS) {
  Rounding(rounding, params.size(), "frugal_shard_update_");
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, subspaces})) {
    check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                              proj_lr_scale, free_lr_scale, rule, /*read_data=*/false);
    check_found_inf("frugal_shard_update_", found_inf, params, steps);
  }
}

}  // namespace
}  // namespace memopt

TORCH_LIBRARY_FRAGMENT(memopt, m) {
  using memopt::define_op;
  define_op(m, "frugal_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor[] subspaces, int[] modes, "
        "Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
        "float proj_lr_scale, float free_lr_scale, int rule, int[] rounding=[], "
        "Tensor(e!)[]? weight_scales=None, Tensor(f!)[]? state_scales=None, "
        "Tensor? found_inf=None) -> ()",
        &memopt::frugal_check);
  // Row-sharded FRUGAL (FSDP2): partial P^T G into `stats`, then the update from their sum;
  // found_inf: the update's (the statistics are read-only work, made whatever it says).
#define MEMOPT_FRUGAL_SHARD_TAIL                                                              \
  "Tensor lr, float beta1, float beta2, float eps, float weight_decay, float proj_lr_scale, "  \
  "float free_lr_scale, int rule, int[] rounding=[], Tensor? found_inf=None) -> ()"
  define_op(m, "frugal_shard_stats_(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, "
        "Tensor[] exp_avg_sqs, Tensor[] steps, Tensor[] subspaces, int[] modes, "
        "Tensor(a!) stats, " MEMOPT_FRUGAL_SHARD_TAIL, &memopt::frugal_shard_check);
  define_op(m, "frugal_shard_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor[] subspaces, int[] modes, "
        "Tensor stats, " MEMOPT_FRUGAL_SHARD_TAIL, &memopt::frugal_shard_check);
}

TORCH_LIBRARY_IMPL(memopt, CPU, m) {
  m.impl("frugal_", &memopt::frugal_cpu);
  m.impl("frugal_shard_stats_", &memopt::frugal_shard_stats_cpu);
  m.impl("frugal_shard_update_", &memopt::frugal_shard_update_cpu);
}

TORCH_LIBRARY_IMPL(memopt, Meta, m) {
  m.impl("frugal_", &memopt::frugal_meta);
  m.impl("frugal_shard_stats_", &memopt::frugal_shard_meta);
  m.impl("frugal_shard_update_", &memopt::frugal_shard_meta);
}
