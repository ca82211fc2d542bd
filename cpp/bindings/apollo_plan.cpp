// _C.ApolloPlan, _C.apollo_ranks, _C.apollo_rank_groups: memopt/apollo_plan.h. Thin:
// conversions only. ApolloPlan derives from _C.OptimizerPlan (plan.cpp): state(i) and
// check_saved are the base's.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>

#include "memopt/apollo_plan.h"
#include "option_text.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

namespace {
at::ScalarType scalar_type_of(nb::handle dtype) {
  TORCH_CHECK_TYPE(THPDtype_Check(dtype.ptr()), "expected a torch.dtype, got ",
                   nb::repr(dtype).c_str());
  return reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
}
}  // namespace

void bind_apollo_plan(nb::module_& m) {
  m.def("apollo_ranks",
        [](const std::vector<std::vector<int64_t>>& shapes,
           const std::vector<std::optional<std::string>>& roles, int64_t rank) {
          TORCH_CHECK_VALUE(roles.size() == shapes.size(), "apollo_ranks: ", roles.size(),
                            " roles for ", shapes.size(), " shapes");
          std::vector<ApolloCandidate> tensors;
          for (size_t i = 0; i < shapes.size(); ++i) {
            std::optional<Role> role;
            if (roles[i]) role = role_from_string(*roles[i]);
            tensors.push_back({shapes[i], role});
          }
          return apollo_ranks(tensors, rank);
        },
        nb::arg("shapes"), nb::arg("roles"), nb::arg("rank"),
        "Each tensor's effective APOLLO rank (0: AdamW); a role None marks an unnamed tensor.");
  m.def("apollo_rank_groups", &apollo_rank_groups, nb::arg("ranks"),
        "[(rank, positions)]: one param group per effective rank, then the AdamW (rank 0) one.");

  nb::class_<ApolloPlan, OptimizerPlan>(m, "ApolloPlan",
                                      "memopt::ApolloPlan: every decision APOLLO makes.")
      .def(nb::init<>())
      .def_ro_static("legacy_adamw_rule", &ApolloSettings::kLegacyAdamWRule)
      .def("add_group",
           [](ApolloPlan& plan, const std::vector<std::vector<int64_t>>& shapes,
              std::optional<int64_t> rank, nb::handle proj, nb::handle proj_type,
              nb::handle scale_type, int64_t update_proj_gap, double scale,
              double norm_growth_limit, bool scale_front, bool store_projection,
              nb::handle adamw_rule, const std::vector<bool>& split, int64_t state_bits,
              nb::handle embeddings) {
             const std::string rows = option_text(embeddings);
             TORCH_CHECK_VALUE(rows == "adamw" || rows == "adam_mini", "embeddings must be "
                               "'adamw' or 'adam_mini' (per-token v, 8-bit friendly), got ", rows);
             plan.add_group(shapes,
                            ApolloSettings{rank, option_text(proj), option_text(proj_type),
                                           option_text(scale_type), update_proj_gap, scale,
                                           norm_growth_limit, scale_front, store_projection,
                                           option_text(adamw_rule), state_bits,
                                           rows == "adam_mini"},
                            split);
           },
           nb::arg("shapes"), nb::arg("rank").none(), nb::arg("proj").none(),
           nb::arg("proj_type").none(), nb::arg("scale_type").none(),
           nb::arg("update_proj_gap"), nb::arg("scale"), nb::arg("norm_growth_limit"),
           nb::arg("scale_front"), nb::arg("store_projection"), nb::arg("adamw_rule").none(),
           nb::arg("split"), nb::arg("state_bits") = 32, nb::arg("embeddings").none() = "adamw",
           "Appends a param group (rank None: AdamW; embeddings='adam_mini': with per-row v); "
           "ValueError leaves the plan as it was.")
      .def("row_blocks", &ApolloPlan::row_blocks, nb::arg("i"))
      .def("__len__", &ApolloPlan::size)
      .def("projected", &ApolloPlan::projected, nb::arg("i"))
      .def("side",
           [](const ApolloPlan& plan, int64_t i) {
             return plan.projector(i).side() == ProjSide::Left ? "left" : "right";
           },
           nb::arg("i"))
      .def("rank", [](const ApolloPlan& plan, int64_t i) { return plan.projector(i).rank(); },
           nb::arg("i"), "The rank of tensor i's projection as used (SVD: at most min(m, n)).")
      .def("seed", &ApolloPlan::seed, nb::arg("i"))
      .def("scale_factors", &ApolloPlan::scale_factors, nb::arg("i"))
      .def("workspace_bytes",
           [](const ApolloPlan& plan, int64_t i, nb::handle dtype) {
             return plan.workspace_bytes(i, scalar_type_of(dtype));
           },
           nb::arg("i"), nb::arg("dtype"));
}
