// error_string for the glue, which cannot include CUDA headers in a CPU torch wheel's build.
#include <cuda_runtime.h>

#include "memopt/kernel_params.h"

namespace memopt::cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace memopt::cuda
