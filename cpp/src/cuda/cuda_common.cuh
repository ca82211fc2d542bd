// Device helpers shared by the kernels: storage <-> compute conversions, dtype dispatch, block
// reductions and launch checking. CUDA headers and kernel_params.h only (see kernel_params.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "memopt/kernel_params.h"
#include "memopt/rounding.h"

namespace memopt::cuda {

// Compute type: float for fp32/bf16/fp16 storage, double for fp64 (as the CPU kernels do).
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename C, typename T>
__device__ __forceinline__ C load(const T* ptr) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return static_cast<C>(__bfloat162float(*ptr));
  else if constexpr (std::is_same_v<T, __half>) return static_cast<C>(__half2float(*ptr));
  else return static_cast<C>(*ptr);
}

// Round-to-nearest-even, the same rounding as c10::BFloat16 / c10::Half on the CPU.
template <typename T, typename C>
__device__ __forceinline__ void store(T* ptr, C x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) *ptr = __float2bfloat16_rn(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, __half>) *ptr = __float2half_rn(static_cast<float>(x));
  else *ptr = static_cast<T>(x);
}

// Stores element `index` of a parameter: with `stochastic` (a bf16 parameter, memopt/rounding.h)
// rounded by the bits of (key, index), the CPU loops' cpu::Stochastic exactly; else as store().
template <typename T, typename C>
__device__ __forceinline__ void store_param(T* ptr, C x, int32_t stochastic, uint64_t key,
                                            int64_t index) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && std::is_same_v<C, float>) {
    if (stochastic) {
      *ptr = __ushort_as_bfloat16(
          bf16_bits_stochastic(__float_as_uint(x), rounding_bits(key, index)));
      return;
    }
  }
  store(ptr, x);
}

// x rounded to the storage type S and back: what a value is once stored (the CPU ops compute
// from stored moments, so the kernels do too).
template <typename S, typename C>
__device__ __forceinline__ C round_to(C x) {
  S stored;
  store(&stored, x);
  return load<C>(&stored);
}

// torch.lerp(start, end, w) as ATen computes it, the twin of cpu::lerp (cpu_loops.h): every
// first moment is lerp(m, g, 1 - b1), which is g exactly at beta1 = 0.
template <typename C>
__device__ __forceinline__ C lerp(C start, C end, C w) {
  const bool small = w < C(0.5) && w > C(-0.5);  // |w| < 0.5
  return small ? start + w * (end - start) : end - (end - start) * (C(1) - w);
}

template <typename T>
struct Tag { using type = T; };

// Calls f(Tag<P>{}, Tag<S>{}) for the (param, state) storage pair; state is the param dtype or
// float32, as the CPU ops accept. Returns cudaErrorInvalidValue for any other pair.
template <typename F>
int dispatch_param_state(Dtype param, Dtype state, F&& f) {
  auto with_state = [&](auto p_tag) -> int {
    using P = typename decltype(p_tag)::type;
    if (state == Dtype::kFloat32) return f(p_tag, Tag<float>{});
    if (state == param) return f(p_tag, Tag<P>{});
    if (state == Dtype::kBFloat16) return f(p_tag, Tag<__nv_bfloat16>{});  // state_bits=16
    return cudaErrorInvalidValue;
  };
  switch (param) {
    case Dtype::kFloat32: return with_state(Tag<float>{});
    case Dtype::kBFloat16: return with_state(Tag<__nv_bfloat16>{});
    case Dtype::kFloat16: return with_state(Tag<__half>{});
    case Dtype::kFloat64: return with_state(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

// Sum over the CTA; every thread gets the result. `scratch` holds one value per warp, and the
// trailing barrier lets the caller reuse it for the next reduction.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// The error of the launch just made (configuration errors surface here, not at run time).
inline int last_launch_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace memopt::cuda
