// _C.infer_role / role_traits / role_from_name / role_names: memopt/roles.h, thin.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "memopt/roles.h"

namespace nb = nanobind;
using namespace memopt;

void bind_roles(nb::module_& m) {
  m.def("role_names", &role_names, "All role names the partitioner knows.");
  m.def("role_from_name",
        [](const std::string& name, const std::vector<int64_t>& shape) {
          return role_name(role_from_name(name, shape));
        },
        nb::arg("name"), nb::arg("shape"), "Role of a parameter from its name and shape alone.");
  m.def("role_traits",
        [] {
          std::map<std::string, std::map<std::string, bool>> out;
          for (const auto& name : role_names()) {
            const RoleTraits& t = role_traits(role_from_string(name));
            out[name] = {{"attention_or_mlp", t.attention_or_mlp},
                         {"hidden_matrix", t.hidden_matrix}, {"decays", t.decays},
                         {"needs_shape", t.needs_shape}, {"per_head", t.per_head}};
          }
          return out;
        },
        "{role: {trait: bool}}: what the algorithms decide from a role (memopt/roles.h).");
  m.def("infer_role",
        [](const std::string& name, const std::vector<int64_t>& shape,
           const std::vector<std::pair<std::string, std::string>>& owners, bool is_output_head,
           bool kv_interleaved, const std::vector<int64_t>& heads,
           const std::optional<std::string>& forced, bool qk_need_heads) {
          TORCH_CHECK_VALUE(heads.size() == 4, "heads: (dim, n_heads, n_kv_heads, head_dim)");
          TensorFacts f;
          for (const auto& [kind, attr] : owners)
            f.owners.push_back({owner_kind_from_string(kind), attr});
          f.is_output_head = is_output_head;
          f.kv_interleaved = kv_interleaved;
          f.heads = {heads[0], heads[1], heads[2], heads[3]};
          if (forced) f.forced = role_from_string(*forced);
          f.qk_need_heads = qk_need_heads;
          const InferredRole r = infer_role(name, shape, f);
          const RoleInfo& i = r.info;
          return nb::make_tuple(role_name(i.role), i.transposed, i.head_dim, i.q_heads,
                                i.kv_heads, i.kv_interleaved, r.source, r.note);
        },
        nb::arg("name"), nb::arg("shape"), nb::arg("owners"), nb::arg("is_output_head"),
        nb::arg("kv_interleaved"), nb::arg("heads"), nb::arg("forced").none(),
        nb::arg("qk_need_heads") = true,
        "The role of one tensor from the module facts: owners [(kind, attr)] with kind one of "
        "other, linear, conv1d, embedding, norm, conv, mha; heads (dim, n_heads, n_kv_heads, "
        "head_dim), 0 = unknown. Returns (role, transposed, head_dim, q_heads, kv_heads, "
        "kv_interleaved, source, note).");
}
