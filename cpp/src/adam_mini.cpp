// Adam-mini: block-mean second moment, fused reduce + update on CPU.
#include "memopt/adam_mini.h"

#include <algorithm>

#include "cpu_params.h"
#include "cpu_states.h"

namespace memopt {

void check_block_v(const char* op, size_t i, const Tensor& v, const BlockSpec& spec,
                   const Tensor& param, const Tensor& grad, const Tensor& exp_avg, bool coded) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.numel() == num_blocks(spec) && v.is_contiguous(), op,
                    ": tensor ", i, ": exp_avg_sq must be contiguous and 1-D with one entry per "
                    "block of the full tensor (", num_blocks(spec), "), got shape ", v.sizes());
  const at::ScalarType vt = v.scalar_type();
  TORCH_CHECK_TYPE((coded ? vt == value_dtype(param, grad) || vt == at::kFloat
                          : vt == exp_avg.scalar_type()) &&
                       v.device() == param.device(),
                   op, ": tensor ", i, ": exp_avg_sq must have exp_avg's dtype (8-bit exp_avg: "
                   "float32 or the parameter's) and device");
}

void check_adam_mini_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                            TensorList exp_avg_sqs, TensorList steps,
                            const std::vector<BlockSpec>& specs, TensorList weight_scales,
                            TensorList state_scales) {
  check_update_lists("adam_mini_update_", params, grads, exp_avgs, steps, weight_scales,
                     state_scales);
  check_state_scales("adam_mini_update_", params, state_scales, {{exp_avgs, at::kChar}});
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == params.size() && specs.size() == params.size(),
                    "adam_mini_update_: ", params.size(), " params but ", exp_avg_sqs.size(),
                    " exp_avg_sqs and ", specs.size(), " block specs");
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string what = "adam_mini_update_: tensor " + std::to_string(i);
    check_block_spec(specs[i], params[i].numel(), what);
    check_block_v("adam_mini_update_", i, exp_avg_sqs[i], specs[i], params[i], grads[i],
                  exp_avgs[i], coded_state(state_scales, params.size(), 0, i));
    const Tensor& scales = weight_scale(weight_scales, i);
    if (int8_scales(scales)) {  // int8: every block row is whole groups
      const int64_t group = int8_group(params[i], scales);
      for (const Segment& seg : specs[i])
        TORCH_CHECK_VALUE(seg.offset % group == 0 && seg.row_stride % group == 0 &&
                              seg.cols % group == 0,
                          what, ": int8 weight with groups of ", group, " elements, but its "
                          "blocks' rows (", seg.cols, " elements every ", seg.row_stride,
                          " from ", seg.offset, ") do not cover whole groups");
    }
  }
}

namespace {

bool elementwise(const BlockSpec& spec) {
  return spec.size() == 1 && spec[0].offset == 0 && spec[0].block_numel() == 1 &&
         spec[0].row_stride == spec[0].cols;
}

// Whether every block of `spec` is a union of whole aligned runs of `run` elements: each tile row
// is (offset, row stride and tile width multiples of run), or each tile is one dense stretch.
bool blocks_follow_runs(const BlockSpec& spec, int64_t run) {
  return std::all_of(spec.begin(), spec.end(), [run](const Segment& s) {
    const bool rows_of_runs =
        s.offset % run == 0 && s.row_stride % run == 0 && s.tile_cols % run == 0;
    const bool dense_tiles = s.row_stride == s.cols && s.tile_cols == s.cols &&
                             s.offset % run == 0 && (s.tile_rows * s.cols) % run == 0;
    return rows_of_runs || dense_tiles;
  });
}

std::vector<Tensor> v_viewed_as_params(TensorList params, TensorList exp_avg_sqs,
                                       const std::vector<BlockSpec>& specs, bool sharded) {
  std::vector<Tensor> out(exp_avg_sqs.begin(), exp_avg_sqs.end());
  for (size_t i = 0; i < out.size() && i < params.size() && i < specs.size(); ++i)
    if (!sharded && elementwise(specs[i]) && out[i].numel() == params[i].numel() &&
        out[i].is_contiguous())
      out[i] = out[i].view(params[i].sizes());
  return out;
}

}  // namespace

