// The non-finite gradient check shared by the LibTorch optimizers' step().
#include "memopt/nonfinite.h"

#include <map>

namespace memopt {

bool skips_nonfinite(const std::string& nonfinite) {
  TORCH_CHECK_VALUE(nonfinite == "propagate" || nonfinite == "skip",
                    "nonfinite must be 'propagate' or 'skip', got '", nonfinite, "'");
  return nonfinite == "skip";
}

bool any_nonfinite(const std::vector<at::Tensor>& grads) {
  std::map<std::string, std::vector<at::Tensor>> by_device;
  for (const auto& g : grads) by_device[g.device().str()].push_back(g);
  double found = 0.0;
  for (auto& [device, list] : by_device) {
    const auto options = at::TensorOptions().dtype(at::kFloat).device(list.front().device());
    at::Tensor flag = at::zeros({1}, options);
    // inv_scale 1: the gradients keep their values (the kernel multiplies by it in place).
    at::_amp_foreach_non_finite_check_and_unscale_(list, flag, at::ones({1}, options));
    found += flag.item<double>();
  }
  return found > 0.0;
}

}  // namespace memopt
