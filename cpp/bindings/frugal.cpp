// memopt_core._C bindings for FRUGAL: the op's validator, the subspace selection primitives and
// memopt::FrugalPlan (every decision of the Python front end). Thin: conversions only.
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "memopt/frugal.h"
#include "memopt/frugal_plan.h"
#include "state_tuples.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

namespace {
// A saved selection's values between Python and C++. Values of another type become their repr,
// a text no field accepts in place of a number, a list or a tensor, so the plan names the field.
c10::IValue to_ivalue(nb::handle v) {
  at::Tensor t;
  if (v.is_none()) return {};
  if (nb::isinstance<nb::bool_>(v)) return nb::cast<bool>(v);
  if (nb::isinstance<nb::int_>(v)) {
    int64_t i;
    if (nb::try_cast(v, i)) return i;
  } else if (nb::isinstance<nb::float_>(v)) {
    return nb::cast<double>(v);
  } else if (nb::isinstance<nb::str>(v)) {
    return nb::cast<std::string>(v);
  } else if (nb::try_cast(v, t)) {
    return t;
  } else if (nb::isinstance<nb::list>(v) || nb::isinstance<nb::tuple>(v)) {
    c10::impl::GenericList list(c10::AnyType::get());
    for (nb::handle e : v) list.push_back(to_ivalue(e));
    return list;
  }
  return nb::cast<std::string>(nb::repr(v));
}

nb::object from_ivalue(const c10::IValue& v) {
  if (v.isNone()) return nb::none();
  if (v.isBool()) return nb::bool_(v.toBool());
  if (v.isInt()) return nb::int_(v.toInt());
  if (v.isDouble()) return nb::float_(v.toDouble());
  if (v.isString()) return nb::str(v.toStringRef().c_str());
  if (v.isTensor()) return nb::cast(v.toTensor());
  nb::list out;  // the plan saves nothing else but lists
  for (const auto& e : v.toListRef()) out.append(from_ivalue(e));
  return out;
}
}  // namespace

