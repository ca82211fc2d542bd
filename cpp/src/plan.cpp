// What every plan shares: state dtypes and the check of a checkpoint's state against a layout.
#include "memopt/plan.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace memopt {

at::ScalarType resolve_dtype(StateDType dtype, at::ScalarType param) {
  switch (dtype) {
    case StateDType::Param: return param;
    case StateDType::Float32: return at::kFloat;
    case StateDType::Int64: return at::kLong;
    case StateDType::Int32: return at::kInt;
    case StateDType::Scalar: return param == at::kDouble ? at::kDouble : at::kFloat;
  }
  TORCH_CHECK_VALUE(false, "unknown StateDType ", static_cast<int64_t>(dtype));
}

void OptimizerPlan::check_saved_state(const StateLayout& layout,
                                      const std::vector<std::pair<std::string, at::Tensor>>& saved,
                                      at::ScalarType param, const std::string& where) {
  const auto find = [&](const std::string& key) -> const at::Tensor* {
    auto it = std::find_if(saved.begin(), saved.end(), [&](const auto& kv) { return kv.first == key; });
    return it == saved.end() ? nullptr : &it->second;
  };
  const at::Tensor* step = find("step");
  TORCH_CHECK_VALUE(step && step->defined() && step->numel() == 1 &&
                        step->scalar_type() == at::kFloat,
                    where, ": step must be a one-element float32 tensor");
  for (const auto& [key, value] : saved) {
    const bool known = key == "step" || std::any_of(layout.begin(), layout.end(),
                                                     [&](const StateSpec& s) { return s.key == key; });
    TORCH_CHECK_VALUE(known, where, ": has state '", key, "', which this optimizer does not keep",
                      layout.empty() ? " (it keeps none for this tensor)" : "");
  }
  for (const auto& spec : layout) {
    const at::Tensor* t = find(spec.key);
    TORCH_CHECK_VALUE(t && t->defined(), where, " lacks state '", spec.key, "'");
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(spec.shape), where, ": state '", spec.key,
                      "' has shape ", t->sizes(), " but this optimizer keeps ",
                      at::IntArrayRef(spec.shape), " for it");
    const auto want = resolve_dtype(spec.dtype, param);
    const bool ok = t->scalar_type() == want ||
                    (spec.dtype == StateDType::Param && t->scalar_type() == at::kFloat);
    TORCH_CHECK_TYPE(ok, where, ": state '", spec.key, "' has dtype ", t->scalar_type(),
                     " but this optimizer keeps ", want, spec.dtype == StateDType::Param ? " (or float32)" : "");
  }
}

}  // namespace memopt
