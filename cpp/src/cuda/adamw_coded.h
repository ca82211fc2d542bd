// Host side of AdamW's 8-bit state kernel (cuda/adamw_codes.cu; defined in adamw_glue.cpp), which
// also steps FRUGAL's whole-tensor modes (frugal_glue.cpp).
#pragma once

#include "launch.h"

namespace memopt::cuda {

// Whether tensor i's m and v are 8-bit codes (state_scales: one list per moment, memopt/common.h).
bool coded_moments(TensorList state_scales, int64_t i);

// What the 8-bit kernel takes, checked before anything is written: float weights, or int8 ones
// whose group divides kStateChunk (a CTA's elements); `op` names the caller in the error.
void check_coded_cuda(const char* op, TensorList params, TensorList weight_scales,
                      TensorList state_scales);

// The tensors with 8-bit m and v, in launches of AdamWCodedParams by value dtype: tensor i
// with its step's scalars in `steps`, `base` giving betas, eps, rule and rounding;
// weight_scales (memopt/common.h) marks int8 weights.
void adamw_coded_kernels(TensorList params, const std::vector<Tensor>& grads,
                         TensorList exp_avgs, TensorList exp_avg_sqs, const StepPlan& steps,
                         const AdamWParams& base, TensorList state_scales,
                         TensorList weight_scales, Stream stream);

}  // namespace memopt::cuda
