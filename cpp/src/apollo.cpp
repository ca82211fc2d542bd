// APOLLO: projected Adam moments -> per-channel scaling of the raw gradient, fused on CPU.
// Per tensor: R = P G is formed one tile of channels at a time in the workspace (GEMM), its
// Adam step and per-channel norms are taken while the tile is hot, then one pass over G writes
// p. No gradient-sized buffer exists unless the gradient itself is non-contiguous.
#include "memopt/apollo.h"

#include <array>

#include "cpu_loops.h"

namespace memopt {

ApolloConfig make_apollo_config(int64_t rank, c10::string_view proj_v,
                                c10::string_view proj_type_v, c10::string_view scale_type,
                                int64_t update_proj_gap, double scale, double norm_growth_limit,
                                bool scale_front) {
  const std::string proj(proj_v.data(), proj_v.size());
  const std::string proj_type(proj_type_v.data(), proj_type_v.size());
  Projector(proj, proj_type, rank, {1, 1});  // validates proj, proj_type and rank
  TORCH_CHECK_VALUE(scale_type == "channel" || scale_type == "tensor",
                    "scale_type must be 'channel' or 'tensor', got '", scale_type, "'");
  TORCH_CHECK_VALUE(update_proj_gap >= 1, "update_proj_gap must be >= 1, got ", update_proj_gap);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0.0, "Invalid scale: ", scale);
  TORCH_CHECK_VALUE(std::isfinite(norm_growth_limit) && norm_growth_limit >= 0.0,
                    "Invalid norm_growth_limit: ", norm_growth_limit,
                    " (gamma > 0, e.g. 1.01, or None/0 to turn the limiter off)");
  return {rank, proj, proj_type, scale_type == "channel", update_proj_gap, scale,
          norm_growth_limit, scale_front};
}

namespace {

constexpr int64_t kTileElements = int64_t{1} << 18;  // 1 MiB of fp32 R: GEMMs stay wide
constexpr double kNormEps = 1e-8;  // apollo-torch's "+ 1e-8" (scaling factor and limiter)

// How one tensor's update is cut into tiles, and the scratch it carves (in this order).
struct TilePlan {
  Projector proj;
  int64_t r, K, L, cw;          // rank, channels, contraction length, channels per tile
  bool stored, convert_g, need_pc, need_draw32, need_pbuf, limiter;
  size_t c_size, p_size;        // bytes of the compute type and of the parameter dtype

