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
  Dtype param_dtype, state_dtype;          // grads have the param dtype
  int32_t rule;                            // memopt::FrugalRule: 0 none, 1 SGD, 2 signSGD
  void* p[kMaxTensors];
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
  ChunkMap<kMaxTensors, 320> map;
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
  const void* g;   // contiguous like p: the same leading dimension
  const void* t;
  int64_t ld_p, ld_t, gp_offset;
  double decay, lr_free;
};
static_assert(sizeof(FrugalProjUpdateParams) <= 4096, "kernel argument over 4 KiB");
int launch_frugal_proj_update(const FrugalProjUpdateParams& params, Stream stream);

}  // namespace memopt::cuda
