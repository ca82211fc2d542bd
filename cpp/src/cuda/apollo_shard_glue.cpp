// memopt::apollo_shard_stats_ and apollo_shard_update_ for the CUDA dispatch key: APOLLO on
// FSDP2 row or column shards of GPU tensors. The statistics layout and every piece of math are
// cpp/src/apollo_shard.cpp's (apollo_tiles.h); here they are ATen ops on device tensors:
//   - P of the full weight is drawn on the host by memopt::Projector (the CPU generator, the
//     values the CPU ops multiply with) and copied to the device, at each refresh into the
//     stored P, or every step with store_projection=False; seeds (to draw P) and step counters
//     are read on the host (a sync for those kept on the device), but with found_inf: then the
//     counters advance on the device (cuda/step_scalars.cu), the call refreshes nothing, and
//     every write is gated by the flag (moments, limiter norm: where(); p: the kernel);
//   - R = P^T G_local (a Left row shard: a partial R, summed over the shard group through
//     `stats`; a Left column shard: its own channels) or G_local P^T (Right: the shard's own
//     channels) by one GEMM, fp32-accumulated for bf16/fp16;
//   - Adam on R, channel and tensor norms (float64 sums as the CPU's), the limiter on the device
//     (no sync), then p = (p - coef * g) (1 - lr wd), rounded once: apollo_'s update kernel.
// The float64 stats buffer lives on the parameters' device (NCCL reduces it there).
// Temporaries are R-, P-, channel- or block-sized, never a parameter's size (but for the host
// emulation's widening of a bf16 gradient, which has no mixed-dtype GEMM).
#include <torch/library.h>

#include <ATen/Context.h>

#include "launch.h"
#include "memopt/apollo.h"

