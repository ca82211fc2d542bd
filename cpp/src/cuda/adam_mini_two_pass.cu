// Adam-mini's two-pass path (see adam_mini.cu): for blocks too large for one CTA and for every
// tiling that is not one contiguous run per block. Three launches on one stream:
//   reduce:   each CTA sums g^2 (in double) over its unit and writes partial sums;
//   finalize: one thread per block adds the block's partials in a fixed order (deterministic,
//             no atomics), updates v and writes the block's factor;
//   update:   each CTA updates its unit with its blocks' factors.
// Scratch: the partials (about one per 32K elements of a run, one per 256 rows x column part
// of a rectangle) and one factor per block, from the device Workspace. Bytes: g is read twice,
// 24 per fp32 parameter against the floor of 20.
//
// Units. kRuns: a tile is one contiguous run (offset + t*tile_rows*row_stride, tile_rows*cols
// long), cut into pieces of kRunPiece elements, one per CTA. kRects: the segment's rows are cut
// into bands of tile_rows (one row of tiles each), each tile into column parts of at most
// kRectCols columns, and a unit is a rectangle of rect_rows rows and parts_per_rect whole parts
// (contiguous columns) of one band. Its threads form tr row lanes of w columns; each thread owns
// one column, so every row is read coalesced and a thread's factor is fixed for the unit.
#include "adam_mini.cuh"
#include "weights.cuh"
#include "memopt/state_codes.h"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 256;
static_assert(AM::kRectCols == kThreads, "a rectangle is at most one column per thread wide");

struct Rect {
  int64_t band, r0, r1, c0, q0;  // rows [r0, r1), columns from c0, first column part q0
  int rc, w, tr;                 // its row chunk in the band, width, row lanes
};

// First column of column part q (part j of tile q / ppt), and one past its last.
__device__ __forceinline__ int64_t part_begin(const AdamMiniSeg& sg, int64_t q) {
  return (q / sg.parts_per_tile) * sg.tile_cols + (q % sg.parts_per_tile) * AM::kRectCols;
}
__device__ __forceinline__ int64_t part_end(const AdamMiniSeg& sg, int64_t q) {
  const int64_t tile_end = (q / sg.parts_per_tile + 1) * sg.tile_cols;
  return min(part_begin(sg, q) + AM::kRectCols, tile_end);
}

__device__ __forceinline__ Rect rect_of(const AdamMiniSeg& sg, int64_t u) {
  const int64_t per_band = static_cast<int64_t>(sg.rects_down) * sg.rects_across;
  Rect r;
  r.band = u / per_band;
  const int64_t rem = u - r.band * per_band;
  r.rc = static_cast<int>(rem / sg.rects_across);
  const int64_t cc = rem - static_cast<int64_t>(r.rc) * sg.rects_across;
  r.r0 = r.band * sg.tile_rows + static_cast<int64_t>(r.rc) * sg.rect_rows;
  r.r1 = min(r.r0 + sg.rect_rows, (r.band + 1) * sg.tile_rows);
  const int64_t parts = sg.cols / sg.tile_cols * sg.parts_per_tile;
  r.q0 = cc * sg.parts_per_rect;
  const int64_t q1 = min(r.q0 + sg.parts_per_rect, parts);
  r.c0 = part_begin(sg, r.q0);
  r.w = static_cast<int>(part_end(sg, q1 - 1) - r.c0);
  r.tr = kThreads / r.w;
  return r;
}

// The column part of the rectangle's column cl (a rectangle spans several parts only when
// they are whole tiles, parts_per_tile == 1), and the tile (index within the segment).
__device__ __forceinline__ int64_t part_of(const AdamMiniSeg& sg, const Rect& r, int cl) {
  return sg.parts_per_tile == 1 ? r.q0 + cl / sg.tile_cols : r.q0;
}
__device__ __forceinline__ int64_t tile_of(const AdamMiniSeg& sg, const Rect& r, int64_t q) {
  return r.band * (sg.cols / sg.tile_cols) + q / sg.parts_per_tile;
}

