// APOLLO's CPU building blocks (internal header), shared by the whole-tensor op (apollo.cpp)
// and the sharded statistics/update ops (apollo_shard.cpp): the tile plan and scratch, the
// projection of a step, R = P G tile by tile, Adam on R with per-channel sums, the gradient's
// channel norms, the limiter and the final pass over G.
#pragma once

#include <array>

#include "cpu_loops.h"
#include "memopt/apollo.h"

namespace memopt::apollo_cpu {

constexpr int64_t kTileElements = int64_t{1} << 18;  // 1 MiB of fp32 R: GEMMs stay wide
constexpr double kNormEps = 1e-8;  // apollo-torch's "+ 1e-8" (scaling factor and limiter)

// How one tensor's (or one row shard's) update is cut into tiles, and the scratch it carves.
// The projector is that of the full weight; K and L are this shard's channels and contraction
// (Left: K = local columns, L = local rows; Right: K = local rows, L = local columns). commit:
// the pass writes the seed and a refreshed P (an update); a statistics pass writes neither, so
// it may need P in scratch.
struct TilePlan {
  Projector proj;
  int64_t r, K, L, cw;          // rank, channels, contraction length, channels per tile
  bool left, stored, commit, convert_g, need_pc, need_draw32, need_pbuf, limiter;
  size_t c_size, p_size;        // bytes of the compute type and of the parameter dtype

