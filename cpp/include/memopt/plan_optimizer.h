// memopt::PlanOptimizer, the one LibTorch front end: a torch::optim::Optimizer that applies an
// OptimizerPlan (plan.h) to plain per-parameter state and runs one fused op call per param
// group. Every memopt LibTorch optimizer is this template over its options, plus its plan and
// its op's arguments.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "memopt/common.h"
#include "memopt/device_counters.h"
#include "memopt/layout.h"
#include "memopt/nonfinite.h"
#include "memopt/optimizer_options.h"
#include "memopt/param_state.h"
#include "memopt/plan.h"

namespace memopt {

// Options: declared with MEMOPT_OPTIONS (optimizer_options.h), plus `void check() const` for
// its own fields. Plan: an OptimizerPlan (BlockPlan, ApolloPlan, FrugalPlan).
template <typename Options, typename Plan>
class PlanOptimizer : public torch::optim::Optimizer {
 public:
  const Plan& plan() const { return plan_; }
  // Steps left out because a gradient was not finite (the defaults' nonfinite "skip"); saved.
  // Steps decided on a device are counted there: this reads the count (a synchronisation).
  int64_t skipped_steps() const {
    return skipped_steps_ + counters_.skipped();
  }
  // Steps whose skip the host decided under nonfinite "skip" (each a synchronisation on a GPU):
  // every step on the CPU; on a GPU only those the optimizer's schedule needs (APOLLO's
  // projection refreshes, FRUGAL's new cycles: about one per gap). Not saved.
  int64_t host_decided_steps() const { return host_decided_steps_; }
  // A parameter's state, or nullptr before its first step.
  const ParamState* state_of(const at::Tensor& param) const {
    auto it = state_.find(param.unsafeGetTensorImpl());
    return it == state_.end() ? nullptr : static_cast<const ParamState*>(it->second.get());
  }

