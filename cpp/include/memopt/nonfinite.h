// The non-finite gradient policy of the LibTorch optimizers, as the Python front end's
// nonfinite="skip": a step with any inf/NaN gradient changes nothing and is counted.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace memopt {

// "propagate" (torch's behaviour: the inf/NaN reaches the parameter) or "skip"; anything else
// raises ValueError naming both.
bool skips_nonfinite(const std::string& nonfinite);

// Whether any of `grads` holds an inf or NaN: one fused read per device (ATen's AMP check,
// the kernel the Python front end and GradScaler use), decided on the host.
bool any_nonfinite(const std::vector<at::Tensor>& grads);

}  // namespace memopt
