// FRUGAL (Zmushko et al., arXiv 2411.07837): each projectable gradient is split into a
// state-full subspace, updated by AdamW with state only there, and its complement, updated by a
// state-free rule (signSGD, SGD or nothing), in one fused pass per tensor.
#pragma once

#include "memopt/common.h"
#include "memopt/layout.h"

namespace memopt {

// How one tensor is updated (the op takes one int per tensor).
enum class FrugalMode : int64_t {
  Adam = 0,       // not projectable: AdamW at lr
  ActiveBlock = 1,  // projectable, active block: AdamW at lr * proj_lr_scale
  FreeBlock = 2,  // projectable, inactive block (or empty subspace): state-free rule only, no state
  Columns = 3,    // AdamW on the columns in `subspace` (sorted int32), state (rows, k)
  Rows = 4,       // AdamW on the rows in `subspace`, state (k, cols)
  RandK = 5,      // AdamW on the flat coordinates in `subspace`, state (k,)
  ProjRight = 6,  // AdamW on G P^T with P = subspace (r, cols), state (rows, r)
  ProjLeft = 7,   // AdamW on P^T G with P = subspace (rows, r), state (r, cols)
};
constexpr int64_t kFrugalModes = 8;

// The state-free rule on the complement of the subspace.
enum class FrugalRule : int64_t { None = 0, Sgd = 1, SignSgd = 2 };

// One fused multi-tensor FRUGAL step, for every tensor i (fp32 math, fp64 for fp64 params):
//   p *= 1 - lr*wd                                  (every tensor, upstream's order)
//   state-full part:  AdamW (bias-corrected, torch eps placement) at lr_i = lr or
//                     lr * proj_lr_scale, on the subspace coordinates / projection; step += 1
//   state-free part:  p -= lr * proj_lr_scale * free_lr_scale * sign(G - G_sub)  (or G - G_sub)
// Free tensors take no state: their exp_avgs/exp_avg_sqs/steps/subspaces entries are ignored
// (pass empty tensors). state_scales (memopt/common.h): 8-bit moments of tensors in the whole-tensor
// modes (Adam, active blocks), stepped as AdamW's 8-bit ones. The split is by index for block/column/row/randk selections and by
// r-sized row chunks for projections, so no parameter-sized temporary is made.
void frugal_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                    at::IntArrayRef modes, const Tensor& lr, double beta1, double beta2,
                    double eps, double weight_decay, double proj_lr_scale, double free_lr_scale,
                    int64_t rule, at::IntArrayRef rounding = {}, TensorList weight_scales = {},
                    TensorList state_scales = {});

// How the FRUGAL kernels (CPU and CUDA, whole and row-sharded) see a non-contiguous parameter
// (memopt/layout.h): Adam, active and free blocks are elementwise, so any dense layout is
// stepped in its memory order without a copy; the column, row, randk and projection modes index
// logical rows, columns or coordinates, so a non-contiguous weight there is staged.
OrderFreeWithin frugal_order_free(at::IntArrayRef modes);

// Everything frugal_update_ checks before it writes. `read_data` also checks index contents
// (sorted, in range), which needs host-readable tensors (not on Meta).
void check_frugal_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                         at::IntArrayRef modes, double proj_lr_scale, double free_lr_scale,
                         int64_t rule, bool read_data = true, TensorList weight_scales = {},
                         TensorList state_scales = {});

// ---- row-sharded parameters (FSDP2; frugal_shard.cpp) ---------------------------------------
// Each parameter is rows [row0, row0 + m) of its full weight, with its gradient's same rows.
// Only left projections (rows < cols: g_low = P^T G, P (rows, r)) contract the sharded dim, so
// one step is two ops around one float64 all-reduce over the shard group:
//   frugal_shard_stats_   writes this shard's P[rows]^T G[rows] of every ProjLeft tensor, in
//                         order, into `stats` (frugal_shard_stats_numel values) and nothing else;
//   frugal_shard_update_  the same arguments with the summed `stats`: frugal_update_ with each
//                         ProjLeft tensor's g_low read from stats instead of projected.
// Layout per mode: ProjLeft subspace = the shard's rows of P (m, r), moments (r, cols) whole
// (every rank steps them alike); ProjRight subspace = the whole P (r, cols), moments (m, r) the
// shard's rows; the other modes are elementwise or per row and need nothing else.
int64_t frugal_shard_stats_numel(TensorList exp_avgs, at::IntArrayRef modes);
void check_frugal_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                               TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                               at::IntArrayRef modes, const Tensor& stats, double proj_lr_scale,
                               double free_lr_scale, int64_t rule, bool read_data = true);
// The shard ops' kernel signature (their schema in C++), shared by the CPU, Meta and CUDA
// kernels: frugal_'s arguments with `stats` after modes.
#define MEMOPT_FRUGAL_SHARD_ARGS                                                              \
  TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,           \
      TensorList steps, TensorList subspaces, at::IntArrayRef modes, const Tensor &stats,     \
      const Tensor &lr, double beta1, double beta2, double eps, double weight_decay,          \
      double proj_lr_scale, double free_lr_scale, int64_t rule, at::IntArrayRef rounding,     \
      const std::optional<at::Tensor>& found_inf

void frugal_shard_stats_(TensorList params, TensorList grads, TensorList exp_avgs,
                         TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                         at::IntArrayRef modes, const Tensor& stats, double proj_lr_scale,
                         double free_lr_scale, int64_t rule);
void frugal_shard_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                          at::IntArrayRef modes, const Tensor& stats, const Tensor& lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          double proj_lr_scale, double free_lr_scale, int64_t rule,
                          at::IntArrayRef rounding = {});

// ---- subspace selection (frugal_subspace.cpp) ---------------------------------------------
// Random draws come from a CPU generator restored from `rng_state` (torch.Generator.get_state())
// and return the advanced state, so a checkpoint resumes the exact random sequence.

// Python's round(x) (ties to even), as upstream uses for block counts and projection ranks.
int64_t frugal_round(double x);

// The next active blocks among n projectable tensors, k at a time, in upstream's order:
// "descending" (from the last tensor back), "ascending", "mirror" (k/2 from the front and their
// mirror images from the back) or "random" (randperm(n)[:k]). `cursor` is upstream's
// next_block_start (-1 before the first selection) and is advanced. Returns sorted indices.
std::vector<int64_t> frugal_select_blocks(int64_t n, int64_t k, const std::string& order,
                                          int64_t& cursor, Tensor& rng_state);

// k of `total` coordinates drawn as randperm(total)[:k], returned sorted as int32.
Tensor frugal_select_indices(int64_t total, int64_t k, Tensor& rng_state);

// The projection matrix of a 2-D gradient: (rank, cols) if `right` else (rows, rank), in the
// gradient's dtype. kind "svd" (top singular vectors of grad, computed in fp32/fp64), "random"
// (torch.nn.init.orthogonal_ on fp32 normals) or "randperm" (rows/cols of a permutation matrix).
Tensor frugal_projection(const Tensor& grad, int64_t rank, bool right, const std::string& kind,
                         Tensor& rng_state);

}  // namespace memopt
