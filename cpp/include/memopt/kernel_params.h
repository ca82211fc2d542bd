// Plain structs shared by the CUDA kernels (cpp/src/cuda/*.cu) and their host glue
// (cpp/src/cuda/*_glue.cpp). No ATen and no CUDA headers here: the .cu files include only this
// and CUDA's own headers, so nvcc alone compile-checks every kernel on a CPU-only machine, and a
// CPU torch wheel (which lacks a complete c10/cuda) still compiles the glue.
#pragma once

#include <cstdint>

#include "memopt/int8_weights.h"
#include "memopt/state_codes.h"
#include "memopt/step_scalars.h"

namespace memopt::cuda {

// Storage dtype of a tensor; the kernels compute in float (double for kFloat64).
enum class Dtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// A cudaStream_t, passed as an opaque pointer so this header needs no CUDA types.
using Stream = void*;

// Every launcher returns 0 or the cudaError_t of its first failed call (launch or API);
// the glue turns a non-zero code into a Python exception with error_string(code).
const char* error_string(int code);

// Multi-tensor launch metadata, passed by value as a kernel argument (torch's
// multi_tensor_apply split, no device allocation): CTA b handles chunk `chunk[b]` of the
// tensor in slot `slot[b]`. A launch holds at most kMaxTensors tensors and kMaxChunks chunks;
// every params struct below stays under the 4 KiB kernel-argument limit of pre-12.1 drivers.
template <int kMaxTensors, int kMaxChunks>
struct ChunkMap {
  static constexpr int max_tensors = kMaxTensors;
  static constexpr int max_chunks = kMaxChunks;
  int64_t numel[kMaxTensors];
  int16_t slot[kMaxChunks];
  int32_t chunk[kMaxChunks];
  int32_t n_tensors;
  int32_t n_chunks;
  int64_t chunk_size;  // elements per chunk (a multiple of 4 * the CTA size)
};

// int8 weights (memopt/int8_weights.h) in the chunked kernels: a group's new scale depends on
// every new value of the group, so one CTA owns whole groups (cuda/weights.cuh). An int8 tensor's
// chunk is the whole groups that fit kInt8Chunk elements (one group at least), and a launch
// holds int8 tensors of one group size (its `int8_group`; 0: float parameters).
constexpr int64_t kInt8Chunk = 8192;
constexpr int kInt8MaxChunkGroups = static_cast<int>(kInt8Chunk / kInt8MinGroup);
MEMOPT_HOST_DEVICE constexpr int64_t int8_chunk(int64_t group) {
  return group >= kInt8Chunk ? group : kInt8Chunk / group * group;
}
static_assert(kInt8MaxGroup <= kInt8Chunk, "a chunk holds at least one group");

// ---- Step counters on the device (cpp/src/cuda/step_scalars.cu) ----------------------------
// An Adam-family op given found_inf (memopt/common.h) keeps its step counters on the device:
// a prologue kernel advances each counter unless *found_inf is non-zero and writes the tensor's
// StepScalars (memopt/step_scalars.h) into a device array; the update kernels read theirs from
// there and return at once where *found_inf is non-zero, so a skipped step is decided without
// the host. With host counters (no found_inf) `scalars` and `found_inf` are null and the
// kernels take the StepScalars the host put in their parameters.
struct DeviceSteps {
  const StepScalars* scalars;
  const float* found_inf;
};
MEMOPT_HOST_DEVICE bool step_skipped(const DeviceSteps& d) {
  return d.found_inf != nullptr && *d.found_inf != 0.0f;
}
// Tensor `tensor`'s scalars of this step: the device array's entry, or `host`.
MEMOPT_HOST_DEVICE StepScalars step_scalars(const DeviceSteps& d, int32_t tensor,
                                            const StepScalars& host) {
  return d.scalars != nullptr ? d.scalars[tensor] : host;
}

struct StepScalarsParams {
  static constexpr int kMaxTensors = 128;
  float* step[kMaxTensors];        // each tensor's float32 counter, on the device; null for a
                                   // tensor without one (FRUGAL's state-free): scalars zero
  int64_t round_id[kMaxTensors];   // its stochastic-rounding id (rounding.h)
  double lr[kMaxTensors];          // its learning rate (FRUGAL scales the projected ones')
  StepScalars* out;                // out[k]: tensor k of this launch
  const float* found_inf;
  int32_t n, apollo_rule, stochastic, fixed_decay;  // fixed_decay: every decay is `decay`
  int64_t round_seed, round_counter;
  double beta1, beta2, weight_decay, decay;
};
static_assert(sizeof(StepScalarsParams) <= 4096, "kernel argument over 4 KiB");
int launch_step_scalars(const StepScalarsParams& params, Stream stream);

// ---- AdamW (cpp/src/cuda/adamw.cu) ----------------------------------------------------------
struct AdamWParams {
  static constexpr int kMaxTensors = 24;
  Dtype param_dtype, state_dtype;  // grads have the param dtype (int8: the value dtype)
  int32_t int8_group;              // > 0: every p holds int8 codes, with scales
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];
  void* v[kMaxTensors];
  float* scales[kMaxTensors];      // int8 only: the scales of p's first group
  // Per tensor (each has its own step count): its StepScalars (which carry the AdamWRule),
  // computed on the host, or on the device (entry tensor[s] of `device`, DeviceSteps above).
  StepScalars scalars[kMaxTensors];
  int32_t tensor[kMaxTensors];
  DeviceSteps device;
  double beta1, beta2, eps;
  int32_t decay_after;            // 0: (pre, post) = (decay, 1); 1 (kApollo): (1, decay)
  // bf16 params rounded stochastically (memopt/rounding.h): element j of slot s by the bits of
  // (the slot's round_key, round_first[s] + j), its index in the parameter.
  int32_t stochastic;
  int64_t round_first[kMaxTensors];
  ChunkMap<kMaxTensors, 296> map;
};
static_assert(sizeof(AdamWParams) <= 4096, "kernel argument over 4 KiB");
int launch_adamw(const AdamWParams& params, Stream stream);

