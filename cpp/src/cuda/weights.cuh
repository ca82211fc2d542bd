// How a kernel reads and writes the parameter it updates: a float one in place, an int8 one
// (memopt/int8_weights.h) through its codes and scales. A kernel's loop is written once against
//   w.get<C>(j)          the value of element j (from the base the accessor was made at)
//   w.put(j, x, index)   its new value x (index: the element's index in the parameter, whose
//                        stochastic-rounding bits it draws)
//   w.writes_state()     whether this pass writes the optimizer state (a kernel skips its state
//                        stores when it does not)
// and run through with_weights, which gives it a FloatWeights or runs it twice for an int8 weight
// (int8_sweeps): a group's new scale depends on every new value of the group, which the CPU
// holds in a buffer; here the CTA that owns the group first measures each group's largest new
// magnitude (nothing else written), then runs the same loop again, which recomputes the same
// values from the same unchanged inputs and encodes them, and finally writes the new scales.
// Costs a second read of the inputs (of one chunk, mostly from cache), no memory.
#pragma once

#include "cuda_common.cuh"
#include "memopt/int8_weights.h"

namespace memopt::cuda {

template <typename P>
struct FloatWeights {
  P* p;
  int32_t stochastic;  // store_param's (bf16 params rounded stochastically under key)
  uint64_t key;
  bool measure = false;  // a measuring sweep of 8-bit state: writes nothing
  template <typename C>
  __device__ __forceinline__ C get(int64_t j) const { return load<C>(p + j); }
  template <typename C>
  __device__ __forceinline__ void put(int64_t j, C x, int64_t index) const {
    if (!measure) store_param(p + j, x, stochastic, key, index);
  }
  __device__ __forceinline__ bool writes_state() const { return !measure; }
};

// Whole groups of an int8 weight from a group boundary; `group_max` and `group_inv` are the
// CTA's shared arrays, one entry per group of its range. j < kInt8Chunk: 32-bit group indices
// (a 64-bit division per element costs several times more on a GPU).
struct Int8Weights {
  int8_t* codes;
  const float* scales;
  int group;
  unsigned* group_max;  // measuring: the bits of each group's largest |new value| (atomicMax on
                        // the bits orders non-negative floats, and an inf or NaN exceeds them all)
  const float* group_inv;  // encoding: each group's code multiplier (0: zero or non-finite)
  bool measure;
  int32_t stochastic;
  uint64_t key;
  template <typename C>
  __device__ __forceinline__ C get(int64_t j) const {
    return static_cast<C>(int8_decode(codes[j], scales[static_cast<int>(j) / group]));
  }
  template <typename C>
  __device__ __forceinline__ void put(int64_t j, C x, int64_t index) const {
    const float value = static_cast<float>(x);
    const int k = static_cast<int>(j) / group;
    if (measure) {
      atomicMax(group_max + k, __float_as_uint(fabsf(value)));
      return;
    }
    const float inv = group_inv[k];
    codes[j] = inv > 0.0f ? int8_encode(value, inv, stochastic != 0,
                                        stochastic ? rounding_bits(key, index) : 0u)
                          : int8_t{0};
  }
  __device__ __forceinline__ bool writes_state() const { return !measure; }
};

// Runs body(w) over n <= kInt8Chunk elements (whole groups) of an int8 weight from codes /
// scales (at a group boundary), as described above. Every thread of the CTA calls it; body must
// not return early from the kernel (it ends in barriers).
// between(): with_weights_measured's, run by every thread after the measuring sweep.
template <typename Body, typename Between>
__device__ void int8_sweeps(int8_t* codes, float* scales, int group, int n, int32_t stochastic,
                            uint64_t key, Body&& body, Between&& between) {
  __shared__ unsigned group_max[kInt8MaxChunkGroups];
  __shared__ float group_inv[kInt8MaxChunkGroups];
  const int groups = (n + group - 1) / group;
  for (int k = threadIdx.x; k < groups; k += blockDim.x) group_max[k] = 0u;
  __syncthreads();
  body(Int8Weights{codes, scales, group, group_max, group_inv, true, stochastic, key});
  __syncthreads();
  for (int k = threadIdx.x; k < groups; k += blockDim.x)
    group_inv[k] = int8_group_scale(__uint_as_float(group_max[k])).inv;
  between();
  __syncthreads();
  body(Int8Weights{codes, scales, group, group_max, group_inv, false, stochastic, key});
  __syncthreads();  // every old scale has been read
  for (int k = threadIdx.x; k < groups; k += blockDim.x)
    scales[k] = int8_group_scale(__uint_as_float(group_max[k])).scale;
}

// body(w) for a CTA's n elements from element `first` of a parameter: int8 codes (scales
// non-null: `int8_group` elements per scale, first a group boundary) or storage P. Only float
// and bf16 values have an int8 form (memopt/common.h's check_weight_scales).
template <typename P, typename Body>
__device__ __forceinline__ void with_weights(void* p, float* scales, int64_t int8_group,
                                             int64_t first, int64_t n, int32_t stochastic,
                                             uint64_t key, Body&& body) {
  if constexpr (std::is_same_v<P, float> || std::is_same_v<P, __nv_bfloat16>) {
    if (int8_group > 0) {  // (n <= int8_chunk(group) <= kInt8Chunk: the launchers' chunks)
      int8_sweeps(static_cast<int8_t*>(p) + first, scales + first / int8_group,
                  static_cast<int>(int8_group), static_cast<int>(n), stochastic, key, body,
                  [] {});
      return;
    }
  }
  body(FloatWeights<P>{static_cast<P*>(p) + first, stochastic, key});
}

// with_weights for a body that measures its own state too (8-bit m's block maxima, taken where
// !w.writes_state()): two sweeps whatever the weight, the measuring one, then between() (every
// thread, after a barrier: it turns the state's measures into scales), then the writing one.
// An int8 weight's groups are measured and encoded in the same two sweeps. Ends in a barrier
// before the int8 weight's scales are written, not after.
template <typename P, typename Body, typename Between>
__device__ __forceinline__ void with_weights_measured(void* p, float* scales, int64_t int8_group,
                                                      int64_t first, int64_t n,
                                                      int32_t stochastic, uint64_t key,
                                                      Body&& body, Between&& between) {
  if constexpr (std::is_same_v<P, float> || std::is_same_v<P, __nv_bfloat16>) {
    if (int8_group > 0) {
      int8_sweeps(static_cast<int8_t*>(p) + first, scales + first / int8_group,
                  static_cast<int>(int8_group), static_cast<int>(n), stochastic, key, body,
                  between);
      return;
    }
  }
  P* w = static_cast<P*>(p) + first;
  body(FloatWeights<P>{w, stochastic, key, true});
  __syncthreads();
  between();
  __syncthreads();
  body(FloatWeights<P>{w, stochastic, key, false});
}

}  // namespace memopt::cuda
