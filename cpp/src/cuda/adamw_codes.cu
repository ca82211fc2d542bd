// AdamW with 8-bit m and v on CUDA (memopt/state_codes.h): the CPU's cpu::adamw_element
// operation order on values decoded from the codes, then the codes of the new values. A CTA owns
// kStateChunkBlocks code blocks; thread t holds element u * 256 + t of block u in registers, so
// each block's new scale is one CTA-wide maximum and nothing is computed twice, but for int8
// weights (memopt/int8_weights.h), whose groups' new scales take a measuring sweep first
// (weights.cuh with_weights). Reads 1 + 1 bytes of state and writes them, besides p and g.
#include "cuda_common.cuh"
#include "memopt/state_codes.h"
#include "weights.cuh"

namespace memopt::cuda {
namespace {

static_assert(kStateThreads == kStateBlock, "one thread per element of a code block");
constexpr int kWarps = kStateThreads / 32;
constexpr int kU = kStateChunkBlocks;

// The bits of |x|: an unsigned maximum orders non-negative floats, and a NaN exceeds every
// other value (so a non-finite block gets scale NaN, as on the CPU).
__device__ __forceinline__ unsigned magnitude_bits(float x) { return __float_as_uint(fabsf(x)); }

template <typename P>
__global__ void __launch_bounds__(kStateThreads) adamw_coded_kernel(const AdamWCodedParams prm) {
  using C = opmath_t<P>;  // (double for a float64 parameter: the CPU op's compute type)
  __shared__ unsigned warp_max[2][kU][kWarps];
  __shared__ float scale[2][kU];
  if (step_skipped(prm.device)) return;
  const int slot = prm.map.slot[blockIdx.x];
  const StepScalars sc = step_scalars(prm.device, prm.tensor[slot], prm.scalars[slot]);
  const int64_t begin = static_cast<int64_t>(prm.map.chunk[blockIdx.x]) * prm.map.chunk_size;
  const int64_t left = prm.map.numel[slot] - begin;
  const int n = static_cast<int>(left < prm.map.chunk_size ? left : prm.map.chunk_size);
  const int64_t block0 = begin / kStateBlock;
  const P* g = static_cast<const P*>(prm.g[slot]) + begin;
  int8_t* mc = prm.m[slot] + begin;
  uint8_t* vc = prm.v[slot] + begin;
  const float* ms = prm.m_scales[slot] + block0;
  const float* vs = prm.v_scales[slot] + block0;
  const C decay = sc.decay, step_size = sc.step_size, bc2 = sc.bc2_sqrt;
  const C b1c = 1.0 - prm.beta1, b2 = prm.beta2, b2c = 1.0 - prm.beta2, eps = prm.eps;
  const C pre = prm.decay_after ? C(1) : decay, post = prm.decay_after ? decay : C(1);
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;

  // An int8 weight runs this twice (weights.cuh): a sweep that only measures its groups' new
  // maxima, then one that encodes p and, as a float weight's only sweep, the moments.
  with_weights<P>(prm.p[slot], prm.w_scales[slot], prm.int8_group[slot], begin, n,
                  prm.stochastic, sc.round_key, [&](const auto& w) {
    C m[kU], root[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = u * kStateThreads + t;
      m[u] = root[u] = 0.0f;
      if (j < n) {
        const C gj = load<C>(g + j);
        const C r0 = square_root_decode(vc[j], vs[u]);
        C vj = r0 * r0;
        m[u] = lerp(static_cast<C>(moment_decode(mc[j], ms[u])), gj, b1c);
        vj = b2 * vj + b2c * gj * gj;
        root[u] = sqrt(vj);
        const C denom = root[u] / bc2 + eps;
        w.put(j, (w.template get<C>(j) * pre - step_size * m[u] / denom) * post, begin + j);
      }
      if (!w.writes_state()) continue;
      // (the block's floats, as the CPU op's: a double's value rounded to float32 first)
      unsigned bm = magnitude_bits(static_cast<float>(m[u]));
      unsigned br = magnitude_bits(static_cast<float>(root[u]));
      for (int o = 16; o > 0; o >>= 1) {
        bm = max(bm, __shfl_xor_sync(0xffffffffu, bm, o));
        br = max(br, __shfl_xor_sync(0xffffffffu, br, o));
      }
      if (lane == 0) warp_max[0][u][warp] = bm, warp_max[1][u][warp] = br;
    }
    if (!w.writes_state()) return;  // (the same for every thread of the CTA)
    __syncthreads();  // (also: every old scale has been read)
    if (t < 2 * kU) {
      const int which = t / kU, u = t % kU;
      unsigned bits = 0u;
      for (int k = 0; k < kWarps; ++k) bits = max(bits, warp_max[which][u][k]);
      const float s = state_block_scale(__uint_as_float(bits));
      scale[which][u] = s;
      if (u * kStateThreads < n) (which ? prm.v_scales : prm.m_scales)[slot][block0 + u] = s;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = u * kStateThreads + t;
      if (j >= n) continue;
      const float sm = scale[0][u], sv = scale[1][u];
      mc[j] = state_block_empty(sm) ? int8_t{0}
                                    : moment_code(static_cast<float>(m[u]), 1.0f / sm);
      vc[j] = state_block_empty(sv) ? uint8_t{0}
                                    : square_code_of_root(static_cast<float>(root[u]), 1.0f / sv);
    }
  });
}

}  // namespace

int launch_adamw_coded(const AdamWCodedParams& prm, Stream stream) {
  if (prm.map.n_chunks == 0) return 0;
  auto run = [&](auto kernel) {
    kernel<<<prm.map.n_chunks, kStateThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  };
  switch (prm.param_dtype) {
    case Dtype::kFloat32: return run(adamw_coded_kernel<float>);
    case Dtype::kBFloat16: return run(adamw_coded_kernel<__nv_bfloat16>);
    case Dtype::kFloat16: return run(adamw_coded_kernel<__half>);
    case Dtype::kFloat64: return run(adamw_coded_kernel<double>);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace memopt::cuda
