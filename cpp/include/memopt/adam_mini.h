// Adam-mini (Zhang et al., arXiv 2406.16793): Adam with one second moment per Hessian block.
#pragma once

#include "memopt/common.h"
#include "memopt/partition.h"

namespace memopt {

// Fused multi-tensor Adam-mini update. For every block b of tensor i (blocks from `specs[i]`):
//   step += 1; v_b = b2*v_b + (1-b2)*mean_{j in b} g_j^2
//   p *= 1 - lr*wd; m = lerp(m, g, 1-b1); p -= lr/(1-b1^t) * m / (sqrt(v_b)/sqrt(1-b2^t) + eps)
// exp_avg_sqs[i] is 1-D with num_blocks(specs[i]) entries, in segment then row-major tile order.
void adam_mini_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                       TensorList exp_avg_sqs, TensorList steps,
                       const std::vector<BlockSpec>& specs, const Tensor& lr, double beta1,
                       double beta2, double eps, double weight_decay);

// Validation only (shared by the CPU and Meta kernels).
void check_adam_mini_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                            TensorList exp_avg_sqs, TensorList steps,
                            const std::vector<BlockSpec>& specs);

}  // namespace memopt