  TilePlan(at::IntArrayRef global_shape, at::IntArrayRef local_shape, at::ScalarType dtype,
           const ApolloConfig& cfg, bool stored_, bool commit_ = true)
      : proj(cfg.proj, cfg.proj_type, cfg.rank, global_shape), stored(stored_), commit(commit_) {
    r = proj.rank();
    left = proj.side() == ProjSide::Left;
    K = left ? local_shape[1] : local_shape[0];
    L = left ? local_shape[0] : local_shape[1];
    const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
    const bool random = proj.kind() == Projector::Kind::Random;
    c_size = dtype == at::kDouble ? 8 : 4;
    p_size = c10::elementSize(dtype);
    convert_g = reduced;                               // bf16/fp16 gradients widened per tile
    need_pc = !stored || reduced || !commit;           // P in the compute type, in scratch
    need_draw32 = random && dtype == at::kDouble;      // P is drawn in fp32, then widened
    need_pbuf = random && (!stored || !commit) && reduced;  // rounded through the param dtype
    limiter = cfg.norm_growth_limit > 0.0;
    cw = std::max<int64_t>(1, std::min(K, kTileElements / std::max(r, convert_g ? L : int64_t{1})));
  }
  int64_t proj_numel() const { return r * proj.contraction(); }
  int64_t bytes() const {
    using WL = Workspace::Lease;
    int64_t b = WL::bytes_for<char>(r * cw * c_size) + WL::bytes_for<double>(K) * (limiter ? 3 : 2);
    if (need_pc) b += WL::bytes_for<char>(proj_numel() * c_size);
    if (need_draw32) b += WL::bytes_for<float>(proj_numel());
    if (need_pbuf) b += WL::bytes_for<char>(proj_numel() * p_size);
    if (convert_g) b += WL::bytes_for<char>(L * cw * c_size);
    return b;
  }
};

// The P of step t0 (the step before its increment) in the compute type: a workspace copy, or
// the stored P itself. Refreshes every update_proj_gap steps (seed chain / SVD of g). With
// tp.commit the seed and a refreshed stored P are written; without, nothing is written and a
// refreshed P is drawn into scratch, exactly as the update will draw it. !want: the caller
// needs no P this step (a Left shard's update): only the seed and a stored P are committed.
// svd_ready: proj="svd" at a refresh, the new P already computed (see apollo_update_).
inline Tensor step_projection(const TilePlan& tp, const ApolloConfig& cfg, Workspace::Lease& lease,
                              at::ScalarType pdtype, at::ScalarType ct, const Tensor* P_stored,
                              const Tensor* seed_t, int64_t t0, const Tensor& g, bool want = true,
                              const Tensor* svd_ready = nullptr) {
  const bool refresh = Projector::refresh_due(t0, cfg.update_proj_gap);
  const auto pshape = tp.proj.proj_shape();
  const bool from_store = tp.stored && (tp.commit || !refresh);  // P is (or becomes) the stored one
  Tensor Pc = tp.need_pc ? lease.take_tensor(pshape, ct) : *P_stored;
  Tensor draw32 = tp.need_draw32 ? lease.take_tensor(pshape, at::kFloat) : Tensor();
  Tensor pbuf = tp.need_pbuf ? lease.take_tensor(pshape, pdtype) : Tensor();
  if (tp.proj.kind() == Projector::Kind::Random) {
    int64_t seed = seed_t->item<int64_t>();
    if (refresh && t0 > 0) {
      seed = Projector::next_seed(seed);
      if (tp.commit) seed_t->fill_(seed);
    }
    const Tensor scratch32 = ct == at::kDouble ? draw32 : Pc;
    if (from_store) {
      if (refresh) tp.proj.gaussian_(*P_stored, seed, scratch32);
    } else if (want) {
      tp.proj.gaussian_(tp.need_pbuf ? pbuf : Pc, seed, scratch32);
      if (tp.need_pbuf) Pc.copy_(pbuf);  // the parameter dtype's rounding, as a stored P has
    }
  } else if (refresh) {
    TORCH_CHECK(tp.commit, "APOLLO: an SVD projection cannot be refreshed by a statistics pass");
    if (svd_ready != nullptr)
      P_stored->copy_(*svd_ready);
    else
      tp.proj.svd_(*P_stored, g);
  }
  if (!want) return Tensor();
  if (from_store && tp.need_pc) Pc.copy_(*P_stored);
  return Pc;
}

// R = P G one tile of channels at a time in the workspace, fn(c0, w, R) on each tile: R is
// (r, w) row-major (Left) or (w, r) (Right). A Left row shard starting at global row row0
// contracts its rows with P's rows [row0, row0 + L) (a partial R); else row0 is 0.
template <typename C, typename Fn>
void project_tiles(const TilePlan& tp, Workspace::Lease& lease, const Tensor& g, const Tensor& Pc,
                   int64_t row0, Fn&& fn) {
  const at::ScalarType ct = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
  const int64_t r = tp.r, L = tp.L;
  Tensor tile = lease.take_tensor({r * tp.cw}, ct);
  Tensor gconv = tp.convert_g ? lease.take_tensor({L * tp.cw}, ct) : Tensor();
  const Tensor Pl = tp.left ? Pc.narrow(0, row0, L) : Pc;
  for (int64_t c0 = 0; c0 < tp.K; c0 += tp.cw) {
    const int64_t w = std::min(tp.cw, tp.K - c0);
    Tensor gs = tp.left ? g.narrow(1, c0, w) : g.narrow(0, c0, w);
    if (tp.convert_g) gs = gconv.narrow(0, 0, L * w).view(gs.sizes()).copy_(gs);
    const std::array<int64_t, 2> out_shape = tp.left ? std::array<int64_t, 2>{r, w}
                                                     : std::array<int64_t, 2>{w, r};
    Tensor out = tile.narrow(0, 0, r * w).view(out_shape);
    if (tp.left && L == 0)
      out.zero_();                   // an empty shard contributes nothing
    else if (tp.left)
      at::mm_out(out, Pl.t(), gs);   // (r, L) x (L, w)
    else
      at::mm_out(out, gs, Pl.t());   // (w, L) x (L, r)
    fn(c0, w, static_cast<const C*>(out.data_ptr<C>()));
  }
}

// apollo-torch's moment coefficients in the compute type, each rounded once from double as
// torch rounds the Python floats beta and 1.0 - beta: 1 - b2 formed in float from b2 rounded to
// float is 1.7e-4 off at b2 = 0.9999 (1 - 0.9999f = 1.000166e-4). Passed by value (no aliasing
// with the moments in the loops).
template <typename C>
struct MomentCoefs {
  C b1, b1c, b2, b2c, eps;
  MomentCoefs(double beta1, double beta2, double e)
      : b1(beta1), b1c(1.0 - beta1), b2(beta2), b2c(1.0 - beta2), eps(e) {}
};

// apollo-torch's Adam on one value of R (stored rounding kept): returns the Adam direction
// Rt = M / (sqrt(V) + eps); Write: the moments are updated in place (else only read).
template <typename S, typename C, bool Write>
inline C adam_element(C x, S* m, S* v, MomentCoefs<C> coefs) {
  const S m1 = cpu::store<S>(coefs.b1 * cpu::load<C>(*m) + coefs.b1c * x);
  const S v1 = cpu::store<S>(coefs.b2 * cpu::load<C>(*v) + coefs.b2c * x * x);
  if constexpr (Write) {
    *m = m1;
    *v = v1;
  }
  return cpu::load<C>(m1) / (std::sqrt(cpu::load<C>(v1)) + coefs.eps);
}

// Adam on a run of R values whose channels are the run's elements (Left side): the sums of
// Rt^2 and R^2 go to each element's own channel accumulator.
template <typename S, typename C, bool Write, typename RT>
MEMOPT_CPU_CLONES void adam_run_per_element(const RT* __restrict R, S* __restrict m, S* __restrict v,
                                            double* __restrict a, double* __restrict b, int64_t n,
                                            MomentCoefs<C> coefs) {
  for (int64_t j = 0; j < n; ++j) {
    const C x = cpu::load<C>(R[j]);
    const C rt = adam_element<S, C, Write>(x, m + j, v + j, coefs);
    a[j] += static_cast<double>(rt) * rt;
    b[j] += static_cast<double>(x) * x;
  }
}

// Adam on one channel's r values (Right side): the channel's two sums go to *a and *b.
template <typename S, typename C, bool Write, typename RT>
MEMOPT_CPU_CLONES void adam_run_one_channel(const RT* __restrict R, S* __restrict m, S* __restrict v,
                                            double* a, double* b, int64_t n,
                                            MomentCoefs<C> coefs) {
  double sa = 0.0, sb = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const C x = cpu::load<C>(R[j]);
    const C rt = adam_element<S, C, Write>(x, m + j, v + j, coefs);
    sa += static_cast<double>(rt) * rt;
    sb += static_cast<double>(x) * x;
  }
  *a = sa;
  *b = sb;
}