AdamMiniLayouts::AdamMiniLayouts(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                                 const std::vector<BlockSpec>& specs, at::IntArrayRef shards,
                                 bool params_written)
    : v_as_params_(v_viewed_as_params(params, exp_avg_sqs, specs, !shards.empty())),
      layouts_(params, {exp_avgs, v_as_params_},
               [&](size_t i, int64_t run) {
                 if (!shards.empty() && shards[2 * i] % run != 0) return false;
                 return (shards.empty() && elementwise(specs[i])) ||
                        blocks_follow_runs(specs[i], run);
               },
               params_written) {
  for (const Tensor& v : layouts_.written(1)) v_seen_.push_back(v.dim() == 1 ? v : v.view(-1));
}

namespace {

// Rows of one segment as pointers; element (r, c) of the segment is base[offset + r*stride + c].
// Store: how p is written (cpu_params.h); an int8 store edits whole rows only.
template <typename G, typename S, typename C, typename Store>
struct SegmentKernel {
  Store store;
  const G* g;
  S* m;
  S* v;  // this segment's blocks
  const Segment& seg;
  const AdamScalars& s;

  C block_factor(int64_t b, double sum_sq) const {
    const C vb = cpu::load<C>(s.beta2) * cpu::load<C>(v[b]) +
                 cpu::load<C>((1.0 - s.beta2) * (sum_sq / seg.block_numel()));
    v[b] = cpu::store<S>(vb);
    return cpu::load<C>(s.step_size) /
           (std::sqrt(cpu::load<C>(cpu::store<S>(vb))) / cpu::load<C>(s.bc2_sqrt) +
            cpu::load<C>(s.eps));
  }
  int64_t row(int64_t r) const { return seg.offset + r * seg.row_stride; }
  // Row r's tiles, tile bj with factor f(bj).
  template <typename F>
  void update_row(int64_t r, F&& f) const {
    const int64_t at = row(r), tc = seg.tile_cols;
    const C decay = cpu::load<C>(s.decay), b1c = cpu::load<C>(1.0 - s.beta1);
    store.edit(at, seg.cols, [&](auto* pr, const auto& round) {
      using P = std::remove_pointer_t<decltype(pr)>;
      for (int64_t bj = 0; bj < seg.cols / tc; ++bj)
        cpu::block_update_span<P, S, C>(pr + bj * tc, g + at + bj * tc, m + at + bj * tc, tc,
                                        decay, b1c, f(bj), round.at(bj * tc));
    });
  }

