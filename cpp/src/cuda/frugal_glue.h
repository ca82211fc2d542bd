// Internal to FRUGAL's CUDA glue. frugal_run: the update after validation (frugal_glue.cpp),
// shared by frugal_ and the row-sharded frugal_shard_update_ (frugal_shard_glue.cpp).
// FrugalCall and the projected modes 6-7 (frugal_project_glue.cpp): what frugal_glue.cpp's
// update hands to the projections' chunked GEMMs and fused kernels.
#pragma once

#include <vector>

#include "launch.h"
#include "memopt/frugal.h"

namespace memopt::cuda {

// The update of validated inputs (CUDA tensors checked here). left_stats: null for whole
// tensors; for row shards the summed P^T G of every ProjLeft tensor in order, float64 on the
// parameters' device, used instead of projecting the local rows.
void frugal_run(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, TensorList subspaces, at::IntArrayRef modes, double lr,
                double beta1, double beta2, double eps, double weight_decay, double proj_lr_scale,
                double free_lr_scale, int64_t rule, const Tensor* left_stats,
                const Rounding& rounding, TensorList weight_scales = {},
                TensorList state_scales = {},
                const std::optional<Tensor>& found_inf = std::nullopt);

struct FrugalCall {  // one op call after validation
  TensorList params, exp_avgs, exp_avg_sqs, subspaces;
  at::IntArrayRef modes;
  std::vector<Tensor> g;            // contiguous gradients
  std::vector<AdamScalars> s;       // per stateful tensor (step advanced)
  double beta1, beta2, eps, decay, lr_free;
  int64_t rule;
  Stream stream;
  std::vector<uint64_t> round_key;  // per tensor, under stochastic rounding (memopt/rounding.h)
  int32_t stochastic;
  TensorList weight_scales;         // memopt/common.h's: [] or one per tensor (int8 weights)
  // With the op's found_inf: the stateful tensors' StepScalars on the device (tensor i's at
  // scalars[i]), which every kernel reads instead of s and round_key, returning at once on a
  // set flag; else empty.
  DeviceSteps device{};
  // Elements per scale of int8 tensor i (0: a float tensor), and its scales (null: float).
  int64_t int8_group(int64_t i) const {
    const Tensor& s = weight_scale(weight_scales, i);
    return int8_scales(s) ? memopt::int8_group(params[i], s) : 0;
  }
  float* scales(int64_t i) const { return TensorBatch::scales(weight_scales, i); }
};

// Modes 6-7 (frugal_project.cpp's math). Right: G (rows x cols) P^T, P (r, cols), state
// (rows, r), in chunks of rows; left: P^T G, P (rows, r), state (r, cols), in chunks of
// columns (whole int8 groups of an int8 weight). A chunk's projection, its AdamW and its back-projection need only that chunk, so the
// scratch is `low` (the chunk's projected gradient and u, rho-sized) and `tile` (its
// back-projections): (1 + rho) * nb / 8 of the tensor's elements in fp32 at most (chunks of
// 2^18 to 2^22 elements). signSGD needs U and Gp: one GEMM on [u, low] interleaved makes both
// (nb = 2). SGD needs only U - lr_free Gp = (u - lr_free low) P and the rule none only U: one
// product on [u] each (nb = 1).
struct FrugalProjShape {
  bool right;
  int64_t r, span, across, chunk, nb;  // span: the chunked dimension; across: the other one
  at::ScalarType cdt;                  // compute dtype: double for fp64 params, else float
  int64_t low_elems() const { return chunk * nb * r; }
  int64_t tile_elems() const { return chunk * nb * across; }  // also stages G for bf16/fp16
};
// The chunking of projected tensor i of the call.
FrugalProjShape frugal_proj_shape(const FrugalCall& c, int64_t i);

// summed: a left row shard's P^T G summed over the shards (float64, the moments' shape), used
// instead of projecting the local rows; null projects g.
// pc: the subspace P in the compute type (made before the first write).
void frugal_projected_update(const FrugalCall& c, int64_t i, const FrugalProjShape& sh,
                             const Tensor& pc, const Tensor& low, const Tensor& tile,
                             const Tensor* summed);

}  // namespace memopt::cuda
