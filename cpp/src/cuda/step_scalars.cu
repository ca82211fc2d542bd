// The prologue of an Adam-family op whose step counters live on the device (kernel_params.h
// DeviceSteps): advances each counter unless *found_inf is set and writes the tensor's
// StepScalars, in double, from the same definition the host uses (memopt/step_scalars.h).
#include "cuda_common.cuh"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) step_scalars_kernel(const StepScalarsParams prm) {
  const int k = static_cast<int>(blockIdx.x * kThreads + threadIdx.x);
  if (k >= prm.n) return;
  if (prm.step[k] == nullptr) {
    prm.out[k] = StepScalars{};
    return;
  }
  const bool skip = *prm.found_inf != 0.0f;
  float t = *prm.step[k];
  if (!skip) *prm.step[k] = t = t + 1.0f;  // float32 like the host counters
  StepScalars s = adam_step_scalars(prm.lr[k], prm.beta1, prm.beta2, prm.weight_decay, t,
                                    prm.apollo_rule != 0);
  if (prm.fixed_decay) s.decay = prm.decay;
  if (prm.stochastic)
    s.round_key = rounding_key(prm.round_seed, prm.round_counter, prm.round_id[k],
                               static_cast<int64_t>(t));
  prm.out[k] = s;
}

}  // namespace

int launch_step_scalars(const StepScalarsParams& prm, Stream stream) {
  if (prm.n == 0) return 0;
  const unsigned grid = static_cast<unsigned>((prm.n + kThreads - 1) / kThreads);
  step_scalars_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(prm);
  return last_launch_error();
}

}  // namespace memopt::cuda