  // Tiles spanning whole rows, many of them: each thread reduces and updates its own tiles
  // while the tile is hot in cache. No scratch.
  void row_bands() const {
    const int64_t tiles = seg.rows / seg.tile_rows, tile_numel = seg.block_numel();
    at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / tile_numel), [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        double acc = 0.0;
        for (int64_t r = bi * seg.tile_rows; r < (bi + 1) * seg.tile_rows; ++r)
          acc += cpu::sum_squares(g + row(r), seg.cols);
        const C f = block_factor(bi, acc);
        for (int64_t r = bi * seg.tile_rows; r < (bi + 1) * seg.tile_rows; ++r)
          update_row(r, [f](int64_t) { return f; });
      }
    });
  }

  // Any tiling: per-thread partial sums in the workspace, then factors, then the update.
  void general(Workspace::Lease& lease) const {
    const int64_t tpr = seg.tiles_per_row();
    C* factor = lease.take<C>(seg.num_blocks());
    block_factors(lease, factor);
    at::parallel_for(0, seg.rows, std::max<int64_t>(1, kGrain / seg.cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        update_row(r, [&](int64_t bj) { return factor[(r / seg.tile_rows) * tpr + bj]; });
    });
  }
  // Every block's factor into factor[0, num_blocks), from per-thread partial sums of g^2 in the
  // workspace (also what 8-bit m's flat pass needs first).
  void block_factors(Workspace::Lease& lease, C* factor) const {
    const int64_t nb = seg.num_blocks(), tpr = seg.tiles_per_row();
    const int64_t threads = at::get_num_threads();
    double* partial = lease.take<double>(threads * nb);
    std::fill(partial, partial + threads * nb, 0.0);
    at::parallel_for(0, seg.rows, std::max<int64_t>(1, kGrain / seg.cols), [&](int64_t r0, int64_t r1) {
      double* acc = partial + at::get_thread_num() * nb;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t bj = 0; bj < tpr; ++bj)
          acc[(r / seg.tile_rows) * tpr + bj] +=
              cpu::sum_squares(g + row(r) + bj * seg.tile_cols, seg.tile_cols);
    });
    for (int64_t b = 0; b < nb; ++b) {
      double sum = 0.0;
      for (int64_t t = 0; t < threads; ++t) sum += partial[t * nb + b];
      factor[b] = block_factor(b, sum);
    }
  }
  // 8-bit m's flat pass: the factor of each element of [b, b + n) this segment holds, into
  // f[e - b] (`factor`: its blocks', from block_factors; an elementwise segment computes its
  // per-element v here instead, so it needs no parameter-sized factor array).
  void fill_factors(int64_t b, int64_t n, const C* factor, C* f) const {
    const int64_t tc = seg.tile_cols, tpr = seg.tiles_per_row(), end = b + n;
    const bool per_element = seg.block_numel() == 1 && seg.row_stride == seg.cols;
    int64_t r0 = (b - seg.offset - seg.cols) / seg.row_stride;  // may start a row early
    r0 = std::max<int64_t>(0, r0);
    for (int64_t r = r0; r < seg.rows && row(r) < end; ++r) {
      const int64_t c0 = std::max<int64_t>(0, b - row(r)), c1 = std::min(seg.cols, end - row(r));
      C* out = f + row(r) - b;  // out[c]: column c of row r
      if (per_element) {
        for (int64_t c = c0; c < c1; ++c) {
          const double gj = static_cast<double>(cpu::load<C>(g[row(r) + c]));
          out[c] = block_factor(row(r) + c - seg.offset, gj * gj);
        }
        continue;
      }
      const C* of_row = factor + (r / seg.tile_rows) * tpr;  // the factors of row r's tiles
      if (tc == 1) {
        std::copy(of_row + c0, of_row + std::max(c0, c1), out + c0);
        continue;
      }
      for (int64_t c = c0; c < c1;) {
        const int64_t stop = std::min(c1, (c / tc + 1) * tc);
        std::fill(out + c, out + stop, of_row[c / tc]);
        c = stop;
      }
    }
  }

  // Narrow tiles (tile_cols <= 16: Adam-mini's per-neuron blocks of transposed weights,
  // SlimAdam's mean over fan-out): per band of tile rows, g^2 is summed down the columns into
  // rows of accumulators, then each tile's factor updates its columns. Vectorised along the row,
  // where `general` would make one call per tile and row (6x slower). Threads take contiguous
  // rows with a row of partial sums each when that scratch is small against the band (1/128),
  // else ranges of whole tiles with one shared row.
  void column_bands(Workspace::Lease& lease) const {
    const int64_t tpr = seg.tiles_per_row(), tc = seg.tile_cols, cols = seg.cols;
    const int64_t threads = row_split_threads(seg);
    double* acc = lease.take<double>(threads * cols);
    C* factor = lease.take<C>(cols);  // per column: its tile's factor
    const C decay = cpu::load<C>(s.decay), b1c = cpu::load<C>(1.0 - s.beta1);
    auto factors = [&](int64_t band, int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        double sum = 0.0;
        for (int64_t j = t * tc; j < (t + 1) * tc; ++j) sum += acc[j];
        std::fill(factor + t * tc, factor + (t + 1) * tc, block_factor(band * tpr + t, sum));
      }
    };
    auto update = [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
      for (int64_t r = r0; r < r1; ++r)
        store.edit(row(r) + c0, n, [&](auto* pr, const auto& round) {
          cpu::column_update_span<std::remove_pointer_t<decltype(pr)>, S, C>(
              pr, g + row(r) + c0, m + row(r) + c0, n, decay, b1c, factor + c0, round);
        });
    };
    const int64_t row_grain = std::max<int64_t>(1, kGrain / cols);
    const int64_t tile_grain = std::max<int64_t>(1, std::max<int64_t>(16, kGrain / seg.tile_rows) / tc);
    for (int64_t band = 0; band < seg.rows / seg.tile_rows; ++band) {
      const int64_t r0 = band * seg.tile_rows, r1 = r0 + seg.tile_rows;
      if (threads > 1) {
        std::fill(acc, acc + threads * cols, 0.0);
        at::parallel_for(r0, r1, row_grain, [&](int64_t a, int64_t b) {
          double* mine = acc + at::get_thread_num() * cols;
          for (int64_t r = a; r < b; ++r) cpu::add_squares(mine, g + row(r), cols);
        });
        for (int64_t t = 1; t < threads; ++t)
          for (int64_t c = 0; c < cols; ++c) acc[c] += acc[t * cols + c];
        factors(band, 0, tpr);
        at::parallel_for(r0, r1, row_grain, [&](int64_t a, int64_t b) { update(a, b, 0, cols); });
        continue;
      }
      if constexpr (std::is_same_v<Store, cpu::Int8Param>) {  // whole rows: one thread each
        std::fill(acc, acc + cols, 0.0);
        for (int64_t r = r0; r < r1; ++r) cpu::add_squares(acc, g + row(r), cols);
        factors(band, 0, tpr);
        at::parallel_for(r0, r1, row_grain, [&](int64_t a, int64_t b) { update(a, b, 0, cols); });
        continue;
      }
      at::parallel_for(0, tpr, tile_grain, [&](int64_t t0, int64_t t1) {
        const int64_t c0 = t0 * tc, n = (t1 - t0) * tc;
        std::fill(acc + c0, acc + c0 + n, 0.0);
        for (int64_t r = r0; r < r1; ++r) cpu::add_squares(acc + c0, g + row(r) + c0, n);
        factors(band, t0, t1);
        update(r0, r1, c0, n);
      });
    }
  }
  static int64_t row_split_threads(const Segment& seg) {
    const int64_t t = at::get_num_threads();
    return t > 1 && t * 8 * 128 <= seg.tile_rows * static_cast<int64_t>(sizeof(G)) ? t : 1;
  }
  static bool use_column_bands(const Segment& seg) {
    return seg.tile_cols <= 16 && seg.tile_cols < seg.cols && seg.cols >= 16;
  }
  static int64_t column_bytes(const Segment& seg) {
    return Workspace::Lease::bytes_for<double>(row_split_threads(seg) * seg.cols) +
           Workspace::Lease::bytes_for<C>(seg.cols);
  }

  static int64_t general_bytes(const Segment& seg) {
    return Workspace::Lease::bytes_for<double>(at::get_num_threads() * seg.num_blocks()) +
           Workspace::Lease::bytes_for<C>(seg.num_blocks());
  }
  // Row bands pay off when there are enough tiles to occupy the threads.
  static bool use_row_bands(const Segment& seg) {
    const int64_t tiles = seg.rows / seg.tile_rows;
    return seg.tile_cols == seg.cols &&
           (tiles >= 2 * at::get_num_threads() || seg.rows * seg.cols <= kGrain);
  }
};

