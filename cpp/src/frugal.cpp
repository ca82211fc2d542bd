// FRUGAL: fused state-full AdamW + state-free signSGD/SGD update on CPU.
#include <algorithm>

#include "frugal_impl.h"
#include "cpu_states.h"

namespace memopt {

namespace {

bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

bool stateful(FrugalMode m) { return m != FrugalMode::FreeBlock; }

// Indices must be sorted and unique so the fused loops can walk them as runs.
void check_sorted(const Tensor& idx, int64_t limit, const std::string& what) {
  const int32_t* d = idx.data_ptr<int32_t>();
  for (int64_t s = 0; s < idx.numel(); ++s)
    TORCH_CHECK_VALUE(d[s] >= 0 && d[s] < limit && (s == 0 || d[s] > d[s - 1]), what,
                      ": subspace indices must be sorted, unique and below ", limit);
}

// Expected shape of the moments of tensor p in `mode` with subspace `sub`.
std::vector<int64_t> moment_shape(FrugalMode mode, const Tensor& p, const Tensor& sub) {
  switch (mode) {
    case FrugalMode::Columns: return {p.size(0), sub.numel()};
    case FrugalMode::Rows: return {sub.numel(), p.size(1)};
    case FrugalMode::RandK: return {sub.numel()};
    case FrugalMode::ProjRight: return {p.size(0), sub.size(0)};
    case FrugalMode::ProjLeft: return {sub.size(1), p.size(1)};
    default: return p.sizes().vec();
  }
}

}  // namespace

void check_frugal_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                         at::IntArrayRef modes, double proj_lr_scale, double free_lr_scale,
                         int64_t rule, bool read_data, TensorList weight_scales,
                         TensorList state_scales) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                        steps.size() == n && subspaces.size() == n && modes.size() == n,
                    "frugal_update_: params, grads, exp_avgs, exp_avg_sqs, steps, subspaces and "
                    "modes must have the same length");
  check_adam_codes("frugal_update_", params, exp_avgs, exp_avg_sqs, state_scales);
  TORCH_CHECK_VALUE(std::isfinite(proj_lr_scale) && proj_lr_scale >= 0.0,
                    "Invalid proj_params_lr_scale: ", proj_lr_scale);
  TORCH_CHECK_VALUE(std::isfinite(free_lr_scale) && free_lr_scale >= 0.0,
                    "Invalid state_free_lr_scale: ", free_lr_scale);
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 2, "frugal_update_: rule must be 0 (none), 1 (sgd) or "
                    "2 (sign_sgd), got ", rule);
  check_weight_scales("frugal_update_", params, grads, weight_scales);
  for (size_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i];
    const at::ScalarType pt = value_dtype(p, g);
    const std::string what = "frugal_update_: tensor " + std::to_string(i);
    TORCH_CHECK_VALUE(modes[i] >= 0 && modes[i] < kFrugalModes, what, ": unknown mode ", modes[i]);
    const auto mode = static_cast<FrugalMode>(modes[i]);
    TORCH_CHECK_TYPE(supported_float(pt), what, ": parameter dtype ", pt,
                     " is not supported; use float32, bfloat16, float16 or float64");
    check_param_layout(what + ": parameter", p);  // any non-overlapping layout (layout.h)
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, what,
                      ": gradient is sparse; memopt optimizers support dense gradients only");
    TORCH_CHECK_TYPE(!g.is_complex(), what,
                     ": gradient is complex; memopt optimizers support real parameters only");
    TORCH_CHECK_TYPE(g.scalar_type() == pt, what, ": gradient has dtype ", g.scalar_type(),
                     " but its parameter has ", pt);
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), what, ": gradient has shape ", g.sizes(),
                      " but its parameter has ", p.sizes());
    TORCH_CHECK_VALUE(g.device() == p.device() && p.device() == params[0].device(), what,
                      ": is on another device; one call takes one device");
    // 8-bit moments: whole-tensor ones only (Adam, active blocks; memopt/frugal_plan.h)
    const bool coded = coded_state(state_scales, n, 0, i);
    TORCH_CHECK_VALUE(!coded || mode == FrugalMode::Adam || mode == FrugalMode::ActiveBlock, what,
                      ": 8-bit moments are for whole tensors (Adam, active blocks), not mode ",
                      modes[i]);
    if (!stateful(mode)) continue;
    const Tensor &m = exp_avgs[i], &v = exp_avg_sqs[i], &s = steps[i], &sub = subspaces[i];
    const bool two_d = mode >= FrugalMode::Columns && mode != FrugalMode::RandK;
    TORCH_CHECK_VALUE(!two_d || p.dim() == 2, what, ": mode ", modes[i], " needs a 2-D tensor, got ",
                      p.sizes());
    if (mode >= FrugalMode::Columns && mode <= FrugalMode::RandK) {
      TORCH_CHECK_TYPE(sub.scalar_type() == at::kInt && sub.dim() == 1 && sub.is_contiguous() &&
                           sub.device().is_cpu() == p.device().is_cpu(),
                       what, ": subspace indices must be a contiguous 1-D int32 tensor");
      const int64_t limit = mode == FrugalMode::Columns ? p.size(1)
                            : mode == FrugalMode::Rows  ? p.size(0)
                                                        : p.numel();
      if (read_data && sub.device().is_cpu()) check_sorted(sub, limit, what);
    } else if (mode >= FrugalMode::ProjRight) {
      const bool right = mode == FrugalMode::ProjRight;
      TORCH_CHECK_VALUE(sub.dim() == 2 && sub.is_contiguous() &&
                            sub.size(right ? 1 : 0) == p.size(right ? 1 : 0),
                        what, ": projection must be ", right ? "(r, cols)" : "(rows, r)",
                        " for a parameter of shape ", p.sizes(), ", got ", sub.sizes());
      TORCH_CHECK_TYPE(sub.scalar_type() == pt && sub.device() == p.device(), what,
                       ": projection must have the parameter's dtype and device");
    }
    const auto shape = moment_shape(mode, p, sub);
    // State shaped like the parameter (Adam, active blocks) may take any layout, as p may.
    const bool param_shaped = m.sizes() == p.sizes();
    TORCH_CHECK_VALUE(m.sizes() == at::IntArrayRef(shape) && v.sizes() == m.sizes() &&
                          (param_shaped || (m.is_contiguous() && v.is_contiguous())),
                      what, ": exp_avg and exp_avg_sq must be ",
                      param_shaped ? "" : "contiguous ", "of shape ", at::IntArrayRef(shape),
                      ", got ", m.sizes(), " and ", v.sizes());
    check_param_layout(what + ": exp_avg", m);
    check_param_layout(what + ": exp_avg_sq", v);
    TORCH_CHECK_TYPE((coded || ((m.scalar_type() == pt || m.scalar_type() == at::kFloat ||
                                 m.scalar_type() == at::kBFloat16) &&
                                v.scalar_type() == m.scalar_type())) &&
                         m.device() == p.device() && v.device() == p.device(),
                     what, ": state must be float32, bfloat16 or the parameter dtype, on its "
                     "device");
    TORCH_CHECK_VALUE(s.numel() == 1 && s.scalar_type() == at::kFloat &&
                          (s.device().is_cpu() || s.device() == p.device()),
                      what, ": step must be a one-element float32 tensor on the CPU");
  }
}