  // Runs `closure` (if given) with grad mode on, then steps every parameter with a gradient.
  // Bad input (dtype, shape, device, hyperparameters) raises before anything is written.
  // nonfinite "skip" on a GPU (nonfinite.h device_skip_types) hands the ops the step's flag
  // (their found_inf: nothing is read back) unless decides_on_device() says the host must see
  // it; the step counters then move to the parameters' devices, where the ops advance them.
  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure != nullptr) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    std::vector<GroupLists> lists(param_groups_.size());
    std::vector<at::Tensor> params, grads;  // every group's, in order
    for (size_t i = 0; i < lists.size(); ++i) {
      validate_options(group_options(i));
      for (const auto& p : param_groups_[i].params()) {
        if (!p.grad().defined()) continue;
        lists[i].params.push_back(p);
        lists[i].grads.push_back(p.grad());
        params.push_back(p);
        grads.push_back(p.grad());
      }
    }
    at::Tensor found;  // the step's flag, when the device decides
    if (skips_nonfinite(static_cast<const Options&>(defaults()).nonfinite())) {
      found = device_found_inf(grads, lists);
      if (!found.defined()) {
        ++host_decided_steps_;
        count_device_steps();
        counters_.bring_home(params, [this](void* key) { return mutable_state(key); });
        if (any_nonfinite(grads)) {
          ++skipped_steps_;  // and nothing changes
          return loss;
        }
      }
    }
    // Every group's call is decided and validated before any runs, so that bad input anywhere
    // raises with parameters, state and plan untouched.
    StateChanges changes = begin_step(lists);
    const auto fresh_counts =
        found.defined()
            ? counters_.move_beside(
                  params, [this](void* key) { return mutable_state(key); },
                  [&changes](void* key) {
                    auto it = changes.find(key);
                    return it == changes.end() ? nullptr : it->second.get();
                  })
            : DeviceCounters::Fresh{};
    std::vector<OpCall> calls;
    for (size_t i = 0; i < lists.size(); ++i) {
      for (const auto& p : lists[i].params) {
        auto it = changes.find(p.unsafeGetTensorImpl());
        lists[i].states.push_back(it != changes.end() ? it->second.get() : state_of(p));
      }
      if (lists[i].params.empty()) continue;
      for (OpCall& call : group_calls(group_options(i), lists[i])) {
        call.found_inf = found;
        dispatch(call, /*validate=*/true);
        calls.push_back(std::move(call));
      }
    }
    counters_.adopt(fresh_counts);
    for (auto& [key, state] : changes) {
      if (state) state_[key] = std::move(state);
      else state_.erase(key);
    }
    commit_step(found);
    for (const auto& call : calls) dispatch(call, /*validate=*/false);
    if (found.defined()) counters_.stepped(params, found);
    return loss;
  }

  // LibTorch's add_param_group replaces a non-built-in optimizer's group options by the
  // defaults; this one keeps the group's own options (validated) and adds it to the plan.
  // Everything is checked before the group is added, so a bad group changes nothing.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
    const Options* own = own_options(param_group);
    for (const auto& p : param_group.params())
      TORCH_CHECK_VALUE(!positions_.count(p.unsafeGetTensorImpl()),
                        "add_param_group: a parameter is already in the optimizer");
    extend_plan(param_group.params(), own ? *own : static_cast<const Options&>(defaults()));
    torch::optim::Optimizer::add_param_group(param_group);
    if (own) param_groups_.back().set_options(std::make_unique<Options>(*own));
    index_params(param_group.params());
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    torch::optim::serialize<ParamState, Options>(archive, *this);
    archive.write("skipped_steps", c10::IValue(skipped_steps()));
  }

  // Raises, leaving state and options as they were, unless the checkpoint has this optimizer's
  // groups, group sizes and, for every saved state, the plan's layout (OptimizerPlan::check_saved).
  void load(torch::serialize::InputArchive& archive) override {
    // torch::optim::serialize(archive, optimizer) would move state in while it checks; the same
    // archive layout is read here into temporaries and committed only when all of it fits.
    c10::IValue version;
    archive.read("pytorch_version", version);
    TORCH_CHECK_VALUE(version.isString() && version.toStringRef() == "1.5.0",
                      "not a LibTorch optimizer checkpoint (unknown format version)");
    torch::serialize::InputArchive state_archive, groups_archive;
    archive.read("state", state_archive);
    archive.read("param_groups", groups_archive);
    ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>> saved, state;
    torch::optim::detail::serialize<ParamState>(state_archive, saved);
    using SavedOptions = std::unique_ptr<torch::optim::OptimizerOptions>;
    std::vector<std::pair<std::vector<std::string>, SavedOptions>> groups;
    torch::optim::detail::serialize<Options>(groups_archive, groups);
    TORCH_CHECK_VALUE(groups.size() == param_groups_.size(), "checkpoint has ", groups.size(),
                      " param groups but the optimizer has ", param_groups_.size());
    for (size_t i = 0; i < groups.size(); ++i) {
      const auto& keys = groups[i].first;
      const auto& params = param_groups_[i].params();
      TORCH_CHECK_VALUE(keys.size() == params.size(), "checkpoint group ", i, " has ",
                        keys.size(), " parameters but the optimizer's has ", params.size());
      validate_options(static_cast<const Options&>(*groups[i].second));
      for (size_t j = 0; j < params.size(); ++j) {
        // Saved keys are the saving process's TensorImpl addresses; parameters match by position.
        auto it = saved.find(reinterpret_cast<void*>(std::stoull(keys[j])));  // NOLINT
        if (it == saved.end()) continue;
        auto& s = static_cast<ParamState&>(*it->second);
        const auto& p = params[j];
        const StateLayout layout = loaded_layout(position(p));
        OptimizerPlan::check_saved_state(layout, s.tensors, p.scalar_type(),
                                         "checkpoint state of parameter " + std::to_string(j) +
                                             " in group " + std::to_string(i));
        // The archive loads onto the CPU; state lives where make_state puts it, elementwise
        // state in the parameter's layout (a contiguous checkpoint into a channels_last model).
        for (const auto& spec : layout) {
          const at::Tensor& v = s.at(spec.key);
          const auto on = v.options().device(state_device(spec, p));
          s.set(spec.key, state_like_param(v.reshape(spec.shape),
                                           spec.follows_param ? p : at::Tensor(), on));
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
    counters_.reset();  // the loaded counters are on the CPU, exact
    state_ = std::move(state);
    for (size_t i = 0; i < groups.size(); ++i)
      param_groups_[i].set_options(std::move(groups[i].second));
  }

 protected:
  // One group's parameters with a gradient, and their states (nullptr: none; Frugal's
  // state-free tensors).
  struct GroupLists {
    std::vector<at::Tensor> params, grads;
    std::vector<const ParamState*> states;
    std::vector<at::Tensor> list(const std::string& key) const {  // each state's `key`
      std::vector<at::Tensor> out;
      for (const auto* s : states) out.push_back(s->at(key));
      return out;
    }
  };
  // One step's new states by TensorImpl* (nullptr: the parameter's state is dropped).
  using StateChanges = ska::flat_hash_map<void*, std::unique_ptr<ParamState>>;
  // memopt::<op>(args...); its validator memopt::check_<op> takes the same arguments.
  struct OpCall {
    std::string op;
    std::vector<c10::IValue> args;
    // The moments the op can keep in 8 bits, in its order (the op's state_scales argument).
    std::vector<std::string> coded_keys;
    at::Tensor found_inf;  // the op's found_inf (undefined: None)
  };

  // Groups that carry options keep them as given (LibTorch merges group options only for its
  // own optimizer types). `plan_order`: the parameters in the plan's order (empty: their order
  // over the groups); a group added later takes the next positions.
  PlanOptimizer(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                const Options& defaults, Plan&& plan,
                const std::vector<at::Tensor>& plan_order = {})
      : torch::optim::Optimizer(param_groups, std::make_unique<Options>(defaults)),
        plan_(std::move(plan)) {
    validate_options(defaults);
    std::vector<at::Tensor> all;
    for (size_t i = 0; i < param_groups.size(); ++i) {
      if (const Options* own = own_options(param_groups[i]))
        param_groups_[i].set_options(std::make_unique<Options>(*own));
      all.insert(all.end(), param_groups[i].params().begin(), param_groups[i].params().end());
    }
    index_params(plan_order.empty() ? all : plan_order);
    // LibTorch only rejects a parameter seen twice once it has state; a repeat here would be
    // stepped twice per step with one shared state.
    TORCH_CHECK_VALUE(positions_.size() == all.size(),
                      "a parameter appears more than once in the optimizer");
  }

  const Options& group_options(size_t group) const {
    return static_cast<const Options&>(param_groups_[group].options());
  }
  // The parameter's position in the plan (raises for a tensor the optimizer does not have).
  int64_t position(const at::Tensor& param) const {
    auto it = positions_.find(param.unsafeGetTensorImpl());
    TORCH_CHECK_VALUE(it != positions_.end(), "tensor of shape ", param.sizes(),
                      " is not a parameter of this optimizer");
    return it->second;
  }
  // Where a state tensor of `p` lives (plan.h state_on_host).
  static at::Device state_device(const StateSpec& spec, const at::Tensor& p) {
    return state_on_host(spec.dtype, spec.shape) ? at::Device(at::kCPU) : p.device();
  }
  // Zeroed (or filled) state as `layout` says, with a zero float32 CPU step: elementwise state
  // in the parameter's memory layout (layout.h), so that a dense parameter steps without
  // staging; each tensor where state_device says.
  static std::unique_ptr<ParamState> make_state(const at::Tensor& p, const StateLayout& layout) {
    auto s = std::make_unique<ParamState>();
    s->tensors.emplace_back("step", at::zeros({}, at::kFloat));
    for (const auto& spec : layout) {
      const auto on = p.options().dtype(resolve_dtype(spec.dtype, p.scalar_type()))
                          .device(state_device(spec, p));
      at::Tensor t = spec.shape.empty()
                         ? at::zeros({}, on)
                         : state_zeros(spec.shape, spec.follows_param ? p : at::Tensor(), on);
      if (spec.fill != 0.0) t.fill_(spec.fill);
      s->tensors.emplace_back(spec.key, std::move(t));
    }
    return s;
  }
  // `args`, then the group's lr (a float64 tensor), beta1, beta2, eps, weight_decay, then `tail`:
  // the argument order of every op.
  static OpCall adam_call(std::string op, std::vector<c10::IValue> args, const Options& o,
                          const std::vector<c10::IValue>& tail = {},
                          std::vector<std::string> coded_keys = {}) {
    for (c10::IValue v : {c10::IValue(at::scalar_tensor(o.lr(), at::kDouble)),
                          c10::IValue(std::get<0>(o.betas())), c10::IValue(std::get<1>(o.betas())),
                          c10::IValue(o.eps()), c10::IValue(o.weight_decay())})
      args.push_back(std::move(v));
    args.insert(args.end(), tail.begin(), tail.end());
    return {std::move(op), std::move(args), std::move(coded_keys)};
  }
  // memopt::adam_mini_ over the tensors of `l`, each with its encoded blocks `blocks(param)`:
  // AdamMini's call, and APOLLO's and FRUGAL's embedding mode (one block per row).
  template <typename Blocks>
  static OpCall adam_mini_call(const Options& o, const GroupLists& l, const Blocks& blocks) {
    std::vector<int64_t> all;
    for (const auto& p : l.params) {
      const std::vector<int64_t> b = blocks(p);
      all.insert(all.end(), b.begin(), b.end());
    }
    return adam_call("adam_mini_", {l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
                                    l.list("step"), all},
                     o, {}, {"exp_avg"});
  }
  // A plan that decides state_bits once (AdamW's, Adam-mini's) refuses a group that asks for
  // other bits: its state was laid out with the plan's.
  static void check_group_state_bits(const Options& o, int64_t planned) {
    TORCH_CHECK_VALUE(o.state_bits() == planned, "state_bits is the optimizer's (its defaults', ",
                      planned, "); a param group cannot set ", o.state_bits());
  }
  // The op's state_scales (memopt/common.h): None when no moment of `keys` holds 8-bit codes,
  // else per key one tensor per parameter, its "<key>_scales" or an empty one (also for a
  // parameter without state: FRUGAL's free blocks).
  static c10::IValue state_scales(const GroupLists& l, const std::vector<std::string>& keys) {
    const auto coded = [](const ParamState* s, const std::string& k) {
      return s != nullptr && s->has(k + "_scales");
    };
    bool any = false;
    for (const auto* s : l.states)
      for (const auto& k : keys) any = any || coded(s, k);
    if (!any) return c10::IValue();
    std::vector<at::Tensor> out;
    for (const auto& k : keys)
      for (const auto* s : l.states)
        out.push_back(coded(s, k) ? s->at(k + "_scales") : at::empty({0}, at::kFloat));
    return out;
  }
  // As torch.ops.memopt.<op> (the device's kernel), or its validator.
  static void dispatch(const OpCall& call, bool validate) {
    std::vector<c10::IValue> stack = call.args;
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
        ((validate ? "memopt::check_" : "memopt::") + call.op).c_str(), "");
    // A boxed call takes every argument: the trailing ones a call leaves out (state_scales, ...)
    // get their schema defaults.
    const auto& args = op.schema().arguments();
    for (size_t k = stack.size(); k < args.size(); ++k)
      stack.push_back(args[k].default_value().value_or(c10::IValue()));
    if (call.found_inf.defined()) {
      const auto k = op.schema().argumentIndexWithName("found_inf");
      TORCH_INTERNAL_ASSERT(k.has_value(), "memopt::", call.op, " takes no found_inf");
      stack[*k] = call.found_inf;
    }
    op.callBoxed(&stack);
  }
  // op_call's call with every op's last arguments: `rounding` (memopt/rounding.h) and
  // `weight_scales` (None: the LibTorch classes train float parameters; int8 weights are the
  // Python front end's, memopt_core.quantize_weights_), and for an op with 8-bit-capable
  // moments its `state_scales`.
  OpCall full_call(const Options& o, const GroupLists& l) const {
    return with_last_args(op_call(o, l), o, l);
  }
  // `call` (of the tensors of `l`) with those last arguments.
  OpCall with_last_args(OpCall call, const Options& o, const GroupLists& l) const {
    call.args.emplace_back(rounding(o, l.params));
    call.args.emplace_back(c10::IValue());
    if (!call.coded_keys.empty()) call.args.emplace_back(state_scales(l, call.coded_keys));
    return call;
  }
  // Every op's last argument, `rounding` (memopt/rounding.h): [] or, with the group's
  // stochastic_rounding, [seed, counter, each parameter's position over the groups] (the
  // Python front end's ids: what a checkpoint numbers parameters by).
  std::vector<int64_t> rounding(const Options& o, const std::vector<at::Tensor>& params) const {
    if (!o.stochastic_rounding()) return {};
    ska::flat_hash_map<void*, int64_t> position;
    for (const auto& group : param_groups_)
      for (const auto& q : group.params())
        position.emplace(q.unsafeGetTensorImpl(), static_cast<int64_t>(position.size()));
    std::vector<int64_t> out{o.rounding_seed(), rounding_counter()};
    for (const auto& p : params) out.push_back(position.at(p.unsafeGetTensorImpl()));
    return out;
  }
  // The rounding counter: it must change every step for tensors without a step count.
  virtual int64_t rounding_counter() const { return 0; }
  // Adam's hyperparameters, the nonfinite policy, then the options' check() (raises naming
  // the key).
  static void validate_options(const Options& o) {
    check_adam_hparams(o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(),
                       o.weight_decay());
    TORCH_CHECK_VALUE(o.rounding_seed() >= 0, "rounding_seed must be >= 0, got ",
                      o.rounding_seed());
    skips_nonfinite(o.nonfinite());
    check_state_bits(o.state_bits());
    o.check();
  }

  Plan plan_;  // every decision; the hooks below apply it

  // Adds the parameters of a group added after construction to the plan (may raise to refuse).
  virtual void extend_plan(const std::vector<at::Tensor>& params, const Options& options) = 0;
  virtual OpCall op_call(const Options& options, const GroupLists& lists) const = 0;
  // The op calls that step one group: full_call, one op for all its tensors, unless an
  // optimizer steps some of them with another op (FRUGAL's embedding mode).
  virtual std::vector<OpCall> group_calls(const Options& options, const GroupLists& lists) const {
    return {full_call(options, lists)};
  }
  // The step's state changes, decided before anything is written (may raise): by default the
  // plan's state for each parameter with a gradient and none yet. `lists` have no states yet.
  virtual StateChanges begin_step(const std::vector<GroupLists>& lists) {
    StateChanges fresh;
    for (const auto& l : lists)
      for (const auto& p : l.params)
        if (!state_of(p)) fresh[p.unsafeGetTensorImpl()] = make_state(p, plan_.state(position(p)));
    return fresh;
  }
  // Adopts begin_step's decision once every group's call has passed its validator; `found`:
  // the step's flag when its skip is decided on the device (undefined: the step is taken).
  virtual void commit_step(const at::Tensor& found) {}
  // Whether the skip of a step of `lists` (every parameter with a gradient) may be decided on
  // the device, where the ops cannot tell the host whether they stepped: by default always;
  // an optimizer whose schedule reads step counts on the host says where it must not.
  virtual bool decides_on_device(const std::vector<GroupLists>& lists) const { return true; }
  // Before a step decided on the host: counts what steps decided on the device left uncounted
  // on the host (FRUGAL's plan count).
  virtual void count_device_steps() {}
  // (lo, hi): the bounds of param's step count (it has state) that the host knows without
  // reading a device: exact for a counter on the CPU; for one moved to the device, its count
  // then plus up to one per step decided on the device since (each taken or skipped).
  std::pair<int64_t, int64_t> step_range(const at::Tensor& param) const {
    return counters_.range(param, *state_of(param));
  }
  // The layout a loaded state of parameter i must have (Frugal: under the loaded selection).
  virtual StateLayout loaded_layout(int64_t i) const { return plan_.state(i); }

 private:
  // The group's own options (validated), or nullptr where it has none.
  static const Options* own_options(const torch::optim::OptimizerParamGroup& group) {
    if (!group.has_options()) return nullptr;
    const auto* options = dynamic_cast<const Options*>(&group.options());
    TORCH_CHECK_TYPE(options != nullptr, "a param group carries options of another optimizer");
    validate_options(*options);
    return options;
  }
  void index_params(const std::vector<at::Tensor>& params) {
    for (const auto& p : params)
      positions_.emplace(p.unsafeGetTensorImpl(), static_cast<int64_t>(positions_.size()));
  }

  // The step's found_inf for the ops when its skip is decided on the device: every gradient
  // on one device of device_skip_types() and decides_on_device(); else undefined.
  at::Tensor device_found_inf(const std::vector<at::Tensor>& grads,
                              const std::vector<GroupLists>& lists) const {
    if (grads.empty()) return {};
    const c10::Device device = grads.front().device();
    const auto& types = device_skip_types();
    if (std::find(types.begin(), types.end(), device.type()) == types.end()) return {};
    for (const auto& g : grads)
      if (g.device() != device) return {};
    for (const auto& l : lists)
      for (const auto& p : l.params)
        if (p.device() != device) return {};
    if (!decides_on_device(lists)) return {};
    return nonfinite_flag(grads);
  }
  ParamState* mutable_state(void* key) {
    auto it = state_.find(key);
    return it == state_.end() ? nullptr : static_cast<ParamState*>(it->second.get());
  }

  ska::flat_hash_map<void*, int64_t> positions_;  // TensorImpl* -> position in the plan
  int64_t skipped_steps_ = 0;
  DeviceCounters counters_;  // the step counters while a GPU decides the skip
  int64_t host_decided_steps_ = 0;
};

}  // namespace memopt
