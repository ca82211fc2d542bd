// memopt::frugal_shard_stats_ and frugal_shard_update_ for the CUDA dispatch key: FRUGAL on FSDP2
// row shards of GPU tensors, frugal_shard.cpp's contract (frugal.h). The statistics are each
// left projection's P[rows]^T G[rows] (one GEMM in the compute type: fp32 for fp32/bf16/fp16,
// fp64 for fp64, TF32 off, r x cols sized), written as float64 into `stats` on the parameters'
// device (NCCL sums it there); the update is frugal_'s CUDA update (frugal_glue.cpp) with those
// tensors' projected gradient read from the summed stats.
#include <torch/library.h>

#include <ATen/Context.h>

#include "frugal_glue.h"
#include "launch.h"

namespace memopt::cuda {
namespace {

// The CPU op's checks, then that every tensor the GEMMs read is on the parameters' device.
void check(const char* op, MEMOPT_FRUGAL_SHARD_ARGS) {
  check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, stats,
                            proj_lr_scale, free_lr_scale, rule);
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
  check_found_inf(op, found_inf, params, steps);
  if (!params.empty())
    check_same_cuda_device(op, {params, grads, exp_avgs, exp_avg_sqs, subspaces, {stats}});
}

void stats_cuda(MEMOPT_FRUGAL_SHARD_ARGS) {
  check("frugal_shard_stats_", params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
        stats, lr, beta1, beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule, rounding,
        found_inf);
  if (params.empty()) return;
  const c10::DeviceGuard guard(params[0].device());
  const at::NoTF32Guard no_tf32;  // fp32 products stay IEEE fp32, as the update's
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (modes[i] != static_cast<int64_t>(FrugalMode::ProjLeft)) continue;
    const Tensor& m = exp_avgs[i];
    const Tensor out = stats.narrow(0, offset, m.numel()).view(m.sizes());
    offset += m.numel();
    if (params[i].size(0) == 0) {  // an empty shard contributes nothing
      out.zero_();
      continue;
    }
    const auto ct = params[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    out.copy_(gemm(subspaces[i].t(), contiguous_grad(grads[i]), ct));  // (r, rows) x (rows, cols)
  }
}

void update_cuda(MEMOPT_FRUGAL_SHARD_ARGS) {
  check("frugal_shard_update_", params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
        stats, lr, beta1, beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule, rounding,
        found_inf);
  frugal_run(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, read_lr(lr), beta1,
             beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule, &stats,
             Rounding(rounding, params.size(), "frugal_shard_update_"), {}, {}, found_inf);
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) {
  m.impl("frugal_shard_stats_", &memopt::cuda::stats_cuda);
  m.impl("frugal_shard_update_", &memopt::cuda::update_cuda);
}
