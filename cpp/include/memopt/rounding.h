// Stochastic rounding of bf16 parameters: the one definition of its random bits, shared by the
// CPU loops, the CUDA kernels (host and device code; no ATen here) and the host code that derives
// each tensor's key.
//
// Every op takes `int[] rounding`: [] rounds parameters to nearest even (the default, the
// trajectories of before), or [seed, counter, id_0, ..., id_{n-1}] for n parameters, which
// rounds every bf16 parameter stochastically from its fp32 result: element e of params[i] at its
// step t (after the increment) goes up with probability equal to the fraction it lies above the
// bf16 value below, using the bits rounding_bits(rounding_key(seed, counter, id_i, t), e).
// Counter-based, so a run is reproducible from the seed and resumes exactly from the steps it
// saved; `counter` must change every step for a tensor without a step count (FRUGAL's
// state-free blocks pass the optimizer's step), `id_i` tells the tensors apart (the front ends
// pass the parameter's position in the optimizer). Other dtypes are stored as without it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEMOPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEMOPT_HOST_DEVICE inline
#endif

namespace memopt {

// SplitMix64's finalizer: a bijective 64-bit mix.
MEMOPT_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A tensor's key for one step (host code, once per tensor and step).
MEMOPT_HOST_DEVICE uint64_t rounding_key(int64_t seed, int64_t counter, int64_t id, int64_t step) {
  uint64_t k = mix64(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ull);
  k = mix64(k ^ static_cast<uint64_t>(counter));
  k = mix64(k ^ static_cast<uint64_t>(id));
  return mix64(k ^ static_cast<uint64_t>(step));
}

// A bijective 32-bit mix (C. Wellons' lowbias32): 32-bit multiplies, so the CPU loops vectorize.
MEMOPT_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  return x ^ (x >> 15);
}

// The random bits of element `index` under `key`; the low 16 round it. One mix of an input that
// is a bijection of the index for a given key (so a tensor's elements never share bits), which
// the key's 64 bits already made independent between steps and tensors.
MEMOPT_HOST_DEVICE uint32_t rounding_bits(uint64_t key, int64_t index) {
  const uint64_t e = static_cast<uint64_t>(index);
  const uint32_t lo = static_cast<uint32_t>(e) ^ static_cast<uint32_t>(key);
  const uint32_t hi = static_cast<uint32_t>(key >> 32) ^ (static_cast<uint32_t>(e >> 32) * 0x9e3779b9u);
  return mix32(lo + hi);
}

// The bf16 bits of the float with bits `u`, rounded up in magnitude when the 16 bits dropped
// plus the low 16 of `bits` carry: an unbiased rounding. NaN becomes 0x7FC0 (as nearest-even
// rounding makes it); infinities stay; a value within one bf16 step of the largest finite one
// may round to infinity, as it would in expectation.
MEMOPT_HOST_DEVICE uint16_t bf16_bits_stochastic(uint32_t u, uint32_t bits) {
  const uint32_t rounded = (u + (bits & 0xFFFFu)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

}  // namespace memopt
