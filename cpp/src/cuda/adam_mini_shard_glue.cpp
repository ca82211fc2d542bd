// memopt::adam_mini_block_sums_ and adam_mini_shard_update_ for the CUDA dispatch key: Adam-mini
// on FSDP2 shards of GPU tensors. The layout (which tiles of the full tensor's blocks a shard
// holds) is cpp/src/adam_mini_shard.cpp's shard_pieces. No parameter-sized temporary is made:
// the block statistics (one value per block) are the only extra memory. The block sums are ATen
// reductions on strided views of each piece, v and the block factors ATen arithmetic on
// block-sized vectors, and the update of p and m one launch per piece
// (cuda/adam_mini_shard.cu), which returns at once under a set found_inf. 8-bit m takes two
// launches per piece and one per tensor for its scales; its only scratch is one uint32 per code
// block (the new block maxima). The fused
// single-tensor kernels (adam_mini.cu) stay the path for unsharded tensors.
#include <torch/library.h>

#include "launch.h"
#include "memopt/adam_mini.h"

namespace memopt::cuda {
namespace {

// The piece's elements of a contiguous tensor as (bands, tile_rows, tiles, tile_cols).
Tensor tiles(const Tensor& t, const Segment& s) {
  return t.as_strided({s.rows / s.tile_rows, s.tile_rows, s.tiles_per_row(), s.tile_cols},
                      {s.tile_rows * s.row_stride, s.row_stride, s.tile_cols, 1},
                      t.storage_offset() + s.offset);
}

// The entries of a per-block vector that the piece's tiles belong to, (bands, tiles) or
// broadcast over each tile's elements.
Tensor of_tiles(const Tensor& per_block, const ShardPiece& pc, bool broadcast) {
  const Segment& s = pc.seg;
  const int64_t off = per_block.storage_offset() + pc.block0;
  if (!broadcast)
    return per_block.as_strided({s.rows / s.tile_rows, s.tiles_per_row()}, {pc.band_blocks, 1}, off);
  return per_block.as_strided({s.rows / s.tile_rows, 1, s.tiles_per_row(), 1},
                              {pc.band_blocks, 0, 1, 0}, off);
}

void block_sums_kernels(TensorList grads, at::IntArrayRef blocks, at::IntArrayRef shards,
                     const Tensor& sums) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(grads.size()));
  check_adam_mini_block_sums_inputs(grads, specs, shards, sums);
  if (grads.empty()) return;
  check_same_cuda_device("adam_mini_block_sums_", {grads, {sums}});
  const c10::DeviceGuard guard(grads[0].device());
  int64_t base = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor g = contiguous_grad(grads[i]);
    const Tensor mine = sums.narrow(0, base, num_blocks(specs[i]));
    for (const auto& pc : shard_pieces(specs[i], shards[2 * i], shards[2 * i] + g.numel()))
      of_tiles(mine, pc, false)
          .add_(at::linalg_vector_norm(tiles(g, pc.seg), 2, at::IntArrayRef{1, 3}, false,
                                       at::kDouble)
                    .square_());
    base += num_blocks(specs[i]);
  }
}

