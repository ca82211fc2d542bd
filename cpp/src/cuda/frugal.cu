// FRUGAL on CUDA: the elementwise halves of cpp/src/frugal.cpp and frugal_project.cpp, with the
// CPU's operation order (fp32 math, fp64 for fp64 params; sign(0) = sign(NaN) = 0).
//
// frugal_split_kernel (modes 2-5, multi-tensor): one pass over p and g per tensor. Each CTA owns
// one tile and first maps the tile's selected columns / rows / coordinates to their state slots
// in shared memory (from the sorted int32 indices, found by a CTA-wide search), then updates
// every element once: AdamW where mapped, the state-free rule elsewhere. Bytes per fp32
// parameter: 12 (p, g, p) + 16 on the selected fraction (m, v) + 4 per index read.
//
// The projection kernels (modes 6-7) run per chunk between the glue's GEMMs: AdamW on the
// projected gradient (rho-sized), then the fused final update from the back-projected tile.
#include <cstdint>

#include "weights.cuh"

namespace memopt::cuda {
namespace {

using SP = FrugalSplitParams;
constexpr int kThreads = SP::kThreads;
constexpr int kUnroll = 4;  // independent elements in flight per thread
// 4 CTAs (1024 threads) per SM for the memory-bound kernels: at most 64 registers, which the
// float kernels fit without spilling; the double ones need more and get 2.
template <typename P>
constexpr int kMinBlocks = std::is_same_v<P, double> ? 2 : 4;
enum : int32_t { kFree = 2, kColumns = 3, kRows = 4, kRandK = 5 };  // memopt::FrugalMode
enum : int32_t { kRuleNone = 0, kRuleSgd = 1, kRuleSign = 2 };      // memopt::FrugalRule

// One tensor's step in the compute type C.
template <typename C>
struct Step {
  C decay, lr_free, step_size, bc2, b1c, b2, b2c, eps;
  int rule;
  int32_t stochastic;  // how p is stored: store_param's (cuda_common.cuh)
  uint64_t key;
  // Free coordinates change at all (the CPU skips them for rule none without weight decay).
  __device__ bool free_writes() const { return rule != kRuleNone || decay != C(1); }
  // AdamW on one coordinate, cpu::adamw_span's order (and adamw.cu's).
  __device__ C adam(C p, C g, C& m, C& v) const {
    m = lerp(m, g, b1c);
    v = b2 * v + b2c * g * g;
    const C denom = sqrt(v) / bc2 + eps;
    return p * decay - step_size * m / denom;
  }
  __device__ C free_rule(C p, C g) const {  // frugal.cpp's free_span
    if (rule == kRuleSign) return p * decay - lr_free * static_cast<C>((g > C(0)) - (g < C(0)));
    if (rule == kRuleSgd) return p * decay - lr_free * g;
    return p * decay;
  }
};

// First s in [0, k) with idx[s] >= key (k if none), by the whole CTA: each round probes
// kThreads evenly spaced positions and keeps the gap after the last probe below key, so about
// log_256(k) rounds of one load per thread. Unsorted indices still give some s in [0, k].
__device__ int64_t block_lower_bound(const int32_t* idx, int64_t k, int64_t key) {
  int64_t lo = 0, hi = k;
  while (lo < hi) {  // uniform: lo and hi come from block-wide counts
    const int64_t step = (hi - lo + kThreads - 1) / kThreads;
    const int64_t pos = lo + static_cast<int64_t>(threadIdx.x) * step;
    const int below = __syncthreads_count(pos < hi && idx[pos] < key);
    if (below == 0) break;  // idx[lo] >= key
    const int64_t last = lo + (below - 1) * step;
    hi = min(hi, last + step);
    lo = last + 1;
  }
  return lo;
}

// map[x - a] = s for every index x = idx[s] in [a, a + w), s from `cur` on; returns the first s
// past them. Sorted unique indices put them in idx[cur, cur + w) at most, so at most
// w / kThreads + 1 batches are read. Whatever the indices hold, map stays within [0, w) and
// every slot below k: a malformed selection gives wrong numbers, never a wrong address.
__device__ int64_t fill_map(int32_t* map, const int32_t* idx, int64_t k, int64_t cur, int64_t a,
                            int w) {
  __syncthreads();  // the previous window's readers are done with map
  for (int j = threadIdx.x; j < w; j += kThreads) map[j] = -1;
  __syncthreads();
  for (int batch = 0; batch <= w / kThreads; ++batch) {
    const int64_t s = cur + threadIdx.x;
    const int64_t x = s < k ? idx[s] : INT64_MAX;
    const bool in = x < a + w;
    if (in && x >= a) map[x - a] = static_cast<int32_t>(s);
    const int n = __syncthreads_count(in);  // also the barrier before map is read
    cur += n;
    if (n < kThreads) break;
  }
  return cur;
}

// Mode 2: the state-free rule on a flat tile of n elements.
template <typename P, typename C>
__device__ void free_tile(P* p, const P* g, int64_t n, const Step<C>& st, int64_t first) {
  for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
    C pj[kUnroll], gj[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      if (j < n) pj[u] = load<C>(p + j), gj[u] = load<C>(g + j);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      if (j < n) store_param(p + j, st.free_rule(pj[u], gj[u]), st.stochastic, st.key, first + j);
    }
  }
}

// kUnroll elements at flat offsets e[u] (skipped where e[u] < 0) with state slots s[u] (-1: not
// selected): loads everything first, then updates, as adamw.cu does.
template <typename P, typename S, typename C>
__device__ __forceinline__ void update_batch(P* p, const P* g, S* m, S* v, const int64_t (&e)[kUnroll],
                                             const int64_t (&s)[kUnroll], const Step<C>& st) {
  const bool free_writes = st.free_writes();
  C pj[kUnroll], gj[kUnroll], mj[kUnroll], vj[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (e[u] >= 0 && (s[u] >= 0 || free_writes)) pj[u] = load<C>(p + e[u]), gj[u] = load<C>(g + e[u]);
    if (e[u] >= 0 && s[u] >= 0) mj[u] = load<C>(m + s[u]), vj[u] = load<C>(v + s[u]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (e[u] < 0) continue;
    if (s[u] >= 0) {
      store_param(p + e[u], st.adam(pj[u], gj[u], mj[u], vj[u]), st.stochastic, st.key, e[u]);
      store(m + s[u], mj[u]);
      store(v + s[u], vj[u]);
    } else if (free_writes) {
      store_param(p + e[u], st.free_rule(pj[u], gj[u]), st.stochastic, st.key, e[u]);
    }
  }
}

// Mode 5: flat tile [b, b + n) in windows of kMapSize coordinates; state slot = index position.
template <typename P, typename S, typename C>
__device__ void randk_tile(int32_t* map, P* p, const P* g, S* m, S* v, const int32_t* idx,
                           int64_t k, int64_t b, int64_t n, const Step<C>& st) {
  int64_t cur = block_lower_bound(idx, k, b);
  for (int64_t a = b; a < b + n; a += SP::kMapSize) {
    const int w = static_cast<int>(min(static_cast<int64_t>(SP::kMapSize), b + n - a));
    cur = fill_map(map, idx, k, cur, a, w);
    for (int base = threadIdx.x; base < w; base += kThreads * kUnroll) {
      int64_t e[kUnroll], s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = base + u * kThreads;
        e[u] = j < w ? a + j : -1;
        s[u] = j < w ? map[j] : -1;
      }
      update_batch(p, g, m, v, e, s, st);
    }
  }
}

// Modes 3 and 4 on a tile_rows x tile_cols tile of a rows x cols matrix. Thread t owns column
// t % tc of the tile and every (kThreads / tc)-th row, so a warp reads consecutive elements.
// Columns: state (rows, k), slot r * k + column slot; rows: state (k, cols), row slot * cols + c.
template <typename P, typename S, typename C>
__device__ void matrix_tile(int32_t* map, bool by_col, P* p, const P* g, S* m, S* v,
                            const int32_t* idx, int64_t k, int64_t rows, int64_t cols, int tr,
                            int tc, int64_t col_tiles, int64_t tile, const Step<C>& st) {
  const int64_t r0 = tile / col_tiles * tr, c0 = tile % col_tiles * tc;
  const int64_t r1 = min(rows, r0 + tr);
  const int64_t a = by_col ? c0 : r0;
  const int w = static_cast<int>(by_col ? min(static_cast<int64_t>(tc), cols - c0) : r1 - r0);
  fill_map(map, idx, k, block_lower_bound(idx, k, a), a, w);  // no barrier after this
  const int groups = kThreads / tc;
  const int rg = threadIdx.x / tc;
  const int64_t col = c0 + threadIdx.x % tc;
  if (rg >= groups || col >= cols) return;
  const int64_t cslot = by_col ? map[col - c0] : 0;
  for (int64_t rb = r0 + rg; rb < r1; rb += static_cast<int64_t>(groups) * kUnroll) {
    int64_t e[kUnroll], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = rb + static_cast<int64_t>(u) * groups;
      e[u] = r < r1 ? r * cols + col : -1;
      const int64_t rslot = by_col || r >= r1 ? 0 : map[r - r0];
      s[u] = r >= r1 || cslot < 0 || rslot < 0 ? -1 : by_col ? r * k + cslot : rslot * cols + col;
    }
    update_batch(p, g, m, v, e, s, st);
  }
}

