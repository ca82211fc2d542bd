// AdamW (Loshchilov & Hutter), torch.optim.AdamW semantics, as a fused multi-tensor update.
#pragma once

#include "memopt/common.h"

namespace memopt {

// One fused pass per tensor, fp32 math (fp64 for double params):
//   step += 1; p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
//   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// params/grads/exp_avgs/exp_avg_sqs are parallel lists; steps are 0-dim float32 CPU tensors.
void adamw_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                   TensorList exp_avg_sqs, TensorList steps, const Tensor& lr, double beta1,
                   double beta2, double eps, double weight_decay);

// Everything adamw_update_ checks before it writes (lists, dtypes, shapes, devices, hparams).
void check_adamw_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList steps);

}  // namespace memopt
