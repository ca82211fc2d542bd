// _C.OptimizerPlan (memopt/plan.h): the base class every plan's binding derives from
// (nb::class_<XPlan, OptimizerPlan>), so the Python base optimizer reads any plan's state layout
// and checks a checkpoint against it the same way. bind_plan runs before the plans' bindings.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include <torch/csrc/DynamicTypes.h>

#include "memopt/plan.h"
#include "state_tuples.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

void bind_plan(nb::module_& m) {
  nb::enum_<StateDType>(m, "StateDType", nb::is_arithmetic(),
                        "A state tensor's dtype relative to its parameter's (memopt/plan.h).")
      .value("Param", StateDType::Param)
      .value("Float32", StateDType::Float32)
      .value("Int64", StateDType::Int64)
      .value("Int32", StateDType::Int32)
      .value("Scalar", StateDType::Scalar)
      .value("BFloat16", StateDType::BFloat16)
      .value("Int8", StateDType::Int8)
      .value("UInt8", StateDType::UInt8);
  m.def("state_dtype",
        [](StateDType dtype, const at::Tensor& param) {
          auto* d = torch::getTHPDtype(resolve_dtype(dtype, param.scalar_type()));
          return nb::borrow<nb::object>(reinterpret_cast<PyObject*>(d));
        },
        nb::arg("dtype"), nb::arg("param"), "The torch.dtype of a state of `dtype` for `param`.");
  m.def("state_on_host", [](StateDType dtype, std::vector<int64_t> shape) {
          return state_on_host(dtype, shape);
        }, nb::arg("dtype"), nb::arg("shape"),
        "Whether a state of `dtype` and `shape` lives on the CPU whatever its parameter's device "
        "(seeds: memopt/plan.h state_on_host).");

  nb::class_<OptimizerPlan>(m, "OptimizerPlan", "memopt::OptimizerPlan: what every plan answers.")
      .def("__len__", &OptimizerPlan::size)
      .def("state",
           [](const OptimizerPlan& plan, int64_t i) { return state_tuples(plan.state(i)); },
           nb::arg("i"),
           "Tensor i's state but step: [(key, shape, StateDType, follows_param, sharded_along, "
           "fill)] in a fixed key order.")
      .def("check_saved",
           [](const OptimizerPlan& plan, int64_t i,
              const std::vector<std::pair<std::string, std::optional<at::Tensor>>>& saved,
              const at::Tensor& param, const std::string& where) {
             std::vector<std::pair<std::string, at::Tensor>> values;
             for (const auto& [key, value] : saved) values.emplace_back(key, value.value_or(at::Tensor()));
             plan.check_saved(i, values, param.scalar_type(), where);
           },
           nb::arg("i"), nb::arg("saved"), nb::arg("param"), nb::arg("where"),
           "Raises ValueError (TypeError for a dtype) unless `saved`, [(key, tensor or None)] "
           "read from a checkpoint with step, is tensor i's state for a parameter like `param`.");
}