template <typename P>
__device__ void reduce_run(const AM& prm, const AdamMiniSeg& sg, int64_t u, double* red) {
  using C = opmath_t<P>;
  const int64_t tile = u / sg.pieces, piece = u - tile * sg.pieces;
  const int64_t len = sg.tile_rows * sg.cols;
  const int64_t end = min((piece + 1) * AM::kRunPiece, len);
  const P* g = static_cast<const P*>(sg.g) + sg.offset + tile * sg.tile_rows * sg.row_stride;
  double acc = 0.0;
  int64_t e = piece * AM::kRunPiece + threadIdx.x;
  for (; e + 7 * kThreads < end; e += 8 * kThreads) {
    C x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = load<C>(g + e + k * kThreads);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc += square(x[k]);
  }
  for (; e < end; e += kThreads) acc += square(load<C>(g + e));
  const double sum = block_sum(acc, red);
  if (threadIdx.x == 0) prm.partials[sg.partials + u] = sum;  // = tile * pieces + piece
}

template <typename P>
__device__ void reduce_rect(const AM& prm, const AdamMiniSeg& sg, int64_t u, double* red) {
  using C = opmath_t<P>;
  const Rect r = rect_of(sg, u);
  const int t = static_cast<int>(threadIdx.x), rl = t / r.w, cl = t % r.w;
  const bool active = rl < r.tr;
  double acc = 0.0;
  if (active) {
    const P* g = static_cast<const P*>(sg.g) + sg.offset + r.c0 + cl;
    const int64_t rs = sg.row_stride;
    int64_t row = r.r0 + rl;
    for (; row + 7 * r.tr < r.r1; row += 8 * r.tr) {
      C x[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = load<C>(g + (row + k * r.tr) * rs);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc += square(x[k]);
    }
    for (; row < r.r1; row += r.tr) acc += square(load<C>(g + row * rs));
  }
  red[t] = acc;
  // Fixed-shape trees (deterministic): over the row lanes, then over each part's columns.
  for (int s = 1; s < r.tr; s <<= 1) {
    __syncthreads();
    if (active && (rl & (2 * s - 1)) == 0 && rl + s < r.tr) red[t] += red[t + s * r.w];
  }
  const int lo = sg.parts_per_tile == 1 ? cl / static_cast<int>(sg.tile_cols) *
                                              static_cast<int>(sg.tile_cols) : 0;
  const int hi = sg.parts_per_tile == 1 ? lo + static_cast<int>(sg.tile_cols) : r.w;
  for (int s = 1; s < r.w; s <<= 1) {
    __syncthreads();
    if (rl == 0 && ((cl - lo) & (2 * s - 1)) == 0 && cl + s < hi) red[cl] += red[cl + s];
  }
  if (rl == 0 && cl == lo) {  // red[lo] was last written by this thread
    const int64_t q = part_of(sg, r, cl);
    prm.partials[sg.partials + (tile_of(sg, r, q) * sg.rects_down + r.rc) * sg.parts_per_tile +
                 q % sg.parts_per_tile] = red[cl];
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ AM prm) {
  __shared__ double red[kThreads];
  const AdamMiniSeg& sg = seg_of_unit(prm, blockIdx.x);
  const int64_t u = blockIdx.x - sg.unit_begin;
  if (sg.kind == AM::kRuns) reduce_run<P>(prm, sg, u, red);
  else reduce_rect<P>(prm, sg, u, red);
}

template <typename S, typename C>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const __grid_constant__ AM prm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= prm.n_tiles || step_skipped(prm.device)) return;
  const AdamMiniSeg& sg = seg_of_tile(prm, i);
  const int64_t t = i - sg.tile_begin;
  const double* part = prm.partials + sg.partials + t * sg.pieces;
  double sum = 0.0;
  for (int k = 0; k < sg.pieces; ++k) sum += part[k];
  const double numel = static_cast<double>(sg.tile_rows * sg.tile_cols);
  prm.factors[i] = block_factor<S, C>(static_cast<S*>(sg.v) + t, sum, numel,
                                      seg_scalars(prm, sg), prm.beta2, prm.eps);
}

