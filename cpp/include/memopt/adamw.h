// AdamW (Loshchilov & Hutter), torch.optim.AdamW semantics, as a fused multi-tensor update.
#pragma once

#include "memopt/common.h"

namespace memopt {

// One fused pass per tensor, fp32 math (fp64 for double params), under `rule` (common.h):
//   kTorch:  step += 1; p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
//            p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
//   kApollo: the same m, v; p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps); p *= 1 - lr*wd
// params/grads/exp_avgs/exp_avg_sqs are parallel lists; steps are 0-dim float32 CPU tensors.
// rounding: how bf16 parameters are stored (memopt/rounding.h; [] = nearest even).
// weight_scales: [] or the scales of int8 parameters (common.h, memopt/int8_weights.h), which
// are decoded, updated in float32 and encoded again (stochastically under `rounding`).
// state_scales: [] or the block scales of 8-bit moments (common.h, memopt/state_codes.h): a
// tensor's m (int8 codes) and v (uint8 codes) are 8-bit together, decoded, updated in float32
// and encoded again span by span in the same pass.
// Layouts (memopt/layout.h): elementwise, so any dense parameter (channels_last, transposed, ...)
// is stepped in its memory order without a copy; a view with gaps is staged; overlapping
// parameters raise ValueError.
void adamw_update_(TensorList params, TensorList grads, TensorList exp_avgs,
                   TensorList exp_avg_sqs, TensorList steps, const Tensor& lr, double beta1,
                   double beta2, double eps, double weight_decay,
                   AdamWRule rule = AdamWRule::kTorch, at::IntArrayRef rounding = {},
                   TensorList weight_scales = {}, TensorList state_scales = {});

// Everything adamw_update_ checks before it writes (lists, dtypes, shapes, devices, hparams).
void check_adamw_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList steps, TensorList weight_scales = {},
                        TensorList state_scales = {});

// The op's `rule` argument: "torch" or "apollo"; anything else raises ValueError naming both.
AdamWRule parse_adamw_rule(c10::string_view rule);

}  // namespace memopt