  TilePlan(at::IntArrayRef shape, at::ScalarType dtype, const ApolloConfig& cfg, bool stored_)
      : proj(cfg.proj, cfg.proj_type, cfg.rank, shape), stored(stored_) {
    r = proj.rank();
    K = proj.channels();
    L = proj.contraction();
    const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
    const bool random = proj.kind() == Projector::Kind::Random;
    c_size = dtype == at::kDouble ? 8 : 4;
    p_size = c10::elementSize(dtype);
    convert_g = reduced;                    // bf16/fp16 gradients are widened per tile
    need_pc = !stored || reduced;           // P in the compute type, unless the stored one is
    need_draw32 = random && dtype == at::kDouble;  // P is drawn in fp32, then widened
    need_pbuf = random && !stored && reduced;      // rounded through the parameter dtype
    limiter = cfg.norm_growth_limit > 0.0;
    cw = std::max<int64_t>(1, std::min(K, kTileElements / std::max(r, convert_g ? L : int64_t{1})));
  }
  int64_t bytes() const {
    using WL = Workspace::Lease;
    int64_t b = WL::bytes_for<char>(r * cw * c_size) + WL::bytes_for<double>(K) * (limiter ? 3 : 2);
    if (need_pc) b += WL::bytes_for<char>(r * L * c_size);
    if (need_draw32) b += WL::bytes_for<float>(r * L);
    if (need_pbuf) b += WL::bytes_for<char>(r * L * p_size);
    if (convert_g) b += WL::bytes_for<char>(L * cw * c_size);
    return b;
  }
};

// apollo-torch's Adam on one value of R (moments updated in place, stored rounding kept):
// returns the Adam direction Rt = M / (sqrt(V) + eps).
template <typename S, typename C>
inline C adam_element(C x, S& m, S& v, C b1, C b2, C eps) {
  m = static_cast<S>(b1 * static_cast<C>(m) + (1 - b1) * x);
  v = static_cast<S>(b2 * static_cast<C>(v) + (1 - b2) * x * x);
  return static_cast<C>(m) / (std::sqrt(static_cast<C>(v)) + eps);
}

// Adam on a run of R values whose channels are the run's elements (Left side): the sums of
// Rt^2 and R^2 go to each element's own channel accumulator.
template <typename S, typename C>
MEMOPT_CPU_CLONES void adam_run_per_element(const C* __restrict R, S* __restrict m, S* __restrict v,
                                            double* __restrict a, double* __restrict b, int64_t n,
                                            C b1, C b2, C eps) {
  for (int64_t j = 0; j < n; ++j) {
    const C rt = adam_element<S, C>(R[j], m[j], v[j], b1, b2, eps);
    a[j] += static_cast<double>(rt) * rt;
    b[j] += static_cast<double>(R[j]) * R[j];
  }
}

// Adam on one channel's r values (Right side): the channel's two sums go to *a and *b.
template <typename S, typename C>
MEMOPT_CPU_CLONES void adam_run_one_channel(const C* __restrict R, S* __restrict m, S* __restrict v,
                                            double* a, double* b, int64_t n, C b1, C b2, C eps) {
  double sa = 0.0, sb = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const C rt = adam_element<S, C>(R[j], m[j], v[j], b1, b2, eps);
    sa += static_cast<double>(rt) * rt;
    sb += static_cast<double>(R[j]) * R[j];
  }
  *a = sa;
  *b = sb;
}

// p = (p - coef * g) * (1 - lr*wd) with apollo-torch's decay after the update; coef per element.
template <typename P, typename C>
MEMOPT_CPU_CLONES void scaled_update_vec(P* __restrict p, const P* __restrict g, const C* __restrict coef,
                                         int64_t n, C lr_wd) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C x = static_cast<C>(p[j]) - coef[j] * static_cast<C>(g[j]);
    p[j] = static_cast<P>(x - lr_wd * x);
  }
}
template <typename P, typename C>
MEMOPT_CPU_CLONES void scaled_update_scalar(P* __restrict p, const P* __restrict g, C coef, int64_t n,
                                            C lr_wd) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C x = static_cast<C>(p[j]) - coef * static_cast<C>(g[j]);
    p[j] = static_cast<P>(x - lr_wd * x);
  }
}

