// The Adam-family LibTorch optimizers: what AdamW and AdamMini share (options and state
// serialization, step, checked load) and AdamW itself. AdamMini's own part: adam_mini_optimizer.cpp.
#include "memopt/optimizers.h"

#include <torch/types.h>
#include <torch/utils.h>

#include <unordered_set>

#include "memopt/adamw.h"
#include "memopt/common.h"
#include "memopt/layout.h"
#include "memopt/nonfinite.h"

namespace memopt {

namespace {
using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

template <typename T>
T read_value(InputArchive& archive, const char* key) {
  c10::IValue value;
  archive.read(key, value);  // raises, naming the key, when the checkpoint lacks it
  return value.to<T>();
}

template <typename Options>
void write_adam_hparams(OutputArchive& archive, const Options& o) {
  archive.write("lr", c10::IValue(o.lr()));
  archive.write("betas", c10::IValue(o.betas()));
  archive.write("eps", c10::IValue(o.eps()));
  archive.write("weight_decay", c10::IValue(o.weight_decay()));
}

template <typename Options>
void read_adam_hparams(InputArchive& archive, Options& o) {
  o.lr(read_value<double>(archive, "lr"));
  o.betas(read_value<typename Options::betas_t>(archive, "betas"));
  o.eps(read_value<double>(archive, "eps"));
  o.weight_decay(read_value<double>(archive, "weight_decay"));
}

template <typename Options>
void check_options(const Options& o) {
  check_adam_hparams(o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(),
                     o.weight_decay());
  skips_nonfinite(o.nonfinite());
  if constexpr (std::is_same_v<Options, ApolloOptions>) check_apollo_options(o);
}
}  // namespace

void AdamWOptions::serialize(InputArchive& archive) { read_adam_hparams(archive, *this); }
void AdamWOptions::serialize(OutputArchive& archive) const { write_adam_hparams(archive, *this); }

void AdamMiniOptions::serialize(InputArchive& archive) {
  read_adam_hparams(archive, *this);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, dim);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, n_heads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, n_kv_heads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, head_dim);
}
void AdamMiniOptions::serialize(OutputArchive& archive) const {
  write_adam_hparams(archive, *this);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dim);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(n_heads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(n_kv_heads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(head_dim);
}

template <typename Derived>
void AdamFamilyParamState<Derived>::serialize(InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg_sq);
}
template <typename Derived>
void AdamFamilyParamState<Derived>::serialize(OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
}

template <typename Options, typename State>
AdamFamily<Options, State>::AdamFamily(
    const std::vector<torch::optim::OptimizerParamGroup>& param_groups, const Options& defaults)
    : torch::optim::Optimizer(param_groups, std::make_unique<Options>(defaults)) {
  check_options(defaults);
  // LibTorch only rejects a parameter seen twice once it has state; a repeat here would be
  // stepped twice per step with one shared state.
  std::unordered_set<void*> seen;
  for (size_t i = 0; i < param_groups.size(); ++i) {
    for (const auto& p : param_groups[i].params())
      TORCH_CHECK_VALUE(seen.insert(p.unsafeGetTensorImpl()).second, "param group ", i,
                        ": a parameter appears more than once in the optimizer");
    keep_group_options(i, param_groups[i]);
  }
}

template <typename Options, typename State>
void AdamFamily<Options, State>::keep_group_options(
    size_t index, const torch::optim::OptimizerParamGroup& group) {
  if (!group.has_options()) return;
  const auto* options = dynamic_cast<const Options*>(&group.options());
  TORCH_CHECK_TYPE(options != nullptr, "param group ", index,
                   " carries options of another optimizer type");
  check_options(*options);
  param_groups_[index].set_options(std::make_unique<Options>(*options));
}

template <typename Options, typename State>
void AdamFamily<Options, State>::add_param_group(
    const torch::optim::OptimizerParamGroup& param_group) {
  // Everything is checked before the group is added, so a bad group changes nothing.
  if (param_group.has_options()) {
    const auto* options = dynamic_cast<const Options*>(&param_group.options());
    TORCH_CHECK_TYPE(options != nullptr, "add_param_group: options of another optimizer type");
    check_options(*options);
  }
  std::unordered_set<void*> seen;
  for (const auto& g : param_groups_)
    for (const auto& p : g.params()) seen.insert(p.unsafeGetTensorImpl());
  for (const auto& p : param_group.params())
    TORCH_CHECK_VALUE(seen.insert(p.unsafeGetTensorImpl()).second,
                      "add_param_group: a parameter is already in the optimizer");
  adopt_params(param_group.params(), param_group.has_options()
                                         ? static_cast<const Options&>(param_group.options())
                                         : static_cast<const Options&>(defaults()));
  torch::optim::Optimizer::add_param_group(param_group);
  keep_group_options(param_groups_.size() - 1, param_group);
}