// ---- AdamW with 8-bit m and v (cpp/src/cuda/adamw_codes.cu, memopt/state_codes.h) ----------
// A CTA of kStateThreads threads owns kStateChunk elements, whole code blocks: thread t keeps
// element u * 256 + t of each block u in registers, so a block's new scale is one CTA
// reduction and every value is computed once. Float weights (not int8), float/bf16/fp16.
constexpr int kStateThreads = 256;
constexpr int kStateChunkBlocks = 16;
constexpr int64_t kStateChunk = kStateThreads * kStateChunkBlocks;
struct AdamWCodedParams {
  static constexpr int kMaxTensors = 24;
  Dtype param_dtype;
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  int8_t* m[kMaxTensors];
  uint8_t* v[kMaxTensors];
  float* m_scales[kMaxTensors];
  float* v_scales[kMaxTensors];
  // int8 weights (memopt/int8_weights.h): p holds codes, w_scales one scale per int8_group
  // elements (a divisor of kStateChunk, so that a CTA owns whole groups); 0: a float parameter.
  float* w_scales[kMaxTensors];
  int32_t int8_group[kMaxTensors];
  StepScalars scalars[kMaxTensors];  // as AdamWParams
  int32_t tensor[kMaxTensors];
  DeviceSteps device;
  double beta1, beta2, eps;
  int32_t decay_after;
  int32_t stochastic;
  ChunkMap<kMaxTensors, 160> map;
};
static_assert(sizeof(AdamWCodedParams) <= 4096, "kernel argument over 4 KiB");
int launch_adamw_coded(const AdamWCodedParams& params, Stream stream);


// ---- APOLLO (cpp/src/cuda/apollo.cu) --------------------------------------------------------
// One tensor's R = P G (or G P^T) comes from an ATen GEMM into workspace scratch; these kernels
// do the rest. Channel c of a Left projection is column c of G and of R (r, K); of a Right one,
// row c of G and of R (K, r). Per-channel sums are double, as on the CPU.

// Adam on R (moments updated in place) and, per channel, the sums of Rt^2 and R^2.
// One launch per tensor: it follows that tensor's GEMM in the reused R scratch.
struct ApolloMomentsParams {
  Dtype param_dtype, state_dtype;  // R is float (double for float64 params)
  int32_t left;                    // R is (r, K), else (K, r)
  const void* R;
  void* m;
  void* v;
  double* sum_rt2;  // K: sum over the channel of (M / (sqrt(V) + eps))^2
  double* sum_r2;   // K: sum over the channel of R^2
  int64_t r, K;
  double beta1, beta2, eps;
  const float* found_inf;  // the op's (null: none): nothing is written where it is set
};
static_assert(sizeof(ApolloMomentsParams) <= 4096, "kernel argument over 4 KiB");
int launch_apollo_moments(const ApolloMomentsParams& params, Stream stream);