// Modes 2-5 on an int8 weight: the tile is n <= kMapSize elements (whole groups) of row r from
// column c0 (FrugalSplitParams::int8_tile). The slot map of its selected columns, row or
// coordinates is made once, then every element is written through weights.cuh's two sweeps,
// one the rule leaves as it is too: its group may take a new scale (the CPU re-encodes it too).
template <typename P, typename S, typename C>
__device__ void int8_split_tile(int32_t* map, const FrugalSplitParams& prm, int slot,
                                int64_t tile, const Step<C>& st) {
  const int64_t cols = prm.cols[slot], width = prm.tile_cols[slot];
  const int64_t per_row = (cols + width - 1) / width;
  const int64_t r = tile / per_row, c0 = tile % per_row * width, b = r * cols + c0;
  const int n = static_cast<int>(min(width, cols - c0));
  const int mode = prm.mode[slot];
  const int32_t* idx = prm.idx[slot];
  const int64_t k = prm.k[slot];
  if (mode == kColumns || mode == kRandK) {  // map[j]: the slot of column c0 + j / element b + j
    const int64_t a = mode == kColumns ? c0 : b;
    fill_map(map, idx, k, block_lower_bound(idx, k, a), a, n);
  } else if (mode == kRows) {                // map[0]: the slot of row r
    fill_map(map, idx, k, block_lower_bound(idx, k, r), r, 1);
  }
  const int64_t row_slot = mode == kRows ? map[0] : -1;  // (fill_map ends in a barrier)
  const P* g = static_cast<const P*>(prm.g[slot]) + b;
  S* m = static_cast<S*>(prm.m[slot]);
  S* v = static_cast<S*>(prm.v[slot]);
  with_weights<P>(prm.p[slot], prm.scales[slot], prm.int8_group, b, n, st.stochastic, st.key,
                  [&](const auto& w) {
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const int64_t s = mode == kColumns ? (map[j] >= 0 ? r * k + map[j] : -1)
                        : mode == kRows  ? (row_slot >= 0 ? row_slot * cols + c0 + j : -1)
                        : mode == kRandK ? map[j] : -1;
      const C pj = w.template get<C>(j), gj = load<C>(g + j);
      if (s >= 0) {
        C mj = load<C>(m + s), vj = load<C>(v + s);
        w.put(j, st.adam(pj, gj, mj, vj), b + j);
        if (w.writes_state()) store(m + s, mj), store(v + s, vj);
      } else {
        w.put(j, st.free_writes() ? st.free_rule(pj, gj) : pj, b + j);
      }
    }
  });
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads, kMinBlocks<P>) frugal_split_kernel(const FrugalSplitParams prm) {
  if (step_skipped(prm.device)) return;
  using C = opmath_t<P>;
  __shared__ int32_t map[SP::kMapSize];
  const int slot = prm.map.slot[blockIdx.x];
  const int64_t tile = prm.map.chunk[blockIdx.x];
  // A state-free tile has no counter: its scalars are the host's (round_key at step 0).
  const StepScalars sc = step_scalars(
      prm.mode[slot] == kFree ? DeviceSteps{} : prm.device, prm.tensor[slot],
      StepScalars{prm.decay, prm.step_size[slot], prm.bc2_sqrt[slot], prm.round_key[slot]});
  const Step<C> st{static_cast<C>(prm.decay), static_cast<C>(prm.lr_free),
                   static_cast<C>(sc.step_size), static_cast<C>(sc.bc2_sqrt),
                   static_cast<C>(1.0 - prm.beta1), static_cast<C>(prm.beta2),
                   static_cast<C>(1.0 - prm.beta2), static_cast<C>(prm.eps), prm.rule,
                   prm.stochastic, sc.round_key};
  P* p = static_cast<P*>(prm.p[slot]);
  const P* g = static_cast<const P*>(prm.g[slot]);
  S* m = static_cast<S*>(prm.m[slot]);
  S* v = static_cast<S*>(prm.v[slot]);
  if (prm.int8_group > 0) return int8_split_tile<P, S, C>(map, prm, slot, tile, st);
  const int64_t numel = prm.numel[slot], b = tile * SP::kTile;
  switch (prm.mode[slot]) {  // uniform per CTA
    case kFree:
      free_tile(p + b, g + b, min(SP::kTile, numel - b), st, b);
      break;
    case kRandK:
      randk_tile(map, p, g, m, v, prm.idx[slot], prm.k[slot], b, min(SP::kTile, numel - b), st);
      break;
    default:
      matrix_tile(map, prm.mode[slot] == kColumns, p, g, m, v, prm.idx[slot], prm.k[slot],
                  numel / prm.cols[slot], prm.cols[slot], prm.tile_rows[slot],
                  prm.tile_cols[slot], prm.col_tiles[slot], tile, st);
  }
}

