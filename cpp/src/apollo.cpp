// APOLLO: projected Adam moments -> per-channel scaling of the raw gradient, fused on CPU.
// Per tensor: R = P G is formed one tile of channels at a time in the workspace (GEMM), its
// Adam step and per-channel norms are taken while the tile is hot, then one pass over G writes
// p. No gradient-sized buffer exists unless the gradient itself is non-contiguous.
#include "memopt/apollo.h"

#include "apollo_tiles.h"
#include "cpu_params.h"
#include "memopt/layout.h"

namespace memopt {

ApolloConfig make_apollo_config(int64_t rank, c10::string_view proj_v,
                                c10::string_view proj_type_v, c10::string_view scale_type,
                                int64_t update_proj_gap, double scale, double norm_growth_limit,
                                bool scale_front, at::IntArrayRef rounding, size_t n_params) {
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
          norm_growth_limit, scale_front, Rounding(rounding, n_params, "apollo_update_")};
}

namespace {

using namespace apollo_cpu;

template <typename P, typename S, typename C>
void update_one(const TilePlan& tp, const ApolloConfig& cfg, Workspace::Lease& lease,
                const Tensor& p, const Tensor& g_in, const Tensor& m, const Tensor& v,
                const Tensor* P_stored, const Tensor* seed_t, const Tensor& limiter_norm,
                const Tensor& step, double lr, double beta1, double beta2, double eps, double wd,
                const Tensor* svd_ready, size_t i, const Tensor& scales, float* buffers,
                int64_t buffer) {
  const at::ScalarType ct = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
  const Tensor g = cpu::contiguous_grad(lease, g_in);
  const int64_t K = tp.K;

  // 1. The projection for this step (refresh every update_proj_gap steps, seed chain).
  const int64_t t0 = static_cast<int64_t>(step.item<float>());
  const Tensor Pc = step_projection(tp, cfg, lease, value_dtype(p, g), ct, P_stored, seed_t, t0, g,
                                    /*want=*/true, svd_ready);
  const double t = cpu::advance_step(step);

  // 2. R tile by tile: GEMM into scratch, Adam on it, per-channel sums of Rt^2 and R^2.
  double* a = lease.take<double>(K);
  double* b = lease.take<double>(K);
  double* fac = b;  // the factors replace the sums of R^2 once computed
  double* g2 = tp.limiter ? lease.take<double>(K) : nullptr;
  std::fill(a, a + K, 0.0);
  std::fill(b, b + K, 0.0);
  S* mp = m.data_ptr<S>();
  S* vp = v.data_ptr<S>();
  const MomentCoefs<C> coefs(beta1, beta2, eps);
  project_tiles<C>(tp, lease, g, Pc, 0, [&](int64_t c0, int64_t w, const C* R) {
    adam_channels<S, C, true, C>(tp, R, w, c0, w, mp, vp, a, b, coefs);
  });

  // 3. Scaling factors: ||Rt_c|| / (||R_c|| + 1e-8), or one for the tensor.
  if (cfg.channel) {
    channel_factors(a, b, fac, K);
  } else {
    double sa = 0.0, sb = 0.0;
    for (int64_t c = 0; c < K; ++c) sa += a[c], sb += b[c];
    std::fill(fac, fac + K, tensor_factor(sa, sb));
  }

  // 4. Norm-growth limiter on U = G s: ||U||^2 = sum_c s_c^2 ||G_c||^2, no U needed.
  const P* gp = g.data_ptr<P>();
  double limit = 1.0;
  if (tp.limiter) {
    std::fill(g2, g2 + K, 0.0);
    channel_squares<P, C>(tp.left, gp, p.size(0), p.size(1), g2);
    double u2 = 0.0;
    for (int64_t c = 0; c < K; ++c) u2 += fac[c] * fac[c] * g2[c];
    limit = limiter_step(cfg, u2, limiter_norm);
  }

  // 5. One pass over G writes p.
  cpu::with_param_store<P>(p, scales, cfg.rounding, i, t, buffers, buffer, [&](const auto& store) {
    apply_update<P, C>(tp, cfg, store, p.size(0), p.size(1), gp, fac, a, t, limit, lr, beta1,
                       beta2, wd);
  });
}

}  // namespace

int64_t apollo_tile_elements() { return apollo_cpu::kTileElements; }

int64_t apollo_workspace_bytes(at::IntArrayRef shape, at::ScalarType dtype, const ApolloConfig& cfg,
                               bool store_projection) {
  return apollo_cpu::TilePlan(shape, shape, dtype, cfg, store_projection).bytes();
}

void apollo_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                    TensorList limiter_norms, TensorList steps, const Tensor& lr_t, double beta1,
                    double beta2, double eps, double weight_decay, const ApolloConfig& cfg,
                    TensorList weight_scales) {
  check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps, cfg,
                      weight_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "apollo_update_: no kernel for device ",
              params[0].device(), " in this build");
  const bool stored = !projs.empty();
  // SVD refreshes first: an SVD can fail (a non-finite gradient), and a failure must come before
  // the first write so that the step is all or nothing. Each new P is r x min(m, n).
  std::vector<Tensor> svd_ready(params.size());
  if (cfg.proj == "svd")
    for (size_t i = 0; i < params.size(); ++i)
      if (Projector::refresh_due(static_cast<int64_t>(steps[i].item<float>()), cfg.update_proj_gap)) {
        const Projector proj(cfg.proj, cfg.proj_type, cfg.rank, params[i].sizes());
        svd_ready[i] = at::empty(proj.proj_shape(), projs[i].options());
        proj.svd_(svd_ready[i], grads[i]);
      }
  // R's channels are logical rows/columns: a non-contiguous weight (a transposed matrix, a view
  // with gaps) is updated staged in logical order (memopt/layout.h).
  ParamLayouts layouts(params, {}, logical_order_only);
  Workspace::Lease lease(Workspace::of(params[0].device()));
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = layouts.params()[i], &m = exp_avgs[i];
    const at::ScalarType pt = value_dtype(p, grads[i]);
    const apollo_cpu::TilePlan tp(p.sizes(), p.sizes(), pt, cfg, stored);
    const Tensor& scales = weight_scale(weight_scales, i);
    const int64_t buffer = cpu::int8_buffer_elements(p, scales, p.dim() == 2 ? p.size(1) : 0);
    lease.reserve(cpu::staging_bytes(grads[i]) + tp.bytes() + cpu::int8_buffer_bytes(buffer));
    float* buffers = cpu::int8_buffers(lease, buffer);
    const Tensor* P = stored ? &projs[i] : nullptr;
    const Tensor* seed = seeds.empty() ? nullptr : &seeds[i];
    MEMOPT_DISPATCH_PARAM_STATE(pt, m.scalar_type(), "apollo_update_", [&] {
      update_one<scalar_t, state_t, opmath_t>(tp, cfg, lease, p, grads[i], m, exp_avg_sqs[i], P,
                                              seed, limiter_norms[i], steps[i], lr, beta1, beta2,
                                              eps, weight_decay,
                                              svd_ready[i].defined() ? &svd_ready[i] : nullptr, i,
                                              scales, buffers, buffer);
    });
  }
  layouts.write_back();
}

}  // namespace memopt