// Per-channel sums of G^2 for the norm-growth limiter (||G s||^2 = sum_c s_c^2 ||G_c||^2).
// Left (column sums) is cut into `splits` row ranges, each writing its own K partial sums
// (out[split * K + c]); Right (row sums) writes out[c] (splits = 1).
struct ApolloGradNormParams {
  Dtype param_dtype;
  int32_t left;
  const void* g;  // contiguous (rows, cols)
  double* out;
  int64_t rows, cols;
  int32_t splits;
  int64_t rows_per_split;
};
static_assert(sizeof(ApolloGradNormParams) <= 4096, "kernel argument over 4 KiB");
int launch_apollo_grad_norms(const ApolloGradNormParams& params, Stream stream);
// Row ranges a Left gradient of `rows` rows is cut into (the glue sizes the partial sums).
int32_t apollo_grad_norm_splits(int64_t rows);

// Scaling factors, limiter and the final per-channel coefficients, one CTA per tensor:
//   s_c = sqrt(sum_rt2_c) / (sqrt(sum_r2_c) + 1e-8)   (tensor: over the sums of all channels)
//   limiter on ||U|| = sqrt(sum_c s_c^2 g2_c) [* alpha if scale_front], reading and writing norm
//   coef_c = (step_size * alpha / limit) * s_c   (coef[0] for tensor scaling), in double: the
//   update rounds it to the compute type, where the CPU op rounds it too.
// The per-channel arrays of all tensors of a call are carved back to back: tensor i's start at
// ch_off[i] (sums, coef) and g2_off[i] (partial G sums).
struct ApolloFactorParams {
  static constexpr int kMaxTensors = 32;
  Dtype param_dtype;
  int32_t n_tensors, channel, limiter, scale_front;
  const double* sum_rt2;
  const double* sum_r2;
  const double* g2;
  double* coef;
  double alpha, gamma;
  int64_t ch_off[kMaxTensors];
  int64_t g2_off[kMaxTensors];
  int64_t K[kMaxTensors];
  int32_t splits[kMaxTensors];
  void* norm[kMaxTensors];  // the limiter norm: float32 or float64 scalar on the device
  int32_t norm_is_double[kMaxTensors];
  // lr sqrt(1 - beta2^t) / (1 - beta1^t): StepScalars::step_size under AdamWRule::kApollo, the
  // host's here or, with device counters, device.scalars[tensor[i]]'s
  double step_size[kMaxTensors];
  int32_t tensor[kMaxTensors];
  DeviceSteps device;  // with found_inf: no norm is written and no coef where it is set
};
static_assert(sizeof(ApolloFactorParams) <= 4096, "kernel argument over 4 KiB");
int launch_apollo_factors(const ApolloFactorParams& params, Stream stream);

// The final pass, multi-tensor: p = (p - coef_c g) - lr wd (p - coef_c g), c per `mode`.
enum ApolloCoefMode : int32_t { kApolloPerTensor = 0, kApolloPerRow = 1, kApolloPerColumn = 2 };
struct ApolloUpdateParams {
  static constexpr int kMaxTensors = 32;
  Dtype param_dtype;   // grads have the param dtype (int8: the value dtype)
  int32_t int8_group;  // > 0: every p holds int8 codes, with scales (as AdamWParams)
  void* p[kMaxTensors];
  float* scales[kMaxTensors];
  const void* g[kMaxTensors];
  const double* coef[kMaxTensors];  // ApolloFactorParams' coef of this tensor
  int64_t cols[kMaxTensors];
  int32_t mode[kMaxTensors];
  double lr_wd;
  int32_t stochastic;  // bf16 params rounded stochastically with round_key (memopt/rounding.h)
  uint64_t round_key[kMaxTensors];  // the host's, or with device counters theirs (as factors)
  int32_t tensor[kMaxTensors];
  DeviceSteps device;  // with found_inf: nothing is written where it is set
  ChunkMap<kMaxTensors, 280> map;
};
static_assert(sizeof(ApolloUpdateParams) <= 4096, "kernel argument over 4 KiB");
int launch_apollo_update(const ApolloUpdateParams& params, Stream stream);
// Elements per chunk (CTA) of a float tensor's update: apollo_'s and its shard update's.
constexpr int64_t kApolloUpdateChunk = 65536;