// One tensor's step with 8-bit m: every block's factor first, then one pass over the tensor in
// spans of whole code blocks (and int8 weight groups), each element with its block's factor,
// each code block decoded, stepped and encoded again. Scratch: the blocks' factors (not an
// elementwise segment's) and, per thread, a span of factors and a block of m.
template <typename G, typename S, typename C, typename Store>
void adam_mini_coded(const Store& store, const G* g, cpu::MomentCodes m, S* v,
                     const BlockSpec& spec, const AdamScalars& s, int64_t numel, int64_t span,
                     Workspace::Lease& lease) {
  using K = SegmentKernel<G, S, C, Store>;
  std::vector<K> kernels;
  std::vector<C*> factors;
  for (const Segment& seg : spec) {
    kernels.push_back(K{store, g, nullptr, v, seg, s});
    const bool per_element = seg.block_numel() == 1 && seg.row_stride == seg.cols;
    factors.push_back(per_element ? nullptr : lease.take<C>(seg.num_blocks()));
    v += seg.num_blocks();
  }
  float* buffers = lease.take<float>(at::get_num_threads() * cpu::factor_coded_floats(span));
  const int64_t mark = lease.mark();
  for (size_t k = 0; k < kernels.size(); ++k) {
    if (!factors[k]) continue;
    lease.rewind(mark);
    kernels[k].block_factors(lease, factors[k]);
  }
  const C decay = cpu::load<C>(s.decay), b1c = cpu::load<C>(1.0 - s.beta1);
  const int64_t per_thread = cpu::factor_coded_floats(span);
  cpu::with_lerp_form(b1c, [&](auto near) {
    cpu::for_state_spans(numel, span, buffers, per_thread, [&](int64_t b, int64_t len, float* buf) {
      float* mb = buf;                                   // one block of m
      C* fb = reinterpret_cast<C*>(buf + kStateBlock);  // span Cs (a double takes 2 floats)
      for (size_t k = 0; k < kernels.size(); ++k) kernels[k].fill_factors(b, len, factors[k], fb);
      store.edit(b, len, [&](auto* pv, const auto& round) {
        cpu::factor_coded_span<std::remove_pointer_t<decltype(pv)>, C, decltype(near)::value>(
            pv, g + b, m, b, len, decay, b1c, fb, round, mb);
      });
    });
  });
}