// ---- projection modes -------------------------------------------------------------------------
// An (outer x inner) block: x runs along inner (coalesced), y strides over outer.
struct Grid2d {
  dim3 grid, block;
};
Grid2d grid2d(int64_t outer, int64_t inner) {
  int tx = 32;
  while (tx < inner && tx < kThreads) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t gy = (outer + ty - 1) / ty;
  return {dim3(static_cast<unsigned>((inner + tx - 1) / tx),
               static_cast<unsigned>(gy < 65535 ? gy : 65535)),
          dim3(tx, ty)};
}

// frugal_project.cpp step 2: u = step_size * m / denom on the projected gradient.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) proj_adam_kernel(const FrugalProjAdamParams prm) {
  using C = opmath_t<P>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= prm.inner || step_skipped(prm.device)) return;
  const StepScalars sc =
      step_scalars(prm.device, prm.tensor, StepScalars{0.0, prm.step_size, prm.bc2_sqrt, 0});
  const C* low = static_cast<const C*>(prm.low) + j;
  C* out = static_cast<C*>(prm.out) + j;  // may be low: each element is read, then written
  S* m = static_cast<S*>(prm.m) + j;
  S* v = static_cast<S*>(prm.v) + j;
  const C b1c = 1.0 - prm.beta1, b2 = prm.beta2, b2c = 1.0 - prm.beta2, eps = prm.eps;
  const C ss = sc.step_size, bc2 = sc.bc2_sqrt, lf = prm.lr_free;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; o < prm.outer;
       o += stride) {
    const C gl = low[o * prm.ld_low];
    C mj = load<C>(m + o * prm.ld_m), vj = load<C>(v + o * prm.ld_m);
    mj = lerp(mj, gl, b1c);
    vj = b2 * vj + b2c * gl * gl;
    const C u = ss * mj / (sqrt(vj) / bc2 + eps);
    out[o * prm.ld_out] = prm.rule == kRuleSgd ? u - lf * gl : u;
    store(m + o * prm.ld_m, mj);
    store(v + o * prm.ld_m, vj);
  }
}

