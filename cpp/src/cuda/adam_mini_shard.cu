// Adam-mini's update of one piece of an FSDP2 shard (kernel_params.h AdamMiniShardParams): one
// pass over p, g and m, the arithmetic of the CPU op's tile-row loops (cpp/src/cpu_loops.h
// block_update_span), and a return before any write when the step's found_inf is set, so a
// skipped step is decided on the device.
#include "cuda_common.cuh"

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
    S* m = static_cast<S*>(prm.m) + at;
    const C mj = lerp(load<C>(m), load<C>(static_cast<const P*>(prm.g) + at), b1c);
    store(p, load<C>(p) * decay - f * mj);
    store(m, mj);
  }
}

}  // namespace

int launch_adam_mini_shard(const AdamMiniShardParams& prm, Stream stream) {
  const int64_t n = prm.rows * prm.tiles_per_row * prm.tile_cols;
  if (n == 0) return 0;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    shard_kernel<P, S><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  });
}

}  // namespace memopt::cuda
