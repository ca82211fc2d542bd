// Low-rank gradient projections (APOLLO, GaLore): which side of an m x n gradient is
// compressed, and the projection matrix P itself, seeded Gaussian or top-r SVD.
#pragma once

#include <ATen/ATen.h>
#include <string>
#include <vector>

namespace memopt {

// Left:  P is (m, r) and R = P^T G is (r, n): the n columns of G are the channels.
// Right: P is (r, n) and R = G P^T is (m, r): the m rows of G are the channels.
enum class ProjSide { Left, Right };

// GaLore's "std" side of an m x n weight: the smaller dimension is compressed (Right if m >= n).
// APOLLO's proj_type "std" and FRUGAL's projections both use it.
inline ProjSide std_side(int64_t m, int64_t n) { return m >= n ? ProjSide::Right : ProjSide::Left; }

// GaLore's SVD projection of a 2-D gradient: its top `rank` singular vectors, the first columns
// of U (Left, (m, rank)) or rows of Vh (Right, (rank, n)), the SVD computed in `compute`.
// APOLLO's proj="svd" (in float32) and FRUGAL's selection="svd" both take it from here.
at::Tensor svd_basis(const at::Tensor& grad, int64_t rank, ProjSide side, at::ScalarType compute);

// The projection of one m x n weight, as apollo-torch 1.0.3 / GaLore define it:
//   proj_type "std": Right if m >= n else Left (the smaller dimension is compressed),
//   "reverse_std": the opposite, "left" / "right": always that side.
//   kind "random": P = randn(shape, CPU generator seeded with `seed`) / sqrt(r), drawn in
//   float32 then cast to the parameter dtype (random_projector.stable_randn);
//   kind "svd": P = U[:, :r] (Left) or Vh[:r] (Right) of svd(G.float()) (svd_projector).
// P is refreshed when step_before % update_proj_gap == 0 (step before its increment); each
// random refresh after the first advances the seed with next_seed, so refresh k uses
// next_seed^k(seed0): the seed chain of apollo-torch's GradientProjector.
class Projector {
 public:
  enum class Kind { Random, Svd };

  // Throws ValueError for an unknown kind / proj_type, rank < 1 or a shape that is not 2-D.
  Projector(const std::string& kind, const std::string& proj_type, int64_t rank,
            at::IntArrayRef shape);

  Kind kind() const { return kind_; }
  ProjSide side() const { return side_; }
  // r as used: the requested rank, except that SVD has at most min(m, n) singular vectors.
  int64_t rank() const { return rank_; }
  int64_t rows() const { return m_; }
  int64_t cols() const { return n_; }
  // Channels keep their own scaling factor: n (Left) or m (Right).
  int64_t channels() const { return side_ == ProjSide::Left ? n_ : m_; }
  // The dimension P contracts: m (Left) or n (Right).
  int64_t contraction() const { return side_ == ProjSide::Left ? m_ : n_; }
  std::vector<int64_t> proj_shape() const;       // (m, r) or (r, n)
  std::vector<int64_t> low_rank_shape() const;   // shape of R and of its Adam moments

  static bool refresh_due(int64_t step_before, int64_t update_proj_gap) {
    return step_before % update_proj_gap == 0;
  }
  // Whether a refresh may be due for a count known only to lie in [lo, hi] (a counter the
  // ops advance on the device, where a step's skip is decided): a multiple of the gap in it.
  static bool refresh_maybe_due(int64_t lo, int64_t hi, int64_t update_proj_gap) {
    return hi / update_proj_gap * update_proj_gap >= lo;
  }
  // apollo-torch's next_seed: the 15th int64 of randint(0, 2^63 - 1) from a CPU generator
  // seeded with `seed`.
  static int64_t next_seed(int64_t seed);

  // Writes the Gaussian P for `seed` into `out` (contiguous, proj_shape(), any float dtype).
  // `scratch`, when out is not float32, is a float32 buffer of proj_shape() to draw into.
  void gaussian_(const at::Tensor& out, int64_t seed, const at::Tensor& scratch = {}) const;
  // Writes the SVD P of `grad` into `out` (contiguous, proj_shape()). Allocates what LAPACK
  // needs (O(m n)): only random projection is free of gradient-sized temporaries.
  void svd_(const at::Tensor& out, const at::Tensor& grad) const;
  // A fresh P (convenience for bindings and tests).
  at::Tensor gaussian(int64_t seed, at::ScalarType dtype) const;
  at::Tensor svd(const at::Tensor& grad) const;

 private:
  void check_out(const at::Tensor& out, const char* what) const;
  Kind kind_;
  ProjSide side_;
  int64_t rank_, m_, n_;
};

}  // namespace memopt
