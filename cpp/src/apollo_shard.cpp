// APOLLO on row or column shards (FSDP2): partial statistics of one shard, then the update
// from their sum over the shard group. Every piece of math is apollo.cpp's (apollo_tiles.h);
// only where R and the norms come from differs. See apollo.h for the statistics' layout.
#include "apollo_tiles.h"
#include "cpu_params.h"
#include "memopt/layout.h"

namespace memopt {

using namespace apollo_cpu;

std::array<int64_t, 2> apollo_shard_global_shape(const Tensor& p, int64_t shard_dim,
                                                 int64_t global_size) {
  return shard_dim == 1 ? std::array<int64_t, 2>{p.size(0), global_size}
                        : std::array<int64_t, 2>{global_size, p.size(1)};
}

bool apollo_shard_sums_r(const Projector& proj, int64_t shard_dim) {
  return proj.side() == ProjSide::Left && shard_dim == 0;
}

int64_t apollo_shard_stats_numel(at::IntArrayRef global_shape, const ApolloConfig& cfg,
                                 int64_t shard_dim) {
  const Projector proj(cfg.proj, cfg.proj_type, cfg.rank, global_shape);
  const bool limiter = cfg.norm_growth_limit > 0.0;
  if (apollo_shard_sums_r(proj, shard_dim))  // partial R, then column sums of G^2 (or total)
    return proj.rank() * proj.cols() + (limiter ? (cfg.channel ? proj.cols() : 1) : 0);
  return (cfg.channel ? 0 : 2) + (limiter ? 1 : 0);  // [sum Rt^2, sum R^2][, ||U||^2 or sum G^2]
}

namespace {

struct ShardArgs {
  const Tensor* P_stored;
  const Tensor* seed;
  int64_t row0;  // P's first contracted row (a Left row shard's offset; else 0)
  bool sums_r;   // the shard splits P's contraction: R itself is summed over the group
  double* st;    // this tensor's statistics
};

at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Partial statistics of one shard; writes nothing but st.
template <typename P, typename S, typename C>
void stats_one(const TilePlan& tp, const ApolloConfig& cfg, Workspace::Lease& lease,
               const Tensor& p, const Tensor& g_in, const Tensor& m, const Tensor& v,
               const Tensor& step, const ShardArgs& sa, double beta1, double beta2, double eps) {
  if (!sa.sums_r && cfg.channel && !tp.limiter) return;  // nothing crosses shards
  const Tensor g = cpu::contiguous_grad(lease, g_in);
  const int64_t t0 = static_cast<int64_t>(step.item<float>());
  const Tensor Pc = step_projection(tp, cfg, lease, p.scalar_type(), compute_type(p.scalar_type()),
                                    sa.P_stored, sa.seed, t0, g);
  const int64_t r = tp.r, K = tp.K, rows = p.size(0), cols = p.size(1);
  const P* gp = g.data_ptr<P>();
  double* st = sa.st;
  if (sa.sums_r) {  // the partial R (r, K), row-major like the moments
    project_tiles<C>(tp, lease, g, Pc, sa.row0, [&](int64_t c0, int64_t w, const C* R) {
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < w; ++j) st[i * K + c0 + j] = static_cast<double>(R[i * w + j]);
    });
    if (tp.limiter) {
      double* g2 = st + r * K;
      if (cfg.channel) {
        std::fill(g2, g2 + K, 0.0);
        channel_squares<P, C>(true, gp, rows, cols, g2);
      } else {
        double* cs = lease.take<double>(K);
        std::fill(cs, cs + K, 0.0);
        channel_squares<P, C>(true, gp, rows, cols, cs);
        double total = 0.0;
        for (int64_t c = 0; c < K; ++c) total += cs[c];
        *g2 = total;
      }
    }
    return;
  }
  // The shard's channels are whole; the moments are read, not written.
  double* a = lease.take<double>(K);
  double* b = lease.take<double>(K);
  double* g2 = tp.limiter ? lease.take<double>(K) : nullptr;
  std::fill(a, a + K, 0.0);  // Left adds into them
  std::fill(b, b + K, 0.0);
  S* mp = m.data_ptr<S>();
  S* vp = v.data_ptr<S>();
  const MomentCoefs<C> coefs(beta1, beta2, eps);
  project_tiles<C>(tp, lease, g, Pc, sa.row0, [&](int64_t c0, int64_t w, const C* R) {
    adam_channels<S, C, false, C>(tp, R, w, c0, w, mp, vp, a, b, coefs);
  });
  if (tp.limiter) {
    std::fill(g2, g2 + K, 0.0);
    channel_squares<P, C>(tp.left, gp, rows, cols, g2);
  }
  if (cfg.channel) {  // ||U||^2 of the shard's channels
    channel_factors(a, b, b, K);
    double u2 = 0.0;
    for (int64_t c = 0; c < K; ++c) u2 += b[c] * b[c] * g2[c];
    st[0] = u2;
  } else {
    double s_a = 0.0, s_b = 0.0, s_g = 0.0;
    for (int64_t c = 0; c < K; ++c) s_a += a[c], s_b += b[c];
    if (tp.limiter)
      for (int64_t c = 0; c < K; ++c) s_g += g2[c];
    st[0] = s_a;
    st[1] = s_b;
    if (tp.limiter) st[2] = s_g;
  }
}

// The update of one shard from the summed statistics.
template <typename P, typename S, typename C>
void finish_one(const TilePlan& tp, const ApolloConfig& cfg, Workspace::Lease& lease,
                const Tensor& p, const Tensor& g_in, const Tensor& m, const Tensor& v,
                const Tensor& limiter_norm, const Tensor& step, const ShardArgs& sa, double lr,
                double beta1, double beta2, double eps, double wd, size_t i) {
  const Tensor g = cpu::contiguous_grad(lease, g_in);
  const int64_t t0 = static_cast<int64_t>(step.item<float>());
  const Tensor Pc = step_projection(tp, cfg, lease, p.scalar_type(), compute_type(p.scalar_type()),
                                    sa.P_stored, sa.seed, t0, g,
                                    /*want=*/!sa.sums_r);  // commits seed and P; summed R needs no P
  const double t = cpu::advance_step(step);
  const int64_t r = tp.r, K = tp.K;
  const double* st = sa.st;
  double* a = lease.take<double>(K);
  double* b = lease.take<double>(K);
  double* fac = b;
  std::fill(a, a + K, 0.0);
  std::fill(b, b + K, 0.0);
  S* mp = m.data_ptr<S>();
  S* vp = v.data_ptr<S>();
  const MomentCoefs<C> coefs(beta1, beta2, eps);
  double u2 = 0.0;
  if (sa.sums_r) {  // the whole R is in st: every rank steps the same moments alike
    adam_channels<S, C, true, double>(tp, st, K, 0, K, mp, vp, a, b, coefs);
    if (cfg.channel) {
      channel_factors(a, b, fac, K);
      if (tp.limiter)
        for (int64_t c = 0; c < K; ++c) u2 += fac[c] * fac[c] * st[r * K + c];
    } else {
      double s_a = 0.0, s_b = 0.0;
      for (int64_t c = 0; c < K; ++c) s_a += a[c], s_b += b[c];
      std::fill(fac, fac + K, tensor_factor(s_a, s_b));
      if (tp.limiter) u2 = fac[0] * fac[0] * st[r * K];
    }
  } else {  // R of the shard's channels again, this time stepping the moments
    project_tiles<C>(tp, lease, g, Pc, sa.row0, [&](int64_t c0, int64_t w, const C* R) {
      adam_channels<S, C, true, C>(tp, R, w, c0, w, mp, vp, a, b, coefs);
    });
    if (cfg.channel) {
      channel_factors(a, b, fac, K);
      if (tp.limiter) u2 = st[0];
    } else {
      const double f = tensor_factor(st[0], st[1]);
      std::fill(fac, fac + K, f);
      if (tp.limiter) u2 = f * f * st[2];
    }
  }
  const double limit = tp.limiter ? limiter_step(cfg, u2, limiter_norm) : 1.0;
  cpu::with_param_store<P>(p, Tensor(), cfg.rounding, i, t, nullptr, 0, [&](const auto& store) {
    apply_update<P, C>(tp, cfg, store, p.size(0), p.size(1), g.data_ptr<P>(), fac, a, t, limit,
                       lr, beta1, beta2, wd);
  });
}

// Runs fn(tp, lease, i, ShardArgs, parameter as the kernel sees it) on every tensor with its dtype dispatch.
template <typename Fn>
void for_each_shard(TensorList params, TensorList grads, TensorList projs, TensorList seeds,
                    at::IntArrayRef offsets, at::IntArrayRef global_sizes,
                    at::IntArrayRef shard_dims, const Tensor& stats, const ApolloConfig& cfg,
                    bool commit, Fn&& fn) {
  if (params.empty()) return;
  const bool stored = !projs.empty();
  // R's channels are logical rows/columns: a non-contiguous weight is updated staged in logical
  // order (memopt/layout.h); the stats op reads only the gradient, so it stages nothing.
  ParamLayouts layouts(commit ? params : TensorList(), {}, logical_order_only);
  Workspace::Lease lease(Workspace::of(params[0].device()));
  double* st = stats.data_ptr<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = commit ? layouts.params()[i] : params[i];
    const auto global = apollo_shard_global_shape(p, shard_dims[i], global_sizes[i]);
    const TilePlan tp(global, p.sizes(), p.scalar_type(), cfg, stored, commit);
    lease.reserve(cpu::staging_bytes(grads[i]) + tp.bytes());
    const bool sums_r = apollo_shard_sums_r(tp.proj, shard_dims[i]);
    const ShardArgs sa{stored ? &projs[i] : nullptr, seeds.empty() ? nullptr : &seeds[i],
                       sums_r ? offsets[i] : 0, sums_r, st};
    fn(tp, lease, i, sa, p);
    st += apollo_shard_stats_numel(global, cfg, shard_dims[i]);
  }
  layouts.write_back();
}

}  // namespace

