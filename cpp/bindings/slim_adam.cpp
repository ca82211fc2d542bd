// Bindings for SlimAdam's layouts (the update op is torch.ops.memopt.adam_mini_).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "memopt/slim_adam.h"

namespace nb = nanobind;
using namespace memopt;

namespace {
using SegmentTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

// (segments, v_shape, dims or None for a split layout, rule text)
auto as_tuple(const SlimLayout& l) {
  std::vector<SegmentTuple> segs;
  for (const auto& s : l.spec)
    segs.emplace_back(s.offset, s.rows, s.cols, s.row_stride, s.tile_rows, s.tile_cols);
  return std::make_tuple(segs, l.v_shape, l.dims, l.rule);
}
}  // namespace

void bind_slim_adam(nb::module_& m) {
  m.def("slim_adam_dims_layout",
        [](const std::vector<int64_t>& shape, const std::vector<int64_t>& dims) {
          return as_tuple(slim_adam_dims_layout(shape, dims));
        },
        nb::arg("shape"), nb::arg("dims"),
        "SlimAdam layout averaging v over `dims` ([] = uncompressed): (segments, v_shape, dims, "
        "rule). Raises ValueError for invalid or unsupported dims.");
  m.def("slim_adam_dims_supported",
        [](const std::vector<int64_t>& shape, const std::vector<int64_t>& dims) {
          return slim_adam_dims_supported(shape, dims);
        },
        nb::arg("shape"), nb::arg("dims"), "Whether the kernel can average v over `dims`.");
  m.def("slim_adam_table_layout",
        [](const std::string& role, const std::vector<int64_t>& shape, bool transposed,
           int64_t head_dim, int64_t q_heads, int64_t kv_heads, bool kv_interleaved) {
          RoleInfo info{role_from_string(role), transposed, head_dim, q_heads, kv_heads,
                        kv_interleaved};
          return as_tuple(slim_adam_table_layout(info, shape));
        },
        nb::arg("role"), nb::arg("shape"), nb::arg("transposed") = false, nb::arg("head_dim") = 0,
        nb::arg("q_heads") = 0, nb::arg("kv_heads") = 0, nb::arg("kv_interleaved") = false,
        "SlimAdam's static table (paper Table 1) for a tensor of this role: (segments, v_shape, "
        "dims or None for fused QKV, rule).");
}
