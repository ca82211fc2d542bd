// The non-finite gradient policy of the LibTorch optimizers, as the Python front end's
// nonfinite="skip": a step with any inf/NaN gradient changes nothing and is counted. On a GPU
// the skip is decided on the device (PlanOptimizer::step: the flag goes into the ops' found_inf
// and nothing is read back) wherever the optimizer's schedule allows; elsewhere on the host.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace memopt {

// "propagate" (torch's behaviour: the inf/NaN reaches the parameter) or "skip"; anything else
// raises ValueError naming both.
bool skips_nonfinite(const std::string& nonfinite);

// A one-element float32 flag on the device of `grads` (all on one device), non-zero where any
// of them holds an inf or NaN: ATen's fused AMP check (the kernel the Python front end and
// GradScaler use), nothing read back.
at::Tensor nonfinite_flag(const std::vector<at::Tensor>& grads);

// Whether any of `grads` holds an inf or NaN: nonfinite_flag per device, read on the host (one
// synchronisation per device on a GPU).
bool any_nonfinite(const std::vector<at::Tensor>& grads);

// The device types on which the LibTorch optimizers decide the skip on the device: {kCUDA}.
// The tests add kCPU, so that the CPU stands in for a GPU (the CPU ops honour found_inf too),
// as tests/test_nonfinite_device.py does with the Python front end's DEVICE_TYPES.
std::vector<c10::DeviceType>& device_skip_types();

}  // namespace memopt