template <typename Options, typename State>
torch::Tensor AdamFamily<Options, State>::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (skips_step()) return loss;
  // Gather and validate every group before updating any, so bad input anywhere raises with
  // parameters and state untouched. New state joins state_ only once its group has stepped.
  std::vector<GroupLists> lists(param_groups_.size());
  std::vector<std::vector<std::pair<void*, std::unique_ptr<State>>>> fresh(param_groups_.size());
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    for (const auto& p : param_groups_[i].params()) {
      if (!p.grad().defined()) continue;
      void* key = p.unsafeGetTensorImpl();
      auto it = state_.find(key);
      State* state = it == state_.end() ? nullptr : static_cast<State*>(it->second.get());
      if (state == nullptr) {
        auto created = std::make_unique<State>();
        created->step(torch::zeros({}, torch::kFloat));
        // Elementwise moments in p's layout (memopt/layout.h): a dense p steps without staging.
        const at::Tensor& like = moments_follow_param(p) ? p : at::Tensor();
        created->exp_avg(state_zeros(exp_avg_sizes(p), like, p.options()));
        created->exp_avg_sq(state_zeros(exp_avg_sq_sizes(p), like, p.options()));
        init_extra_state(*created, p);
        state = created.get();
        fresh[i].emplace_back(key, std::move(created));
      }
      GroupLists& l = lists[i];
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      l.exp_avgs.push_back(state->exp_avg());
      l.exp_avg_sqs.push_back(state->exp_avg_sq());
      l.steps.push_back(state->step());
      l.states.push_back(state);
    }
    check_options(group_options(i));
    check_group("step (param group " + std::to_string(i) + ")", group_options(i), lists[i]);
  }
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    if (lists[i].params.empty()) continue;
    update(group_options(i), lists[i]);
    for (auto& [key, state] : fresh[i]) state_[key] = std::move(state);
  }
  return loss;
}

template <typename Options, typename State>
bool AdamFamily<Options, State>::skips_step() {
  if (!skips_nonfinite(static_cast<const Options&>(defaults()).nonfinite())) return false;
  std::vector<at::Tensor> grads;
  for (const auto& group : param_groups_)
    for (const auto& p : group.params())
      if (p.grad().defined()) grads.push_back(p.grad());
  if (!any_nonfinite(grads)) return false;
  ++skipped_steps_;
  return true;
}

template <typename Options, typename State>
void AdamFamily<Options, State>::save(OutputArchive& archive) const {
  torch::optim::serialize<State, Options>(archive, *this);
  archive.write("skipped_steps", c10::IValue(skipped_steps_));
}

template <typename Options, typename State>
void AdamFamily<Options, State>::check_loaded_state(State& s, const at::Tensor& param,
                                                    size_t group, size_t index) const {
  const auto where = [&] {
    return "checkpoint state of parameter " + std::to_string(index) + " in group " +
           std::to_string(group);
  };
  TORCH_CHECK_VALUE(s.step().defined() && s.exp_avg().defined() && s.exp_avg_sq().defined(),
                    where(), " lacks step, exp_avg or exp_avg_sq");
  TORCH_CHECK_VALUE(s.step().numel() == 1 && s.step().scalar_type() == at::kFloat, where(),
                    ": step must be a one-element float32 tensor");
  const auto m_sizes = exp_avg_sizes(param);
  TORCH_CHECK_VALUE(s.exp_avg().sizes() == at::IntArrayRef(m_sizes), where(),
                    ": exp_avg has shape ", s.exp_avg().sizes(), " but this optimizer keeps ",
                    at::IntArrayRef(m_sizes), " for it");
  const auto sq_sizes = exp_avg_sq_sizes(param);
  TORCH_CHECK_VALUE(s.exp_avg_sq().sizes() == at::IntArrayRef(sq_sizes), where(),
                    ": exp_avg_sq has shape ", s.exp_avg_sq().sizes(), " but this optimizer keeps ",
                    at::IntArrayRef(sq_sizes), " for it (different shape or blocks)");
  const auto dtype = s.exp_avg().scalar_type();
  TORCH_CHECK_TYPE((dtype == param.scalar_type() || dtype == at::kFloat) &&
                       s.exp_avg_sq().scalar_type() == dtype,
                   where(), ": state dtype ", dtype, " must be float32 or the parameter's ",
                   param.scalar_type());
  // The archive loads onto the CPU; state lives with its parameter.
  s.step(s.step().to(at::kCPU).reshape({}));
  // Copied into the parameter's layout (a contiguous checkpoint into a channels_last model).
  const at::Tensor& like = moments_follow_param(param) ? param : at::Tensor();
  s.exp_avg(state_like_param(s.exp_avg(), like, s.exp_avg().options().device(param.device())));
  s.exp_avg_sq(
      state_like_param(s.exp_avg_sq(), like, s.exp_avg_sq().options().device(param.device())));
  check_extra_state(s, param, where());
}

template <typename Options, typename State>
void AdamFamily<Options, State>::load(InputArchive& archive) {
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
  torch::optim::detail::serialize<State>(state_archive, saved_state);
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
    check_options(static_cast<const Options&>(*saved_groups[i].second));
    for (size_t j = 0; j < params.size(); ++j) {
      // Saved keys are the saving process's TensorImpl addresses; parameters match by position.
      auto it = saved_state.find(reinterpret_cast<void*>(std::stoull(keys[j])));  // NOLINT
      if (it == saved_state.end()) continue;
      check_loaded_state(static_cast<State&>(*it->second), params[j], i, j);
      state[params[j].unsafeGetTensorImpl()] = std::move(it->second);
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

AdamW::AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
             AdamWOptions defaults)
    : AdamFamily(param_groups, defaults) {}

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults)
    : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

std::vector<int64_t> AdamW::exp_avg_sq_sizes(const at::Tensor& param) const {
  return param.sizes().vec();
}

// Through the dispatcher, as torch.ops.memopt.adamw_: the kernel for the parameters' device
// (CPU, or CUDA when built) runs, exactly as for the Python front end.
void AdamW::update(const AdamWOptions& o, const GroupLists& l) {
  call_adamw_op(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps,
                at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()),
                std::get<1>(o.betas()), o.eps(), o.weight_decay(), "torch");
}

template struct AdamFamilyParamState<AdamWParamState>;
template struct AdamFamilyParamState<AdamMiniParamState>;
template struct AdamFamilyParamState<ApolloParamState>;
template class AdamFamily<AdamWOptions, AdamWParamState>;
template class AdamFamily<AdamMiniOptions, AdamMiniParamState>;
template class AdamFamily<ApolloOptions, ApolloParamState>;

}  // namespace memopt