// ---- Adam-mini / SlimAdam (cpp/src/cuda/adam_mini.cu, adam_mini_two_pass.cu) ----------------
// One Segment (partition.h) of one tensor, with the tensor's pointers and scalars. A launch
// holds up to kMaxSegs segments of any tensors; its units (a unit is what one CTA, or one warp,
// works on) are numbered segment after segment, and a kernel finds its segment by unit_begin.
struct AdamMiniSeg {
  void* p;
  const void* g;
  void* m;
  void* v;            // exp_avg_sq at this segment's first block
  StepScalars s;      // the tensor's (each has its own step count), or
  int32_t tensor;     // its entry in AdamMiniParams::device (DeviceSteps above)
  int64_t offset, row_stride, cols, tile_rows, tile_cols;  // partition.h's Segment
  int64_t unit_begin;  // first unit of this segment in the launch
  int64_t tile_begin;  // first tile (block): its factor's index in the scratch (two-pass)
  int64_t partials;    // first partial sum of this segment in the scratch (two-pass)
  int32_t kind;        // AdamMiniParams::kRuns or kRects (two-pass)
  int32_t pieces;      // partial sums per tile (two-pass)
  // kRects only: a tile is cut into parts of at most kRectCols columns (parts_per_tile of them)
  // and a rectangle covers parts_per_rect parts and rect_rows rows of one band of tiles.
  int32_t parts_per_tile, parts_per_rect, rect_rows, rects_down, rects_across;
  // int8 weights (two-pass only): p holds codes, `scales` their scales; the update's units are
  // runs of whole groups along the segment's rows (adam_mini_two_pass.cu), from int8_unit_begin.
  int32_t int8_group;  // 0: a float parameter
  float* scales;
  int64_t int8_unit_begin;
  // 8-bit m (memopt/state_codes.h; float weights): m holds int8 codes with these block scales,
  // and the update runs in units of whole code blocks (update_unit_chunk), like int8 weights.
  float* m_scales;  // null: m in the state dtype
};
// Elements per update unit of a two-pass segment with int8 weights (whole groups) or, with
// int8_group 0, with 8-bit m (whole code blocks).
MEMOPT_HOST_DEVICE constexpr int64_t update_unit_chunk(int32_t int8_group) {
  return int8_chunk(int8_group > 0 ? int8_group : kStateBlock);
}

struct AdamMiniParams {
  static constexpr int kMaxSegs = 20;
  // Paths. Fused: one warp (kWarp) or CTA per tile, the tile's gradient held in registers
  // between its sum of squares and its update; a tile must be one contiguous run of at most
  // fused_capacity(path) elements. kTwoPass: any tiling, via partial sums in a scratch buffer.
  enum Path : int32_t { kWarp = 0, kCta256 = 1, kCta512 = 2, kCta1024 = 3, kTwoPass = 4 };
  static constexpr int kNumPaths = 5;
  // Two-pass segment kinds: kRuns (each tile one contiguous run, cut into kRunPiece pieces) and
  // kRects (anything else: rectangles of rows x up to kRectCols columns within a band).
  enum Kind : int32_t { kRuns = 0, kRects = 1 };
  static constexpr int64_t kRunPiece = 32768;
  static constexpr int64_t kRectCols = 256;
  static constexpr int64_t kRectElems = 65536;  // target elements per rectangle
  static constexpr int64_t fused_capacity(int path, Dtype param) {
    const int64_t floats = path == kWarp ? 256 : path == kCta256 ? 4096 : path == kCta512 ? 8192
                         : path == kCta1024 ? 16384 : 0;
    return param == Dtype::kFloat64 ? floats / 2 : floats;  // held in registers: same bytes
  }

