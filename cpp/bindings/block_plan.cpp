// _C.BlockPlan (memopt/block_plan.h): AdamW's, Adam-mini's and SlimAdam's decisions. Thin:
// conversions of Python values only.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "memopt/block_plan.h"

namespace nb = nanobind;
using namespace memopt;

namespace {
// (role, transposed, head_dim, q_heads, kv_heads, kv_interleaved), as _C.infer_role returns it
using RoleTuple = std::tuple<std::string, bool, int64_t, int64_t, int64_t, bool>;
// (name, shape, role or None, note)
using TensorTuple = std::tuple<std::string, std::vector<int64_t>, std::optional<RoleTuple>, std::string>;

std::string repr_of(nb::handle v) { return nb::cast<std::string>(nb::repr(v)); }

// One rules value: a list or tuple of ints, None, "table", or anything else as its repr.
SlimRule slim_rule_of(nb::handle v) {
  SlimRule rule;
  if (v.is_none()) return rule;
  if (nb::isinstance<nb::str>(v) && nb::cast<std::string>(v) == "table") {
    rule.kind = SlimRule::Kind::Table;
    return rule;
  }
  if (nb::isinstance<nb::list>(v) || nb::isinstance<nb::tuple>(v)) {
    bool ints = true;
    for (nb::handle d : v) {
      ints = ints && nb::isinstance<nb::int_>(d) && !nb::isinstance<nb::bool_>(d);
      if (ints) rule.dims.push_back(nb::cast<int64_t>(d));
    }
    if (ints) return rule;
  }
  return SlimRule{SlimRule::Kind::Invalid, {}, repr_of(v)};
}

// rules=: "table", None or a dict (a JSON file is read by the front end).
SlimRules slim_rules_of(nb::handle v) {
  SlimRules rules;
  if (v.is_none()) {
    rules.kind = SlimRules::Kind::None;
  } else if (nb::isinstance<nb::dict>(v)) {
    rules.kind = SlimRules::Kind::Map;
    for (auto [name, rule] : nb::borrow<nb::dict>(v))
      rules.map.emplace_back(nb::cast<std::string>(name), slim_rule_of(rule));
  } else if (!nb::isinstance<nb::str>(v) || nb::cast<std::string>(v) != "table") {
    throw nb::type_error(("rules must be 'table', None, a dict or a JSON path, got " +
                          nb::cast<std::string>(nb::handle(v.type()).attr("__name__"))).c_str());
  }
  return rules;
}

template <class T>
nb::tuple as_tuple(const std::vector<T>& values) {
  nb::list out;
  for (const auto& v : values) out.append(v);
  return nb::tuple(out);
}

// Segments as (offset, rows, cols, row_stride, tile_rows, tile_cols) tuples, in a tuple.
nb::tuple segments(const BlockSpec& spec) {
  nb::list out;
  for (const auto& s : spec)
    out.append(nb::make_tuple(s.offset, s.rows, s.cols, s.row_stride, s.tile_rows, s.tile_cols));
  return nb::tuple(out);
}

// SlimAdam's dims as its rules write them: "table" for the table's fused QKV split, None for
// none (uncompressed, and every other optimizer), else the averaged dims.
nb::object rules_dims(const BlockDecision& d) {
  if (d.split) return nb::str("table");
  return d.dims.empty() ? nb::none() : nb::object(as_tuple(d.dims));
}
}  // namespace

void bind_block_plan(nb::module_& m) {
  nb::class_<BlockPlan, OptimizerPlan>(m, "BlockPlan",
                                       "memopt::BlockPlan: AdamW's, Adam-mini's and SlimAdam's decisions.")
      .def("__init__",
           [](BlockPlan* self, const std::vector<TensorTuple>& tensors, const std::string& algorithm,
              nb::handle partition, int64_t dim, int64_t n_heads, bool role_overrides, nb::handle rules,
              int64_t state_bits) {
             std::vector<BlockTensor> ts;
             for (const auto& [name, shape, role, note] : tensors) {
               RoleInfo info;
               if (role) {
                 const auto& [r, transposed, head_dim, q_heads, kv_heads, interleaved] = *role;
                 info = RoleInfo{role_from_string(r), transposed, head_dim, q_heads, kv_heads, interleaved};
               }
               ts.push_back({name, shape, info, note});
             }
             BlockPlanConfig config;
             config.algorithm = block_algorithm_from_string(algorithm);
             config.partition = nb::isinstance<nb::str>(partition) ? nb::cast<std::string>(partition) : repr_of(partition);
             config.dim = dim;
             config.n_heads = n_heads;
             config.role_overrides = role_overrides;
             config.state_bits = state_bits;
             if (config.algorithm == BlockAlgorithm::SlimAdam) config.rules = slim_rules_of(rules);
             new (self) BlockPlan(std::move(ts), std::move(config));
           },
           nb::arg("tensors"), nb::arg("algorithm"), nb::arg("partition").none() = "auto",
           nb::arg("dim") = 0, nb::arg("n_heads") = 0, nb::arg("role_overrides") = false,
           nb::arg("rules").none() = "table", nb::arg("state_bits") = 32,
           "tensors: [(name, shape, (role, transposed, head_dim, q_heads, kv_heads, "
           "kv_interleaved) or None, note)]; algorithm: adamw, adam_mini or slim_adam.")
      .def("blocks",
           [](const BlockPlan& plan, int64_t i) {
             const BlockDecision& d = plan.decision(i);
             return nb::make_tuple(role_name(d.role), segments(d.spec), d.count, d.decay, d.note,
                                   as_tuple(d.v_shape), rules_dims(d), d.rule, plan.encoded(i));
           },
           nb::arg("i"),
           "Tensor i's decision: (role, segments, count, decay, note, v_shape, dims, rule, "
           "encoded); a segment is (offset, rows, cols, row_stride, tile_rows, tile_cols), dims "
           "a tuple, None or 'table' (SlimAdam's rules), encoded the op's flat list.")
      .def_prop_ro("missing_rules", &BlockPlan::missing_rules)
      .def_prop_ro("unknown_rules", &BlockPlan::unknown_rules)
      .def_prop_ro("rules_warning", &BlockPlan::rules_warning);
}
