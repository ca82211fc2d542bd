// memopt::ParamState: one parameter's state in the LibTorch optimizers (plan_optimizer.h).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <string>
#include <utility>
#include <vector>

namespace memopt {

// A parameter's state: its plan's tensors by key ("step", then the layout's keys), saved under
// those keys, so checkpoints of every optimizer share one format.
struct ParamState : public torch::optim::OptimizerCloneableParamState<ParamState> {
  std::vector<std::pair<std::string, at::Tensor>> tensors;

  bool has(const std::string& key) const {
    for (const auto& kv : tensors)
      if (kv.first == key) return true;
    return false;
  }
  const at::Tensor& at(const std::string& key) const {  // raises ValueError if there is none
    for (const auto& [k, t] : tensors)
      if (k == key) return t;
    TORCH_CHECK_VALUE(false, "optimizer state has no '", key, "'");
  }
  void set(const std::string& key, at::Tensor value) {
    for (auto& [k, t] : tensors)
      if (k == key) {
        t = std::move(value);
        return;
      }
    tensors.emplace_back(key, std::move(value));
  }
  void serialize(torch::serialize::InputArchive& archive) override {
    tensors.clear();
    for (const auto& key : archive.keys()) {
      torch::Tensor t;  // fresh: try_read set_()s a defined tensor in place
      if (archive.try_read(key, t)) tensors.emplace_back(key, t);
    }
  }
  void serialize(torch::serialize::OutputArchive& archive) const override {
    for (const auto& [key, t] : tensors) archive.write(key, t);
  }
};

}  // namespace memopt