namespace {

// The state-free update of a span: p = p*decay - lr_free * rule(g), with rule(g) = sign(g), g
// or 0 (sign(0) = 0 as torch.sign).
template <typename P, typename C, typename R, typename G>
MEMOPT_CPU_CLONES void free_span(P* __restrict p, const G* __restrict g, int64_t n, C decay,
                                 C lr_free, int64_t rule, const R& round) {
  if (rule == 2) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const C gj = cpu::load<C>(g[j]);
      const C sg = cpu::load<C>((gj > C(0)) - (gj < C(0)));
      p[j] = round.template store<P>(cpu::load<C>(p[j]) * decay - lr_free * sg, j);
    }
  } else if (rule == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      p[j] = round.template store<P>(cpu::load<C>(p[j]) * decay - lr_free * cpu::load<C>(g[j]), j);
  } else if (decay != C(1)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[j] = round.template store<P>(cpu::load<C>(p[j]) * decay, j);
  }
}

// One AdamW coordinate (for scattered column / randk coordinates), element e of round's.
template <typename P, typename S, typename C, typename R>
inline void adam_one(P& p, C g, S& m, S& v, const AdamScalars& s, const R& round, int64_t e) {
  C mj = cpu::load<C>(m), vj = cpu::load<C>(v);
  mj = cpu::lerp(mj, g, cpu::load<C>(1.0 - s.beta1));
  vj = cpu::load<C>(s.beta2) * vj + cpu::load<C>(1.0 - s.beta2) * g * g;
  const C denom = std::sqrt(vj) / cpu::load<C>(s.bc2_sqrt) + cpu::load<C>(s.eps);
  p = round.template store<P>(cpu::load<C>(p) * cpu::load<C>(s.decay) -
                                 cpu::load<C>(s.step_size) * mj / denom, e);
  m = cpu::store<S>(mj);
  v = cpu::store<S>(vj);
}