template <typename P, typename S, typename C>
void update_one(const TilePlan& tp, const ApolloConfig& cfg, Workspace::Lease& lease,
                const Tensor& p, const Tensor& g_in, const Tensor& m, const Tensor& v,
                const Tensor* P_stored, const Tensor* seed_t, const Tensor& limiter_norm,
                const Tensor& step, double lr, double beta1, double beta2, double eps, double wd) {
  const at::ScalarType ct = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
  const Tensor g = cpu::contiguous_grad(lease, g_in);
  const int64_t rows = p.size(0), cols = p.size(1), r = tp.r, K = tp.K, L = tp.L;
  const bool left = tp.proj.side() == ProjSide::Left;

  // 1. The projection for this step (refresh every update_proj_gap steps, seed chain).
  const int64_t t0 = static_cast<int64_t>(step.item<float>());
  const bool refresh = Projector::refresh_due(t0, cfg.update_proj_gap);
  const auto pshape = tp.proj.proj_shape();
  Tensor Pc = tp.need_pc ? lease.take_tensor(pshape, ct) : *P_stored;
  Tensor draw32 = tp.need_draw32 ? lease.take_tensor(pshape, at::kFloat) : Tensor();
  Tensor pbuf = tp.need_pbuf ? lease.take_tensor(pshape, p.scalar_type()) : Tensor();
  if (tp.proj.kind() == Projector::Kind::Random) {
    int64_t seed = seed_t->item<int64_t>();
    if (refresh && t0 > 0) {
      seed = Projector::next_seed(seed);
      seed_t->fill_(seed);
    }
    const Tensor scratch32 = ct == at::kDouble ? draw32 : Pc;
    if (!tp.stored) {
      tp.proj.gaussian_(tp.need_pbuf ? pbuf : Pc, seed, scratch32);
      if (tp.need_pbuf) Pc.copy_(pbuf);  // the parameter dtype's rounding, as a stored P has
    } else if (refresh) {
      tp.proj.gaussian_(*P_stored, seed, scratch32);
    }
  } else if (refresh) {
    tp.proj.svd_(*P_stored, g);
  }
  if (tp.stored && tp.need_pc) Pc.copy_(*P_stored);
  const double t = cpu::advance_step(step);

  // 2. R tile by tile: GEMM into scratch, Adam on it, per-channel sums of Rt^2 and R^2.
  Tensor tile = lease.take_tensor({r * tp.cw}, ct);
  Tensor gconv = tp.convert_g ? lease.take_tensor({L * tp.cw}, ct) : Tensor();
  double* a = lease.take<double>(K);
  double* b = lease.take<double>(K);
  double* fac = b;  // the factors replace the sums of R^2 once computed
  double* g2 = tp.limiter ? lease.take<double>(K) : nullptr;
  std::fill(a, a + K, 0.0);
  std::fill(b, b + K, 0.0);
  S* mp = m.data_ptr<S>();
  S* vp = v.data_ptr<S>();
  const C b1 = beta1, b2 = beta2, ce = eps;
  for (int64_t c0 = 0; c0 < K; c0 += tp.cw) {
    const int64_t w = std::min(tp.cw, K - c0);
    Tensor gs = left ? g.narrow(1, c0, w) : g.narrow(0, c0, w);
    if (tp.convert_g) gs = gconv.narrow(0, 0, L * w).view(gs.sizes()).copy_(gs);
    const std::array<int64_t, 2> out_shape = left ? std::array<int64_t, 2>{r, w}
                                                  : std::array<int64_t, 2>{w, r};
    Tensor out = tile.narrow(0, 0, r * w).view(out_shape);
    if (left)
      at::mm_out(out, Pc.t(), gs);   // (r, L) x (L, w)
    else
      at::mm_out(out, gs, Pc.t());   // (w, L) x (L, r)
    const C* R = out.data_ptr<C>();
    if (left) {
      at::parallel_for(0, w, std::max<int64_t>(16, kGrain / r), [&](int64_t j0, int64_t j1) {
        for (int64_t i = 0; i < r; ++i) {
          const int64_t off = i * K + c0 + j0;
          adam_run_per_element<S, C>(R + i * w + j0, mp + off, vp + off, a + c0 + j0, b + c0 + j0,
                                     j1 - j0, b1, b2, ce);
        }
      });
    } else {
      at::parallel_for(0, w, std::max<int64_t>(1, kGrain / r), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j)
          adam_run_one_channel<S, C>(R + j * r, mp + (c0 + j) * r, vp + (c0 + j) * r,
                                     a + c0 + j, b + c0 + j, r, b1, b2, ce);
      });
    }
  }

  // 3. Scaling factors: ||Rt_c|| / (||R_c|| + 1e-8), or one for the tensor.
  if (cfg.channel) {
    for (int64_t c = 0; c < K; ++c) fac[c] = std::sqrt(a[c]) / (std::sqrt(b[c]) + kNormEps);
  } else {
    double sa = 0.0, sb = 0.0;
    for (int64_t c = 0; c < K; ++c) sa += a[c], sb += b[c];
    std::fill(fac, fac + K, std::sqrt(sa) / (std::sqrt(sb) + kNormEps));
  }

  // 4. Norm-growth limiter on U = G s: ||U||^2 = sum_c s_c^2 ||G_c||^2, no U needed.
  const P* gp = g.data_ptr<P>();
  const double alpha = std::sqrt(cfg.scale);
  double limit = 1.0;
  if (tp.limiter) {
    std::fill(g2, g2 + K, 0.0);
    if (left) {  // channels are columns: each thread sums a band of columns over all rows
      at::parallel_for(0, cols, std::max<int64_t>(16, kGrain / rows), [&](int64_t j0, int64_t j1) {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = j0; j < j1; ++j) {
            const double x = static_cast<C>(gp[i * cols + j]);
            g2[j] += x * x;
          }
      });
    } else {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) g2[i] = cpu::sum_squares(gp + i * cols, cols);
      });
    }
    double u2 = 0.0;
    for (int64_t c = 0; c < K; ++c) u2 += fac[c] * fac[c] * g2[c];
    const double u = std::sqrt(u2) * (cfg.scale_front ? alpha : 1.0);
    // float32, or float64 for float64 parameters (the float64 reference is matched exactly)
    const bool wide = limiter_norm.scalar_type() == at::kDouble;
    const double prev = wide ? *limiter_norm.data_ptr<double>() : *limiter_norm.data_ptr<float>();
    double now = u;  // first step (negative = no norm yet): remember the norm, limit nothing
    if (prev >= 0.0) {
      const double gamma = cfg.norm_growth_limit;
      limit = std::max(u / (prev + kNormEps), gamma) / gamma;
      now = u / limit;
    }
    if (wide)
      *limiter_norm.data_ptr<double>() = now;
    else
      *limiter_norm.data_ptr<float>() = static_cast<float>(now);
  }

  // 5. One pass over G: p = (p - lr sqrt(1-b2^t)/(1-b1^t) * sqrt(scale)/limit * s_c * g) (1 - lr wd).
  const double step_size = lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
  const double mult = step_size * alpha / limit;
  C* coef = reinterpret_cast<C*>(a);  // a is free now; K C values fit in K doubles
  for (int64_t c = 0; c < K; ++c) coef[c] = static_cast<C>(mult * fac[c]);
  P* pp = p.data_ptr<P>();
  const C lr_wd = static_cast<C>(lr * wd);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (left && cfg.channel)
        scaled_update_vec<P, C>(pp + i * cols, gp + i * cols, coef, cols, lr_wd);
      else
        scaled_update_scalar<P, C>(pp + i * cols, gp + i * cols, coef[cfg.channel ? i : 0], cols,
                                   lr_wd);
    }
  });
}

}  // namespace

