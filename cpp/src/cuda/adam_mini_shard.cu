// Adam-mini's update of one piece of an FSDP2 shard (kernel_params.h AdamMiniShardParams): one
// pass over p, g and m, the arithmetic of the CPU op's tile-row loops (cpp/src/cpu_loops.h
// block_update_span), and a return before any write when the step's found_inf is set, so a
// skipped step is decided on the device. With 8-bit m, two passes and a scales launch (the
// header says why): the CPU op's coded_shard_update decodes, steps and encodes a span in one
// go, which a kernel could only do for code blocks inside one piece.
#include "cuda_common.cuh"
#include "memopt/state_codes.h"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 256;

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) shard_kernel(const AdamMiniShardParams prm) {
  if (prm.found_inf != nullptr && *prm.found_inf != 0.0f) return;
  using C = opmath_t<P>;
  const int64_t row_len = prm.tiles_per_row * prm.tile_cols, n = prm.rows * row_len;
  const C decay = prm.decay, b1c = prm.b1c;
  const C* factor = static_cast<const C*>(prm.factor);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e / row_len, c = e - r * row_len;
    const int64_t at = prm.offset + r * prm.row_stride + c;
    const C f = factor[prm.block0 + (r / prm.tile_rows) * prm.band_blocks + c / prm.tile_cols];
    P* p = static_cast<P*>(prm.p) + at;
    const P* g = static_cast<const P*>(prm.g) + at;
    if (prm.m_scales == nullptr) {
      S* m = static_cast<S*>(prm.m) + at;
      const C mj = lerp(load<C>(m), load<C>(g), b1c);
      store(p, load<C>(p) * decay - f * mj);
      store(m, mj);
      continue;
    }
    // 8-bit m: decoded with the old scale of its block, as the CPU op's span buffer holds it
    // (float), stepped in the compute type, encoded from float32.
    int8_t* code = static_cast<int8_t*>(prm.m) + at;
    const int64_t blk = at / kStateBlock;
    const C mj = lerp(static_cast<C>(moment_decode(*code, prm.m_scales[blk])), load<C>(g), b1c);
    const float mf = static_cast<float>(mj);
    if (prm.pass == 1) {
      store(p, load<C>(p) * decay - f * mj);
      // Non-negative floats order as their bits, and a NaN's above an infinity's: the max of
      // the bits is the block's max |m|, or non-finite when any is (scale NaN, as the CPU's).
      atomicMax(prm.m_absmax + blk, __float_as_uint(fabsf(mf)));
    } else {
      const float s = state_block_scale(__uint_as_float(prm.m_absmax[blk]));
      *code = state_block_empty(s) ? int8_t{0} : moment_code(mf, 1.0f / s);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    scales_kernel(const float* found_inf, const unsigned* absmax, float* scales, int64_t n) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * kThreads)
    scales[k] = state_block_scale(__uint_as_float(absmax[k]));
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace

int launch_adam_mini_shard(const AdamMiniShardParams& prm, Stream stream) {
  const int64_t n = prm.rows * prm.tiles_per_row * prm.tile_cols;
  if (n == 0) return 0;
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    shard_kernel<P, S><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  });
}

int launch_adam_mini_shard_scales(const float* found_inf, const unsigned* absmax, float* scales,
                                  int64_t blocks, Stream stream) {
  if (blocks == 0) return 0;
  scales_kernel<<<grid_for(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      found_inf, absmax, scales, blocks);
  return last_launch_error();
}

}  // namespace memopt::cuda
