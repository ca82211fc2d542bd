// FRUGAL's subspace selection (upstream proj_optimizer_templates.py / *_projector.py): which
// blocks are active, which columns/rows/coordinates are state-full, and projection matrices.
// Random draws use a CPU generator restored from a saved state, so resume is exact.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cfenv>

#include "memopt/frugal.h"
#include "memopt/projection.h"

namespace memopt {

namespace {

at::Generator generator_from(const Tensor& state) {
  TORCH_CHECK_VALUE(state.defined() && state.scalar_type() == at::kByte && state.dim() == 1,
                    "FRUGAL: rng_state must be a uint8 tensor from torch.Generator.get_state()");
  auto gen = at::make_generator<at::CPUGeneratorImpl>();
  gen.set_state(state);
  return gen;
}

Tensor randperm(int64_t n, Tensor& rng_state) {
  auto gen = generator_from(rng_state);  // local to this call; ATen locks it while drawing
  Tensor perm = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
  rng_state = gen.get_state();
  return perm;
}

}  // namespace

int64_t frugal_round(double x) {
  TORCH_CHECK_VALUE(std::isfinite(x), "FRUGAL: cannot round ", x);
  return static_cast<int64_t>(std::nearbyint(x));  // default rounding mode: ties to even
}

std::vector<int64_t> frugal_select_blocks(int64_t n, int64_t k, const std::string& order,
                                          int64_t& cursor, Tensor& rng_state) {
  TORCH_CHECK_VALUE(n >= 0 && k >= 0 && k <= n, "FRUGAL: cannot activate ", k, " of ", n,
                    " blocks");
  std::vector<int64_t> out;
  if (order == "random") {
    const Tensor perm = randperm(n, rng_state);
    const int64_t* d = perm.data_ptr<int64_t>();
    out.assign(d, d + k);
  } else if (order == "ascending") {
    if (cursor < 0) cursor = 0;
    for (int64_t i = cursor; i < cursor + k; ++i) out.push_back(i % n);
    cursor += k;
    if (cursor >= n) cursor -= n;
  } else if (order == "descending") {
    if (cursor < 0) cursor = n - 1;
    for (int64_t i = cursor; i > cursor - k; --i) out.push_back(((i % n) + n) % n);
    cursor -= k;
    if (cursor < 0) cursor += n;
  } else if (order == "mirror") {
    TORCH_CHECK_VALUE(k % 2 == 0, "FRUGAL: block_order='mirror' needs an even number of active "
                      "blocks, got ", k, " of ", n, " (change density)");
    const int64_t half = n / 2;
    if (cursor < 0) cursor = 0;
    for (int64_t i = cursor; i < cursor + k / 2; ++i) {
      out.push_back(i % half);
      out.push_back(n - 1 - i % half);
    }
    cursor += k / 2;
    if (cursor >= half) cursor -= half;
  } else {
    TORCH_CHECK_VALUE(false, "FRUGAL: unknown block_order '", order,
                      "'; use 'descending', 'ascending', 'random' or 'mirror'");
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Tensor frugal_select_indices(int64_t total, int64_t k, Tensor& rng_state) {
  TORCH_CHECK_VALUE(k >= 0 && k <= total, "FRUGAL: cannot select ", k, " of ", total,
                    " coordinates");
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "FRUGAL: a tensor of ", total,
                    " elements is too large for int32 coordinate indices");
  // upstream: randperm(total)[:k]; kept sorted so the fused update walks them in order.
  const Tensor perm = randperm(total, rng_state);
  return std::get<0>(perm.narrow(0, 0, k).sort()).to(at::kInt).contiguous();
}

Tensor frugal_projection(const Tensor& grad, int64_t rank, bool right, const std::string& kind,
                         Tensor& rng_state) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "FRUGAL: projections need a 2-D tensor, got ", grad.sizes());
  const int64_t rows = grad.size(0), cols = grad.size(1);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= (right ? cols : rows), "FRUGAL: projection rank ", rank,
                    " out of range for a ", rows, "x", cols, " tensor");
  const auto cdt = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor proj;
  if (kind == "svd") {  // GaLore's projector: top singular vectors of the current gradient
    proj = svd_basis(grad, rank, right ? ProjSide::Right : ProjSide::Left, cdt);
  } else if (kind == "random") {  // torch.nn.init.orthogonal_ on fp32 normals, as upstream
    const int64_t r0 = right ? rank : rows, c0 = right ? cols : rank;
    auto gen = generator_from(rng_state);
    Tensor flat = at::empty({r0, c0}, at::TensorOptions().dtype(at::kFloat));
    flat.normal_(0.0, 1.0, gen);
    rng_state = gen.get_state();
    if (r0 < c0) flat = flat.t();
    auto [q, r] = at::linalg_qr(flat);
    q = q * r.diagonal().sign();
    proj = r0 < c0 ? q.t() : q;
  } else if (kind == "randperm") {  // rows (right) / columns (left) of a permutation matrix
    const int64_t n = right ? cols : rows;
    const Tensor perm = randperm(n, rng_state);
    const int64_t* d = perm.data_ptr<int64_t>();
    proj = at::zeros(right ? std::vector<int64_t>{rank, cols} : std::vector<int64_t>{rows, rank},
                     at::TensorOptions().dtype(at::kDouble));
    double* q = proj.data_ptr<double>();
    if (right) {
      for (int64_t i = 0; i < rank; ++i) q[i * cols + d[i]] = 1.0;
    } else {
      for (int64_t i = 0; i < rows; ++i)
        if (d[i] < rank) q[i * rank + d[i]] = 1.0;
    }
  } else {
    TORCH_CHECK_VALUE(false, "FRUGAL: unknown projection '", kind,
                      "'; use 'svd', 'random' or 'randperm'");
  }
  return proj.to(grad.scalar_type()).contiguous();
}

}  // namespace memopt