// Adam on channels [c0, c0 + w) of R (a tile, or the whole summed R): Left, R is (r, w) with
// row stride ldr, moments (r, K), sums added to a[c], b[c] (zero them first); Right, R is
// (w, r), moments (K, r), sums assigned.
template <typename S, typename C, bool Write, typename RT>
void adam_channels(const TilePlan& tp, const RT* R, int64_t ldr, int64_t c0, int64_t w, S* mp,
                   S* vp, double* a, double* b, MomentCoefs<C> coefs) {
  const int64_t r = tp.r, K = tp.K;
  if (tp.left) {
    at::parallel_for(0, w, std::max<int64_t>(16, kGrain / r), [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < r; ++i) {
        const int64_t off = i * K + c0 + j0;
        adam_run_per_element<S, C, Write, RT>(R + i * ldr + j0, mp + off, vp + off, a + c0 + j0,
                                              b + c0 + j0, j1 - j0, coefs);
      }
    });
  } else {
    at::parallel_for(0, w, std::max<int64_t>(1, kGrain / r), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        adam_run_one_channel<S, C, Write, RT>(R + j * r, mp + (c0 + j) * r, vp + (c0 + j) * r,
                                          a + c0 + j, b + c0 + j, r, coefs);
    });
  }
}

// Sums of g^2 per channel of a (rows x cols) gradient: per column (left) or per row, added to
// g2 (zero it first).
template <typename P, typename C>
void channel_squares(bool left, const P* gp, int64_t rows, int64_t cols, double* g2) {
  if (left) {  // channels are columns: each thread sums a band of columns over all rows
    at::parallel_for(0, cols, std::max<int64_t>(16, kGrain / std::max<int64_t>(1, rows)),
                     [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          const double x = cpu::load<C>(gp[i * cols + j]);
          g2[j] += x * x;
        }
    });
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)),
                     [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) g2[i] += cpu::sum_squares(gp + i * cols, cols);
    });
  }
}