// Updates the elements base + k*step (k < count) with factor f, four at a time.
template <typename P, typename S>
__device__ __forceinline__ void update_strided(const AM& prm, const AdamMiniSeg& sg,
                                               int64_t base, int64_t step, int64_t count,
                                               opmath_t<P> f) {
  using C = opmath_t<P>;
  P* p = static_cast<P*>(sg.p);
  const P* g = static_cast<const P*>(sg.g);
  S* m = static_cast<S*>(sg.m);
  const StepScalars sc = seg_scalars(prm, sg);
  const C decay = static_cast<C>(sc.decay), b1c = static_cast<C>(1.0 - prm.beta1);
  for (int64_t k = 0; k < count; k += 4) {
    int64_t at[4];
    bool ok[4];
    C gj[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      at[u] = base + (k + u) * step;
      ok[u] = k + u < count;
      gj[u] = ok[u] ? load<C>(g + at[u]) : C(0);
    }
    update_n<4>(p, m, at, ok, gj, decay, b1c, f, prm, sc.round_key, 0);
  }
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ AM prm) {
  using C = opmath_t<P>;
  if (step_skipped(prm.device)) return;
  const AdamMiniSeg& sg = seg_of_unit(prm, blockIdx.x);
  const int64_t u = blockIdx.x - sg.unit_begin;
  if (sg.kind == AM::kRuns) {
    const int64_t tile = u / sg.pieces, piece = u - tile * sg.pieces;
    const int64_t begin = piece * AM::kRunPiece + threadIdx.x;
    const int64_t end = min((piece + 1) * AM::kRunPiece, sg.tile_rows * sg.cols);
    if (begin >= end) return;
    const C f = static_cast<C>(prm.factors[sg.tile_begin + tile]);
    const int64_t base = sg.offset + tile * sg.tile_rows * sg.row_stride;
    update_strided<P, S>(prm, sg, base + begin, kThreads, (end - begin + kThreads - 1) / kThreads,
                         f);
  } else {
    const Rect r = rect_of(sg, u);
    const int t = static_cast<int>(threadIdx.x), rl = t / r.w, cl = t % r.w;
    if (rl >= r.tr || r.r0 + rl >= r.r1) return;
    const C f = static_cast<C>(prm.factors[sg.tile_begin + tile_of(sg, r, part_of(sg, r, cl))]);
    const int64_t count = (r.r1 - r.r0 - rl + r.tr - 1) / r.tr;
    update_strided<P, S>(prm, sg, sg.offset + (r.r0 + rl) * sg.row_stride + r.c0 + cl,
                         r.tr * sg.row_stride, count, f);
  }
}

