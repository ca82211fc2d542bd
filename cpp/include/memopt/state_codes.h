// 8-bit optimizer states (state_bits=8): the one definition of their codes, shared by the CPU
// loops, the plan and (device code) the CUDA kernels; no ATen here.
//
// A full-size moment of n elements is stored as n codes and ceil(n / kStateBlock) float32 block
// scales; element e belongs to block e / kStateBlock (in the parameter's memory order). Codes are
// power-law ("companded") so that the small values of a block keep a relative precision, as the
// dynamic-tree codes of bitsandbytes and torchao do, with only a division and square roots
// (correctly rounded in IEEE float32 on every device, so the codes are reproducible exactly):
//
//   first moment m, int8 c in [-127, 127], scale a = max |m| over the block:
//       m = a * f * |f|,  f = c / 127                     (c = round(127 sqrt(|m| / a)) sign(m))
//   second moment v >= 0, uint8 c in [0, 255], scale a = max sqrt(v) over the block:
//       sqrt(v) = a * f * f,  f = c / 255                 (c = round(255 sqrt(sqrt(v) / a)))
//
// v's code is over sqrt(v), the quantity the update divides by, and a positive v never encodes
// to 0 (at least code 1): a v rounded to zero would turn the element's update into m / eps.
// A zero block encodes as scale 0; a block holding a NaN or an infinity as scale NaN and codes
// 0, so it decodes to NaN (a non-finite update poisons its block, as it poisons a float state).
#pragma once

#include <cmath>
#include <cstdint>

#include "memopt/rounding.h"  // MEMOPT_HOST_DEVICE

namespace memopt {

constexpr int64_t kStateBlock = 256;
// Tensors smaller than this keep float states whatever state_bits says (norms, biases: their
// state is nothing, and a block scale per 256 would be a poor code for them), as torchao does.
constexpr int64_t kStateMinNumel = 4096;
constexpr float kMomentCodeMax = 127.0f;
constexpr float kSquareCodeMax = 255.0f;

MEMOPT_HOST_DEVICE int64_t state_blocks(int64_t numel) {
  return (numel + kStateBlock - 1) / kStateBlock;
}

// A block scale from its largest |m| (or sqrt(v)): NaN when that is not finite.
MEMOPT_HOST_DEVICE float state_block_scale(float absmax) {
  return absmax <= 3.4028234663852886e38f ? absmax : NAN;
}
// Whether a block of that scale encodes as codes 0 (zero or non-finite).
MEMOPT_HOST_DEVICE bool state_block_empty(float scale) {
  return !(scale > 0.0f && scale <= 3.4028234663852886e38f);
}

MEMOPT_HOST_DEVICE float moment_decode(int8_t code, float scale) {
  const float f = static_cast<float>(code) / kMomentCodeMax;
  return scale * (f * fabsf(f));
}
// The code of x in a block of scale `scale` that is not empty (the loops test that per block).
MEMOPT_HOST_DEVICE int8_t moment_code(float x, float scale) {
  const float t = nearbyintf(sqrtf(fabsf(x) / scale) * kMomentCodeMax);
  return static_cast<int8_t>(x < 0.0f ? -t : t);
}
MEMOPT_HOST_DEVICE int8_t moment_encode(float x, float scale) {
  return state_block_empty(scale) ? 0 : moment_code(x, scale);
}

MEMOPT_HOST_DEVICE float square_decode(uint8_t code, float scale) {
  const float f = static_cast<float>(code) / kSquareCodeMax;
  const float r = scale * (f * f);  // sqrt(v)
  return r * r;
}
MEMOPT_HOST_DEVICE uint8_t square_code(float v, float scale) {
  const float t = nearbyintf(sqrtf(sqrtf(v) / scale) * kSquareCodeMax);
  return static_cast<uint8_t>(v > 0.0f && t < 1.0f ? 1.0f : t);
}
MEMOPT_HOST_DEVICE uint8_t square_encode(float v, float scale) {
  return state_block_empty(scale) ? 0 : square_code(v, scale);
}

}  // namespace memopt
