// Inner loops shared by the CPU kernels (internal header). Every loop computes in opmath_t
// (float for fp32/bf16/fp16 storage, double for float64) and rounds to storage once.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "memopt/arena.h"
#include "memopt/common.h"
#include "memopt/rounding.h"

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (GCC ifunc), as ATen does for its own kernels; the wheel itself targets baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MEMOPT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMOPT_CPU_CLONES
#endif

namespace memopt::cpu {

// Storage <-> compute conversions of the hot loops: static_cast, except bf16, whose c10
// conversions (a NaN branch on store) keep the loops scalar, 7x slower than fp32. Here they are
// bit operations that vectorize, with c10's results exactly: bf16 -> float is the high half;
// float -> bf16 rounds to nearest even, NaN to 0x7FC0 (c10::detail::round_to_nearest_even).
template <typename C, typename T>
inline C load(T x) {
  return static_cast<C>(x);
}
template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 x) {
  return c10::detail::f32_from_bits(x.x);
}
template <typename T, typename C>
inline T store(C x) {
  return static_cast<T>(x);
}
template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded),
                       c10::BFloat16::from_bits());
}

// How a loop stores parameter values (memopt/rounding.h): `Nearest` rounds to nearest even;
// `Stochastic` rounds bf16 from float by the bits of element first + j (j: the loop's index).
// A loop over p + o takes policy.at(o).
struct Nearest {
  Nearest at(int64_t) const { return *this; }
  template <typename P, typename C>
  P store(C x, int64_t) const {
    return cpu::store<P>(x);
  }
};
struct Stochastic {
  uint64_t key;
  int64_t first = 0;
  Stochastic at(int64_t offset) const { return {key, first + offset}; }
  template <typename P, typename C>
  P store(C x, int64_t j) const {
    if constexpr (std::is_same_v<P, c10::BFloat16> && std::is_same_v<C, float>) {
      uint32_t u;
      std::memcpy(&u, &x, sizeof(u));
      return c10::BFloat16(bf16_bits_stochastic(u, rounding_bits(key, first + j)),
                           c10::BFloat16::from_bits());
    } else {
      return cpu::store<P>(x);
    }
  }
};

// Calls f(policy) with tensor i's policy under `rounding` at `step`: Stochastic for a bf16
// parameter when the op was asked for it, else Nearest (the only instantiation for the rest).
template <typename P, typename F>
void with_rounding(const Rounding& rounding, size_t i, double step, F&& f) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (rounding.stochastic()) return f(Stochastic{rounding.key(i, step)});
  }
  f(Nearest{});
}

// torch.lerp(start, end, w) as ATen computes it (ATen/native/Lerp.h): start + w (end - start)
// for |w| < 0.5, else end - (end - start)(1 - w). Every first moment is lerp(m, g, 1 - b1), as
// torch.optim.AdamW's: at beta1 = 0 that is g exactly, where m + (g - m) keeps m's rounding.
// (cuda_common.cuh has the device twin.)
template <typename C>
inline C lerp(C start, C end, C w) {
  return std::abs(w) < C(0.5) ? start + w * (end - start) : end - (end - start) * (C(1) - w);
}
// lerp with its form fixed (kNearStart: |w| < 0.5). The loops below take the form as a template
// argument, chosen once per call by with_lerp_form: choosing per element, even on a
// loop-invariant condition, left GCC a branch it would not vectorize once the loop grew (bf16
// moments, stochastic rounding: measured 8x slower, scalar).
template <bool kNearStart, typename C>
inline C lerp_as(C start, C end, C w) {
  if constexpr (kNearStart) return start + w * (end - start);
  else return end - (end - start) * (C(1) - w);
}
template <typename C, typename F>
inline void with_lerp_form(C w, F&& f) {
  if (std::abs(w) < C(0.5)) f(std::true_type{});
  else f(std::false_type{});
}

// AdamW's scalars in the loops' compute type, under the rule `s` was made for (AdamScalars: the
// decay before the update, or after it for AdamWRule::kApollo).
template <typename C>
struct AdamConsts {
  C b1c, b2, b2c, step_size, bc2_sqrt, eps, pre, post;
  explicit AdamConsts(const AdamScalars& s)
      : b1c(1.0 - s.beta1), b2(s.beta2), b2c(1.0 - s.beta2), step_size(s.step_size),
        bc2_sqrt(s.bc2_sqrt), eps(s.eps), pre(s.decay_after ? 1.0 : s.decay),
        post(s.decay_after ? s.decay : 1.0) {}
};
// One element's AdamW step, the one place its arithmetic is written on the CPU (the CUDA
// kernels repeat its order): m and v (v itself) updated in place, root = sqrt(new v); returns
// p's new value.
template <bool kNearStart, typename C>
inline C adamw_element(const AdamConsts<C>& k, C p, C g, C& m, C& v, C& root) {
  m = lerp_as<kNearStart>(m, g, k.b1c);
  v = k.b2 * v + k.b2c * g * g;
  root = std::sqrt(v);
  const C denom = root / k.bc2_sqrt + k.eps;
  return (p * k.pre - k.step_size * m / denom) * k.post;
}