namespace memopt::cuda {
namespace {

constexpr double kNormEps = 1e-8;  // apollo-torch's "+ 1e-8" (scaling factor and limiter)

at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// P of the full weight for this step on the device, in the parameter dtype. t0: the step
// before its increment (-1: no refresh); commit: write a new seed and a refreshed stored P
// (the update pass); want: return P (a Left update needs none). The seed is read (a sync when
// it lives on the device) only to draw P.
Tensor step_projection(const Projector& proj, const ApolloConfig& cfg, const Tensor& p,
                       const Tensor* stored, const Tensor& seed_t, int64_t t0, bool commit,
                       bool want) {
  const bool refresh = t0 >= 0 && Projector::refresh_due(t0, cfg.update_proj_gap);
  const bool from_store = stored && (commit || !refresh);
  if (from_store && !refresh) return want ? *stored : Tensor();
  int64_t seed = seed_t.item<int64_t>();
  if (refresh && t0 > 0) {
    seed = Projector::next_seed(seed);
    if (commit) seed_t.fill_(seed);
  }
  if (!from_store && !want) return Tensor();
  const bool pin = kKernelDevice == c10::DeviceType::CUDA;  // host emulation: none
  Tensor host = at::empty(proj.proj_shape(), at::TensorOptions().dtype(p.scalar_type())
                                                 .pinned_memory(pin));
  const Tensor scratch =
      p.scalar_type() == at::kFloat ? Tensor() : at::empty(proj.proj_shape(), at::kFloat);
  proj.gaussian_(host, seed, scratch);
  if (from_store) return stored->copy_(host, /*non_blocking=*/true);  // the host block is kept
  return host.to(p.device(), /*non_blocking=*/true);                  // by the caching allocator
}

// R of this shard: Left (r, local columns), the partial sum over a row shard's rows starting
// at row0 (a column shard has every row: row0 = 0); Right (rows, r).
Tensor project(const Projector& proj, const Tensor& P, const Tensor& g, int64_t row0,
               at::ScalarType ct) {
  if (proj.side() == ProjSide::Right) return gemm(g, P.t(), ct);
  if (g.size(0) == 0)  // an empty shard contributes nothing
    return at::zeros({proj.rank(), g.size(1)}, g.options().dtype(ct));
  return gemm(P.narrow(0, row0, g.size(0)).t(), g, ct);
}

// `fresh`, or `old` where the 0-dim bool `skip` (the op's found_inf set; undefined: never)
// is true: the gate of the R- and channel-sized state this file writes with ATen ops.
Tensor unless_skipped(const Tensor& skip, const Tensor& old, const Tensor& fresh) {
  return skip.defined() ? at::where(skip, old, fresh) : fresh;
}

// Adam on R (stored rounding kept): the direction Rt = M / (sqrt(V) + eps) in ct; the moments
// are written only with `write`, and kept where `skip` says.
Tensor adam_direction(const Tensor& R, const Tensor& m, const Tensor& v, double b1, double b2,
                      double eps, bool write, const Tensor& skip = {}) {
  const at::ScalarType ct = R.scalar_type();
  // 1 - b in double, rounded by the op, as apollo-torch and the CPU's MomentCoefs
  Tensor m1 = m.to(ct, false, true).mul_(b1).add_(R, 1.0 - b1);
  Tensor v1 = v.to(ct, false, true).mul_(b2).addcmul_(R, R, 1.0 - b2);
  if (write) {
    m.copy_(unless_skipped(skip, m, m1));
    v.copy_(unless_skipped(skip, v, v1));
  }
  if (m.scalar_type() != ct) m1 = m1.to(m.scalar_type()).to(ct), v1 = v1.to(v.scalar_type()).to(ct);
  return m1.div_(v1.sqrt_().add_(eps));
}

// Per-channel sums of squares in float64: channels are R's columns (Left) or rows (Right).
Tensor channel_sums(const Tensor& x, bool left) {
  return x.to(at::kDouble, false, /*copy=*/true).square_().sum(left ? 0 : 1);  // x may alias stats
}
// Sums of g^2 per channel: per column (Left) or per row, float64 (no gradient-sized copy).
Tensor grad_squares(const Tensor& g, bool left) {
  return at::linalg_vector_norm(g, 2, at::IntArrayRef{left ? 0 : 1}, false, at::kDouble)
      .square_();
}
Tensor factor(const Tensor& a, const Tensor& b) { return a.sqrt().div_(b.sqrt().add_(kNormEps)); }

struct Args {
  TensorList params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps;
  at::IntArrayRef offsets, global_sizes, shard_dims;
  const Tensor& stats;
};

// Validation (the CPU op's, then the devices) before anything is written; runs fn(i, proj,
// sums_r, g, stats slice) on each tensor (sums_r: the shard splits P's contraction).
template <typename Fn>
void for_each_shard(const char* op, const Args& a, const ApolloConfig& cfg, Fn&& fn) {
  check_apollo_shard_inputs(a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.projs, a.seeds,
                            a.limiter_norms, a.steps, a.offsets, a.global_sizes, a.shard_dims,
                            a.stats, cfg);
  if (a.params.empty()) return;
  check_same_cuda_device(op, {a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.projs, {a.stats}});
  const bool fp16_accumulation = at::globalContext().allowFP16AccumulationCuBLAS();
  for (const auto& p : a.params)
    TORCH_CHECK_VALUE(p.scalar_type() != at::kHalf || !fp16_accumulation, op,
                      ": float16 parameters need torch.backends.cuda.matmul."
                      "allow_fp16_accumulation = False (R is accumulated in float32)");
  const c10::DeviceGuard guard(a.params[0].device());
  int64_t off = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const int64_t dim = a.shard_dims[i];
    const auto global = apollo_shard_global_shape(a.params[i], dim, a.global_sizes[i]);
    const Projector proj(cfg.proj, cfg.proj_type, cfg.rank, global);
    const int64_t numel = apollo_shard_stats_numel(global, cfg, dim);
    fn(i, proj, apollo_shard_sums_r(proj, dim), contiguous_grad(a.grads[i]),
       a.stats.narrow(0, off, numel));
    off += numel;
  }
}

void stats_cuda(MEMOPT_APOLLO_SHARD_ARGS) {
  const ApolloConfig cfg = MEMOPT_APOLLO_SHARD_CONFIG;
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
  check_found_inf("apollo_shard_stats_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, cfg, found_inf);
  const bool limiter = cfg.norm_growth_limit > 0.0;
  const Args a{params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
               offsets, global_sizes, shard_dims, stats};
  for_each_shard("apollo_shard_stats_", a, cfg,
                 [&](size_t i, const Projector& proj, bool sums_r, const Tensor& g, Tensor st) {
    const bool left = proj.side() == ProjSide::Left;
    if (!sums_r && cfg.channel && !limiter) return;  // nothing crosses shards
    const Tensor& p = params[i];
    const auto ct = compute_type(p.scalar_type());
    const Tensor P = step_projection(proj, cfg, p, projs.empty() ? nullptr : &projs[i],
                                     seeds[i], apollo_step_before(steps[i], found_inf),
                                     /*commit=*/false, /*want=*/true);
    const Tensor R = project(proj, P, g, sums_r ? offsets[i] : 0, ct);
    if (sums_r) {  // the partial R, then column sums of G^2 (or their total)
      const int64_t rK = R.numel();
      st.narrow(0, 0, rK).view(R.sizes()).copy_(R);
      if (limiter) {
        const Tensor g2 = grad_squares(g, true);
        if (cfg.channel)
          st.narrow(0, rK, g2.numel()).copy_(g2);
        else
          st.narrow(0, rK, 1).copy_(g2.sum().reshape({1}));
      }
      return;
    }
    // The shard's channels are whole; the moments are read, not written.
    const Tensor rt = adam_direction(R, exp_avgs[i], exp_avg_sqs[i], beta1, beta2, eps, false);
    const Tensor sa = channel_sums(rt, left), sb = channel_sums(R, left);
    const Tensor g2 = limiter ? grad_squares(g, left) : Tensor();
    if (cfg.channel)  // ||U||^2 of the shard's channels
      st.narrow(0, 0, 1).copy_(factor(sa, sb).square_().mul_(g2).sum().reshape({1}));
    else
      st.narrow(0, 0, limiter ? 3 : 2)
          .copy_(limiter ? at::stack({sa.sum(), sb.sum(), g2.sum()}) : at::stack({sa.sum(), sb.sum()}));
  });
}

// The norm-growth limiter on the device given ||U||^2 (0-d float64, before sqrt(scale)):
// returns the divisor of the update and stores the limited norm (first time: the norm itself)
// unless `skip` says.
Tensor limiter_step(const ApolloConfig& cfg, const Tensor& u2, const Tensor& limiter_norm,
                    const Tensor& skip) {
  const Tensor u = u2.sqrt().mul_(cfg.scale_front ? std::sqrt(cfg.scale) : 1.0);
  const Tensor prev = limiter_norm.to(u.device(), at::kDouble).reshape({});
  const double gamma = cfg.norm_growth_limit;
  const Tensor grown = at::clamp_min(u / (prev + kNormEps), gamma).div_(gamma);
  const Tensor limit = at::where(prev >= 0.0, grown, at::ones_like(grown));
  limiter_norm.copy_(unless_skipped(skip.defined() ? skip.to(u.device()) : skip,
                                    limiter_norm.to(u.device(), at::kDouble),
                                    (u / limit).reshape(limiter_norm.sizes())));
  return limit;
}

// p = x - lr wd x with x = p - coef g (apollo-torch's decay after the update), rounded to p's
// dtype once as the CPU op does: apollo_'s update kernel (cuda/apollo.cu) on one tensor, coef
// per column (Left), row (Right) or one for the tensor; nothing is written where the step's
// found_inf (`steps`) is set.
void apply_update(const Tensor& p, const Tensor& g, const Tensor& coef, int32_t mode,
                  double lr_wd, const StepPlan& steps, int32_t tensor, Stream stream) {
  const Tensor c = coef.to(at::kDouble).contiguous();  // (the kernel rounds it as the CPU op)
  ApolloUpdateParams up{};
  up.param_dtype = dtype_of(p.scalar_type());
  up.lr_wd = lr_wd;
  up.device = steps.device;
  launch_chunked(
      "apollo_shard_update_", up, 1, kApolloUpdateChunk, [&](int64_t) { return p.numel(); },
      [&](int slot, int64_t) {
        up.p[slot] = p.data_ptr(), up.g[slot] = g.data_ptr(), up.coef[slot] = c.data_ptr<double>();
        up.cols[slot] = p.size(1), up.mode[slot] = mode, up.tensor[slot] = tensor;
      },
      [&](const ApolloUpdateParams& launch) { return launch_apollo_update(launch, stream); });
}

void update_kernels(MEMOPT_APOLLO_SHARD_ARGS) {
  const ApolloConfig cfg = MEMOPT_APOLLO_SHARD_CONFIG;
  const double lr_value = read_lr(lr);
  check_adam_hparams(lr_value, beta1, beta2, eps, weight_decay);
  const bool limiter = cfg.norm_growth_limit > 0.0;
  const Args a{params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
               offsets, global_sizes, shard_dims, stats};
  // Made at the first tensor, once everything is validated: each count before the step (or
  // -1, found_inf), then the counters advanced (on the device with found_inf) and StepScalars.
  std::vector<int64_t> t0(params.size());
  std::optional<StepPlan> plan;
  const Stream stream = params.empty() ? nullptr : current_stream(params[0].device());
  const Tensor skip = found_inf.has_value() ? found_inf->ne(0).reshape({}) : Tensor();
  for_each_shard("apollo_shard_update_", a, cfg,
                 [&](size_t i, const Projector& proj, bool sums_r, const Tensor& g, Tensor st) {
    if (!plan) {
      for (size_t k = 0; k < params.size(); ++k) t0[k] = apollo_step_before(steps[k], found_inf);
      plan = plan_steps(steps, lr_value, beta1, beta2, weight_decay, AdamWRule::kApollo,
                        Rounding(), found_inf, stream);  // (stochastic: refused, check above)
    }
    const bool left = proj.side() == ProjSide::Left;
    const Tensor& p = params[i];
    const auto ct = compute_type(p.scalar_type());
    const Tensor P = step_projection(proj, cfg, p, projs.empty() ? nullptr : &projs[i], seeds[i],
                                     t0[i], /*commit=*/true, /*want=*/!sums_r);
    const int64_t r = proj.rank(), K = left ? p.size(1) : p.size(0);
    // A summed R is whole in st, every rank steps the same moments alike; else R of the
    // shard's channels again, this time stepping the moments.
    const Tensor R = sums_r ? st.narrow(0, 0, r * K).view({r, K}).to(ct)
                            : project(proj, P, g, 0, ct);
    const Tensor rt =
        adam_direction(R, exp_avgs[i], exp_avg_sqs[i], beta1, beta2, eps, true, skip);
    const Tensor sa = channel_sums(rt, left), sb = channel_sums(R, left);
    Tensor fac, u2;  // fac: (K) per channel or 0-d
    if (cfg.channel) {
      fac = factor(sa, sb);
      if (limiter) u2 = sums_r ? fac.square().mul_(st.narrow(0, r * K, K)).sum() : st[0];
    } else {
      fac = sums_r ? factor(sa.sum(), sb.sum()) : factor(st[0], st[1]);
      if (limiter) u2 = fac.square() * st[sums_r ? r * K : 2];
    }
    // lr sqrt(1 - b2^t) / (1 - b1^t): StepScalars' under kApollo, the host's or the device's
    Tensor coef = plan->buffer.defined()
        ? fac.mul(plan->buffer.view({-1, 4})[static_cast<int64_t>(i)][1] * std::sqrt(cfg.scale))
        : fac.mul(plan->of(i).step_size * std::sqrt(cfg.scale));
    if (limiter) coef.div_(limiter_step(cfg, u2, limiter_norms[i], skip));
    const int32_t mode = !cfg.channel ? kApolloPerTensor : left ? kApolloPerColumn : kApolloPerRow;
    apply_update(p, g, coef, mode, lr_value * weight_decay, *plan, static_cast<int32_t>(i),
                 stream);
  });
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void update_cuda(MEMOPT_APOLLO_SHARD_ARGS) {
  check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                            steps, offsets, global_sizes, shard_dims, stats,
                            MEMOPT_APOLLO_SHARD_CONFIG);
  check_found_inf("apollo_shard_update_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, MEMOPT_APOLLO_SHARD_CONFIG, found_inf);
  // R's channels are logical rows/columns: a non-contiguous weight is staged in logical order.
  ParamLayouts layouts(params, {}, logical_order_only);
  update_kernels(layouts.params(), grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                 steps, offsets, global_sizes, shard_dims, stats, lr, beta1, beta2, eps,
                 weight_decay, rank, proj, proj_type, scale_type, update_proj_gap, scale,
                 norm_growth_limit, scale_front, rounding, found_inf);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) {
  m.impl("apollo_shard_stats_", &memopt::cuda::stats_cuda);
  m.impl("apollo_shard_update_", &memopt::cuda::update_cuda);
}
