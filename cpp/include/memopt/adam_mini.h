// Adam-mini (Zhang et al., arXiv 2406.16793): Adam with one second moment per Hessian block.
#pragma once

#include "memopt/common.h"
#include "memopt/layout.h"
#include "memopt/partition.h"

namespace memopt {

// Fused multi-tensor Adam-mini update. For every block b of tensor i (blocks from `specs[i]`):
//   step += 1; v_b = b2*v_b + (1-b2)*mean_{j in b} g_j^2
//   p *= 1 - lr*wd; m = lerp(m, g, 1-b1); p -= lr/(1-b1^t) * m / (sqrt(v_b)/sqrt(1-b2^t) + eps)
// exp_avg_sqs[i] is 1-D with num_blocks(specs[i]) entries, in segment then row-major tile order.
void adam_mini_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                       TensorList exp_avg_sqs, TensorList steps,
                       const std::vector<BlockSpec>& specs, const Tensor& lr, double beta1,
                       double beta2, double eps, double weight_decay,
                       at::IntArrayRef rounding = {}, TensorList weight_scales = {},
                       TensorList state_scales = {});

// state_scales: [] or the block scales of 8-bit m (int8 codes; common.h, memopt/state_codes.h);
// v, one entry per block, stays float.
// Validation only (shared by the CPU and Meta kernels). int8 weights (weight_scales, common.h)
// need every block row to be whole quantization groups.
void check_adam_mini_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                            TensorList exp_avg_sqs, TensorList steps,
                            const std::vector<BlockSpec>& specs, TensorList weight_scales = {},
                            TensorList state_scales = {});

// Adam-mini on shards (cpp/src/adam_mini_shard.cpp). `shards` holds per tensor [lo, numel]:
// the tensors are elements [lo, lo + tensor.numel()) of full tensors of `numel` elements whose
// blocks are `specs`. block_sums_ adds each shard's sum of g^2 per full block to `sums` (float64,
// blocks of all tensors in order); once `sums` holds the totals over all shards, shard_update_
// updates every block's v (exp_avg_sqs hold all blocks of the full tensor) and the shard's
// elements, exactly as adam_mini_update_ does on the full tensor.
void adam_mini_block_sums_(TensorList grads, const std::vector<BlockSpec>& specs,
                           at::IntArrayRef shards, const Tensor& sums);
void adam_mini_shard_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                             TensorList exp_avg_sqs, TensorList steps,
                             const std::vector<BlockSpec>& specs, at::IntArrayRef shards,
                             const Tensor& sums, const Tensor& lr, double beta1, double beta2,
                             double eps, double weight_decay, at::IntArrayRef rounding = {},
                             TensorList state_scales = {});
void check_adam_mini_block_sums_inputs(TensorList grads, const std::vector<BlockSpec>& specs,
                                      at::IntArrayRef shards, const Tensor& sums);
// Stochastic rounding of sharded parameters is implemented on the CPU only (the CUDA shard op's
// update is ATen arithmetic); raises for CUDA parameters with it.
void check_shard_rounding(TensorList params, const Rounding& rounding);
void check_adam_mini_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                                  TensorList exp_avg_sqs, TensorList steps,
                                  const std::vector<BlockSpec>& specs, at::IntArrayRef shards,
                                  const Tensor& sums, TensorList state_scales = {});
// Tensor i's v: contiguous, 1-D, one entry per block of `spec`, on the parameter's device, in
// exp_avg's dtype (8-bit exp_avg, `coded`: float32 or the parameter's value dtype).
void check_block_v(const char* op, size_t i, const Tensor& v, const BlockSpec& spec,
                   const Tensor& param, const Tensor& grad, const Tensor& exp_avg, bool coded);

// How the Adam-mini kernels (adam_mini_, the shard ops; CPU and CUDA) see a non-contiguous
// parameter (memopt/layout.h): a dense one is stepped in its memory order, without a copy, when
// every block is a union of whole runs (per-output-channel blocks of a channels_last conv weight,
// one block per tensor); with elementwise blocks (plain Adam: SlimAdam's uncompressed tensors)
// also in memory order, its 1-D v (kept in logical order, as checkpoints and second_moment()
// expose it) staged in that order, a state-sized copy. Anything else (blocks that cut a run,
// e.g. per-row blocks of a transposed weight; gapped views) is staged. shards: the shard ops'
// [lo, numel] pairs (a shard's runs must start on a run of the full tensor), empty for adam_mini_.
class AdamMiniLayouts {
 public:
  AdamMiniLayouts(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                  const std::vector<BlockSpec>& specs, at::IntArrayRef shards = {},
                  bool params_written = true);
  const std::vector<Tensor>& params() const { return layouts_.params(); }
  const std::vector<Tensor>& exp_avgs() const { return layouts_.written(0); }
  const std::vector<Tensor>& exp_avg_sqs() const { return v_seen_; }
  std::vector<Tensor> follow(TensorList grads) const { return layouts_.follow(grads); }
  void write_back() { layouts_.write_back(); }

 private:
  std::vector<Tensor> v_as_params_;  // elementwise tensors' v viewed as the parameter
  ParamLayouts layouts_;
  std::vector<Tensor> v_seen_;
};

}  // namespace memopt
