// FRUGAL's projection modes (GaLore-style subspace, paper §3 / upstream GaloreOptimizer):
//   g_low = project_down(G);  u = AdamW direction on g_low (state: m, v of g_low's shape)
//   p = p*decay - project_up(u) - lr_free * rule(G - project_up(g_low))
// g_low and u are r-sized; project_up is done in row chunks into workspace tiles, fused with the
// elementwise update, so neither project_up(u) nor the residual G - G_proj ever exists whole.
// On row shards (frugal_shard.cpp) left mode's project_down is split: frugal_left_partial gives a
// shard's part, and frugal_projected_update takes the shards' sum as g_low (summed_low).
#include "frugal_impl.h"

namespace memopt {

namespace {

at::ScalarType compute_dtype(const Tensor& p) {
  return p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per back-projection tile: about 4 * kGrain elements, at least one row.
int64_t chunk_rows(const Tensor& p) {
  return std::max<int64_t>(1, std::min<int64_t>(p.size(0), 4 * kGrain / std::max<int64_t>(p.size(1), 1)));
}

}  // namespace

int64_t frugal_projected_bytes(const Tensor& p, const Tensor& proj, const Tensor& m) {
  const int64_t es = c10::elementSize(compute_dtype(p));
  const int64_t tile = chunk_rows(p) * p.size(1);
  return Workspace::aligned(proj.numel() * es) + 2 * Workspace::aligned(m.numel() * es) +
         3 * Workspace::aligned(tile * es);
}

namespace {

// Project down: right glow = G P^T (row chunks of the output), left glow = P^T G (summed over
// row chunks). pc is P in the compute dtype; gbuf a (chunk, cols) tile for a cast gradient.
void project_down(const Tensor& g, const Tensor& pc, const Tensor& glow, bool right,
                  int64_t chunk, const Tensor& gbuf) {
  const int64_t rows = g.size(0);
  const bool same = g.scalar_type() == glow.scalar_type();
  if (!right) glow.zero_();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    Tensor gr = g.narrow(0, r0, n);
    if (!same) {
      Tensor t = gbuf.narrow(0, 0, n);
      t.copy_(gr);
      gr = t;
    }
    if (right) {
      Tensor out = glow.narrow(0, r0, n);
      at::mm_out(out, gr, pc.t());
    } else {
      glow.addmm_(pc.narrow(0, r0, n).t(), gr);
    }
  }
}

}  // namespace

void frugal_left_partial(const Tensor& p, const Tensor& g, const Tensor& proj, const Tensor& out,
                         Workspace::Lease& lease) {
  const auto cdt = compute_dtype(p);
  Tensor pc = lease.take_tensor(proj.sizes(), cdt);
  pc.copy_(proj);
  Tensor gbuf = lease.take_tensor({chunk_rows(p), p.size(1)}, cdt);
  if (out.scalar_type() == cdt) {  // fp64: the partial sums go straight into the buffer
    project_down(g, pc, out, /*right=*/false, chunk_rows(p), gbuf);
    return;
  }
  Tensor glow = lease.take_tensor(out.sizes(), cdt);
  project_down(g, pc, glow, /*right=*/false, chunk_rows(p), gbuf);
  out.copy_(glow);
}

void frugal_projected_update(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                             const Tensor& proj, bool right, const AdamScalars& s, double lr_free,
                             int64_t rule, Workspace::Lease& lease, const Tensor* summed_low,
                             const Rounding& rounding, size_t i, const Tensor& scales,
                             float* buffers, int64_t buffer) {
  const auto cdt = compute_dtype(p);
  const int64_t rows = p.size(0), cols = p.size(1), chunk = chunk_rows(p);
  Tensor pc = lease.take_tensor(proj.sizes(), cdt);
  pc.copy_(proj);
  Tensor u = lease.take_tensor(m.sizes(), cdt);
  Tensor gbuf = lease.take_tensor({chunk, cols}, cdt), ubuf = lease.take_tensor({chunk, cols}, cdt);
  Tensor gpbuf = lease.take_tensor({chunk, cols}, cdt);
  // 1. g_low: projected here, or (row shards, left) the sum of every shard's partial P^T G,
  // read in place when it already has the compute dtype (it is only read from here on).
  Tensor glow;
  if (summed_low != nullptr && summed_low->scalar_type() == cdt) {
    glow = *summed_low;
  } else {
    glow = lease.take_tensor(m.sizes(), cdt);
    if (summed_low != nullptr)
      glow.copy_(*summed_low);
    else
      project_down(g, pc, glow, right, chunk, gbuf);
  }

  // 2. AdamW on the projected gradient; u = step_size * m / (sqrt(v)/bc2_sqrt + eps).
  MEMOPT_DISPATCH_PARAM_STATE(value_dtype(p, g), m.scalar_type(), "frugal_project", [&] {
    using C = opmath_t;
    const C* gl = glow.data_ptr<C>();
    C* up = u.data_ptr<C>();
    auto* mp = m.data_ptr<state_t>();
    auto* vp = v.data_ptr<state_t>();
    const C b1c = 1.0 - s.beta1, b2 = s.beta2, b2c = 1.0 - s.beta2, ss = s.step_size,
            bc2 = s.bc2_sqrt, eps = s.eps;
    at::parallel_for(0, m.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        C mj = cpu::load<C>(mp[j]), vj = cpu::load<C>(vp[j]);
        const C gj = gl[j];
        mj = cpu::lerp(mj, gj, b1c);
        vj = b2 * vj + b2c * gj * gj;
        up[j] = ss * mj / (std::sqrt(vj) / bc2 + eps);
        mp[j] = static_cast<state_t>(mj);
        vp[j] = static_cast<state_t>(vj);
      }
    });

    // 3. per row chunk: U = project_up(u), Gp = project_up(g_low), then one fused pass.
    const auto* gp = g.data_ptr<scalar_t>();
    const C decay = s.decay, lf = lr_free;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      Tensor ut = ubuf.narrow(0, 0, n), gpt = gpbuf.narrow(0, 0, n);
      if (right) {
        at::mm_out(ut, u.narrow(0, r0, n), pc);
        if (rule != 0) at::mm_out(gpt, glow.narrow(0, r0, n), pc);
      } else {
        at::mm_out(ut, pc.narrow(0, r0, n), u);
        if (rule != 0) at::mm_out(gpt, pc.narrow(0, r0, n), glow);
      }
      const C* uo = ut.data_ptr<C>();
      const C* go = gpt.data_ptr<C>();
      cpu::with_param_store<scalar_t>(p, scales, rounding, i, s.step, buffers, buffer,
                                      [&](const auto& store) {
        at::parallel_for(0, n, std::max<int64_t>(1, kGrain / cols), [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) {
            const int64_t o = (r0 + r) * cols;
            const C *ur = uo + r * cols, *gr = go + r * cols;
            store.edit(o, cols, [&](auto* pr, const auto& round) {
              using P = std::remove_pointer_t<decltype(pr)>;
              for (int64_t j = 0; j < cols; ++j) {
                C upd = cpu::load<C>(pr[j]) * decay - ur[j];
                if (rule != 0) {
                  const C rj = cpu::load<C>(gp[o + j]) - gr[j];
                  upd -= lf * (rule == 2 ? cpu::load<C>((rj > C(0)) - (rj < C(0))) : rj);
                }
                pr[j] = round.template store<P>(upd, j);
              }
            });
          }
        });
      });
    }
  });
}

}  // namespace memopt