  Dtype param_dtype, state_dtype;  // grads have the param dtype, exp_avg_sq the state dtype
  int32_t stochastic;              // bf16 params rounded stochastically (memopt/rounding.h)
  int32_t path;
  int32_t n_segs;
  int64_t n_units, n_tiles, n_partials;
  int64_t n_int8_units;  // > 0: an int8 (or 8-bit m) batch, every segment updated by units
  double beta1, beta2, eps;
  double* partials;  // two-pass scratch: n_partials sums of squares, then n_tiles factors
  double* factors;
  DeviceSteps device;
  AdamMiniSeg seg[kMaxSegs];
};
static_assert(sizeof(AdamMiniParams) <= 4096, "kernel argument over 4 KiB");
int launch_adam_mini(const AdamMiniParams& params, Stream stream);


// ---- Adam-mini on a shard (cpp/src/cuda/adam_mini_shard.cu) -----------------------------------
// One ShardPiece (partition.h) of a shard of an FSDP2 tensor, its block factors already computed
// from the all-reduced block sums: m = lerp(m, g, b1c) and p = p decay - factor m for every
// element, the CPU op's block_update_span / column_update_span. The piece's elements are
// (rows / tile_rows) bands x tile_rows rows x tiles_per_row tiles x tile_cols columns of a
// contiguous shard; element (r, j, c) has block block0 + (r / tile_rows) band_blocks + j.
// Nothing is written where *found_inf (the op's, or null) is non-zero.
// With 8-bit m (m_scales set: m holds int8 codes, memopt/state_codes.h, blocks of the local
// shard's memory order) a piece takes two launches, and the tensor one more once every piece
// has had both: pass 1 updates p and takes each code block's max |m| (as float32 bits, with
// atomicMax, into m_absmax: zeroed, one per code block); pass 2 recomputes m (the same
// arithmetic) and encodes it under the new scales; launch_adam_mini_shard_scales then writes
// those scales over the old ones, which both passes decode with.
struct AdamMiniShardParams {
  Dtype param_dtype, state_dtype;  // (state_dtype: float32 with 8-bit m)
  void* p;
  const void* g;
  void* m;
  const void* factor;  // per block of the full tensor, in the compute type (float or double)
  const float* found_inf;
  int64_t offset, rows, row_stride, tile_rows, tiles_per_row, tile_cols, block0, band_blocks;
  double decay, b1c;
  const float* m_scales;  // 8-bit m: the block scales (nullptr: m is float)
  unsigned* m_absmax;
  int pass;               // 8-bit m: 1 or 2
};
int launch_adam_mini_shard(const AdamMiniShardParams& params, Stream stream);
int launch_adam_mini_shard_scales(const float* found_inf, const unsigned* absmax, float* scales,
                                  int64_t blocks, Stream stream);

// ---- FRUGAL (cpp/src/cuda/frugal.cu) ----------------------------------------------------------
// Modes 0-1 of memopt::FrugalMode (AdamW on a whole tensor) run on launch_adamw. Modes 2-5 (the
// state-free block; AdamW on selected columns / rows / flat coordinates and the state-free rule
// on the rest) share one multi-tensor kernel, one pass over p and g per tensor. The projection
// modes 6-7 are ATen GEMMs in the glue around the two per-chunk elementwise kernels below.

