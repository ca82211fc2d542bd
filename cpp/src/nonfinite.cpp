// The non-finite gradient check shared by the LibTorch optimizers' step().
#include "memopt/nonfinite.h"

#include <map>

namespace memopt {

bool skips_nonfinite(const std::string& nonfinite) {
  TORCH_CHECK_VALUE(nonfinite == "propagate" || nonfinite == "skip",
                    "nonfinite must be 'propagate' or 'skip', got '", nonfinite, "'");
  return nonfinite == "skip";
}

at::Tensor nonfinite_flag(const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(!grads.empty(), "nonfinite_flag: no gradients");
  const auto options = at::TensorOptions().dtype(at::kFloat).device(grads.front().device());
  at::Tensor flag = at::zeros({1}, options);
  // inv_scale 1: the gradients keep their values (the kernel multiplies by it in place).
  at::_amp_foreach_non_finite_check_and_unscale_(grads, flag, at::ones({1}, options));
  return flag;
}

bool any_nonfinite(const std::vector<at::Tensor>& grads) {
  std::map<std::string, std::vector<at::Tensor>> by_device;
  for (const auto& g : grads) by_device[g.device().str()].push_back(g);
  double found = 0.0;
  for (auto& [device, list] : by_device) found += nonfinite_flag(list).item<double>();
  return found > 0.0;
}

std::vector<c10::DeviceType>& device_skip_types() {
  static std::vector<c10::DeviceType> types{c10::DeviceType::CUDA};
  return types;
}

}  // namespace memopt
