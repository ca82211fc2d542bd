// APOLLO on CUDA: the passes around one ATen GEMM per tensor (R = P G, in apollo_glue.cpp), in
// the CPU op's order and rounding (cpp/src/apollo.cpp):
//   moments:    Adam on R (r x K values), per-channel sums of Rt^2 and R^2   (R-sized)
//   grad norms: per-channel sums of G^2, only with the limiter               (one read of G)
//   factors:    scaling factors, limiter, per-channel coefficients           (K-sized)
//   update:     p = (p - coef_c g)(1 - lr wd), multi-tensor            (read g, p; write p)
// An fp32 parameter moves 12 B in the update, 4 B in the GEMM and 4 B in the norms (20 B, 16 B
// without the limiter; bf16 half of that) plus the R-sized traffic; no pass writes anything
// parameter-sized but p. Per-channel sums are double, as on the CPU.
#include "weights.cuh"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 256;        // reduction kernels
constexpr int kUpdateThreads = 512;  // the final pass (adamw.cu's shape)
constexpr int kUnroll = 4;
constexpr double kNormEps = 1e-8;    // apollo-torch's "+ 1e-8" (scaling factor and limiter)
constexpr int kLeftLanes = 8;        // threads that share one column (row ranges)

// Threads that cooperate on one channel: the power of two covering n, at most `cap`.
inline int lanes_for(int64_t n, int cap) {
  int w = 1;
  while (w < cap && w < n) w <<= 1;
  return w;
}

// How the kThreads of a CTA split into channel groups of `lanes` threads. Strided (Left: the
// channels are columns) puts neighbouring channels on neighbouring threads, so a warp reads one
// row's consecutive columns; packed (Right: channels are rows) puts a channel's lanes together,
// so they read consecutive values of the row and reduce by shuffles.
struct Group {
  int lanes, per_block, lane, slot;
  __device__ Group(int lanes_, bool strided) : lanes(lanes_), per_block(kThreads / lanes_) {
    lane = strided ? threadIdx.x / per_block : threadIdx.x % lanes;
    slot = strided ? threadIdx.x % per_block : threadIdx.x / lanes;
  }
};

// Sums x[0..N) over a channel's lanes; lane 0 gets the totals. Every thread of the CTA calls it
// (barriers and full-warp shuffles), whether or not it has a channel.
template <int N>
__device__ __forceinline__ void reduce_lanes(double (&x)[N], const Group& grp, bool strided) {
  if (strided) {
    __shared__ double red[N][kThreads];
#pragma unroll
    for (int k = 0; k < N; ++k) red[k][threadIdx.x] = x[k];
    __syncthreads();
    if (grp.lane == 0)  // in lane order: deterministic
      for (int l = 1; l < grp.lanes; ++l)
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] += red[k][l * grp.per_block + grp.slot];
  } else {
    for (int o = grp.lanes / 2; o > 0; o >>= 1)
#pragma unroll
      for (int k = 0; k < N; ++k) x[k] += __shfl_xor_sync(0xffffffffu, x[k], o);
  }
}

template <typename S, typename C, bool kLeft>
__global__ void __launch_bounds__(kThreads) moments_kernel(const ApolloMomentsParams prm,
                                                           int lanes) {
  if (prm.found_inf != nullptr && *prm.found_inf != 0.0f) return;  // (uniform: every CTA)
  const Group grp(lanes, kLeft);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * grp.per_block + grp.slot;
  const int64_t r = prm.r, K = prm.K;
  const C* R = static_cast<const C*>(prm.R);
  S* m = static_cast<S*>(prm.m);
  S* v = static_cast<S*>(prm.v);
  // 1 - b in double, then rounded, as the CPU's MomentCoefs (1 - 0.9999f is 1.7e-4 off)
  const C b1 = prm.beta1, b2 = prm.beta2, eps = prm.eps;
  const C b1c = static_cast<C>(1.0 - prm.beta1), b2c = static_cast<C>(1.0 - prm.beta2);
  double s[2] = {0.0, 0.0};  // sums of Rt^2 and R^2
  if (c < K) {
    for (int64_t k = grp.lane; k < r; k += lanes) {
      const int64_t j = kLeft ? k * K + c : c * r + k;
      const C x = R[j];
      const C mj = round_to<S>(b1 * load<C>(m + j) + b1c * x);
      const C vj = round_to<S>(b2 * load<C>(v + j) + b2c * x * x);
      store(m + j, mj);
      store(v + j, vj);
      s[1] += static_cast<double>(x) * x;  // before the division: x is not live across its
      const C rt = mj / (sqrt(vj) + eps);   // double slow-path call (a spill on sm_90 otherwise)
      s[0] += static_cast<double>(rt) * rt;
    }
  }
  reduce_lanes(s, grp, kLeft);
  if (grp.lane == 0 && c < K) {
    prm.sum_rt2[c] = s[0];
    prm.sum_r2[c] = s[1];
  }
}