// [begin, end) of a flat span whose selected coordinates are idx[...] (sorted): every coordinate
// first takes the vectorised state-free pass, then the selected ones are redone with AdamW from
// their saved original values. Works in sub-spans of kSub so the saved values fit on the stack.
// pb: the values of element begin on (p + begin); g: from element 0; round: indexed from pb.
template <typename P, typename S, typename C, typename R, typename G>
void split_span(P* pb, const G* g, S* m, S* v, const int32_t* idx, int64_t k, int64_t begin,
                int64_t end, int64_t slot_offset, const AdamScalars& s, C lr_free, int64_t rule,
                const R& round) {
  constexpr int64_t kSub = 1024;
  P saved[kSub];
  int64_t slot = std::lower_bound(idx, idx + k, begin) - idx;
  for (int64_t b = begin; b < end; b += kSub) {
    const int64_t e = std::min(end, b + kSub);
    int64_t last = slot;
    for (; last < k && idx[last] < e; ++last) saved[last - slot] = pb[idx[last] - begin];
    free_span<P, C>(pb + (b - begin), g + b, e - b, cpu::load<C>(s.decay), lr_free, rule,
                    round.at(b - begin));
    for (int64_t q = slot; q < last; ++q) {
      P pv = saved[q - slot];
      adam_one<P, S, C>(pv, cpu::load<C>(g[idx[q]]), m[slot_offset + q], v[slot_offset + q], s,
                        round, idx[q] - begin);
      pb[idx[q] - begin] = pv;
    }
    slot = last;
  }
}

}  // namespace

