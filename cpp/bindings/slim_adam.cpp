// Bindings for SlimAdam: its layouts are memopt::BlockPlan's (_C.BlockPlan); the update op is
// torch.ops.memopt.adam_mini_. What remains: the question snr.py asks before writing a rule.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "memopt/slim_adam.h"

namespace nb = nanobind;
using namespace memopt;

void bind_slim_adam(nb::module_& m) {
  m.def("slim_adam_dims_supported",
        [](const std::vector<int64_t>& shape, const std::vector<int64_t>& dims) {
          return slim_adam_dims_supported(shape, dims);
        },
        nb::arg("shape"), nb::arg("dims"), "Whether the kernel can average v over `dims`.");
}