// s_c = ||Rt_c|| / (||R_c|| + 1e-8) from the channel sums (a = Rt^2, b = R^2), into fac.
inline void channel_factors(const double* a, const double* b, double* fac, int64_t K) {
  for (int64_t c = 0; c < K; ++c) fac[c] = std::sqrt(a[c]) / (std::sqrt(b[c]) + kNormEps);
}
inline double tensor_factor(double sum_a, double sum_b) {
  return std::sqrt(sum_a) / (std::sqrt(sum_b) + kNormEps);
}

// Norm-growth limiter given ||U||^2 (before sqrt(scale), which scale_front applies here):
// returns the divisor of the update and stores the limited norm (first time: the norm itself).
inline double limiter_step(const ApolloConfig& cfg, double u2, const Tensor& limiter_norm) {
  const double u = std::sqrt(u2) * (cfg.scale_front ? std::sqrt(cfg.scale) : 1.0);
  // float32, or float64 for float64 parameters (the float64 reference is matched exactly)
  const bool wide = limiter_norm.scalar_type() == at::kDouble;
  const double prev = wide ? *limiter_norm.data_ptr<double>() : *limiter_norm.data_ptr<float>();
  double limit = 1.0, now = u;  // first step (negative = no norm yet): remember, limit nothing
  if (prev >= 0.0) {
    const double gamma = cfg.norm_growth_limit;
    limit = std::max(u / (prev + kNormEps), gamma) / gamma;
    now = u / limit;
  }
  if (wide)
    *limiter_norm.data_ptr<double>() = now;
  else
    *limiter_norm.data_ptr<float>() = static_cast<float>(now);
  return limit;
}

// p = (p - coef * g) * (1 - lr*wd) with apollo-torch's decay after the update; coef per element.
template <typename P, typename C, typename R, typename G>
MEMOPT_CPU_CLONES void scaled_update_vec(P* __restrict p, const G* __restrict g,
                                         const C* __restrict coef, int64_t n, C lr_wd,
                                         const R& round) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C x = cpu::load<C>(p[j]) - coef[j] * cpu::load<C>(g[j]);
    p[j] = round.template store<P>(x - lr_wd * x, j);
  }
}
template <typename P, typename C, typename R, typename G>
MEMOPT_CPU_CLONES void scaled_update_scalar(P* __restrict p, const G* __restrict g, C coef,
                                            int64_t n, C lr_wd, const R& round) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    C x = cpu::load<C>(p[j]) - coef * cpu::load<C>(g[j]);
    p[j] = round.template store<P>(x - lr_wd * x, j);
  }
}

// One pass over G: p = (p - lr sqrt(1-b2^t)/(1-b1^t) * sqrt(scale)/limit * s_c * g) (1 - lr wd).
// fac: the K factors (one per channel; all equal for tensor scaling); coef_buf: K doubles of
// scratch (may alias a spent buffer). store: how p (rows x cols) is written (cpu_params.h).
template <typename G, typename C, typename Store>
void apply_update(const TilePlan& tp, const ApolloConfig& cfg, const Store& store, int64_t rows,
                  int64_t cols, const G* gp, const double* fac, double* coef_buf, double t,
                  double limit, double lr, double beta1, double beta2, double wd) {
  const int64_t K = tp.K;
  const double step_size = lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
  const double mult = step_size * std::sqrt(cfg.scale) / limit;
  C* coef = reinterpret_cast<C*>(coef_buf);  // K C values fit in K doubles
  for (int64_t c = 0; c < K; ++c) coef[c] = cpu::load<C>(mult * fac[c]);
  const C lr_wd = cpu::load<C>(lr * wd);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      store.edit(i * cols, cols, [&](auto* pr, const auto& round) {
        using P = std::remove_pointer_t<decltype(pr)>;
        if (tp.left && cfg.channel)
          scaled_update_vec<P, C>(pr, gp + i * cols, coef, cols, lr_wd, round);
        else
          scaled_update_scalar<P, C>(pr, gp + i * cols, coef[cfg.channel ? i : 0], cols, lr_wd,
                                     round);
      });
  });
}

}  // namespace memopt::apollo_cpu
