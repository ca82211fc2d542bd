// The definitions of memopt::PlanOptimizer (plan_optimizer.h), included by each optimizer's
// source file, which instantiates the template for its options:
//   template class memopt::PlanOptimizer<MyOptions>;
#pragma once

#include <torch/optim/serialize.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <unordered_set>

#include "memopt/common.h"
#include "memopt/layout.h"
#include "memopt/nonfinite.h"
#include "memopt/plan_optimizer.h"

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

template <typename Options>
std::vector<at::Tensor> PlanOptimizer<Options>::GroupLists::list(const std::string& key) const {
  std::vector<at::Tensor> out;
  out.reserve(states.size());
  for (const auto* s : states) out.push_back(s->at(key));
  return out;
}

template <typename Options>
PlanOptimizer<Options>::PlanOptimizer(
    const std::vector<torch::optim::OptimizerParamGroup>& param_groups, const Options& defaults,
    const std::vector<at::Tensor>& plan_order)
    : torch::optim::Optimizer(param_groups, std::make_unique<Options>(defaults)) {
  validate_options(defaults);
  // LibTorch only rejects a parameter seen twice once it has state; a repeat here would be
  // stepped twice per step with one shared state.
  std::unordered_set<void*> seen;
  for (size_t i = 0; i < param_groups.size(); ++i) {
    for (const auto& p : param_groups[i].params())
      TORCH_CHECK_VALUE(seen.insert(p.unsafeGetTensorImpl()).second, "param group ", i,
                        ": a parameter appears more than once in the optimizer");
    keep_group_options(i, param_groups[i]);
  }
  if (!plan_order.empty()) {
    TORCH_CHECK(plan_order.size() == seen.size(), "plan_order must list every parameter once");
    index_params(plan_order);
  } else {
    for (const auto& g : param_groups_) index_params(g.params());
  }
}

template <typename Options>
void PlanOptimizer<Options>::validate_options(const Options& o) {
  check_adam_hparams(o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(),
                     o.weight_decay());
  skips_nonfinite(o.nonfinite());
  o.check();
}

template <typename Options>
void PlanOptimizer<Options>::keep_group_options(size_t index,
                                                const torch::optim::OptimizerParamGroup& group) {
  if (!group.has_options()) return;
  const auto* options = dynamic_cast<const Options*>(&group.options());
  TORCH_CHECK_TYPE(options != nullptr, "param group ", index,
                   " carries options of another optimizer type");
  validate_options(*options);
  param_groups_[index].set_options(std::make_unique<Options>(*options));
}

template <typename Options>
void PlanOptimizer<Options>::index_params(const std::vector<at::Tensor>& params) {
  for (const auto& p : params)
    positions_.emplace(p.unsafeGetTensorImpl(), static_cast<int64_t>(positions_.size()));
}

template <typename Options>
void PlanOptimizer<Options>::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  // Everything is checked before the group is added, so a bad group changes nothing.
  const Options* options = static_cast<const Options*>(&defaults());
  if (param_group.has_options()) {
    options = dynamic_cast<const Options*>(&param_group.options());
    TORCH_CHECK_TYPE(options != nullptr, "add_param_group: options of another optimizer type");
    validate_options(*options);
  }
  for (const auto& p : param_group.params())
    TORCH_CHECK_VALUE(!positions_.count(p.unsafeGetTensorImpl()),
                      "add_param_group: a parameter is already in the optimizer");
  extend_plan(param_group.params(), *options);
  torch::optim::Optimizer::add_param_group(param_group);
  keep_group_options(param_groups_.size() - 1, param_group);
  index_params(param_group.params());
}

template <typename Options>
int64_t PlanOptimizer<Options>::position(const at::Tensor& param) const {
  auto it = positions_.find(param.unsafeGetTensorImpl());
  TORCH_CHECK_VALUE(it != positions_.end(), "tensor of shape ", param.sizes(),
                    " is not a parameter of this optimizer");
  return it->second;
}

template <typename Options>
ParamState* PlanOptimizer<Options>::mutable_state(const at::Tensor& param) const {
  auto it = state_.find(param.unsafeGetTensorImpl());
  return it == state_.end() ? nullptr : static_cast<ParamState*>(it->second.get());
}

template <typename Options>
const ParamState* PlanOptimizer<Options>::state_of(const at::Tensor& param) const {
  return mutable_state(param);
}

template <typename Options>
std::unique_ptr<ParamState> PlanOptimizer<Options>::make_state(const at::Tensor& p,
                                                               const StateLayout& layout) {
  auto s = std::make_unique<ParamState>();
  s->tensors.emplace_back("step", torch::zeros({}, torch::kFloat));
  for (const auto& spec : layout) {
    const auto options = p.options().dtype(resolve_dtype(spec.dtype, p.scalar_type()));
    // elementwise state in p's layout (memopt/layout.h): a dense p steps without staging;
    // scalars (seeds, norms) on the CPU, where the ops read them
    at::Tensor t = spec.shape.empty() ? torch::zeros({}, options.device(at::kCPU))
                                      : state_zeros(spec.shape, spec.follows_param ? p : at::Tensor(),
                                                    options);
    if (spec.fill != 0.0) t.fill_(spec.fill);
    s->tensors.emplace_back(spec.key, std::move(t));
  }
  return s;
}

