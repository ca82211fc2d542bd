// Plain structs shared by the CUDA kernels (cpp/src/cuda/*.cu) and their host glue
// (cpp/src/cuda/*_glue.cpp). No ATen and no CUDA headers here: the .cu files include only this
// and CUDA's own headers, so nvcc alone compile-checks every kernel on a CPU-only machine, and a
// CPU torch wheel (which lacks a complete c10/cuda) still compiles the glue.
#pragma once

#include <cstdint>

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

// ---- AdamW (cpp/src/cuda/adamw.cu) ----------------------------------------------------------
struct AdamWParams {
  static constexpr int kMaxTensors = 24;
  Dtype param_dtype, state_dtype;  // grads have the param dtype
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];
  void* v[kMaxTensors];
  // Per tensor (each has its own step count), computed on the host in double.
  double decay[kMaxTensors];      // 1 - lr * weight_decay
  double step_size[kMaxTensors];  // lr / (1 - beta1^t)
  double bc2_sqrt[kMaxTensors];   // sqrt(1 - beta2^t)
  double beta1, beta2, eps;
  ChunkMap<kMaxTensors, 320> map;
};
static_assert(sizeof(AdamWParams) <= 4096, "kernel argument over 4 KiB");
int launch_adamw(const AdamWParams& params, Stream stream);

// ---- Adam-mini / SlimAdam (cpp/src/cuda/adam_mini.cu, adam_mini_two_pass.cu) ----------------
// One Segment (partition.h) of one tensor, with the tensor's pointers and scalars. A launch
// holds up to kMaxSegs segments of any tensors; its units (a unit is what one CTA, or one warp,
// works on) are numbered segment after segment, and a kernel finds its segment by unit_begin.
struct AdamMiniSeg {
  void* p;
  const void* g;
  void* m;
  void* v;                            // exp_avg_sq at this segment's first block
  double decay, step_size, bc2_sqrt;  // the tensor's AdamScalars (each tensor has its own step)
  int64_t offset, row_stride, cols, tile_rows, tile_cols;  // partition.h's Segment
  int64_t unit_begin;  // first unit of this segment in the launch
  int64_t tile_begin;  // first tile (block): its factor's index in the scratch (two-pass)
  int64_t partials;    // first partial sum of this segment in the scratch (two-pass)
  int32_t kind;        // AdamMiniParams::kRuns or kRects (two-pass)
  int32_t pieces;      // partial sums per tile (two-pass)
  // kRects only: a tile is cut into parts of at most kRectCols columns (parts_per_tile of them)
  // and a rectangle covers parts_per_rect parts and rect_rows rows of one band of tiles.
  int32_t parts_per_tile, parts_per_rect, rect_rows, rects_down, rects_across;
};

struct AdamMiniParams {
  static constexpr int kMaxSegs = 26;
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
  int32_t path;
  int32_t n_segs;
  int64_t n_units, n_tiles, n_partials;
  double beta1, beta2, eps;
  double* partials;  // two-pass scratch: n_partials sums of squares, then n_tiles factors
  double* factors;
  AdamMiniSeg seg[kMaxSegs];
};
static_assert(sizeof(AdamMiniParams) <= 4096, "kernel argument over 4 KiB");
int launch_adam_mini(const AdamMiniParams& params, Stream stream);


}  // namespace memopt::cuda