// frugal_project.cpp step 3, fused: p = p * decay - U - lr_free * rule(G - Gp).
template <typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocks<P>) proj_update_kernel(const FrugalProjUpdateParams prm) {
  using C = opmath_t<P>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= prm.inner || step_skipped(prm.device)) return;
  const uint64_t key = step_scalars(prm.device, prm.tensor, {0.0, 0.0, 1.0, prm.round_key}).round_key;
  P* p = static_cast<P*>(prm.p) + j;
  const P* g = static_cast<const P*>(prm.g) + j;
  const C* t = static_cast<const C*>(prm.t) + j;
  const C decay = prm.decay, lf = prm.lr_free;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
       base < prm.outer; base += stride * kUnroll) {
    C pj[kUnroll], tj[kUnroll], gj[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t o = base + u * stride;
      if (o >= prm.outer) continue;
      pj[u] = load<C>(p + o * prm.ld_p);
      tj[u] = t[o * prm.ld_t];
      if (prm.rule == kRuleSign) gj[u] = load<C>(g + o * prm.ld_p) - t[o * prm.ld_t + prm.gp_offset];
      else if (prm.rule == kRuleSgd) gj[u] = load<C>(g + o * prm.ld_p);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t o = base + u * stride;
      if (o >= prm.outer) continue;
      C upd = pj[u] * decay - tj[u];  // for SGD tj = U - lr_free * Gp: G - Gp in two parts
      if (prm.rule == kRuleSign) upd -= lf * static_cast<C>((gj[u] > C(0)) - (gj[u] < C(0)));
      else if (prm.rule == kRuleSgd) upd -= lf * gj[u];
      store_param(p + o * prm.ld_p, upd, prm.stochastic, key, prm.first + o * prm.ld_p + j);
    }
  }
}