void apollo_shard_stats_(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                         TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                         at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                         const Tensor& stats, double beta1, double beta2, double eps,
                         const ApolloConfig& cfg) {
  check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                            steps, offsets, global_sizes, shard_dims, stats, cfg);
  check_adam_hparams(0.0, beta1, beta2, eps, 0.0);
  for_each_shard(params, grads, projs, seeds, offsets, global_sizes, shard_dims, stats, cfg, false,
                 [&](const TilePlan& tp, Workspace::Lease& lease, size_t i, const ShardArgs& sa,
                     const Tensor& p) {
    MEMOPT_DISPATCH_PARAM_STATE(p.scalar_type(), exp_avgs[i].scalar_type(), "apollo_shard_stats_", [&] {
      stats_one<scalar_t, state_t, opmath_t>(tp, cfg, lease, p, grads[i], exp_avgs[i],
                                             exp_avg_sqs[i], steps[i], sa, beta1, beta2, eps);
    });
  });
}

void apollo_shard_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                          TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                          at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                          const Tensor& stats, const Tensor& lr_t, double beta1, double beta2,
                          double eps, double weight_decay, const ApolloConfig& cfg) {
  check_apollo_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                            steps, offsets, global_sizes, shard_dims, stats, cfg);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  for_each_shard(params, grads, projs, seeds, offsets, global_sizes, shard_dims, stats, cfg, true,
                 [&](const TilePlan& tp, Workspace::Lease& lease, size_t i, const ShardArgs& sa,
                     const Tensor& p) {
    MEMOPT_DISPATCH_PARAM_STATE(p.scalar_type(), exp_avgs[i].scalar_type(), "apollo_shard_update_", [&] {
      finish_one<scalar_t, state_t, opmath_t>(tp, cfg, lease, p, grads[i], exp_avgs[i],
                                              exp_avg_sqs[i], limiter_norms[i], steps[i], sa, lr,
                                              beta1, beta2, eps, weight_decay, i);
    });
  });
}

}  // namespace memopt