// Modes 2-5. A chunk of the map is a tile: kTile flat elements (modes 2 and 5), or tile_rows x
// tile_cols of the matrix (3 and 4; tile_cols <= kThreads, tile_rows <= kMapSize). map.numel
// counts tiles and map.chunk_size is 1.
struct FrugalSplitParams {
  static constexpr int kMaxTensors = 16;
  static constexpr int kThreads = 256;
  static constexpr int kMapSize = 4096;    // shared-memory slot map: a tile's rows, a randk window
  static constexpr int64_t kTile = 65536;  // elements of a flat tile, and about of a 2-D one
  // int8 weights (int8_group > 0, every mode): a tile is `tile_cols` elements (whole groups, at
  // most kMapSize) of one row, the row's last tile shorter; tiles run row by row.
  static constexpr int64_t int8_tile(int64_t group, int64_t cols) {
    const int64_t fit = group >= kMapSize ? group : kMapSize / group * group;
    return fit < cols ? fit : cols;
  }
  Dtype param_dtype, state_dtype;          // grads have the param dtype (int8: the value dtype)
  int32_t rule;                            // memopt::FrugalRule: 0 none, 1 SGD, 2 signSGD
  int32_t int8_group;                      // > 0: every p holds int8 codes, with scales
  void* p[kMaxTensors];
  float* scales[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];                    // moments of the selected coordinates (not mode 2)
  void* v[kMaxTensors];
  const int32_t* idx[kMaxTensors];         // the selection (columns, rows or flat coordinates)
  int64_t numel[kMaxTensors];
  int64_t cols[kMaxTensors];               // modes 3 and 4
  int64_t k[kMaxTensors];                  // number of indices, < 2^31
  int32_t mode[kMaxTensors];
  int32_t tile_rows[kMaxTensors], tile_cols[kMaxTensors], col_tiles[kMaxTensors];
  // Per tensor (its own step count), computed on the host in double; decay is shared.
  double step_size[kMaxTensors];           // lr * proj_lr_scale / (1 - beta1^t)
  double bc2_sqrt[kMaxTensors];            // sqrt(1 - beta2^t)
  double decay, lr_free, beta1, beta2, eps;
  int32_t stochastic;  // bf16 params rounded stochastically with round_key (memopt/rounding.h)
  uint64_t round_key[kMaxTensors];
  // With device counters (the op's found_inf): a stateful tensor's step_size, bc2_sqrt and
  // round_key are device.scalars[tensor[slot]]'s, and nothing is written where found_inf is set.
  int32_t tensor[kMaxTensors];
  DeviceSteps device;
  ChunkMap<kMaxTensors, 300> map;
};
static_assert(sizeof(FrugalSplitParams) <= 4096, "kernel argument over 4 KiB");
int launch_frugal_split(const FrugalSplitParams& params, Stream stream);

// Modes 6-7, one chunk of a projected tensor (outer x inner, row-major with leading dimensions):
// AdamW on the projected gradient `low` (compute dtype: double for fp64 params, else float),
// writing out = step_size * m / denom, or that minus lr_free * low for SGD (out may be low).
struct FrugalProjAdamParams {
  Dtype param_dtype, state_dtype;
  int32_t rule;
  int64_t outer, inner;
  const void* low;
  void* out;
  void* m;
  void* v;
  int64_t ld_low, ld_out, ld_m;
  double beta1, beta2, eps, step_size, bc2_sqrt, lr_free;
  DeviceSteps device;  // as FrugalSplitParams': scalars[tensor], nothing written on found_inf
  int32_t tensor;
};
static_assert(sizeof(FrugalProjAdamParams) <= 4096, "kernel argument over 4 KiB");
int launch_frugal_proj_adam(const FrugalProjAdamParams& params, Stream stream);

// ... then p = p * decay - U - lr_free * rule(g - Gp) over the chunk, from t = the back-projected
// chunk (compute dtype): U at t[o * ld_t + j], Gp at t[o * ld_t + gp_offset + j] (signSGD); for
// SGD t holds U - lr_free * Gp; for the rule none, U.
struct FrugalProjUpdateParams {
  Dtype param_dtype;
  int32_t rule;
  int64_t outer, inner;
  void* p;
  // int8 (int8_group > 0): p holds codes and `scales` the scales of its first group; ld_p and
  // the chunk's columns are whole groups, and one CTA takes int8_chunk(group) of a row.
  float* scales;
  int32_t int8_group;
  const void* g;   // contiguous like p: the same leading dimension
  const void* t;
  int64_t ld_p, ld_t, gp_offset;
  double decay, lr_free;
  int32_t stochastic;  // p[o * ld_p + j] is element first + o * ld_p + j of the parameter
  uint64_t round_key;
  int64_t first;
  DeviceSteps device;  // as FrugalProjAdamParams'
  int32_t tensor;
};
static_assert(sizeof(FrugalProjUpdateParams) <= 4096, "kernel argument over 4 KiB");
int launch_frugal_proj_update(const FrugalProjUpdateParams& params, Stream stream);

// ---- int8_encode_ (cpp/src/cuda/int8_encode.cu) ---------------------------------------------
// Float values (numel, contiguous, float32 or bf16) to int8 codes and group scales, to nearest:
// one CTA per int8_chunk(group) elements, weights.cuh's encoder.
struct Int8EncodeParams {
  Dtype dtype;
  const void* values;
  int8_t* codes;
  float* scales;
  int64_t numel, group;
};
int launch_int8_encode(const Int8EncodeParams& params, Stream stream);

}  // namespace memopt::cuda