// frugal_update_'s loop (frugal_impl.h), also the finish of frugal_shard_update_.
void frugal_update_loop(TensorList params_in, TensorList grads_in, TensorList exp_avgs_in,
                        TensorList exp_avg_sqs_in, TensorList steps, TensorList subspaces,
                        at::IntArrayRef modes, double lr, double beta1, double beta2, double eps,
                        double weight_decay, double proj_lr_scale, double free_lr_scale,
                        int64_t rule, const Tensor* left_stats, const Rounding& rounding,
                        TensorList weight_scales, TensorList state_scales) {
  if (params_in.empty()) return;
  TORCH_CHECK(params_in[0].device().is_cpu(), "frugal_update_: no kernel for device ",
              params_in[0].device(), " in this build");
  ParamLayouts layouts(params_in, {exp_avgs_in, exp_avg_sqs_in}, frugal_order_free(modes));
  const auto grads_seen = layouts.follow(grads_in);
  TensorList params = layouts.params(), grads = grads_seen, exp_avgs = layouts.written(0),
             exp_avg_sqs = layouts.written(1);
  const double lr_free = lr * proj_lr_scale * free_lr_scale;

  Workspace::Lease lease(Workspace::of(params[0].device()));
  int64_t stats_at = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto mode = static_cast<FrugalMode>(modes[i]);
    const bool projected = mode == FrugalMode::ProjRight || mode == FrugalMode::ProjLeft;
    const Tensor& p = params[i];
    const Tensor& scales = weight_scale(weight_scales, i);
    const bool coded = coded_state(state_scales, params.size(), 0, i);
    const int64_t span =
        coded ? cpu::state_span(int8_scales(scales) ? int8_group(p, scales) : 1) : 0;
    const int64_t buffer = cpu::int8_buffer_elements(
        p, scales, coded ? span : p.dim() == 2 ? p.size(1) : 0);
    lease.reserve(cpu::staging_bytes(grads[i]) + cpu::int8_buffer_bytes(buffer) +
                  cpu::int8_buffer_bytes(coded ? cpu::kAdamCodedFloats : 0) +
                  (projected ? frugal_projected_bytes(p, subspaces[i], exp_avgs[i]) : 0));
    const Tensor g = cpu::contiguous_grad(lease, grads[i]);
    float* buffers = cpu::int8_buffers(lease, buffer);
    float* state_buffers = cpu::int8_buffers(lease, coded ? cpu::kAdamCodedFloats : 0);
    const at::ScalarType pt = value_dtype(p, g);
    if (mode == FrugalMode::FreeBlock) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pt, "frugal_free", [&] {
        using C = at::opmath_type<scalar_t>;
        const auto* gp = g.data_ptr<scalar_t>();
        // State-free, no step count (step 0): the key's `counter`, the optimizer's step,
        // changes it every step.
        cpu::with_param_store<scalar_t>(p, scales, rounding, i, 0.0, buffers, buffer,
                                        [&](const auto& store) {
          store.for_spans(0, p.numel(), [&](auto* pv, const auto& round, int64_t b, int64_t n) {
            free_span<std::remove_pointer_t<decltype(pv)>, C>(
                pv, gp + b, n, cpu::load<C>(1.0 - lr * weight_decay), cpu::load<C>(lr_free), rule,
                round);
          });
        });
      });
      continue;
    }
    // Adam at the scaled lr for projectable tensors; decay always with the group lr (upstream).
    const double lr_adam = mode == FrugalMode::Adam ? lr : lr * proj_lr_scale;
    auto s = AdamScalars::make(lr_adam, beta1, beta2, eps, weight_decay,
                               cpu::advance_step(steps[i]));
    s.decay = 1.0 - lr * weight_decay;
    const Tensor &m = exp_avgs[i], &v = exp_avg_sqs[i], &sub = subspaces[i];
    if (projected) {
      Tensor summed;
      if (left_stats != nullptr && mode == FrugalMode::ProjLeft) {
        summed = left_stats->narrow(0, stats_at, m.numel()).view(m.sizes());
        stats_at += m.numel();
      }
      frugal_projected_update(p, g, m, v, sub, mode == FrugalMode::ProjRight, s, lr_free, rule,
                              lease, summed.defined() ? &summed : nullptr, rounding, i, scales,
                              buffers, buffer);
      continue;
    }
    MEMOPT_DISPATCH_PARAM_STATE(pt, coded ? at::kFloat : m.scalar_type(), "frugal_update_", [&] {
      cpu::with_param_store<scalar_t>(p, scales, rounding, i, s.step, buffers, buffer,
                                      [&](const auto& store) {
        using C = opmath_t;
        const auto* gp = g.data_ptr<scalar_t>();
        if (coded) {  // (Adam or an active block: check_frugal_inputs)
          const size_t n = params.size();
          cpu::adamw_coded<scalar_t, C>(
              store, gp, {m.data_ptr<int8_t>(), state_scale(state_scales, n, 0, i).data_ptr<float>()},
              {v.data_ptr<uint8_t>(), state_scale(state_scales, n, 1, i).data_ptr<float>()},
              p.numel(), span, state_buffers, s);
          return;
        }
        auto* mp = m.data_ptr<state_t>();
        auto* vp = v.data_ptr<state_t>();
        const C lf = cpu::load<C>(lr_free);
        if (mode == FrugalMode::Adam || mode == FrugalMode::ActiveBlock) {
          store.for_spans(0, p.numel(), [&](auto* pv, const auto& round, int64_t b, int64_t n) {
            cpu::adamw_span<std::remove_pointer_t<decltype(pv)>, state_t, C>(
                pv, gp + b, mp + b, vp + b, n, s, round);
          });
        } else if (mode == FrugalMode::RandK) {
          const int32_t* idx = sub.data_ptr<int32_t>();
          store.for_spans(0, p.numel(), [&](auto* pv, const auto& round, int64_t b, int64_t n) {
            split_span<std::remove_pointer_t<decltype(pv)>, state_t, C>(
                pv, gp, mp, vp, idx, sub.numel(), b, b + n, 0, s, lf, rule, round);
          });
        } else if (mode == FrugalMode::Columns) {
          const int64_t rows = p.size(0), cols = p.size(1), k = sub.numel();
          const int32_t* idx = sub.data_ptr<int32_t>();
          at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                           [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)  // row r's state slots are m[r*k, r*k + k)
              store.edit(r * cols, cols, [&](auto* pr, const auto& round) {
                split_span<std::remove_pointer_t<decltype(pr)>, state_t, C>(
                    pr, gp + r * cols, mp, vp, idx, k, 0, cols, r * k, s, lf, rule, round);
              });
          });
        } else {  // Rows
          const int64_t rows = p.size(0), cols = p.size(1), k = sub.numel();
          const int32_t* idx = sub.data_ptr<int32_t>();
          at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                           [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t slot = std::lower_bound(idx, idx + k, r) - idx;
              const int64_t o = r * cols;
              store.edit(o, cols, [&](auto* pr, const auto& round) {
                using P = std::remove_pointer_t<decltype(pr)>;
                if (slot < k && idx[slot] == r)
                  cpu::adamw_span<P, state_t, C>(pr, gp + o, mp + slot * cols, vp + slot * cols,
                                                 cols, s, round);
                else
                  free_span<P, C>(pr, gp + o, cols, cpu::load<C>(s.decay), lf, rule, round);
              });
            }
          });
        }
      });
    });
  }
  layouts.write_back();
}

OrderFreeWithin frugal_order_free(at::IntArrayRef modes) {
  std::vector<int64_t> kept(modes.begin(), modes.end());
  return [kept](size_t i, int64_t run) {
    const auto mode = static_cast<FrugalMode>(kept[i]);
    return run <= 1 || mode == FrugalMode::Adam || mode == FrugalMode::ActiveBlock ||
           mode == FrugalMode::FreeBlock;
  };
}

void frugal_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                    at::IntArrayRef modes, const Tensor& lr_t, double beta1, double beta2,
                    double eps, double weight_decay, double proj_lr_scale, double free_lr_scale,
                    int64_t rule, at::IntArrayRef rounding, TensorList weight_scales,
                    TensorList state_scales) {
  check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                      proj_lr_scale, free_lr_scale, rule, true, weight_scales, state_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  frugal_update_loop(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, lr, beta1,
                     beta2, eps, weight_decay, proj_lr_scale, free_lr_scale, rule, nullptr,
                     Rounding(rounding, params.size(), "frugal_update_"), weight_scales,
                     state_scales);
}

}  // namespace memopt
