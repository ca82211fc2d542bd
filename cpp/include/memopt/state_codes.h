// 8-bit optimizer states (state_bits=8): the one definition of their codes, shared by the CPU
// loops, the plan and (device code) the CUDA kernels; no ATen here.
//
// A full-size moment of n elements is stored as n codes and ceil(n / kStateBlock) float32 block
// scales; element e belongs to block e / kStateBlock (in the parameter's memory order). Codes are
// power-law ("companded") so that the small values of a block keep a relative precision, as the
// dynamic-tree codes of bitsandbytes and torchao do, with only products and square roots, each
// rounded once in IEEE float32 (sqrt correctly rounded) on every device, so the codes are
// reproducible exactly. With a block's scale a and r = 1/a (a float32 division, once per block):
//
//   first moment m, int8 c in [-127, 127], a = max |m| over the block:
//       m = a * (f * |f|),  f = c * (1/127)              c = round(127 sqrt(|m| r)) sign(m)
//   second moment v >= 0, uint8 c in [0, 255], a = max sqrt(v) over the block:
//       sqrt(v) = a * (f * f),  f = c * (1/255)          c = round(255 sqrt(sqrt(v) r))
//
// (1/127, 1/255: the float32 constants.) v's code is over sqrt(v), the quantity the update
// divides by, and a positive v never encodes to 0 (at least code 1): a v rounded to zero would
// turn the element's update into m / eps. A block whose largest value is zero or below the
// smallest normal float encodes as scale 0 and codes 0; a block holding a NaN or an infinity as
// scale NaN and codes 0, so it decodes to NaN (a non-finite update poisons its block, as it
// poisons a float state).
#pragma once

#include <cmath>
#include <cstdint>

#include "memopt/rounding.h"  // MEMOPT_HOST_DEVICE

namespace memopt {

constexpr int64_t kStateBlock = 256;
// Tensors smaller than this, and vectors, keep float states whatever state_bits says (norms,
// biases: their state is nothing, and a block scale per 256 would be a poor code for them);
// memopt/plan.h low_bit_state decides.
constexpr int64_t kStateMinNumel = 4096;
constexpr float kMomentCodeMax = 127.0f;
constexpr float kSquareCodeMax = 255.0f;

MEMOPT_HOST_DEVICE int64_t state_blocks(int64_t numel) {
  return (numel + kStateBlock - 1) / kStateBlock;
}

// A block scale from its largest |m| (or sqrt(v)): NaN when that is not finite, 0 below the
// smallest normal float.
MEMOPT_HOST_DEVICE float state_block_scale(float absmax) {
  if (!(absmax <= 3.4028234663852886e38f)) return NAN;
  return absmax >= 1.17549435e-38f ? absmax : 0.0f;
}
// Whether a block of that scale encodes as codes 0 (zero, subnormal or non-finite: 1/a would
// overflow or be NaN).
MEMOPT_HOST_DEVICE bool state_block_empty(float scale) {
  return !(scale >= 1.17549435e-38f && scale <= 3.4028234663852886e38f);
}

constexpr float kMomentStep = 1.0f / kMomentCodeMax;
constexpr float kSquareStep = 1.0f / kSquareCodeMax;

MEMOPT_HOST_DEVICE float moment_decode(int8_t code, float scale) {
  const float f = static_cast<float>(code) * kMomentStep;
  return scale * (f * fabsf(f));
}
// The code of x in a block that is not empty (the loops test that per block), whose scale's
// reciprocal is `inv`.
MEMOPT_HOST_DEVICE int8_t moment_code(float x, float inv) {
  const float t = nearbyintf(sqrtf(fabsf(x) * inv) * kMomentCodeMax);
  return static_cast<int8_t>(x < 0.0f ? -t : t);
}
MEMOPT_HOST_DEVICE int8_t moment_encode(float x, float scale) {
  return state_block_empty(scale) ? 0 : moment_code(x, 1.0f / scale);
}

// sqrt(v) of a code: the update squares it for v (bit for bit square_decode's value).
MEMOPT_HOST_DEVICE float square_root_decode(uint8_t code, float scale) {
  const float f = static_cast<float>(code) * kSquareStep;
  return scale * (f * f);
}
MEMOPT_HOST_DEVICE float square_decode(uint8_t code, float scale) {
  const float r = square_root_decode(code, scale);
  return r * r;
}
// The code of v from root = sqrt(v) (which the update computes anyway) in a block that is not
// empty, whose scale's reciprocal is `inv`.
MEMOPT_HOST_DEVICE uint8_t square_code_of_root(float root, float inv) {
  const float t = nearbyintf(sqrtf(root * inv) * kSquareCodeMax);
  return static_cast<uint8_t>(root > 0.0f && t < 1.0f ? 1.0f : t);
}
MEMOPT_HOST_DEVICE uint8_t square_encode(float v, float scale) {
  return state_block_empty(scale) ? 0 : square_code_of_root(sqrtf(v), 1.0f / scale);
}

}  // namespace memopt
