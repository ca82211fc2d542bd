// The per-tensor scalars of one Adam step, from its step count: the one definition shared by
// the host (memopt::AdamScalars, common.h) and the CUDA kernels, which compute them on the
// device when the step counters live there (the ops' found_inf, common.h). No ATen here.
#pragma once

#include <cmath>
#include <cstdint>

#include "memopt/rounding.h"  // MEMOPT_HOST_DEVICE

namespace memopt {

// What an Adam-family kernel reads per tensor. Every kernel computes
//   p = (p * pre - step_size * m / (sqrt(v) / bc2_sqrt + eps)) * post
// with (pre, post) = (decay, 1), or (1, decay) under AdamWRule::kApollo (decay_after).
struct StepScalars {
  double decay;      // 1 - lr * weight_decay (decoupled weight decay)
  double step_size;  // lr / (1 - beta1^t); kApollo: times sqrt(1 - beta2^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t); kApollo: 1 (eps on the uncorrected sqrt(v))
  uint64_t round_key;  // the tensor's stochastic-rounding key at step t (rounding.h), or 0
};

// The scalars at step count `t` (after its increment), in double on every device.
MEMOPT_HOST_DEVICE StepScalars adam_step_scalars(double lr, double beta1, double beta2,
                                                 double weight_decay, double t,
                                                 bool apollo_rule) {
  StepScalars s{1.0 - lr * weight_decay, lr / (1.0 - pow(beta1, t)),
                sqrt(1.0 - pow(beta2, t)), 0};
  if (apollo_rule) {
    s.step_size *= s.bc2_sqrt;
    s.bc2_sqrt = 1.0;
  }
  return s;
}

}  // namespace memopt