// Right: out[row] = sum_j g[row, j]^2. Left: out[split * cols + col] over the split's rows.
template <typename P, bool kLeft>
__global__ void __launch_bounds__(kThreads) grad_norms_kernel(const ApolloGradNormParams prm,
                                                              int lanes) {
  using C = opmath_t<P>;
  const Group grp(lanes, kLeft);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * grp.per_block + grp.slot;
  const int64_t rows = prm.rows, cols = prm.cols, K = kLeft ? cols : rows;
  const P* g = static_cast<const P*>(prm.g);
  double s[1] = {0.0};
  if (c < K) {
    if (kLeft) {
      const int64_t begin = blockIdx.y * prm.rows_per_split;
      const int64_t end = min(rows, begin + prm.rows_per_split);
      for (int64_t i = begin + grp.lane; i < end; i += lanes) {
        const double x = load<C>(g + i * cols + c);
        s[0] += x * x;
      }
    } else {
      for (int64_t j = grp.lane; j < cols; j += lanes) {
        const double x = load<C>(g + c * cols + j);
        s[0] += x * x;
      }
    }
  }
  reduce_lanes(s, grp, kLeft);
  if (grp.lane == 0 && c < K) prm.out[(kLeft ? blockIdx.y * K : 0) + c] = s[0];
}

// One CTA per tensor; double throughout, the CPU op's expressions.
__global__ void __launch_bounds__(kThreads) factors_kernel(const ApolloFactorParams prm) {
  if (step_skipped(prm.device)) return;
  __shared__ double scratch[kThreads / 32];
  const int t = blockIdx.x;
  const int64_t K = prm.K[t], splits = prm.splits[t];
  const double* a = prm.sum_rt2 + prm.ch_off[t];
  const double* b = prm.sum_r2 + prm.ch_off[t];
  double* coef = prm.coef + prm.ch_off[t];
  // Every thread reads the previous norm before the barriers below; thread 0 writes it after.
  double prev = -1.0;
  if (prm.limiter)
    prev = prm.norm_is_double[t] ? *static_cast<const double*>(prm.norm[t])
                                 : static_cast<double>(*static_cast<const float*>(prm.norm[t]));
  double tensor_fac = 0.0;
  if (!prm.channel) {
    double sa = 0.0, sb = 0.0;
    for (int64_t c = threadIdx.x; c < K; c += kThreads) sa += a[c], sb += b[c];
    sa = block_sum(sa, scratch);
    sb = block_sum(sb, scratch);
    tensor_fac = sqrt(sa) / (sqrt(sb) + kNormEps);
  }
  auto fac = [&](int64_t c) {
    return prm.channel ? sqrt(a[c]) / (sqrt(b[c]) + kNormEps) : tensor_fac;
  };
  double limit = 1.0;
  if (prm.limiter) {  // ||U||^2 = sum_c s_c^2 ||G_c||^2: U itself is never formed
    const double* g2 = prm.g2 + prm.g2_off[t];
    double u2 = 0.0;
    for (int64_t c = threadIdx.x; c < K; c += kThreads) {
      double gc = 0.0;
      for (int64_t sp = 0; sp < splits; ++sp) gc += g2[sp * K + c];
      const double f = fac(c);
      u2 += f * f * gc;
    }
    u2 = block_sum(u2, scratch);
    const double u = sqrt(u2) * (prm.scale_front ? prm.alpha : 1.0);
    double now = u;  // first step (negative: no norm yet): remember the norm, limit nothing
    if (prev >= 0.0) {
      const double growth = u / (prev + kNormEps);
      limit = (growth < prm.gamma ? prm.gamma : growth) / prm.gamma;  // std::max's NaN rule
      now = u / limit;
    }
    if (threadIdx.x == 0) {
      if (prm.norm_is_double[t])
        *static_cast<double*>(prm.norm[t]) = now;
      else
        *static_cast<float*>(prm.norm[t]) = static_cast<float>(now);
    }
  }
  const double step_size = prm.device.scalars != nullptr
                               ? prm.device.scalars[prm.tensor[t]].step_size : prm.step_size[t];
  const double mult = step_size * prm.alpha / limit;
  if (prm.channel) {
    for (int64_t c = threadIdx.x; c < K; c += kThreads) coef[c] = mult * fac(c);
  } else if (threadIdx.x == 0) {
    coef[0] = mult * tensor_fac;
  }
}

