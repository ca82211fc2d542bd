// 8-bit moments on the CPU (memopt/state_codes.h; internal header): a kernel decodes a span of
// whole code blocks into a per-thread float buffer, runs its float loop (cpu_loops.h) on the
// buffer, and encodes the span again, so the loops are the same for every state format and no
// step holds more than a span per thread.
#pragma once

#include <algorithm>
#include <numeric>

#include "cpu_loops.h"
#include "memopt/state_codes.h"

namespace memopt::cpu {

// Elements per span: whole code blocks and whole int8 weight groups (`group`; 1 for a float
// weight), at least kSpanTarget so that the loops run long enough to vectorize well, small
// enough that a span's buffers stay in L1/L2.
constexpr int64_t kSpanTarget = 4096;
inline int64_t state_span(int64_t group) {
  const int64_t unit = std::lcm(kStateBlock, std::max<int64_t>(group, 1));
  return std::max<int64_t>(1, kSpanTarget / unit) * unit;
}

// The two codes of state_codes.h as the span loops take them: a first moment's buffer holds m,
// a second moment's holds sqrt(v) (what the update divides by; adamw_span_root_v squares it).
struct MomentCode {
  using code_t = int8_t;
  static float decode(int8_t c, float s) { return moment_decode(c, s); }
  static int8_t code(float x, float inv) { return moment_code(x, inv); }
};
struct SquareRootCode {
  using code_t = uint8_t;
  static float decode(uint8_t c, float s) { return square_root_decode(c, s); }
  static uint8_t code(float root, float inv) { return square_code_of_root(root, inv); }
};

// One 8-bit moment of a tensor (codes and block scales), decoded into and encoded from a span's
// float buffer: [b, b + n), b a multiple of kStateBlock (the last block may be partial).
template <typename Code>
struct StateCodes {
  using code_t = typename Code::code_t;
  code_t* codes;
  float* scales;

  MEMOPT_CPU_CLONES void decode(int64_t b, int64_t n, float* __restrict out) const {
    for (int64_t k = 0; k * kStateBlock < n; ++k) {
      const int64_t len = std::min(kStateBlock, n - k * kStateBlock);
      const float s = scales[b / kStateBlock + k];
      const code_t* __restrict c = codes + b + k * kStateBlock;
      float* o = out + k * kStateBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = Code::decode(c[j], s);
    }
  }
  MEMOPT_CPU_CLONES void encode(const float* __restrict x, int64_t b, int64_t n) const {
    for (int64_t k = 0; k * kStateBlock < n; ++k) {
      const int64_t len = std::min(kStateBlock, n - k * kStateBlock);
      const float* xk = x + k * kStateBlock;
      code_t* __restrict c = codes + b + k * kStateBlock;
      const float s = state_block_scale(block_absmax(xk, len));
      scales[b / kStateBlock + k] = s;
      if (state_block_empty(s)) {
        std::fill(c, c + len, code_t{0});
        continue;
      }
      const float inv = 1.0f / s;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) c[j] = Code::code(xk[j], inv);
    }
  }
};
using MomentCodes = StateCodes<MomentCode>;
using SquareRootCodes = StateCodes<SquareRootCode>;

// Calls f(b, len, buffers) over [0, n) in spans of `span` elements (a multiple of kStateBlock),
// in parallel; buffers: the calling thread's `per_thread` floats of `all` (threads x per_thread).
template <typename F>
void for_state_spans(int64_t n, int64_t span, float* all, int64_t per_thread, F&& f) {
  const int64_t spans = (n + span - 1) / span;
  at::parallel_for(0, spans, 1, [&](int64_t k0, int64_t k1) {
    float* mine = all + at::get_thread_num() * per_thread;
    for (int64_t k = k0; k < k1; ++k) f(k * span, std::min(span, n - k * span), mine);
  });
}

// One tensor's AdamW step (adamw_span's, scalars `s`) with 8-bit m and v: spans of whole code
// blocks (and int8 weight groups), decoded into the thread's 2 x span floats of `buffers`,
// updated by the float loop, encoded again. AdamW's op and FRUGAL's Adam modes.
template <typename P, typename C, typename Store>
void adamw_coded(const Store& store, const P* g, MomentCodes m, SquareRootCodes v, int64_t n,
                 int64_t span, float* buffers, const AdamScalars& s) {
  for_state_spans(n, span, buffers, 2 * span, [&](int64_t b, int64_t len, float* buf) {
    float *mb = buf, *vb = buf + span;  // m and sqrt(v)
    m.decode(b, len, mb);
    v.decode(b, len, vb);
    store.edit(b, len, [&](auto* pv, const auto& round) {
      using PV = std::remove_pointer_t<decltype(pv)>;
      adamw_span<PV, float, C, std::decay_t<decltype(round)>, P, true>(pv, g + b, mb, vb, len, s,
                                                                      round);
    });
    m.encode(mb, b, len);
    v.encode(vb, b, len);
  });
}

}  // namespace memopt::cpu
