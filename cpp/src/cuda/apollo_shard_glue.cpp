// memopt::apollo_shard_stats_ and apollo_shard_update_ for the CUDA dispatch key: APOLLO on
// FSDP2 row or column shards of GPU tensors. The statistics layout and every piece of math are
// cpp/src/apollo_shard.cpp's (apollo_tiles.h); here they are ATen ops on device tensors:
//   - P of the full weight is drawn on the host by memopt::Projector (the CPU generator, the
//     values the CPU ops multiply with) and copied to the device, at each refresh into the
//     stored P, or every step with store_projection=False; seeds and step counters are read on
//     the host (a sync for those kept on the device);
//   - R = P^T G_local (a Left row shard: a partial R, summed over the shard group through
//     `stats`; a Left column shard: its own channels) or G_local P^T (Right: the shard's own
//     channels) by one GEMM, fp32-accumulated for bf16/fp16;
//   - Adam on R, channel and tensor norms (float64 sums as the CPU's), the limiter on the device
//     (no sync), then p = (p - coef * g) (1 - lr wd) with a broadcast coef, rounded once
//     (in place for fp32/fp64, through bounded row blocks for bf16/fp16).
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
// before its increment; commit: write a new seed and a refreshed stored P (the update pass);
// want: return P (a Left update needs none).
Tensor step_projection(const Projector& proj, const ApolloConfig& cfg, const Tensor& p,
                       const Tensor* stored, const Tensor& seed_t, int64_t t0, bool commit,
                       bool want) {
  const bool refresh = Projector::refresh_due(t0, cfg.update_proj_gap);
  int64_t seed = seed_t.item<int64_t>();
  if (refresh && t0 > 0) {
    seed = Projector::next_seed(seed);
    if (commit) seed_t.fill_(seed);
  }
  const bool from_store = stored && (commit || !refresh);
  if (from_store && !refresh) return want ? *stored : Tensor();
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

// Adam on R (stored rounding kept): the direction Rt = M / (sqrt(V) + eps) in ct; the moments
// are written only with `write`.
Tensor adam_direction(const Tensor& R, const Tensor& m, const Tensor& v, double b1, double b2,
                      double eps, bool write) {
  const at::ScalarType ct = R.scalar_type();
  // 1 - b in double, rounded by the op, as apollo-torch and the CPU's MomentCoefs
  Tensor m1 = m.to(ct, false, true).mul_(b1).add_(R, 1.0 - b1);
  Tensor v1 = v.to(ct, false, true).mul_(b2).addcmul_(R, R, 1.0 - b2);
  if (write) {
    m.copy_(m1);
    v.copy_(v1);
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
  const bool limiter = cfg.norm_growth_limit > 0.0;
  const Args a{params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
               offsets, global_sizes, shard_dims, stats};
  for_each_shard("apollo_shard_stats_", a, cfg,
                 [&](size_t i, const Projector& proj, bool sums_r, const Tensor& g, Tensor st) {
    const bool left = proj.side() == ProjSide::Left;
    if (!sums_r && cfg.channel && !limiter) return;  // nothing crosses shards
    const Tensor& p = params[i];
    const auto ct = compute_type(p.scalar_type());
    const int64_t t0 = static_cast<int64_t>(steps[i].item<float>());
    const Tensor P = step_projection(proj, cfg, p, projs.empty() ? nullptr : &projs[i],
                                     seeds[i], t0, /*commit=*/false, /*want=*/true);
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
// returns the divisor of the update and stores the limited norm (first time: the norm itself).
Tensor limiter_step(const ApolloConfig& cfg, const Tensor& u2, const Tensor& limiter_norm) {
  const Tensor u = u2.sqrt().mul_(cfg.scale_front ? std::sqrt(cfg.scale) : 1.0);
  const Tensor prev = limiter_norm.to(u.device(), at::kDouble).reshape({});
  const double gamma = cfg.norm_growth_limit;
  const Tensor grown = at::clamp_min(u / (prev + kNormEps), gamma).div_(gamma);
  const Tensor limit = at::where(prev >= 0.0, grown, at::ones_like(grown));
  limiter_norm.copy_((u / limit).reshape(limiter_norm.sizes()));
  return limit;
}

// p = x - lr wd x with x = p - coef g (apollo-torch's decay after the update), rounded to p's
// dtype once as the CPU op does: in place for fp32/fp64, through compute-type row blocks of at
// most kBlock elements for bf16/fp16 (bounded scratch, never a parameter's size).
void apply_update(const Tensor& p, const Tensor& g, const Tensor& coef, double lr_wd) {
  constexpr int64_t kBlock = int64_t{1} << 20;
  const auto ct = coef.scalar_type();
  if (p.scalar_type() == ct) {
    p.addcmul_(g, coef, -1.0);
    p.add_(p, -lr_wd);
    return;
  }
  const int64_t rows = p.size(0), step = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, p.size(1)));
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    const Tensor c = coef.dim() == 2 && coef.size(0) == rows ? coef.narrow(0, r0, n) : coef;
    Tensor x = p.narrow(0, r0, n).to(ct).addcmul_(g.narrow(0, r0, n), c, -1.0);
    p.narrow(0, r0, n).copy_(x.add_(x, -lr_wd));
  }
}

void update_kernels(MEMOPT_APOLLO_SHARD_ARGS) {
  const ApolloConfig cfg = MEMOPT_APOLLO_SHARD_CONFIG;
  const double lr_value = read_lr(lr);
  check_adam_hparams(lr_value, beta1, beta2, eps, weight_decay);
  const bool limiter = cfg.norm_growth_limit > 0.0;
  const Args a{params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
               offsets, global_sizes, shard_dims, stats};
  for_each_shard("apollo_shard_update_", a, cfg,
                 [&](size_t i, const Projector& proj, bool sums_r, const Tensor& g, Tensor st) {
    const bool left = proj.side() == ProjSide::Left;
    const Tensor& p = params[i];
    const auto ct = compute_type(p.scalar_type());
    const int64_t t0 = static_cast<int64_t>(steps[i].item<float>());
    const Tensor P = step_projection(proj, cfg, p, projs.empty() ? nullptr : &projs[i], seeds[i],
                                     t0, /*commit=*/true, /*want=*/!sums_r);
    const double t = advance_step(steps[i]);
    const int64_t r = proj.rank(), K = left ? p.size(1) : p.size(0);
    // A summed R is whole in st, every rank steps the same moments alike; else R of the
    // shard's channels again, this time stepping the moments.
    const Tensor R = sums_r ? st.narrow(0, 0, r * K).view({r, K}).to(ct)
                            : project(proj, P, g, 0, ct);
    const Tensor rt = adam_direction(R, exp_avgs[i], exp_avg_sqs[i], beta1, beta2, eps, true);
    const Tensor sa = channel_sums(rt, left), sb = channel_sums(R, left);
    Tensor fac, u2;  // fac: (K) per channel or 0-d
    if (cfg.channel) {
      fac = factor(sa, sb);
      if (limiter) u2 = sums_r ? fac.square().mul_(st.narrow(0, r * K, K)).sum() : st[0];
    } else {
      fac = sums_r ? factor(sa.sum(), sb.sum()) : factor(st[0], st[1]);
      if (limiter) u2 = fac.square() * st[sums_r ? r * K : 2];
    }
    const double step_size = lr_value * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
    Tensor coef = fac.mul(step_size * std::sqrt(cfg.scale));
    if (limiter) coef.div_(limiter_step(cfg, u2, limiter_norms[i]));
    coef = coef.to(ct);
    if (cfg.channel) coef = left ? coef.view({1, K}) : coef.view({K, 1});
    apply_update(p, g, coef, lr_value * weight_decay);
  });
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void update_cuda(MEMOPT_APOLLO_SHARD_ARGS) {
  check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                            steps, offsets, global_sizes, shard_dims, stats,
                            MEMOPT_APOLLO_SHARD_CONFIG);
  // R's channels are logical rows/columns: a non-contiguous weight is staged in logical order.
  ParamLayouts layouts(params, {}, logical_order_only);
  update_kernels(layouts.params(), grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                 steps, offsets, global_sizes, shard_dims, stats, lr, beta1, beta2, eps,
                 weight_decay, rank, proj, proj_type, scale_type, update_proj_gap, scale,
                 norm_growth_limit, scale_front, rounding);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) {
  m.impl("apollo_shard_stats_", &memopt::cuda::stats_cuda);
  m.impl("apollo_shard_update_", &memopt::cuda::update_cuda);
}