// proj_update_kernel on an int8 weight: one CTA per int8_chunk(group) elements (whole groups)
// of a row of the chunk, in the same operation order, through weights.cuh's two sweeps.
template <typename P>
__global__ void __launch_bounds__(kThreads) proj_update_int8_kernel(const FrugalProjUpdateParams prm) {
  if (step_skipped(prm.device)) return;
  using C = opmath_t<P>;
  const int64_t width = min(int8_chunk(prm.int8_group), prm.inner);
  const int64_t per_row = (prm.inner + width - 1) / width;
  const int64_t o = blockIdx.x / per_row, j0 = blockIdx.x % per_row * width;
  const int64_t n = min(width, prm.inner - j0), at = o * prm.ld_p + j0;
  const P* g = static_cast<const P*>(prm.g) + at;
  const C* t = static_cast<const C*>(prm.t) + o * prm.ld_t + j0;
  const C decay = prm.decay, lf = prm.lr_free;
  const uint64_t key = step_scalars(prm.device, prm.tensor, {0.0, 0.0, 1.0, prm.round_key}).round_key;
  with_weights<P>(prm.p, prm.scales, prm.int8_group, at, n, prm.stochastic, key,
                  [&](const auto& w) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      C upd = w.template get<C>(j) * decay - t[j];  // as proj_update_kernel
      if (prm.rule == kRuleSign) {
        const C gj = load<C>(g + j) - t[j + prm.gp_offset];
        upd -= lf * static_cast<C>((gj > C(0)) - (gj < C(0)));
      } else if (prm.rule == kRuleSgd) {
        upd -= lf * load<C>(g + j);
      }
      w.put(j, upd, prm.first + at + j);
    }
  });
}

}  // namespace

int launch_frugal_split(const FrugalSplitParams& prm, Stream stream) {
  if (prm.map.n_chunks == 0) return 0;
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    frugal_split_kernel<P, S>
        <<<prm.map.n_chunks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  });
}

int launch_frugal_proj_adam(const FrugalProjAdamParams& prm, Stream stream) {
  if (prm.outer == 0 || prm.inner == 0) return 0;
  const Grid2d d = grid2d(prm.outer, prm.inner);
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    proj_adam_kernel<P, S><<<d.grid, d.block, 0, static_cast<cudaStream_t>(stream)>>>(prm);
    return last_launch_error();
  });
}

int launch_frugal_proj_update(const FrugalProjUpdateParams& prm, Stream stream) {
  if (prm.outer == 0 || prm.inner == 0) return 0;
  const Grid2d d = grid2d(prm.outer, prm.inner);
  return dispatch_param_state(prm.param_dtype, prm.param_dtype, [&](auto p_tag, auto) {
    using P = typename decltype(p_tag)::type;
    const auto st = static_cast<cudaStream_t>(stream);
    if (prm.int8_group > 0) {
      const int64_t width = min(int8_chunk(prm.int8_group), prm.inner);
      const auto ctas = static_cast<unsigned>(prm.outer * ((prm.inner + width - 1) / width));
      proj_update_int8_kernel<P><<<ctas, kThreads, 0, st>>>(prm);
    } else {
      proj_update_kernel<P><<<d.grid, d.block, 0, st>>>(prm);
    }
    return last_launch_error();
  });
}

}  // namespace memopt::cuda
