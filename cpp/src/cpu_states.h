// 8-bit moments on the CPU (memopt/state_codes.h; internal header). AdamW's step (adamw_coded)
// decodes, steps and measures each code block in one pass, then encodes it from a block of
// floats per thread; the other kernels decode a span of whole code blocks into a per-thread
// float buffer, run their float loop (cpu_loops.h) on it and encode the span again. No step
// holds more than a span per thread.
#pragma once

#include <algorithm>
#include <cstring>
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
      encode_block(x + k * kStateBlock, b + k * kStateBlock, len,
                   block_absmax(x + k * kStateBlock, len));
    }
  }
  // Block e / kStateBlock (e a multiple of kStateBlock) from its len values x, whose largest
  // |x| is absmax (NaN or infinite when any x is not finite).
  MEMOPT_CPU_CLONES void encode_block(const float* __restrict x, int64_t e, int64_t len,
                                      float absmax) const {
    code_t* __restrict c = codes + e;
    const float s = state_block_scale(absmax);
    scales[e / kStateBlock] = s;
    if (state_block_empty(s)) {
      std::fill(c, c + len, code_t{0});
      return;
    }
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = Code::code(x[j], inv);
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

// |x|'s bits: their maximum over a block is its largest |x|'s, and at least 0x7F800000 (an
// infinity or a NaN, which state_block_scale makes NaN) when a value is not finite.
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

// AdamW (cpu_loops.h adamw_element) on n <= kStateBlock elements of one code block, in one pass:
// m and sqrt(v) decoded from their codes (block scales ms, vs), p stepped, the new m and sqrt(v)
// written to mb and vb and their largest magnitudes' bits to mmax and vmax (the new scales).
// With FMA the compiler may fuse a decoded product into the update's first subtraction, as
// nvcc does in the CUDA kernel (adamw_codes.cu), so the step can differ in the last bit from
// one on the stored floats; the codes' definition (state_codes.h) is over the new values.
template <typename P, typename C, typename R, bool kNearStart, typename G>
MEMOPT_CPU_CLONES void adamw_code_block_as(P* __restrict p, const G* __restrict g,
                                           const int8_t* __restrict mc, float ms,
                                           const uint8_t* __restrict vc, float vs,
                                           float* __restrict mb, float* __restrict vb, int64_t n,
                                           const AdamScalars& s, const R& round, uint32_t& mmax,
                                           uint32_t& vmax) {
  const AdamConsts<C> k(s);
  uint32_t am = 0, av = 0;
#pragma omp simd reduction(max : am, av)
  for (int64_t j = 0; j < n; ++j) {
    C mj = load<C>(moment_decode(mc[j], ms));
    const C r0 = load<C>(square_root_decode(vc[j], vs));
    C vj = r0 * r0, root;
    const C pj = adamw_element<kNearStart>(k, load<C>(p[j]), load<C>(g[j]), mj, vj, root);
    p[j] = round.template store<P>(pj, j);
    mb[j] = store<float>(mj);
    vb[j] = store<float>(root);
    am = std::max(am, magnitude_bits(mb[j]));
    av = std::max(av, magnitude_bits(vb[j]));
  }
  mmax = am;
  vmax = av;
}

// Adam-mini's step (cpu_loops.h factor_element, each element j with factor f[j]) on n <=
// kStateBlock elements of one code block, in one pass: m decoded from its codes (block scale
// ms), p stepped, the new m written to mb and its largest magnitude's bits to mmax.
template <typename P, typename C, typename R, bool kNearStart, typename G>
MEMOPT_CPU_CLONES void factor_code_block_as(P* __restrict p, const G* __restrict g,
                                            const int8_t* __restrict mc, float ms,
                                            float* __restrict mb, int64_t n, C decay, C b1c,
                                            const C* __restrict f, const R& round,
                                            uint32_t& mmax) {
  uint32_t am = 0;
#pragma omp simd reduction(max : am)
  for (int64_t j = 0; j < n; ++j) {
    C mj = load<C>(moment_decode(mc[j], ms));
    p[j] = round.template store<P>(
        factor_element<kNearStart>(load<C>(p[j]), load<C>(g[j]), mj, decay, b1c, f[j]), j);
    mb[j] = store<float>(mj);
    am = std::max(am, magnitude_bits(mb[j]));
  }
  mmax = am;
}

// Floats per thread of Adam-mini's coded pass (factor_coded_span) over spans of `span`
// elements: a block of m and the span's factors (as doubles at most).
constexpr int64_t factor_coded_floats(int64_t span) { return kStateBlock + 2 * span; }

// Adam-mini's step on elements [b, b + len) (whole code blocks; p and g point at element b),
// element j with factor f[j]: each code block decoded, stepped and encoded again through mb (a
// block of floats). The sharded and the whole-tensor op both step 8-bit m here, so a shard's
// codes are bit for bit the whole tensor's.
template <typename P, typename C, bool kNearStart, typename R, typename G>
void factor_coded_span(P* p, const G* g, MomentCodes m, int64_t b, int64_t len, C decay, C b1c,
                       const C* f, const R& round, float* mb) {
  for (int64_t o = 0; o < len; o += kStateBlock) {
    const int64_t e = b + o, l = std::min(kStateBlock, len - o);
    uint32_t mmax;
    factor_code_block_as<P, C, R, kNearStart>(p + o, g + o, m.codes + e,
                                              m.scales[e / kStateBlock], mb, l, decay, b1c,
                                              f + o, round.at(o), mmax);
    m.encode_block(mb, e, l, from_bits(mmax));
  }
}

// Floats per thread that adamw_coded takes of its `buffers`: one block of m, one of sqrt(v).
constexpr int64_t kAdamCodedFloats = 2 * kStateBlock;

// One tensor's AdamW step (scalars `s`) with 8-bit m and v: in parallel spans of whole code
// blocks (and int8 weight groups: state_span), each code block decoded, stepped and encoded
// again through the thread's kAdamCodedFloats of `buffers`. AdamW's op and FRUGAL's Adam modes.
template <typename P, typename C, typename Store>
void adamw_coded(const Store& store, const P* g, MomentCodes m, SquareRootCodes v, int64_t n,
                 int64_t span, float* buffers, const AdamScalars& s) {
  with_lerp_form(C(1.0 - s.beta1), [&](auto near) {
    for_state_spans(n, span, buffers, kAdamCodedFloats, [&](int64_t b, int64_t len, float* buf) {
      float *mb = buf, *vb = buf + kStateBlock;  // m and sqrt(v) of one block
      store.edit(b, len, [&](auto* pv, const auto& round) {
        using PV = std::remove_pointer_t<decltype(pv)>;
        using R = std::decay_t<decltype(round)>;
        for (int64_t o = 0; o < len; o += kStateBlock) {
          const int64_t e = b + o, l = std::min(kStateBlock, len - o);
          uint32_t mmax, vmax;
          adamw_code_block_as<PV, C, R, decltype(near)::value, P>(
              pv + o, g + e, m.codes + e, m.scales[e / kStateBlock], v.codes + e,
              v.scales[e / kStateBlock], mb, vb, l, s, round.at(o), mmax, vmax);
          m.encode_block(mb, e, l, from_bits(mmax));
          v.encode_block(vb, e, l, from_bits(vmax));
        }
      });
    });
  });
}

}  // namespace memopt::cpu