// int8 weights or 8-bit m (AM::n_int8_units > 0): the update of a unit of whole groups (code
// blocks), each element with its block's factor. A segment whose rows are contiguous
// (row_stride == cols) is one line of rows * cols elements, else each row is a line; a unit is
// update_unit_chunk elements of a line (whole groups: offset, row_stride and cols are multiples
// of the group, check_block_spec and the glue). 8-bit m runs the loop twice as an int8 weight
// does (weights.cuh with_weights_measured; with an int8 weight, the same two sweeps): a sweep
// that writes nothing but each code block's largest |new m| (and each weight group's), then the
// same loop again, encoding; then the blocks' new scales. A unit is then whole code blocks too
// (the glue checks update_unit_chunk).
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) int8_update_kernel(const __grid_constant__ AM prm) {
  using C = opmath_t<P>;
  constexpr int kBlocks = static_cast<int>(kInt8Chunk / kStateBlock);
  __shared__ unsigned m_max[kBlocks];
  __shared__ float m_scale[kBlocks];
  if (step_skipped(prm.device)) return;
  int s = 0;
  while (s + 1 < prm.n_segs && prm.seg[s + 1].int8_unit_begin <= blockIdx.x) ++s;
  const AdamMiniSeg& sg = prm.seg[s];
  const int64_t tiles = (s + 1 < prm.n_segs ? prm.seg[s + 1].tile_begin : prm.n_tiles) -
                        sg.tile_begin;
  const int64_t across = sg.cols / sg.tile_cols, rows = tiles / across * sg.tile_rows;
  const bool one_line = sg.row_stride == sg.cols;
  const int64_t line_len = one_line ? rows * sg.cols : sg.cols;
  const int64_t chunk = update_unit_chunk(sg.int8_group);
  const int64_t per_line = (line_len + chunk - 1) / chunk;
  const int64_t u = blockIdx.x - sg.int8_unit_begin, line = u / per_line;
  const int64_t k0 = (u - line * per_line) * chunk;  // first element of the unit in its line
  const int64_t n = min(chunk, line_len - k0);
  const int64_t first = sg.offset + line * sg.row_stride + k0;  // in the parameter
  const StepScalars sc = seg_scalars(prm, sg);
  const C decay = static_cast<C>(sc.decay), b1c = static_cast<C>(1.0 - prm.beta1);
  const P* g = static_cast<const P*>(sg.g) + first;
  const double* factors = prm.factors + sg.tile_begin;
  auto body = [&](const auto& w) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const int64_t k = k0 + j, r = one_line ? k / sg.cols : line, c = one_line ? k % sg.cols : k;
      const C f = static_cast<C>(factors[r / sg.tile_rows * across + c / sg.tile_cols]);
      const int b = static_cast<int>(j / kStateBlock);  // (8-bit m) its code block in the unit
      const C m_old = sg.m_scales
          ? static_cast<C>(moment_decode(static_cast<const int8_t*>(sg.m)[first + j],
                                         sg.m_scales[(first + j) / kStateBlock]))
          : load<C>(static_cast<const S*>(sg.m) + first + j);
      const C mj = lerp(m_old, load<C>(g + j), b1c);  // as update_n
      w.put(j, w.template get<C>(j) * decay - f * mj, first + j);
      if (!sg.m_scales) {
        if (w.writes_state()) store(static_cast<S*>(sg.m) + first + j, mj);
      } else if (!w.writes_state()) {
        atomicMax(m_max + b, __float_as_uint(fabsf(static_cast<float>(mj))));
      } else {
        static_cast<int8_t*>(sg.m)[first + j] =
            state_block_empty(m_scale[b]) ? int8_t{0}
                                          : moment_code(static_cast<float>(mj), 1.0f / m_scale[b]);
      }
    }
  };
  if (!sg.m_scales) {
    with_weights<P>(sg.p, sg.scales, sg.int8_group, first, n, prm.stochastic, sc.round_key, body);
    return;
  }
  const int blocks = static_cast<int>((n + kStateBlock - 1) / kStateBlock);
  for (int b = threadIdx.x; b < blocks; b += kThreads) m_max[b] = 0u;
  __syncthreads();
  with_weights_measured<P>(sg.p, sg.scales, sg.int8_group, first, n, prm.stochastic,
                           sc.round_key, body, [&] {
    for (int b = threadIdx.x; b < blocks; b += kThreads)
      m_scale[b] = state_block_scale(__uint_as_float(m_max[b]));
  });
  __syncthreads();  // every old scale has been read
  for (int b = threadIdx.x; b < blocks; b += kThreads)
    sg.m_scales[first / kStateBlock + b] = m_scale[b];
}

}  // namespace

int launch_adam_mini_two_pass(const AM& prm, cudaStream_t stream) {
  return dispatch_param_state(prm.param_dtype, prm.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = typename decltype(p_tag)::type;
    using S = typename decltype(s_tag)::type;
    const auto units = static_cast<unsigned>(prm.n_units);
    reduce_kernel<P><<<units, kThreads, 0, stream>>>(prm);
    if (const int err = last_launch_error()) return err;
    const auto tiles_grid = static_cast<unsigned>((prm.n_tiles + kThreads - 1) / kThreads);
    finalize_kernel<S, opmath_t<P>><<<tiles_grid, kThreads, 0, stream>>>(prm);
    if (const int err = last_launch_error()) return err;
    if (prm.n_int8_units > 0) {
      const auto int8_units = static_cast<unsigned>(prm.n_int8_units);
      int8_update_kernel<P, S><<<int8_units, kThreads, 0, stream>>>(prm);
    } else {
      update_kernel<P, S><<<units, kThreads, 0, stream>>>(prm);
    }
    return last_launch_error();
  });
}

}  // namespace memopt::cuda