template <typename Options>
torch::Tensor PlanOptimizer<Options>::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  const torch::Tensor loss = evaluate(closure);
  if (skips_step()) return loss;
  // Gather and validate every group before updating any, so bad input anywhere raises with
  // parameters and state untouched. New state joins state_ only once its group has stepped.
  std::vector<GroupLists> lists(param_groups_.size());
  std::vector<std::vector<std::pair<void*, std::unique_ptr<ParamState>>>> fresh(lists.size());
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    for (const auto& p : param_groups_[i].params()) {
      if (!p.grad().defined()) continue;
      ParamState* state = mutable_state(p);
      if (state == nullptr) {
        fresh[i].emplace_back(p.unsafeGetTensorImpl(), make_state(p, plan().state(position(p))));
        state = fresh[i].back().second.get();
      }
      lists[i].params.push_back(p);
      lists[i].grads.push_back(p.grad());
      lists[i].states.push_back(state);
    }
    validate_options(group_options(i));
    if (!lists[i].params.empty()) check_group(group_options(i), lists[i]);
  }
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    if (lists[i].params.empty()) continue;
    update(group_options(i), lists[i]);
    for (auto& [key, state] : fresh[i]) state_[key] = std::move(state);
  }
  return loss;
}

template <typename Options>
bool PlanOptimizer<Options>::skips_step() {
  if (!skips_nonfinite(static_cast<const Options&>(defaults()).nonfinite())) return false;
  std::vector<at::Tensor> grads;
  for (const auto& group : param_groups_)
    for (const auto& p : group.params())
      if (p.grad().defined()) grads.push_back(p.grad());
  if (!any_nonfinite(grads)) return false;
  ++skipped_steps_;
  return true;
}

template <typename Options>
void PlanOptimizer<Options>::save(OutputArchive& archive) const {
  torch::optim::serialize<ParamState, Options>(archive, *this);
  archive.write("skipped_steps", c10::IValue(skipped_steps_));
}

template <typename Options>
void PlanOptimizer<Options>::load(InputArchive& archive) {
  // torch::optim::serialize(archive, optimizer) would move state in while it checks; the same
  // archive layout is read here into temporaries and committed only when all of it fits.
  c10::IValue version;
  archive.read("pytorch_version", version);
  TORCH_CHECK_VALUE(version.isString() && version.toStringRef() == "1.5.0",
                    "not a LibTorch optimizer checkpoint (unknown format version)");
  InputArchive state_archive, groups_archive;
  archive.read("state", state_archive);
  archive.read("param_groups", groups_archive);
  ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>> saved_state;
  torch::optim::detail::serialize<ParamState>(state_archive, saved_state);
  std::vector<std::pair<std::vector<std::string>, std::unique_ptr<torch::optim::OptimizerOptions>>>
      saved_groups;
  torch::optim::detail::serialize<Options>(groups_archive, saved_groups);

  TORCH_CHECK_VALUE(saved_groups.size() == param_groups_.size(), "checkpoint has ",
                    saved_groups.size(), " param groups but the optimizer has ",
                    param_groups_.size());
  ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>> state;
  for (size_t i = 0; i < saved_groups.size(); ++i) {
    const auto& keys = saved_groups[i].first;
    const auto& params = param_groups_[i].params();
    TORCH_CHECK_VALUE(keys.size() == params.size(), "checkpoint group ", i, " has ", keys.size(),
                      " parameters but the optimizer's has ", params.size());
    validate_options(static_cast<const Options&>(*saved_groups[i].second));
    for (size_t j = 0; j < params.size(); ++j) {
      // Saved keys are the saving process's TensorImpl addresses; parameters match by position.
      auto it = saved_state.find(reinterpret_cast<void*>(std::stoull(keys[j])));  // NOLINT
      if (it == saved_state.end()) continue;
      auto& s = static_cast<ParamState&>(*it->second);
      const auto& p = params[j];
      const StateLayout layout = loaded_layout(position(p));
      OptimizerPlan::check_saved_state(layout, s.tensors, p.scalar_type(),
                                       "checkpoint state of parameter " + std::to_string(j) +
                                           " in group " + std::to_string(i));
      // The archive loads onto the CPU; state lives with its parameter, elementwise state in
      // its layout (a contiguous checkpoint into a channels_last model), scalars on the CPU.
      for (const auto& spec : layout) {
        const at::Tensor& v = s.at(spec.key);
        const auto options = v.options().device(spec.shape.empty() ? at::Device(at::kCPU) : p.device());
        s.set(spec.key, state_like_param(v.reshape(spec.shape), spec.follows_param ? p : at::Tensor(),
                                         options));
      }
      s.set("step", s.at("step").to(at::kCPU).reshape({}));
      state[p.unsafeGetTensorImpl()] = std::move(it->second);
    }
  }
  c10::IValue skipped(int64_t{0});  // a checkpoint from before the counter: 0
  archive.try_read("skipped_steps", skipped);
  TORCH_CHECK_VALUE(skipped.isInt() && skipped.toInt() >= 0,
                    "checkpoint: skipped_steps must be an integer >= 0");
  // Exactly the checkpoint: a parameter without saved state has none after the load.
  skipped_steps_ = skipped.toInt();
  state_ = std::move(state);
  for (size_t i = 0; i < saved_groups.size(); ++i)
    param_groups_[i].set_options(std::move(saved_groups[i].second));
}

}  // namespace memopt
