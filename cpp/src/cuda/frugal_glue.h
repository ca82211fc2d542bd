// FRUGAL's CUDA update after validation (frugal_glue.cpp), shared by frugal_ and the
// row-sharded frugal_shard_update_ (frugal_shard_glue.cpp). Internal to the CUDA glue.
#pragma once

#include "memopt/frugal.h"

namespace memopt::cuda {

// The update of validated inputs (CUDA tensors checked here). left_stats: null for whole
// tensors; for row shards the summed P^T G of every ProjLeft tensor in order, float64 on the
// parameters' device, used instead of projecting the local rows.
void frugal_run(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, TensorList subspaces, at::IntArrayRef modes, double lr,
                double beta1, double beta2, double eps, double weight_decay, double proj_lr_scale,
                double free_lr_scale, int64_t rule, const Tensor* left_stats);

}  // namespace memopt::cuda
