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

}  // namespace memopt::cuda