int64_t apollo_tile_elements() { return kTileElements; }

int64_t apollo_workspace_bytes(at::IntArrayRef shape, at::ScalarType dtype, const ApolloConfig& cfg,
                               bool store_projection) {
  return TilePlan(shape, dtype, cfg, store_projection).bytes();
}

void apollo_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                    TensorList limiter_norms, TensorList steps, const Tensor& lr_t, double beta1,
                    double beta2, double eps, double weight_decay, const ApolloConfig& cfg) {
  check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps, cfg);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "apollo_update_: no kernel for device ",
              params[0].device(), " in this build");
  const bool stored = !projs.empty();
  Workspace::Lease lease(Workspace::of(params[0].device()));
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i];
    const TilePlan tp(p.sizes(), p.scalar_type(), cfg, stored);
    lease.reserve(cpu::staging_bytes(grads[i]) + tp.bytes());
    const Tensor* P = stored ? &projs[i] : nullptr;
    const Tensor* seed = seeds.empty() ? nullptr : &seeds[i];
    MEMOPT_DISPATCH_PARAM_STATE(p.scalar_type(), m.scalar_type(), "apollo_update_", [&] {
      update_one<scalar_t, state_t, opmath_t>(tp, cfg, lease, p, grads[i], m, exp_avg_sqs[i], P,
                                              seed, limiter_norms[i], steps[i], lr, beta1, beta2,
                                              eps, weight_decay);
    });
  }
}

}  // namespace memopt