void bind_frugal(nb::module_& m) {
  using TL = std::vector<at::Tensor>;
  m.def("frugal_shard_stats_numel",
        [](const TL& exp_avgs, const std::vector<int64_t>& modes) {
          return frugal_shard_stats_numel(exp_avgs, modes);
        },
        nb::arg("exp_avgs"), nb::arg("modes"),
        "Float64 values of frugal_shard_stats_'s buffer: the moments' size of every left-"
        "projected tensor.");
  m.def("frugal_round", &frugal_round, nb::arg("x"), "Python's round(): ties to even.");
  m.def("frugal_select_blocks",
        [](int64_t n, int64_t k, const std::string& order, int64_t cursor, at::Tensor rng_state) {
          auto active = frugal_select_blocks(n, k, order, cursor, rng_state);
          return std::make_tuple(active, cursor, rng_state);
        },
        nb::arg("n"), nb::arg("k"), nb::arg("order"), nb::arg("cursor"), nb::arg("rng_state"),
        "(sorted active block indices, next cursor, next rng_state).");
  m.def("frugal_select_indices",
        [](int64_t total, int64_t k, at::Tensor rng_state) {
          auto idx = frugal_select_indices(total, k, rng_state);
          return std::make_tuple(idx, rng_state);
        },
        nb::arg("total"), nb::arg("k"), nb::arg("rng_state"),
        "(sorted int32 indices of randperm(total)[:k], next rng_state).");
  m.def("frugal_projection",
        [](const at::Tensor& grad, int64_t rank, bool right, const std::string& kind,
           at::Tensor rng_state) {
          auto proj = frugal_projection(grad, rank, right, kind, rng_state);
          return std::make_tuple(proj, rng_state);
        },
        nb::arg("grad"), nb::arg("rank"), nb::arg("right"), nb::arg("kind"), nb::arg("rng_state"),
        "(projection matrix, next rng_state); kind: 'svd', 'random' or 'randperm'.");

  // The mode and change codes of FrugalPlan's answers (ints in its lists), named once here.
  nb::enum_<FrugalMode>(m, "FrugalMode", nb::is_arithmetic(), "frugal.h's FrugalMode.")
      .value("Adam", FrugalMode::Adam).value("ActiveBlock", FrugalMode::ActiveBlock)
      .value("FreeBlock", FrugalMode::FreeBlock).value("Columns", FrugalMode::Columns)
      .value("Rows", FrugalMode::Rows).value("RandK", FrugalMode::RandK)
      .value("ProjRight", FrugalMode::ProjRight).value("ProjLeft", FrugalMode::ProjLeft);
  nb::enum_<FrugalStateChange>(m, "FrugalStateChange", nb::is_arithmetic(),
                               "frugal_plan.h's FrugalStateChange.")
      .value("None_", FrugalStateChange::None).value("Keep", FrugalStateChange::Keep)
      .value("Carry", FrugalStateChange::Carry).value("Start", FrugalStateChange::Start)
      .value("Drop", FrugalStateChange::Drop);
  nb::class_<FrugalSelection>(m, "FrugalSelection", "FrugalPlan's selection (frugal_plan.h).")
      .def_ro("t", &FrugalSelection::t)
      .def_ro("cursor", &FrugalSelection::cursor)
      .def_ro("block_cycle", &FrugalSelection::block_cycle)
      .def_ro("active", &FrugalSelection::active)
      .def_ro("cycle", &FrugalSelection::cycle)
      .def_ro("rng", &FrugalSelection::rng)
      .def_ro("held", &FrugalSelection::held);
  nb::class_<FrugalStepDecision>(m, "FrugalStepDecision",
                                 "One step's decision (frugal_plan.h); modes and changes "
                                 "as FrugalMode / FrugalStateChange codes.")
      .def_ro("selection", &FrugalStepDecision::selection)
      .def_ro("modes", &FrugalStepDecision::modes)
      .def_ro("changes", &FrugalStepDecision::changes)
      .def_ro("subspaces", &FrugalStepDecision::subspaces)
      .def_ro("repack", &FrugalStepDecision::repack);
  using Spec = std::tuple<std::string, std::vector<int64_t>, std::string, bool>;
  nb::class_<FrugalPlan, OptimizerPlan>(m, "FrugalPlan",
                                        "memopt::FrugalPlan: every decision FRUGAL makes.")
      .def("__init__",
           [](FrugalPlan* self, const std::vector<Spec>& tensors, double density,
              int64_t update_gap, std::string selection, std::string block_order,
              std::string state_free, bool reset_statistics, std::optional<int64_t> seed,
              bool proj_embeds, bool proj_norms, bool proj_logits, int64_t state_bits,
              std::string embeddings) {
             std::vector<FrugalTensor> specs;
             for (const auto& [name, shape, role, heads_unknown] : tensors)
               specs.push_back({name, shape, role_from_string(role), heads_unknown});
             new (self) FrugalPlan(specs, FrugalConfig{density, update_gap, std::move(selection),
                                                       std::move(block_order),
                                                       std::move(state_free), reset_statistics,
                                                       seed, proj_embeds, proj_norms,
                                                       proj_logits, state_bits,
                                                       std::move(embeddings)});
           },
           nb::arg("tensors"), nb::arg("density"), nb::arg("update_gap"), nb::arg("selection"),
           nb::arg("block_order"), nb::arg("state_free"), nb::arg("reset_statistics"),
           nb::arg("seed").none(), nb::arg("proj_embeds"), nb::arg("proj_norms"),
           nb::arg("proj_logits"), nb::arg("state_bits") = 32, nb::arg("embeddings") = "adamw",
           "tensors: (name, shape, role, heads_unknown) of every parameter, in optimizer order.")
      .def_prop_ro("projectable", &FrugalPlan::projectable)
      .def_prop_ro("rule", [](const FrugalPlan& p) { return static_cast<int64_t>(p.rule()); })
      .def_prop_ro("blocks_per_cycle", &FrugalPlan::blocks_per_cycle)
      .def_prop_ro("selection", &FrugalPlan::selection)
      .def("mode", [](const FrugalPlan& p, int64_t j, const FrugalSelection* sel) {
             return static_cast<int64_t>(sel ? p.mode(j, *sel) : p.mode(j));
           }, nb::arg("j"), nb::arg("selection").none() = nb::none())
      .def("moment_shape", [](const FrugalPlan& p, int64_t j, int64_t mode) {
             return p.moment_shape(j, static_cast<FrugalMode>(mode));
           }, nb::arg("j"), nb::arg("mode"))
      .def("subspace_shape", [](const FrugalPlan& p, int64_t j, int64_t mode) {
             return p.subspace_shape(j, static_cast<FrugalMode>(mode));
           }, nb::arg("j"), nb::arg("mode"))
      .def("subspace_is_index", &FrugalPlan::subspace_is_index, nb::arg("j"))
      .def("layout", [](const FrugalPlan& p, int64_t i, int64_t mode) {
             return state_tuples(p.layout(i, static_cast<FrugalMode>(mode)));
           }, nb::arg("i"), nb::arg("mode"),
           "Tensor i's state in `mode` (as OptimizerPlan.state; empty: none).")
      .def("per_row_v", &FrugalPlan::per_row_v, nb::arg("i"),
           "Whether tensor i is in the embedding mode (embeddings='adam_mini').")
      .def("row_blocks", &FrugalPlan::row_blocks, nb::arg("i"),
           "Tensor i's per-row blocks for the Adam-mini op (embedding mode only).")
      .def("block", &FrugalPlan::block, nb::arg("i"),
           "Tensor i's projectable number j, or -1 (plain AdamW).")
      .def("add_adamw", &FrugalPlan::add_adamw, nb::arg("shapes"),
           "Tensors of a param group added later: plain AdamW, outside the selection.")
      .def("begin_step", &FrugalPlan::begin_step, nb::arg("with_grad"), nb::arg("holding"),
           nb::arg("gradient"))
      .def("commit", &FrugalPlan::commit, nb::arg("decision"))
      .def("steady", &FrugalPlan::steady, nb::arg("with_grad"), nb::arg("holding"),
           nb::arg("pending"))
      .def("advance", &FrugalPlan::advance, nb::arg("steps"))
      .def("save", [](const FrugalPlan& p, const std::vector<int64_t>& holding) {
             nb::dict out;
             for (const auto& [key, value] : p.save(holding)) out[key.c_str()] = from_ivalue(value);
             return out;
           }, nb::arg("holding"))
      .def("read", [](const FrugalPlan& p, nb::dict saved) {
             FrugalSavedFields fields;
             for (auto [key, value] : saved)
               if (nb::isinstance<nb::str>(key))
                 fields.emplace_back(nb::cast<std::string>(key), to_ivalue(value));
             return p.read(fields);
           }, nb::arg("saved"))
      .def("adopt", &FrugalPlan::adopt, nb::arg("selection"))
      .def("holders", &FrugalPlan::holders, nb::arg("selection"), nb::arg("holding"))
      .def("check_loaded", &FrugalPlan::check_loaded, nb::arg("j"), nb::arg("selection"),
           nb::arg("has_state"), nb::arg("subspace").none());
}
