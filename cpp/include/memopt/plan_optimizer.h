// memopt::PlanOptimizer, the one LibTorch front end: a torch::optim::Optimizer that applies an
// OptimizerPlan (plan.h) to plain per-parameter state and runs one fused op call per param
// group. Every memopt LibTorch optimizer (AdamW, AdamMini, SlimAdam, Apollo, Frugal) is this
// template over its options, plus the few lines that name its plan and its op.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "memopt/plan.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace memopt {

// A parameter's state: its plan's tensors by key ("step", then the layout's keys), saved under
// those keys, so checkpoints of every optimizer share one format.
struct ParamState : public torch::optim::OptimizerCloneableParamState<ParamState> {
  std::vector<std::pair<std::string, at::Tensor>> tensors;

  // The tensor under `key` (raises ValueError if there is none).
  const at::Tensor& at(const std::string& key) const;
  bool has(const std::string& key) const;
  void set(const std::string& key, at::Tensor value);
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// Options: a torch::optim::OptimizerCloneableOptions with Adam's hyperparameters
// (MEMOPT_ADAM_OPTIONS_ARGS) and `void check() const` for its own. The template's definitions are
// in cpp/src/plan_optimizer_impl.h; each optimizer's source file instantiates it for its options.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Signature>();
}

template <typename Options>
class PlanOptimizer : public torch::optim::Optimizer {
 public:
  // Runs `closure` (if given) with grad mode on, then steps every parameter with a gradient.
  // Bad input (dtype, shape, device, hyperparameters) raises before anything is written.
  torch::Tensor step(LossClosure closure = nullptr) override;
  // LibTorch's add_param_group replaces a non-built-in optimizer's group options by the
  // defaults; this one keeps the group's own options (validated) and adds it to the plan.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);
  void save(torch::serialize::OutputArchive& archive) const override;
  // Raises, leaving state and options as they were, unless the checkpoint has this optimizer's
  // groups, group sizes and, for every saved state, the plan's layout (OptimizerPlan::check_saved).
  void load(torch::serialize::InputArchive& archive) override;
  // Steps left out because a gradient was not finite (the defaults' nonfinite "skip"); saved.
  int64_t skipped_steps() const { return skipped_steps_; }
  // A parameter's state, or nullptr before its first step.
  const ParamState* state_of(const at::Tensor& param) const;
  virtual const OptimizerPlan& plan() const = 0;

 protected:
  // One group's parameters with a gradient and their states, as the ops' parallel lists.
  struct GroupLists {
    std::vector<at::Tensor> params, grads;
    std::vector<ParamState*> states;
    std::vector<at::Tensor> list(const std::string& key) const;  // each state's `key`
  };

  // Groups that carry options keep them as given (LibTorch merges group options only for its
  // own optimizer types). `plan_order`: the parameters in the plan's order (empty: their order
  // over the groups); a group added later takes the next positions.
  PlanOptimizer(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                const Options& defaults, const std::vector<at::Tensor>& plan_order = {});

  const Options& group_options(size_t group) const {
    return static_cast<const Options&>(param_groups_[group].options());
  }
  // The parameter's position in the plan (raises for a tensor the optimizer does not have).
  int64_t position(const at::Tensor& param) const;
  ParamState* mutable_state(const at::Tensor& param) const;
  // Calls the op memopt::<name> through the dispatcher (the device's kernel, as the Python front
  // end's torch.ops.memopt.<name>), or with `validate` its validator memopt::check_<name>.
  template <typename Signature, typename... Args>
  static void call_op(const char* name, bool validate, Args&&... args) {
    // looked up per call (a hash lookup): ops of one signature must not share a cached handle
    find_op<Signature>(std::string(validate ? "memopt::check_" : "memopt::") + name)
        .call(std::forward<Args>(args)...);
  }
  // Zeroed (or filled) state as `layout` says, with a zero float32 CPU step.
  static std::unique_ptr<ParamState> make_state(const at::Tensor& param, const StateLayout& layout);

  // Adds the parameters of a group added after construction to the plan (may raise to refuse).
  virtual void extend_plan(const std::vector<at::Tensor>& params, const Options& options) = 0;
  // Everything the group's op checks before it writes (raises on bad input).
  virtual void check_group(const Options& options, const GroupLists& lists) const = 0;
  // The group's single fused op call.
  virtual void update(const Options& options, const GroupLists& lists) = 0;
  // The layout a loaded state of parameter i must have: the plan's (Frugal: under the
  // selection being loaded).
  virtual StateLayout loaded_layout(int64_t i) const { return plan().state(i); }
  // The closure's loss (undefined without one), evaluated with grad mode on.
  static torch::Tensor evaluate(const LossClosure& closure) {
    if (closure == nullptr) return {};
    at::AutoGradMode enable_grad(true);
    return closure();
  }
  // Whether this step must change nothing: nonfinite "skip" and a gradient of the step is not
  // finite (then counted). Called before anything is created or written.
  bool skips_step();
  // Adam's hyperparameters, the nonfinite policy, then the options' own check() (raises
  // naming the key).
  static void validate_options(const Options& options);

  int64_t skipped_steps_ = 0;

 private:
  void keep_group_options(size_t index, const torch::optim::OptimizerParamGroup& group);
  void index_params(const std::vector<at::Tensor>& params);
  ska::flat_hash_map<void*, int64_t> positions_;  // TensorImpl* -> position in the plan
};

}  // namespace memopt
