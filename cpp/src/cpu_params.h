// How the CPU kernels write a parameter (internal header): through its storage, or, for an int8
// weight (memopt/int8_weights.h), through its codes decoded span by span into a per-thread float
// buffer and encoded again once the loop has updated the span. The loops of cpu_loops.h are the
// same in both cases: a kernel hands them the pointer and rounding policy a store gives it.
//
//   store.edit(offset, n, f)        f(P* values of elements [offset, offset + n), policy)
//   store.for_spans(offset, n, f)   f(values, policy, begin, len) over [offset, offset + n), in
//                                   parallel, in spans the store can edit
//
// An int8 span must be whole groups and at most the buffer (buffer_elements); a kernel sizes the
// buffer for the widest span it edits (a row) and reserves int8_buffer_bytes for it.
#pragma once

#include <algorithm>

#include "cpu_loops.h"
#include "memopt/int8_weights.h"

namespace memopt::cpu {

template <typename P, typename R>
struct PlainParam {
  P* p;
  R round;
  template <typename F>
  void edit(int64_t offset, int64_t, F&& f) const {
    f(p + offset, round.at(offset));
  }
  template <typename F>
  void for_spans(int64_t offset, int64_t n, F&& f) const {
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      f(p + offset + b, round.at(offset + b), offset + b, e - b);
    });
  }
};

// Decodes [0, n) of codes (whole groups) into out.
MEMOPT_CPU_CLONES inline void int8_decode_span(const int8_t* __restrict codes,
                                               const float* __restrict scales, int64_t group,
                                               int64_t n, float* __restrict out) {
  for (int64_t k = 0; k * group < n; ++k) {
    const float s = scales[k];
    const int8_t* c = codes + k * group;
    float* o = out + k * group;
#pragma omp simd
    for (int64_t j = 0; j < group; ++j) o[j] = int8_decode(c[j], s);
  }
}

// Encodes [0, n) of values (whole groups; element j is element first + j of the tensor, whose
// rounding bits it draws under `key` when stochastic).
MEMOPT_CPU_CLONES inline void int8_encode_span(const float* __restrict values, int64_t group,
                                               int64_t n, int8_t* __restrict codes,
                                               float* __restrict scales, bool stochastic,
                                               uint64_t key, int64_t first) {
  for (int64_t k = 0; k * group < n; ++k) {
    const float* x = values + k * group;
    const Int8GroupScale gs = int8_group_scale(block_absmax(x, group));
    scales[k] = gs.scale;
    int8_t* c = codes + k * group;
    const int64_t e0 = first + k * group;
    if (stochastic) {
#pragma omp simd
      for (int64_t j = 0; j < group; ++j)
        c[j] = int8_encode(x[j], gs.inv, true, rounding_bits(key, e0 + j));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < group; ++j) c[j] = int8_encode(x[j], gs.inv, false, 0);
    }
  }
}

struct Int8Param {
  int8_t* codes;
  float* scales;
  int64_t group;
  bool stochastic;
  uint64_t key;
  float* buffers;           // one buffer of buffer_elements per thread
  int64_t buffer_elements;  // whole groups

  template <typename F>
  void edit(int64_t offset, int64_t n, F&& f) const {
    TORCH_CHECK(offset % group == 0 && n % group == 0 && n <= buffer_elements,
                "int8 weight: a span of ", n, " elements at ", offset,
                " is not whole groups of ", group, " within the buffer of ", buffer_elements);
    float* buf = buffers + at::get_thread_num() * buffer_elements;
    int8_decode_span(codes + offset, scales + offset / group, group, n, buf);
    f(buf, Nearest{});
    int8_encode_span(buf, group, n, codes + offset, scales + offset / group, stochastic, key,
                     offset);
  }
  template <typename F>
  void for_spans(int64_t offset, int64_t n, F&& f) const {
    const int64_t groups = n / group, per_span = buffer_elements / group;
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / group), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; k += per_span) {
        const int64_t b = offset + k * group, len = std::min(per_span, k1 - k) * group;
        edit(b, len, [&](float* values, const Nearest& round) { f(values, round, b, len); });
      }
    });
  }
};

// The per-thread buffer (elements) parameter p needs for spans of up to `widest` elements: 0
// unless p is int8 (scales non-empty), else at least 4096 (whole groups), so that elementwise
// loops run in spans as long as the CPU loops like.
inline int64_t int8_buffer_elements(const Tensor& p, const Tensor& scales, int64_t widest) {
  if (!int8_scales(scales)) return 0;
  const int64_t group = int8_group(p, scales), base = std::max<int64_t>(widest, kInt8MaxGroup);
  return (base + group - 1) / group * group;
}
inline int64_t int8_buffer_bytes(int64_t elements) {
  return Workspace::Lease::bytes_for<float>(at::get_num_threads() * elements);
}
// Carves the buffers out of a lease reserved with int8_buffer_bytes (null when elements is 0).
inline float* int8_buffers(Workspace::Lease& lease, int64_t elements) {
  return elements ? lease.take<float>(at::get_num_threads() * elements) : nullptr;
}

// Calls f(store) for parameter p with gradient storage G: an Int8Param when `scales` is defined
// (p holds int8 codes; buffers carved by the caller, int8_buffer_bytes), else a PlainParam with
// p's rounding policy under `rounding` (with_rounding).
template <typename G, typename F>
void with_param_store(const Tensor& p, const Tensor& scales, const Rounding& rounding, size_t i,
                      double step, float* buffers, int64_t buffer_elements, F&& f) {
  if (int8_scales(scales)) {
    if constexpr (std::is_same_v<G, float> || std::is_same_v<G, c10::BFloat16>) {
      const bool sr = rounding.stochastic();
      return f(Int8Param{p.data_ptr<int8_t>(), scales.data_ptr<float>(),
                         p.numel() / scales.numel(), sr, sr ? rounding.key(i, step) : 0, buffers,
                         buffer_elements});
    } else {
      TORCH_CHECK_TYPE(false, "int8 weights take float32 or bfloat16 gradients");
    }
  }
  with_rounding<G>(rounding, i, step,
                   [&](const auto& round) { f(PlainParam<G, std::decay_t<decltype(round)>>{
                                                p.data_ptr<G>(), round}); });
}

}  // namespace memopt::cpu
