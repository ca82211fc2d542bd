// APOLLO (Zhu et al., arXiv 2412.05270): Adam moments of a random projection R = P G give a
// per-channel (or per-tensor) scaling factor for the raw gradient; APOLLO-Mini is rank 1 with
// tensor scaling.
#pragma once

#include <array>
#include <string>

#include "memopt/common.h"
#include "memopt/projection.h"

namespace memopt {

// Everything one APOLLO op call shares (one param group): apollo-torch's group keys.
struct ApolloConfig {
  int64_t rank = 256;
  std::string proj = "random";      // "random" | "svd"
  std::string proj_type = "std";    // "std" | "reverse_std" | "left" | "right"
  bool channel = true;              // scale_type "channel" (else "tensor")
  int64_t update_proj_gap = 200;
  double scale = 1.0;               // the update is multiplied by sqrt(scale) (alpha = sqrt(scale))
  double norm_growth_limit = 1.01;  // gamma of the norm-growth limiter; 0 turns it off
  bool scale_front = false;         // sqrt(scale) applied before (true) or after the limiter
  Rounding rounding;                // how bf16 parameters are stored (memopt/rounding.h)
};

// Validates a config (ValueError naming the key). String views, so the ops pass their schema's
// `str` arguments and C++ callers pass std::string alike.
ApolloConfig make_apollo_config(int64_t rank, c10::string_view proj, c10::string_view proj_type,
                                c10::string_view scale_type, int64_t update_proj_gap,
                                double scale, double norm_growth_limit, bool scale_front,
                                at::IntArrayRef rounding = {}, size_t n_params = 0);

// Fused multi-tensor APOLLO update, apollo-torch 1.0.3's APOLLOAdamW.step for a rank group.
// Per 2-D parameter (G = grad, t = step before the increment):
//   if t % update_proj_gap == 0: P <- new projection (random: seed <- next_seed(seed) if t > 0)
//   R = P^T G or G P^T (Projector side);  t += 1
//   M = b1 M + (1-b1) R;  V = b2 V + (1-b2) R^2;  Rt = M / (sqrt(V) + eps)
//   s = ||Rt_c|| / (||R_c|| + 1e-8) per channel c (or one s for the tensor)
//   U = G s [* sqrt(scale) if scale_front];  limiter (if gamma > 0 and a previous norm exists):
//     l = max(||U|| / (norm + 1e-8), gamma) / gamma;  U /= l;  norm = ||U||  (first time: norm = ||U||)
//   p -= lr sqrt(1-b2^t)/(1-b1^t) * U [* sqrt(scale) if not scale_front];  p -= lr wd p
// R, its Adam step and all norms are computed tile by tile in workspace scratch (at most
// apollo_tile_elements() values of R at a time); U is never formed: ||U|| follows from the
// per-channel factors and gradient norms, and the last pass writes p directly.
// Layouts (memopt/layout.h): R's channels are logical rows or columns, so a non-contiguous
// weight (transposed, or a view with gaps) is staged in logical order through the staging
// workspace (the weights APOLLO projects are 2-D; conv weights take the AdamW op, copy-free).
// projs: the stored P per tensor, or empty (regenerated from seeds each step; random only).
// seeds: int64 one-element CPU tensors (random only, else empty): the seed of the current P.
// limiter_norms: float32 (float64 for float64 params) one-element CPU tensors; negative: no norm yet.
void apollo_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                    TensorList limiter_norms, TensorList steps, const Tensor& lr, double beta1,
                    double beta2, double eps, double weight_decay, const ApolloConfig& cfg,
                    TensorList weight_scales = {});

// The op's found_inf (common.h check_found_inf): the step is skipped where it is set, decided on
// the device by the CUDA kernels, whose step counters then live there unread; so a call with
// found_inf refreshes no projection, and one where a refresh is due (a counter at a multiple of
// update_proj_gap, the first step included) must be made without it, its skip decided on the
// host (the front end reads the counters back near those steps, nonfinite.py). The CPU op,
// whose counters are readable, refuses such a call; the CUDA op trusts its caller.
void check_found_inf_refreshes_nothing(TensorList steps, const ApolloConfig& cfg,
                                       const std::optional<Tensor>& found_inf);

