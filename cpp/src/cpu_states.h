// 8-bit moments on the CPU (memopt/state_codes.h; internal header). A kernel decodes, steps and
// measures each code block in one pass (the element arithmetic is cpu_loops.h's), writing the
// new values to a block of floats per thread, then encodes the block from them: the state is
// read and written once, and no step holds more than a block (and a span of factors) per thread.
#pragma once

#include <algorithm>
#include <numeric>

#include "cpu_loops.h"
#include "memopt/state_codes.h"

namespace memopt::cpu {

// Elements per span, the unit of parallel work (and of an int8 weight's decode and encode):
// whole code blocks and whole int8 weight groups (`group`; 1 for a float weight), at least
// kSpanTarget so that a thread's work outweighs its dispatch, small enough that an int8 weight's
// span of floats stays in L1/L2.
constexpr int64_t kSpanTarget = 4096;
inline int64_t state_span(int64_t group) {
  const int64_t unit = std::lcm(kStateBlock, std::max<int64_t>(group, 1));
  return std::max<int64_t>(1, kSpanTarget / unit) * unit;
}

// The two codes of state_codes.h: a first moment's block of floats holds m, a second moment's
// holds sqrt(v) (what the update divides by, and what v's code is over).
struct MomentCode {
  using code_t = int8_t;
  static int8_t code(float x, float inv) { return moment_code(x, inv); }
};
struct SquareRootCode {
  using code_t = uint8_t;
  static uint8_t code(float root, float inv) { return square_code_of_root(root, inv); }
};

// One 8-bit moment of a tensor: its codes and block scales. The kernels decode a block inline
// (moment_decode, square_root_decode) and encode it from a block of floats.
template <typename Code>
struct StateCodes {
  using code_t = typename Code::code_t;
  code_t* codes;
  float* scales;

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
  // (no omp simd: cpu_loops.h magnitude_bits)
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
  // (no omp simd: cpu_loops.h magnitude_bits)
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
