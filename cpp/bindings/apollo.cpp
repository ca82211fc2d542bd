// _C bindings for APOLLO: the Projector and the scratch planner (the settings' checks are
// ApolloPlan.add_group's: apollo_plan.cpp; the op's validator is registered beside the op). Thin.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "memopt/apollo.h"
#include "memopt/projection.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

void bind_apollo(nb::module_& m) {
  using Tensors = std::vector<at::Tensor>;
  m.def("apollo_shard_stats_numel",
        [](const std::vector<int64_t>& global_shape, int64_t rank, const std::string& proj,
           const std::string& proj_type, const std::string& scale_type,
           double norm_growth_limit, int64_t shard_dim) {
          const auto cfg = make_apollo_config(rank, proj, proj_type, scale_type, 1, 1.0,
                                              norm_growth_limit, false);
          return apollo_shard_stats_numel(global_shape, cfg, shard_dim);
        },
        nb::arg("global_shape"), nb::arg("rank"), nb::arg("proj"), nb::arg("proj_type"),
        nb::arg("scale_type"), nb::arg("norm_growth_limit"), nb::arg("shard_dim") = 0,
        "Float64 statistics one tensor of this full shape, sharded along shard_dim (0: rows, "
        "1: columns), adds to apollo_shard_'s stats buffer.");
  m.def("apollo_workspace_bytes",
        [](const std::vector<int64_t>& shape, const at::Tensor& like, int64_t rank,
           const std::string& proj, const std::string& proj_type, const std::string& scale_type,
           double norm_growth_limit, bool store_projection) {
          const auto cfg = make_apollo_config(rank, proj, proj_type, scale_type, 1, 1.0,
                                              norm_growth_limit, false);
          return apollo_workspace_bytes(shape, like.scalar_type(), cfg, store_projection);
        },
        nb::arg("shape"), nb::arg("like"), nb::arg("rank"), nb::arg("proj"), nb::arg("proj_type"),
        nb::arg("scale_type"), nb::arg("norm_growth_limit"), nb::arg("store_projection"),
        "Workspace bytes the APOLLO update of one tensor carves (contiguous gradient).");
  m.def("apollo_tile_elements", &apollo_tile_elements,
        "The most values of R = P G one APOLLO tile holds.");

  nb::class_<Projector>(m, "Projector",
                        "Low-rank projection of an m x n weight (apollo-torch / GaLore rules).")
      .def("__init__",
           [](Projector* self, const std::string& proj, const std::string& proj_type,
              int64_t rank, const std::vector<int64_t>& shape) {
             new (self) Projector(proj, proj_type, rank, shape);
           },
           nb::arg("proj"), nb::arg("proj_type"), nb::arg("rank"), nb::arg("shape"))
      .def_prop_ro("side",
                   [](const Projector& p) { return p.side() == ProjSide::Left ? "left" : "right"; })
      .def_prop_ro("rank", &Projector::rank)
      .def_prop_ro("channels", &Projector::channels)
      .def_prop_ro("proj_shape", &Projector::proj_shape)
      .def_prop_ro("low_rank_shape", &Projector::low_rank_shape)
      .def("gaussian",
           [](const Projector& p, int64_t seed, const at::Tensor& like) {
             return p.gaussian(seed, like.scalar_type());
           },
           nb::arg("seed"), nb::arg("like"),
           "P for `seed` (randn(proj_shape) / sqrt(r), drawn in float32), in like's dtype.")
      .def("svd", &Projector::svd, nb::arg("grad"), "P from the top-r singular vectors of grad.")
      .def_static("next_seed", &Projector::next_seed, nb::arg("seed"),
                  "The next seed of the chain (apollo-torch's next_seed).")
      .def_static("refresh_due", &Projector::refresh_due, nb::arg("step_before"),
                  nb::arg("update_proj_gap"))
      .def_static("refresh_maybe_due", &Projector::refresh_maybe_due, nb::arg("lo"),
                  nb::arg("hi"), nb::arg("update_proj_gap"));
}