void shard_update_kernels(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                          at::IntArrayRef shards, const Tensor& sums, const Tensor& lr_t,
                          double beta1, double beta2, double eps, double weight_decay,
                          TensorList state_scales, const std::optional<Tensor>& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  check_adam_mini_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs, shards, sums,
                               state_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  check_same_cuda_device("adam_mini_shard_update_", {params, grads, exp_avgs, exp_avg_sqs, {sums}});
  const c10::DeviceGuard guard(params[0].device());
  const Stream stream = current_stream(params[0].device());
  const std::vector<Tensor> g = contiguous_grads(grads);
  // The step counters: advanced here, or (found_inf) on the device, whose StepScalars the
  // factors below read as 0-dim tensors, so nothing is read back.
  const StepPlan plan = plan_steps(steps, lr, beta1, beta2, weight_decay, AdamWRule::kTorch,
                                   Rounding(),  // (check_shard_rounding: nearest)
                                   found_inf, stream);
  const Tensor skip = found_inf.has_value() ? found_inf->ne(0) : Tensor();
  int64_t base = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    // v of every block in float64 (rounded to its dtype once, as the CPU op does), then each
    // block's step factor lr/(1-b1^t) / (sqrt(v)/sqrt(1-b2^t) + eps) in the compute type.
    const Tensor v64 = v.to(at::kDouble, false, /*copy=*/true).mul_(beta2);
    int64_t b = 0;
    for (const auto& seg : specs[i]) {
      v64.narrow(0, b, seg.num_blocks())
          .add_(sums.narrow(0, base + b, seg.num_blocks()), (1.0 - beta2) / seg.block_numel());
      b += seg.num_blocks();
    }
    v.copy_(skip.defined() ? at::where(skip, v, v64) : v64);  // (block-sized)
    const auto compute = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor factor = v.to(compute, false, /*copy=*/true).sqrt_();
    if (plan.buffer.defined()) {  // [decay, step_size, bc2_sqrt, key] per tensor, on the device
      const Tensor s = plan.buffer.view({-1, 4})[static_cast<int64_t>(i)];
      factor.div_(s[2]).add_(eps);
      factor = s[1].to(compute).div(factor);
    } else {
      factor.div_(plan.of(i).bc2_sqrt).add_(eps);
      factor = at::full_like(factor, plan.of(i).step_size).div_(factor);
    }
    AdamMiniShardParams prm{};
    prm.param_dtype = dtype_of(p.scalar_type());
    const bool coded = coded_state(state_scales, params.size(), 0, i);
    prm.state_dtype = coded ? Dtype::kFloat32 : dtype_of(m.scalar_type());  // (codes: dispatch's)
    prm.p = p.data_ptr(), prm.g = g[i].data_ptr(), prm.m = m.data_ptr();
    prm.factor = factor.data_ptr();
    prm.found_inf = plan.device.found_inf;
    prm.decay = 1.0 - lr * weight_decay, prm.b1c = 1.0 - beta1;
    Tensor absmax;  // 8-bit m: the new max |m| of each code block, as float32 bits
    if (coded) {
      const Tensor& scales = state_scale(state_scales, params.size(), 0, i);
      absmax = at::zeros({scales.numel()}, scales.options().dtype(at::kInt));
      prm.m_scales = scales.data_ptr<float>();
      prm.m_absmax = reinterpret_cast<unsigned*>(absmax.data_ptr<int32_t>());
    }
    const auto pieces = shard_pieces(specs[i], shards[2 * i], shards[2 * i] + p.numel());
    for (int pass = 1; pass <= (coded ? 2 : 1); ++pass)
      for (const auto& pc : pieces) {
        const Segment& sg = pc.seg;
        prm.offset = sg.offset, prm.rows = sg.rows, prm.row_stride = sg.row_stride;
        prm.tile_rows = sg.tile_rows, prm.tiles_per_row = sg.tiles_per_row();
        prm.tile_cols = sg.tile_cols, prm.block0 = pc.block0, prm.band_blocks = pc.band_blocks;
        prm.pass = pass;
        check_launch(launch_adam_mini_shard(prm, stream), "adam_mini_shard_update_");
      }
    if (coded)
      check_launch(launch_adam_mini_shard_scales(plan.device.found_inf, prm.m_absmax,
                                                 state_scale(state_scales, params.size(), 0, i)
                                                     .data_ptr<float>(),
                                                 absmax.numel(), stream),
                   "adam_mini_shard_update_");
    base += num_blocks(specs[i]);
  }
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void block_sums_cuda(TensorList grads, at::IntArrayRef blocks, at::IntArrayRef shards,
                     const Tensor& sums) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(grads.size()));
  check_adam_mini_block_sums_inputs(grads, specs, shards, sums);
  // Summed in the memory order shard_update_cuda steps the parameter in (read only).
  AdamMiniLayouts layouts(grads, {}, {}, specs, shards, /*params_written=*/false);
  block_sums_kernels(layouts.params(), blocks, shards, sums);
}

void shard_update_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                       TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                       at::IntArrayRef shards, const Tensor& sums, const Tensor& lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       at::IntArrayRef rounding, OptionalTensors state_scales,
                       const std::optional<Tensor>& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  check_adam_mini_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs, shards, sums,
                               listed(state_scales));
  check_shard_rounding(params, Rounding(rounding, params.size(), "adam_mini_shard_update_"));
  check_found_inf("adam_mini_shard_update_", found_inf, params, steps);
  AdamMiniLayouts layouts(params, exp_avgs, exp_avg_sqs, specs, shards);
  shard_update_kernels(layouts.params(), layouts.follow(grads), layouts.exp_avgs(),
                       layouts.exp_avg_sqs(), steps, blocks, shards, sums, lr, beta1, beta2, eps,
                       weight_decay, listed(state_scales), found_inf);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) {
  m.impl("adam_mini_block_sums_", &memopt::cuda::block_sums_cuda);
  m.impl("adam_mini_shard_update_", &memopt::cuda::shard_update_cuda);
}