// Elementwise AdamW on [0, n) of contiguous arrays (8-bit states: cpu_states.h adamw_coded).
template <typename P, typename S, typename C, typename R, bool kNearStart, typename G>
MEMOPT_CPU_CLONES void adamw_span_as(P* __restrict p, const G* __restrict g, S* __restrict m,
                                     S* __restrict v, int64_t n, const AdamScalars& s,
                                     const R& round) {
  const AdamConsts<C> k(s);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C mj = load<C>(m[j]), vj = load<C>(v[j]), root;
    const C pj = adamw_element<kNearStart>(k, load<C>(p[j]), load<C>(g[j]), mj, vj, root);
    p[j] = round.template store<P>(pj, j);
    m[j] = store<S>(mj);
    v[j] = store<S>(vj);
  }
}
template <typename P, typename S, typename C, typename R = Nearest, typename G = P>
void adamw_span(P* p, const G* g, S* m, S* v, int64_t n, const AdamScalars& s,
                const R& round = {}) {
  with_lerp_form(C(1.0 - s.beta1), [&](auto near) {
    adamw_span_as<P, S, C, R, decltype(near)::value, G>(p, g, m, v, n, s, round);
  });
}

// One element's Adam step with its block's factor f = step_size / (sqrt(v_b)/bc2_sqrt + eps),
// the one place its arithmetic is written on the CPU: m updated in place; returns p's new value.
template <bool kNearStart, typename C>
inline C factor_element(C p, C g, C& m, C decay, C b1c, C f) {
  m = lerp_as<kNearStart>(m, g, b1c);
  return p * decay - f * m;
}

// The Adam step with one shared per-block factor f.
template <typename P, typename S, typename C, typename R, bool kNearStart, typename G>
MEMOPT_CPU_CLONES void block_update_span_as(P* __restrict p, const G* __restrict g,
                                            S* __restrict m, int64_t n, C decay, C b1c, C f,
                                            const R& round) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C mj = load<C>(m[j]);
    p[j] = round.template store<P>(factor_element<kNearStart>(load<C>(p[j]), load<C>(g[j]), mj,
                                                               decay, b1c, f), j);
    m[j] = store<S>(mj);
  }
}
template <typename P, typename S, typename C, typename R = Nearest, typename G = P>
void block_update_span(P* p, const G* g, S* m, int64_t n, C decay, C b1c, C f,
                       const R& round = {}) {
  with_lerp_form(b1c, [&](auto near) {
    block_update_span_as<P, S, C, R, decltype(near)::value>(p, g, m, n, decay, b1c, f, round);
  });
}

// block_update_span with one factor per element (f[j]: the factor of the tile column j is in).
template <typename P, typename S, typename C, typename R, bool kNearStart, typename G>
MEMOPT_CPU_CLONES void column_update_span_as(P* __restrict p, const G* __restrict g,
                                             S* __restrict m, int64_t n, C decay, C b1c,
                                             const C* __restrict f, const R& round) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C mj = load<C>(m[j]);
    p[j] = round.template store<P>(factor_element<kNearStart>(load<C>(p[j]), load<C>(g[j]), mj,
                                                               decay, b1c, f[j]), j);
    m[j] = store<S>(mj);
  }
}
template <typename P, typename S, typename C, typename R = Nearest, typename G = P>
void column_update_span(P* p, const G* g, S* m, int64_t n, C decay, C b1c, const C* f,
                        const R& round = {}) {
  with_lerp_form(b1c, [&](auto near) {
    column_update_span_as<P, S, C, R, decltype(near)::value>(p, g, m, n, decay, b1c, f, round);
  });
}

// acc[j] += g[j]^2 in double: one row's contribution to per-column sums of squares.
template <typename P>
MEMOPT_CPU_CLONES void add_squares(double* __restrict acc, const P* __restrict g, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double x = static_cast<double>(static_cast<at::opmath_type<P>>(g[j]));
    acc[j] += x * x;
  }
}

// Sum of squares in double (accurate for blocks of millions of elements).
template <typename P>
MEMOPT_CPU_CLONES double sum_squares(const P* __restrict g, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    // Through opmath (float for bf16/fp16) so float64 gradients keep their precision.
    const double x = static_cast<double>(static_cast<at::opmath_type<P>>(g[j]));
    acc += x * x;
  }
  return acc;
}

// |x|'s bits: their maximum over a block is its largest |x|'s, and at least 0x7F800000 (an
// infinity or a NaN) when a value is not finite. An unsigned maximum GCC vectorizes 16 wide
// without `omp simd`, whose reduction clauses leave such a loop 4 floats wide.
inline uint32_t magnitude_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u & 0x7FFFFFFFu;
}
inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Largest |x| of [0, len): NaN when any value is NaN or infinite (std::max would drop a NaN),
// which an int8 weight group or an 8-bit state block then takes as its scale.
MEMOPT_CPU_CLONES inline float block_absmax(const float* __restrict x, int64_t len) {
  uint32_t bits = 0;
  for (int64_t j = 0; j < len; ++j) bits = std::max(bits, magnitude_bits(x[j]));
  return bits >= 0x7F800000u ? NAN : from_bits(bits);
}

// A contiguous view of a gradient: the gradient itself, or a copy staged in the workspace
// (the only case in which the workspace holds a gradient-sized buffer).
inline int64_t staging_bytes(const Tensor& g) {
  return g.is_contiguous() ? 0 : Workspace::aligned(g.numel() * g.element_size());
}
inline Tensor contiguous_grad(Workspace::Lease& lease, const Tensor& g) {
  if (g.is_contiguous()) return g;
  Tensor staged = lease.take_tensor(g.sizes(), g.scalar_type());
  staged.copy_(g);
  return staged;
}

// Increments a step scalar and returns the new value.
inline double advance_step(const Tensor& step) {
  float* s = step.data_ptr<float>();
  *s += 1.0f;
  return *s;
}

}  // namespace memopt::cpu