template <typename P, typename W>
__device__ __forceinline__ void update_chunk(const ApolloUpdateParams& prm, int slot,
                                             int64_t begin, int n, const W& w) {
  using C = opmath_t<P>;
  const P* g = static_cast<const P*>(prm.g[slot]) + begin;
  const double* coef = prm.coef[slot];
  const int mode = prm.mode[slot];
  const int64_t cols = prm.cols[slot], row0 = begin / cols, col0 = begin % cols;
  // Element j of the chunk is column (col0 + j) % cols of row row0 + (col0 + j) / cols; that
  // index fits 32 bits (cheaper division) unless a row is over 2^31 elements.
  const bool narrow = cols < (int64_t{1} << 31);
  const C lr_wd = prm.lr_wd, f0 = coef[0];

  for (int base = 0; base < n; base += kUpdateThreads * kUnroll) {
    C gj[kUnroll], pj[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // coalesced: neighbouring threads, neighbouring elements
      const int j = base + u * kUpdateThreads + threadIdx.x;
      if (j < n) {
        gj[u] = load<C>(g + j);
        pj[u] = w.template get<C>(j);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kUpdateThreads + threadIdx.x;
      if (j < n) {
        C f = f0;
        if (mode != kApolloPerTensor) {
          int64_t q, rem;
          if (narrow) {
            const uint32_t x = static_cast<uint32_t>(col0 + j), d = static_cast<uint32_t>(cols);
            q = x / d, rem = x % d;
          } else {
            q = (col0 + j) / cols, rem = (col0 + j) % cols;
          }
          f = static_cast<C>(coef[mode == kApolloPerRow ? row0 + q : rem]);
        }
        const C x = pj[u] - f * gj[u];  // decay after the update, at the plain lr (apollo-torch)
        w.put(j, x - lr_wd * x, begin + j);
      }
    }
  }
}

template <typename P>
__global__ void __launch_bounds__(kUpdateThreads) update_kernel(const ApolloUpdateParams prm) {
  if (step_skipped(prm.device)) return;
  const int slot = prm.map.slot[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(prm.map.chunk[blockIdx.x]) * prm.map.chunk_size;
  const int64_t left = prm.map.numel[slot] - begin;
  const int n = static_cast<int>(left < prm.map.chunk_size ? left : prm.map.chunk_size);
  const uint64_t key = prm.device.scalars != nullptr
                           ? prm.device.scalars[prm.tensor[slot]].round_key : prm.round_key[slot];
  with_weights<P>(prm.p[slot], prm.scales[slot], prm.int8_group, begin, n, prm.stochastic, key,
                  [&](const auto& w) { update_chunk<P>(prm, slot, begin, n, w); });
}

inline unsigned blocks(int64_t n, int per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace

int32_t apollo_grad_norm_splits(int64_t rows) {
  // Enough CTAs for a wide gradient with few columns; each split still sums >= 256 rows.
  const int64_t splits = (rows + 255) / 256;
  return static_cast<int32_t>(splits < 1 ? 1 : splits > 16 ? 16 : splits);
}

int launch_apollo_moments(const ApolloMomentsParams& prm, Stream stream) {
  if (prm.K == 0 || prm.r == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using C = opmath_t<typename decltype(p_tag)::type>;
    using S = typename decltype(s_tag)::type;
    const int lanes = lanes_for(prm.r, prm.left ? kLeftLanes : 32);
    const unsigned grid = blocks(prm.K, kThreads / lanes);
    if (prm.left)
      moments_kernel<S, C, true><<<grid, kThreads, 0, s>>>(prm, lanes);
    else
      moments_kernel<S, C, false><<<grid, kThreads, 0, s>>>(prm, lanes);
    return last_launch_error();
  });
}

int launch_apollo_grad_norms(const ApolloGradNormParams& prm, Stream stream) {
  if (prm.rows == 0 || prm.cols == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  // Only the parameter type matters; float32 is a state type every parameter type accepts.
  return dispatch_param_state(prm.param_dtype, Dtype::kFloat32, [&](auto p_tag, auto) {
    using P = typename decltype(p_tag)::type;
    if (prm.left) {
      const dim3 grid(blocks(prm.cols, kThreads / kLeftLanes), static_cast<unsigned>(prm.splits));
      grad_norms_kernel<P, true><<<grid, kThreads, 0, s>>>(prm, kLeftLanes);
    } else {
      const int lanes = lanes_for(prm.cols, 32);
      const unsigned grid = blocks(prm.rows, kThreads / lanes);
      grad_norms_kernel<P, false><<<grid, kThreads, 0, s>>>(prm, lanes);
    }
    return last_launch_error();
  });
}

int launch_apollo_factors(const ApolloFactorParams& prm, Stream stream) {
  if (prm.n_tensors == 0) return 0;
  factors_kernel<<<prm.n_tensors, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
  return last_launch_error();
}

int launch_apollo_update(const ApolloUpdateParams& prm, Stream stream) {
  if (prm.map.n_chunks == 0) return 0;
  return dispatch_param_state(prm.param_dtype, Dtype::kFloat32, [&](auto p_tag, auto) {
    using P = typename decltype(p_tag)::type;
    const auto s = static_cast<cudaStream_t>(stream);
    update_kernel<P><<<prm.map.n_chunks, kUpdateThreads, 0, s>>>(prm);
    return last_launch_error();
  });
}

}  // namespace memopt::cuda
