// Adam-mini / SlimAdam on CUDA (the memopt::adam_mini_ op). Two paths, chosen per segment by
// adam_mini_glue.cpp:
//
//  * Fused (this file): a tile (block) that is one contiguous run of at most 16384 elements
//    (per-row, per-token, per-neuron blocks, norms, SlimAdam's fan-in means) is reduced and
//    updated by one warp or one CTA, which keeps the tile's gradient in registers between its
//    sum of squares and its update. Every byte moves once: read p, g, m, write p, m, and one v
//    per tile: 20 bytes per fp32 parameter, the floor.
//  * Two-pass (adam_mini_two_pass.cu): larger runs (per-head blocks of Q/K, whole tensors) and
//    every tiling that is not a run (per-column blocks of transposed Conv1D weights, SlimAdam's
//    fan-out means, interleaved fused-QKV parts): partial sums into a small scratch buffer,
//    one thread per block for v and its factor, then the update. The gradient is read twice:
//    24 bytes per fp32 parameter.
//
// Elementwise segments (biases) are plain Adam and run on adamw.cu's kernel (28 bytes/param).
#include "adam_mini.cuh"

namespace memopt::cuda {
namespace {

// One tile per group of kGroup threads (a warp, or the whole CTA); each thread holds
// kFloatHold gradient values of the tile (half as many doubles: float64 parameters have half
// the capacity, AM::fused_capacity). Launch bounds cap registers at 64 for every variant (1024
// threads' worth per SM), which these holds fit without spilling.
template <typename P, typename S, int kThreads, int kGroup, int kFloatHold>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    fused_kernel(const __grid_constant__ AM prm) {
  using C = opmath_t<P>;
  constexpr int kHold = kFloatHold * 4 / static_cast<int>(sizeof(C));  // the same bytes
  constexpr int kGroups = kThreads / kGroup;
  const int lane = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / kGroup;
  if (step_skipped(prm.device)) return;  // uniform over the launch
  if constexpr (kGroups > 1) {
    if (unit >= prm.n_units) return;  // a warp past the last tile (warp groups never sync)
  }
  const AdamMiniSeg& sg = seg_of_unit(prm, unit);
  const StepScalars sc = seg_scalars(prm, sg);
  const int64_t tile = unit - sg.unit_begin;
  const int len = static_cast<int>(sg.tile_rows * sg.cols);  // <= 16384 (the glue's choice)
  const int64_t base = sg.offset + tile * sg.tile_rows * sg.row_stride;
  const P* g = static_cast<const P*>(sg.g) + base;

  // Pass 1: the tile's gradient into registers, and its sum of squares.
  C held[kHold];
  double acc = 0.0;
#pragma unroll
  for (int k = 0; k < kHold; ++k) {
    const int e = k * kGroup + lane;
    held[k] = e < len ? load<C>(g + e) : C(0);
  }
#pragma unroll
  for (int k = 0; k < kHold; ++k) acc += square(held[k]);

  // The block's v and factor, by one thread, then shared with the group.
  auto factor = [&](double sum) {
    return block_factor<S, C>(static_cast<S*>(sg.v) + tile, sum, static_cast<double>(len), sc,
                              prm.beta2, prm.eps);
  };
  C f = 0;
  if constexpr (kGroups > 1) {
    const double sum = warp_sum(acc);
    if (lane == 0) f = factor(sum);
    f = __shfl_sync(0xffffffffu, f, 0);
  } else {
    __shared__ double scratch[32];
    __shared__ C shared_factor;
    const double sum = block_sum(acc, scratch);
    if (lane == 0) shared_factor = factor(sum);
    __syncthreads();
    f = shared_factor;
  }

  // Pass 2: the update from the held gradient, a few elements' loads in flight at a time
  // (four floats, two doubles: what the registers left over hold).
  constexpr int kBatch = sizeof(C) == 8 ? 2 : 4;
  P* p = static_cast<P*>(sg.p) + base;
  S* m = static_cast<S*>(sg.m) + base;
  const C decay = static_cast<C>(sc.decay), b1c = static_cast<C>(1.0 - prm.beta1);
#pragma unroll
  for (int k0 = 0; k0 < kHold; k0 += kBatch) {
    int at[kBatch];
    bool ok[kBatch];
    C gj[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      at[u] = (k0 + u) * kGroup + lane;
      ok[u] = at[u] < len;
      gj[u] = held[k0 + u];
    }
    update_n<kBatch>(p, m, at, ok, gj, decay, b1c, f, prm, sc.round_key, base);
  }
}

template <typename P, typename S, int kThreads, int kGroup, int kFloatHold>
int launch_fused(const AM& prm, cudaStream_t stream) {
  static_assert(kFloatHold % 4 == 0, "the update loop takes four floats (two doubles) at a time");
  constexpr int64_t kGroups = kThreads / kGroup;
  const int64_t grid = (prm.n_units + kGroups - 1) / kGroups;
  fused_kernel<P, S, kThreads, kGroup, kFloatHold><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(prm);
  return last_launch_error();
}

// The capacities the glue plans with (AM::fused_capacity) are what the variants hold.
static_assert(AM::fused_capacity(AM::kWarp, Dtype::kFloat32) == 32 * 8);
static_assert(AM::fused_capacity(AM::kCta256, Dtype::kFloat32) == 256 * 16);
static_assert(AM::fused_capacity(AM::kCta512, Dtype::kFloat32) == 512 * 16);
static_assert(AM::fused_capacity(AM::kCta1024, Dtype::kFloat32) == 1024 * 16);
static_assert(AM::fused_capacity(AM::kCta1024, Dtype::kFloat64) == 1024 * 8);

}  // namespace

int launch_adam_mini(const AM& prm, Stream stream) {
  if (prm.n_units == 0) return 0;
  const auto st = static_cast<cudaStream_t>(stream);
  if (prm.path == AM::kTwoPass) return launch_adam_mini_two_pass(prm, st);
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    switch (prm.path) {
      case AM::kWarp: return launch_fused<P, S, 256, 32, 8>(prm, st);
      case AM::kCta256: return launch_fused<P, S, 256, 256, 16>(prm, st);
      case AM::kCta512: return launch_fused<P, S, 512, 512, 16>(prm, st);
      case AM::kCta1024: return launch_fused<P, S, 1024, 1024, 16>(prm, st);
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  });
}

}  // namespace memopt::cuda