int64_t adam_mini_coded_bytes(const BlockSpec& spec, int64_t span) {
  int64_t factors = 0, partial = 0;
  for (const Segment& seg : spec) {
    if (seg.block_numel() == 1 && seg.row_stride == seg.cols) continue;
    factors += Workspace::Lease::bytes_for<double>(seg.num_blocks());
    partial = std::max(partial, Workspace::Lease::bytes_for<double>(at::get_num_threads() *
                                                                    seg.num_blocks()));
  }
  const int64_t buffers = at::get_num_threads() * cpu::factor_coded_floats(span);
  return factors + Workspace::Lease::bytes_for<float>(buffers) + partial;
}

}  // namespace

void adam_mini_update_(TensorList params_in, TensorList grads_in, TensorList exp_avgs_in,
                       TensorList exp_avg_sqs_in, TensorList steps,
                       const std::vector<BlockSpec>& specs, const Tensor& lr_t, double beta1,
                       double beta2, double eps, double weight_decay,
                       at::IntArrayRef rounding_arg, TensorList weight_scales,
                       TensorList state_scales) {
  check_adam_mini_inputs(params_in, grads_in, exp_avgs_in, exp_avg_sqs_in, steps, specs,
                         weight_scales, state_scales);
  const Rounding rounding(rounding_arg, params_in.size(), "adam_mini_update_");
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params_in.empty()) return;
  TORCH_CHECK(params_in[0].device().is_cpu(), "adam_mini_update_: no kernel for device ",
              params_in[0].device(), " in this build");
  AdamMiniLayouts layouts(params_in, exp_avgs_in, exp_avg_sqs_in, specs);
  const auto grads_seen = layouts.follow(grads_in);
  TensorList params = layouts.params(), grads = grads_seen, exp_avgs = layouts.exp_avgs(),
             exp_avg_sqs = layouts.exp_avg_sqs();

  Workspace::Lease lease(Workspace::of(params[0].device()));
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const Tensor& scales = weight_scale(weight_scales, i);
    const bool coded = coded_state(state_scales, params.size(), 0, i);
    const int64_t span =
        coded ? cpu::state_span(int8_scales(scales) ? int8_group(p, scales) : 1) : 0;
    int64_t widest = span;
    for (const auto& seg : specs[i]) widest = std::max(widest, seg.cols);
    const int64_t buffer = cpu::int8_buffer_elements(p, scales, widest);
    const at::ScalarType pt = value_dtype(p, grads[i]);
    MEMOPT_DISPATCH_PARAM_STATE(pt, v.scalar_type(), "adam_mini_update_", [&] {
      using K = SegmentKernel<scalar_t, state_t, opmath_t, cpu::PlainParam<scalar_t, cpu::Nearest>>;
      int64_t need = cpu::staging_bytes(grads[i]);
      for (const auto& seg : specs[i])
        if (!K::use_row_bands(seg))
          need = std::max(need, cpu::staging_bytes(grads[i]) + (K::use_column_bands(seg)
                                                                     ? K::column_bytes(seg)
                                                                     : K::general_bytes(seg)));
      if (coded) need = cpu::staging_bytes(grads[i]) + adam_mini_coded_bytes(specs[i], span);
      lease.reserve(need + cpu::int8_buffer_bytes(buffer));
      const Tensor g = cpu::contiguous_grad(lease, grads[i]);
      float* buffers = cpu::int8_buffers(lease, buffer);
      const auto s = AdamScalars::make(lr, beta1, beta2, eps, weight_decay,
                                       cpu::advance_step(steps[i]));
      auto* vp = v.data_ptr<state_t>();
      const int64_t mark = lease.mark();
      cpu::with_param_store<scalar_t>(p, scales, rounding, i, s.step, buffers, buffer,
                                      [&](const auto& store) {
        using KR = SegmentKernel<scalar_t, state_t, opmath_t, std::decay_t<decltype(store)>>;
        if (coded) {
          adam_mini_coded<scalar_t, state_t, opmath_t>(
              store, g.data_ptr<scalar_t>(),
              {m.data_ptr<int8_t>(), state_scale(state_scales, params.size(), 0, i).data_ptr<float>()},
              vp, specs[i], s, p.numel(), span, lease);
          return;
        }
        for (const auto& seg : specs[i]) {
          KR k{store, g.data_ptr<scalar_t>(), m.data_ptr<state_t>(), vp, seg, s};
          // Elementwise (plain Adam) segments take the AdamW loop directly.
          if (seg.block_numel() == 1 && seg.row_stride == seg.cols) {
            store.for_spans(seg.offset, seg.rows * seg.cols,
                            [&](auto* pv, const auto& round, int64_t o, int64_t n) {
              cpu::adamw_span<std::remove_pointer_t<decltype(pv)>, state_t, opmath_t>(
                  pv, k.g + o, k.m + o, vp + (o - seg.offset), n, s, round);
            });
          } else if (K::use_row_bands(seg)) {
            k.row_bands();
          } else if (K::use_column_bands(seg)) {
            lease.rewind(mark);
            k.column_bands(lease);
          } else {
            lease.rewind(mark);  // keeps the staged grad, reuses the scratch after it
            k.general(lease);
          }
          vp += seg.num_blocks();
        }
      });
    });
  }
  layouts.write_back();
}

}  // namespace memopt
