// FRUGAL's internal pieces shared by frugal.cpp (the op), frugal_project.cpp (projection modes)
// and frugal_shard.cpp (row-sharded parameters). Not part of the public API.
#pragma once

#include "cpu_params.h"
#include "memopt/frugal.h"

namespace memopt {

// frugal_project.cpp: the projection modes (r-sized temporaries, row-chunked back-projection).
// `summed_low` (left mode on a row shard): the full weight's P^T G, summed over the shards,
// used instead of projecting this shard; null projects g. scales, buffers, buffer: an int8 p
// (cpu_params.h; scales undefined otherwise).
void frugal_projected_update(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                             const Tensor& proj, bool right, const AdamScalars& s, double lr_free,
                             int64_t rule, Workspace::Lease& lease, const Tensor* summed_low,
                             const Rounding& rounding, size_t i, const Tensor& scales = {},
                             float* buffers = nullptr, int64_t buffer = 0);
// Workspace bytes of one frugal_projected_update or frugal_left_partial call.
int64_t frugal_projected_bytes(const Tensor& p, const Tensor& proj, const Tensor& m);
// A row shard's part of left mode's P^T G: P[rows]^T G[rows] into `out` (float64, the
// moments' shape), for the shards' sum. Writes nothing else.
void frugal_left_partial(const Tensor& p, const Tensor& g, const Tensor& proj, const Tensor& out,
                         Workspace::Lease& lease);

// frugal.cpp: frugal_update_'s loop, after validation. `left_stats`: null for whole tensors;
// for row shards the summed P^T G of every ProjLeft tensor in order (frugal_shard_update_).
void frugal_update_loop(TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                        at::IntArrayRef modes, double lr, double beta1, double beta2, double eps,
                        double weight_decay, double proj_lr_scale, double free_lr_scale,
                        int64_t rule, const Tensor* left_stats, const Rounding& rounding,
                        TensorList weight_scales = {}, TensorList state_scales = {});

}  // namespace memopt
