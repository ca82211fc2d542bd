// int8 weights: the one definition of their format and of how an update re-encodes them, shared
// by the CPU loops, the host code and (device code) the CUDA kernels; no ATen here.
//
// A weight of shape (rows, cols) is stored as int8 codes (rows, cols) and float32 scales
// (rows, cols / group): element e of group k = e / group (groups run along rows) has the value
// codes[e] * scales[k], a float32 product. An op that updates such a weight decodes a group,
// updates it in float32, and encodes it again: the group's new scale is absmax / 127, and each
// value x becomes the code t = x * (127 / absmax) rounded to an integer, to nearest (ties to
// even) or stochastically (up with probability t - floor(t), by the bits of rounding.h, so the
// expected decoded value is x). t is formed in double, where the product of two floats is exact,
// so no compiler contraction or vector width changes a code. A group of zeros encodes as scale 0;
// a group holding a NaN or an infinity encodes as scale NaN and codes 0, so it decodes to NaN
// (a non-finite update poisons its group, as it would poison the element of a float weight).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "memopt/rounding.h"

namespace memopt {

constexpr int kInt8CodeMax = 127;
// Groups the ops accept (a group is one scale): at least 16 elements and at most 4096, so that a
// group always fits the CPU loops' per-thread buffers.
constexpr int64_t kInt8MinGroup = 16;
constexpr int64_t kInt8MaxGroup = 4096;

MEMOPT_HOST_DEVICE float int8_decode(int8_t code, float scale) {
  return static_cast<float>(code) * scale;
}

// The scale and the code multiplier of a group whose largest magnitude is `absmax` (NaN when
// the group holds a non-finite value).
struct Int8GroupScale {
  float scale;
  float inv;  // 127 / absmax; 0 for a zero or non-finite group (every code 0)
};
MEMOPT_HOST_DEVICE Int8GroupScale int8_group_scale(float absmax) {
  if (!(absmax <= 3.4028234663852886e38f)) return {NAN, 0.0f};  // NaN or inf
  if (absmax == 0.0f) return {0.0f, 0.0f};
  return {absmax / static_cast<float>(kInt8CodeMax), static_cast<float>(kInt8CodeMax) / absmax};
}

// 1.0 when d's sign bit is set, else 0.0, by integer operations on its bits: a floating-point
// comparison, floor() or signbit() keeps the CPU loops scalar (they may trap), this vectorizes.
MEMOPT_HOST_DEVICE double sign_bit(double d) {
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = static_cast<uint64_t>(__double_as_longlong(d));
#else
  std::memcpy(&b, &d, sizeof(b));
#endif
  const uint64_t one = (0ull - (b >> 63)) & 0x3FF0000000000000ull;  // the bits of 1.0, or 0
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(one));
#else
  double out;
  std::memcpy(&out, &one, sizeof(out));
  return out;
#endif
}

// The code of x in a group with multiplier inv: nearest when !stochastic, else rounded up when
// the fraction exceeds u = (bits >> 8) / 2^24 (uniform on [0, 1) in steps of 2^-24).
MEMOPT_HOST_DEVICE int8_t int8_encode(float x, float inv, bool stochastic, uint32_t bits) {
  const double t = static_cast<double>(x) * static_cast<double>(inv);
  double q;
  if (stochastic) {
    // floor(t) and the comparison with u as sign bits of exact differences (t has at most 48
    // significant bits, so t - near and frac - u are exact).
    const double near = nearbyint(t);
    const double fl = near - sign_bit(t - near);
    // (bits >> 8 fits an int32, whose conversion to double vectorizes; uint32's does not on AVX2)
    const double u = static_cast<double>(static_cast<int32_t>(bits >> 8)) * 0x1p-24;
    q = fl + sign_bit(u - (t - fl));
  } else {
    q = nearbyint(t);
  }
  q = q > kInt8CodeMax ? kInt8CodeMax : (q < -kInt8CodeMax ? -kInt8CodeMax : q);
  return static_cast<int8_t>(q);
}

}  // namespace memopt