// Everything apollo_update_ checks before it writes (shared by the CPU and Meta kernels).
// weight_scales: int8 parameters (common.h).
void check_apollo_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                         TensorList limiter_norms, TensorList steps, const ApolloConfig& cfg,
                         TensorList weight_scales = {});

// The most elements of R (and of a converted gradient slice) one tile holds.
int64_t apollo_tile_elements();
// Workspace bytes one tensor's update takes (contiguous gradient): the planner's scratch figure.
int64_t apollo_workspace_bytes(at::IntArrayRef shape, at::ScalarType dtype, const ApolloConfig& cfg,
                               bool store_projection);

// ---- Sharded parameters (FSDP2: each rank holds a run of rows, or of columns, of the weight)
// One step is two ops around one all-reduce (summing over the shard group) of a float64 buffer:
//   apollo_shard_stats_  writes this shard's partial statistics into `stats` and nothing else;
//   apollo_shard_update_ finishes the update from the summed `stats` (the same arguments).
// Per tensor, shard_dims[i] (0: rows, 1: columns), offsets[i] and global_sizes[i] place the
// shard along that dim; the projector is the full weight's.
// When the shard splits the dim P contracts (Left on rows; Right on columns is refused) the
// stats are the partial R = P[rows]^T G (r x n) and the gradient's column sums of squares (n,
// or their total for scale_type "tensor"; only with the limiter); the moments (r, n) and P are
// whole on every rank and updated alike: r x n values cross ranks.
// When it splits the channels (Right on rows, Left on columns) R's channels are the shard's, so
// the moments are shards of R like the weight; stats are sum Rt^2, sum R^2 (tensor scaling) and
// ||U||^2 or sum G^2 (limiter): at most 3 values, none for channel scaling without limiter.
// Such a tensor forms its R twice (once per op) rather than keeping it between them.
// proj="svd" is refused (its refresh needs the whole gradient).
// The full shape of tensor i's weight, and whether its shard splits P's contraction.
std::array<int64_t, 2> apollo_shard_global_shape(const Tensor& p, int64_t shard_dim,
                                                 int64_t global_size);
bool apollo_shard_sums_r(const Projector& proj, int64_t shard_dim);
// Float64 stats of one tensor, laid out tensor after tensor in `stats`.
int64_t apollo_shard_stats_numel(at::IntArrayRef global_shape, const ApolloConfig& cfg,
                                 int64_t shard_dim = 0);
void check_apollo_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                               TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                               TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                               at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                               const Tensor& stats, const ApolloConfig& cfg);
// The shard ops' kernel signature (their schema in C++), shared by the CPU, Meta and CUDA
// kernels: apollo_'s arguments with (offsets, global_sizes, shard_dims, stats) after steps.
#define MEMOPT_APOLLO_SHARD_ARGS                                                             \
  TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,           \
      TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,         \
      at::IntArrayRef offsets, at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,      \
      const Tensor &stats, const Tensor &lr, double beta1, double beta2, double eps,          \
      double weight_decay, int64_t rank, c10::string_view proj, c10::string_view proj_type,   \
      c10::string_view scale_type, int64_t update_proj_gap, double scale,                     \
      double norm_growth_limit, bool scale_front, at::IntArrayRef rounding,                   \
      const std::optional<Tensor>& found_inf
#define MEMOPT_APOLLO_SHARD_CONFIG                                                           \
  make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap, scale,               \
                     norm_growth_limit, scale_front, rounding, params.size())

void apollo_shard_stats_(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                         TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                         at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                         const Tensor& stats, double beta1, double beta2, double eps,
                         const ApolloConfig& cfg);
void apollo_shard_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList projs, TensorList seeds,
                          TensorList limiter_norms, TensorList steps, at::IntArrayRef offsets,
                          at::IntArrayRef global_sizes, at::IntArrayRef shard_dims,
                          const Tensor& stats, const Tensor& lr, double beta1, double beta2,
                          double eps, double weight_decay, const ApolloConfig& cfg);

}  // namespace memopt
