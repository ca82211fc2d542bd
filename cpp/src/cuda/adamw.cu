// AdamW on CUDA: one multi-tensor launch per 24 tensors / 296 chunks, one pass over p, g, m, v
// (28 bytes per fp32 parameter, the floor; int8 weights: weights.cuh's two sweeps per chunk). Same operation order as cpu::adamw_span, under
// either AdamWRule (the host folds it into the scalars and decay_after).
#include "weights.cuh"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // independent elements in flight per thread

template <typename P, typename S, typename W>
__device__ __forceinline__ void adamw_chunk(const AdamWParams& prm, const StepScalars& sc,
                                            int slot, int64_t begin, int64_t n, const W& w) {
  using C = opmath_t<P>;
  const P* g = static_cast<const P*>(prm.g[slot]) + begin;
  S* m = static_cast<S*>(prm.m[slot]) + begin;
  S* v = static_cast<S*>(prm.v[slot]) + begin;
  const C decay = sc.decay, step_size = sc.step_size, bc2 = sc.bc2_sqrt;
  const C b1c = 1.0 - prm.beta1, b2 = prm.beta2, b2c = 1.0 - prm.beta2, eps = prm.eps;
  const C pre = prm.decay_after ? C(1) : decay, post = prm.decay_after ? decay : C(1);
  const bool writes_state = w.writes_state();

  for (int64_t base = 0; base < n; base += static_cast<int64_t>(kThreads) * kUnroll) {
    C gj[kUnroll], mj[kUnroll], vj[kUnroll], pj[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // coalesced: neighbouring threads, neighbouring elements
      const int64_t j = base + u * kThreads + threadIdx.x;
      if (j < n) {
        gj[u] = load<C>(g + j);
        mj[u] = load<C>(m + j);
        vj[u] = load<C>(v + j);
        pj[u] = w.template get<C>(j);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads + threadIdx.x;
      if (j < n) {
        mj[u] = lerp(mj[u], gj[u], b1c);
        vj[u] = b2 * vj[u] + b2c * gj[u] * gj[u];
        const C denom = sqrt(vj[u]) / bc2 + eps;
        w.put(j, (pj[u] * pre - step_size * mj[u] / denom) * post,
              prm.round_first[slot] + begin + j);
        if (writes_state) {
          store(m + j, mj[u]);
          store(v + j, vj[u]);
        }
      }
    }
  }
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWParams prm) {
  if (step_skipped(prm.device)) return;
  const int slot = prm.map.slot[blockIdx.x];
  const StepScalars sc = step_scalars(prm.device, prm.tensor[slot], prm.scalars[slot]);
  const int64_t begin = static_cast<int64_t>(prm.map.chunk[blockIdx.x]) * prm.map.chunk_size;
  const int64_t left = prm.map.numel[slot] - begin;
  const int64_t n = left < prm.map.chunk_size ? left : prm.map.chunk_size;
  with_weights<P>(prm.p[slot], prm.scales[slot], prm.int8_group, begin, n, prm.stochastic,
                  sc.round_key,
                  [&](const auto& w) { adamw_chunk<P, S>(prm, sc, slot, begin, n, w); });
}

}  // namespace

int launch_adamw(const AdamWParams& prm, Stream stream) {
  if (prm.map.n_chunks == 0) return 0;
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    adamw_kernel<P, S><<<prm.map.n_chunks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  });
}

}  // namespace memopt::cuda
