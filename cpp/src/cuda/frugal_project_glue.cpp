// FRUGAL's projected modes (6-7) for the CUDA dispatch key, run by frugal_glue.cpp's update
// after validation: per tensor, ATen GEMMs (fp32, TF32 off) on chunks of rows (right) or columns
// (left) into chunk-sized scratch, around the fused kernels of cuda/frugal.cu (see FrugalProjShape
// in frugal_glue.h). Registers no op: frugal_glue.cpp and frugal_shard_glue.cpp do.
#include <ATen/ATen.h>

#include <algorithm>

#include "frugal_glue.h"

namespace memopt::cuda {

FrugalProjShape frugal_proj_shape(const FrugalCall& c, int64_t i) {
  const Tensor &p = c.params[i], &proj = c.subspaces[i];
  FrugalProjShape s;
  s.right = static_cast<FrugalMode>(c.modes[i]) == FrugalMode::ProjRight;
  s.r = s.right ? proj.size(0) : proj.size(1);
  s.span = p.size(s.right ? 0 : 1), s.across = p.size(s.right ? 1 : 0);
  const int64_t budget = std::clamp<int64_t>(p.numel() / 8, int64_t{1} << 18, int64_t{1} << 22);
  s.chunk = std::clamp<int64_t>(budget / std::max<int64_t>(s.across, 1), 1,
                                std::max<int64_t>(s.span, 1));
  if (const int64_t group = c.int8_group(i); group > 0 && !s.right)  // columns: whole groups
    s.chunk = std::max(group, s.chunk / group * group);
  s.nb = c.rule == 2 ? 2 : 1;
  s.cdt = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return s;
}

void frugal_projected_update(const FrugalCall& c, int64_t i, const FrugalProjShape& sh,
                             const Tensor& pc, const Tensor& low, const Tensor& tile,
                             const Tensor* summed) {
  const Tensor& p = c.params[i];
  const Tensor &g = c.g[i], &m = c.exp_avgs[i], &v = c.exp_avg_sqs[i];
  // An empty row shard still steps a left projection's replicated moments from `summed`.
  if (p.numel() == 0 && (sh.right || summed == nullptr)) return;
  const at::NoTF32Guard no_tf32;  // fp32 products stay IEEE fp32, whatever torch.backends says
  const bool right = sh.right;
  const int64_t rows = p.size(0), cols = p.size(1), r = sh.r, nb = sh.nb;

  FrugalProjAdamParams ap{};
  ap.param_dtype = dtype_of(value_dtype(p, g)), ap.state_dtype = dtype_of(m.scalar_type());
  ap.rule = static_cast<int32_t>(c.rule);
  ap.beta1 = c.beta1, ap.beta2 = c.beta2, ap.eps = c.eps;
  ap.step_size = c.s[i].step_size, ap.bc2_sqrt = c.s[i].bc2_sqrt, ap.lr_free = c.lr_free;
  ap.device = c.device, ap.tensor = static_cast<int32_t>(i);
  FrugalProjUpdateParams up{};
  up.param_dtype = ap.param_dtype, up.rule = ap.rule;
  up.decay = c.decay, up.lr_free = c.lr_free;  // (c.s[i].decay: the same, set on the host)
  up.device = c.device, up.tensor = static_cast<int32_t>(i);
  up.ld_p = cols;
  up.stochastic = c.stochastic, up.round_key = c.round_key[i];
  up.int8_group = static_cast<int32_t>(c.int8_group(i));

  for (int64_t c0 = 0; c0 < sh.span; c0 += sh.chunk) {
    const int64_t n = std::min(sh.chunk, sh.span - c0);
    auto part = [&](const Tensor& t) { return right ? t.narrow(0, c0, n) : t.narrow(1, c0, n); };
    Tensor gc = part(g);
    if (gc.scalar_type() != sh.cdt) gc = tile.narrow(0, 0, gc.numel()).view(gc.sizes()).copy_(gc);
    // this chunk's projected gradient and u: [u_i, low_i] per row i (right) or
    // [u_k | low_k] per row k (left)
    const Tensor lw = right ? low.narrow(0, 0, n * nb * r).view({n, nb, r})
                            : low.narrow(0, 0, n * nb * r).view({r, nb, n});
    Tensor lowv = lw.select(1, nb - 1);
    if (right) at::mm_out(lowv, gc, pc.t());
    else if (summed) lowv.copy_(summed->narrow(1, c0, n));
    else at::mm_out(lowv, pc.t(), gc);
    const Tensor uv = lw.select(1, 0), mc = part(m), vc = part(v);
    ap.outer = lowv.size(0), ap.inner = lowv.size(1);
    ap.low = lowv.data_ptr(), ap.ld_low = lowv.stride(0);
    ap.out = uv.data_ptr(), ap.ld_out = uv.stride(0);
    ap.m = mc.data_ptr(), ap.v = vc.data_ptr(), ap.ld_m = mc.stride(0);
    check_launch(launch_frugal_proj_adam(ap, c.stream), "frugal_update_");
    if (rows == 0) continue;  // no local rows to update

    // back-projection: right, row i * nb + b of t is (u_i, low_i)[b] P; left, columns
    // [b * n, b * n + n) of t are P (u, low)[b]
    Tensor t = right ? tile.narrow(0, 0, n * nb * cols).view({n * nb, cols})
                     : tile.narrow(0, 0, rows * nb * n).view({rows, nb * n});
    if (right) at::mm_out(t, lw.view({n * nb, r}), pc);
    else at::mm_out(t, pc, lw.view({r, nb * n}));
    up.outer = right ? n : rows, up.inner = right ? cols : n;
    up.p = part(p).data_ptr(), up.g = part(g).data_ptr(), up.t = t.data_ptr();
    up.first = right ? c0 * cols : c0;  // the chunk's first element in p
    up.scales = up.int8_group > 0 ? c.scales(i) + up.first / up.int8_group : nullptr;
    up.ld_t = right ? nb * cols : nb * n;
    up.gp_offset = right ? cols : n;
    check_launch(launch_frugal_proj_update(up, c.stream), "frugal_update_");
  }
}

}  // namespace memopt::cuda
