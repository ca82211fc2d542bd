// memopt::ParamState (plan_optimizer.h): a parameter's state tensors by key, saved under them.
#include "memopt/plan_optimizer.h"

#include <algorithm>

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

const at::Tensor& ParamState::at(const std::string& key) const {
  for (const auto& [k, t] : tensors)
    if (k == key) return t;
  TORCH_CHECK_VALUE(false, "optimizer state has no '", key, "'");
}

bool ParamState::has(const std::string& key) const {
  return std::any_of(tensors.begin(), tensors.end(), [&](const auto& kv) { return kv.first == key; });
}

void ParamState::set(const std::string& key, at::Tensor value) {
  for (auto& [k, t] : tensors)
    if (k == key) {
      t = std::move(value);
      return;
    }
  tensors.emplace_back(key, std::move(value));
}

void ParamState::serialize(InputArchive& archive) {
  tensors.clear();
  for (const auto& key : archive.keys()) {
    torch::Tensor t;  // fresh: try_read set_()s a defined tensor in place
    if (archive.try_read(key, t)) tensors.emplace_back(key, t);
  }
}

void ParamState::serialize(OutputArchive& archive) const {
  for (const auto& [key, t] : tensors) archive.write(key, t);
}

}  // namespace memopt
