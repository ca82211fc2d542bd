// Device helpers shared by the Adam-mini kernels (adam_mini.cu, adam_mini_two_pass.cu): segment
// lookup, the per-block factor and the element update, each in the operation order of the CPU
// kernel (adam_mini.cpp's block_factor, cpu::block_update_span), so that float32 results match
// it within rounding. Sums of squares are accumulated in double, as cpu::sum_squares does: a
// block of half a million squares then loses nothing before v is rounded to float, and the only
// difference from the CPU is the order of the double additions, invisible after that rounding.
#pragma once

#include "cuda_common.cuh"

namespace memopt::cuda {

using AM = AdamMiniParams;

// The StepScalars of segment `sg`'s tensor (kernel_params.h DeviceSteps).
__device__ __forceinline__ StepScalars seg_scalars(const AM& prm, const AdamMiniSeg& sg) {
  return step_scalars(prm.device, sg.tensor, sg.s);
}

// The segment that unit `u` belongs to. A launch has at most kMaxSegs segments, so a short
// scan of the kernel's parameter space (uniform across a CTA: a broadcast) is enough.
__device__ __forceinline__ const AdamMiniSeg& seg_of_unit(const AM& prm, int64_t u) {
  int s = 0;
  while (s + 1 < prm.n_segs && prm.seg[s + 1].unit_begin <= u) ++s;
  return prm.seg[s];
}

__device__ __forceinline__ const AdamMiniSeg& seg_of_tile(const AM& prm, int64_t t) {
  int s = 0;
  while (s + 1 < prm.n_segs && prm.seg[s + 1].tile_begin <= t) ++s;
  return prm.seg[s];
}

template <typename C>
__device__ __forceinline__ double square(C x) {
  const double d = static_cast<double>(x);
  return d * d;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// v_b = b2*v_b + (1-b2)*mean(g^2) stored, and the block's factor
// step_size / (sqrt(v_b)/sqrt(1-b2^t) + eps): the CPU's SegmentKernel::block_factor.
// One thread per block calls it (it reads and writes v_b).
template <typename S, typename C>
__device__ __forceinline__ C block_factor(S* v, double sum_sq, double block_numel,
                                          const StepScalars& sc, double beta2, double eps) {
  const C vb = static_cast<C>(beta2) * load<C>(v) +
               static_cast<C>((1.0 - beta2) * (sum_sq / block_numel));
  store(v, vb);
  return static_cast<C>(sc.step_size) /
         (sqrt(round_to<S>(vb)) / static_cast<C>(sc.bc2_sqrt) + static_cast<C>(eps));
}

// Up to N elements (those with ok[u]) of p and m updated with the gradient gj and one factor
// per element: all loads issued before any store (p and m may not be assumed distinct from
// the compiler's view, so this order is what keeps N loads in flight). p + at[u] is element
// first + at[u] of the parameter (its index for stochastic rounding).
template <int N, typename P, typename S, typename C, typename I>
__device__ __forceinline__ void update_n(P* p, S* m, const I (&at)[N], const bool (&ok)[N],
                                         const C (&gj)[N], C decay, C b1c, C f,
                                         const AdamMiniParams& prm, uint64_t round_key,
                                         int64_t first) {
  C pj[N], mj[N];
#pragma unroll
  for (int u = 0; u < N; ++u) {
    pj[u] = ok[u] ? load<C>(p + at[u]) : C(0);
    mj[u] = ok[u] ? load<C>(m + at[u]) : C(0);
  }
#pragma unroll
  for (int u = 0; u < N; ++u) {
    if (!ok[u]) continue;
    mj[u] = lerp(mj[u], gj[u], b1c);  // as cpu::block_update_span
    store_param(p + at[u], pj[u] * decay - f * mj[u], prm.stochastic, round_key,
                first + at[u]);
    store(m + at[u], mj[u]);
  }
}

// Two-pass path (adam_mini_two_pass.cu), called by launch_adam_mini for AM::kTwoPass batches.
int launch_adam_mini_two_pass(const AM& prm, cudaStream_t stream);

}  // namespace memopt::cuda
