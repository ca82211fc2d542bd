// Projection matrices for low-rank gradient methods: seeded Gaussian (bit-identical to
// apollo-torch's CPU stable_randn) and top-r SVD (GaLore).
#include "memopt/projection.h"

#include <ATen/CPUGeneratorImpl.h>
#include <cmath>
#include <limits>

namespace memopt {

Projector::Projector(const std::string& kind, const std::string& proj_type, int64_t rank,
                     at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(kind == "random" || kind == "svd", "proj must be 'random' or 'svd', got '",
                    kind, "'");
  TORCH_CHECK_VALUE(rank >= 1, "rank must be >= 1, got ", rank);
  TORCH_CHECK_VALUE(shape.size() == 2, "a projected parameter must be 2-D (a weight matrix), got "
                    "shape ", shape, "; put other tensors in a group without 'rank'");
  m_ = shape[0];
  n_ = shape[1];
  TORCH_CHECK_VALUE(m_ >= 1 && n_ >= 1, "cannot project an empty weight of shape ", shape);
  kind_ = kind == "random" ? Kind::Random : Kind::Svd;
  if (proj_type == "std") {
    side_ = std_side(m_, n_);
  } else if (proj_type == "reverse_std") {
    side_ = std_side(m_, n_) == ProjSide::Right ? ProjSide::Left : ProjSide::Right;
  } else if (proj_type == "left") {
    side_ = ProjSide::Left;
  } else if (proj_type == "right") {
    side_ = ProjSide::Right;
  } else {
    TORCH_CHECK_VALUE(false, "proj_type must be 'std', 'reverse_std', 'left' or 'right', got '",
                      proj_type, "'");
  }
  // U[:, :r] / Vh[:r] of a thin SVD hold at most min(m, n) vectors (apollo-torch slices the same).
  rank_ = kind_ == Kind::Svd ? std::min(rank, std::min(m_, n_)) : rank;
}

std::vector<int64_t> Projector::proj_shape() const {
  return side_ == ProjSide::Left ? std::vector<int64_t>{m_, rank_} : std::vector<int64_t>{rank_, n_};
}

std::vector<int64_t> Projector::low_rank_shape() const {
  return side_ == ProjSide::Left ? std::vector<int64_t>{rank_, n_} : std::vector<int64_t>{m_, rank_};
}

int64_t Projector::next_seed(int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const at::Tensor draws = at::randint(0, std::numeric_limits<int64_t>::max(), {15}, gen,
                                       at::TensorOptions().dtype(at::kLong));
  return draws.data_ptr<int64_t>()[14];
}

void Projector::check_out(const at::Tensor& out, const char* what) const {
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(proj_shape()) && out.is_contiguous() &&
                        at::isFloatingType(out.scalar_type()),
                    what, ": the projection must be a contiguous floating tensor of shape ",
                    at::IntArrayRef(proj_shape()), ", got ", out.sizes());
}

void Projector::gaussian_(const at::Tensor& out, int64_t seed, const at::Tensor& scratch) const {
  check_out(out, "Projector.gaussian_");
  TORCH_CHECK_VALUE(kind_ == Kind::Random, "Projector.gaussian_: this is an SVD projector");
  // normal_ on a contiguous float32 tensor is exactly what torch.randn(shape, generator=g)
  // runs, so drawing in place gives stable_randn's values; the / sqrt(r) is the same op too.
  const bool direct = out.scalar_type() == at::kFloat;
  at::Tensor draw = direct ? out : scratch;
  if (!direct) {
    TORCH_CHECK(draw.defined() && draw.scalar_type() == at::kFloat && draw.is_contiguous() &&
                    draw.numel() == out.numel(),
                "Projector.gaussian_: a float32 scratch of the projection's size is needed");
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  draw.normal_(0.0, 1.0, gen);
  draw.div_(std::sqrt(static_cast<double>(rank_)));
  if (!direct) out.copy_(draw.view(out.sizes()));
}

void Projector::svd_(const at::Tensor& out, const at::Tensor& grad) const {
  check_out(out, "Projector.svd_");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == m_ && grad.size(1) == n_,
                    "Projector.svd_: gradient of shape ", grad.sizes(), " for a ", m_, " x ", n_,
                    " projector");
  out.copy_(svd_basis(grad, rank_, side_, at::kFloat));
}

at::Tensor svd_basis(const at::Tensor& grad, int64_t rank, ProjSide side, at::ScalarType compute) {
  auto [U, S, Vh] = at::linalg_svd(grad.to(compute), /*full_matrices=*/false);
  return side == ProjSide::Left ? U.narrow(1, 0, rank) : Vh.narrow(0, 0, rank);
}

at::Tensor Projector::gaussian(int64_t seed, at::ScalarType dtype) const {
  at::Tensor out = at::empty(proj_shape(), at::TensorOptions().dtype(dtype));
  at::Tensor scratch;
  if (dtype != at::kFloat) scratch = at::empty(proj_shape(), at::TensorOptions().dtype(at::kFloat));
  gaussian_(out, seed, scratch);
  return out;
}

at::Tensor Projector::svd(const at::Tensor& grad) const {
  at::Tensor out = at::empty(proj_shape(), grad.options());
  svd_(out, grad);
  return out;
}

}  // namespace memopt
