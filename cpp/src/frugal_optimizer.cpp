// memopt::Frugal, the LibTorch optimizer: memopt::FrugalPlan's decisions (the same plan as the
// Python front end's, so the same selections and generator draws) applied to plain per-tensor
// state, stepped by the memopt::frugal_ op.
#include "memopt/frugal_optimizer.h"

#include <c10/util/ScopeExit.h>

namespace memopt {

// The parameters and what the plan knows of each, from names (infer_role with names only, as
// the Python front end decides for bare named parameters) ...
Frugal::Described Frugal::described(const NamedParams& named) {
  Described out;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "Frugal: parameter '", name, "' is an undefined tensor");
    const InferredRole r = infer_role(name, p.sizes(), TensorFacts{});
    out.first.push_back(p);
    out.second.push_back({name, p.sizes().vec(), r.info.role,
                          r.info.role == Role::Linear && !r.note.empty()});
  }
  return out;
}

// ... or from explicit roles.
Frugal::Described Frugal::described(
    const std::vector<std::pair<torch::Tensor, Role>>& with_roles) {
  Described out;
  for (const auto& [p, role] : with_roles) {
    const auto name = "parameter " + std::to_string(out.first.size());
    TORCH_CHECK_VALUE(p.defined(), "Frugal: ", name, " is an undefined tensor");
    out.first.push_back(p);
    out.second.push_back({name, p.sizes().vec(), role});
  }
  return out;
}

Frugal::Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config)
    : PlanOptimizer({torch::optim::OptimizerParamGroup(params.first)}, defaults,
                    FrugalPlan(params.second, [&] {
                      config.state_bits = defaults.state_bits();  // the options' (one place)
                      return std::move(config);
                    }())) {
  for (int64_t i : plan_.projectable()) projs_.push_back(params.first[i]);
}

void Frugal::extend_plan(const std::vector<at::Tensor>& params, const FrugalOptions&) {
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& p : params) shapes.push_back(p.sizes().vec());
  plan_.add_adamw(shapes);
}

std::vector<int64_t> Frugal::holding() const {
  std::vector<int64_t> out;
  for (size_t j = 0; j < projs_.size(); ++j)
    if (state_of(projs_[j])) out.push_back(static_cast<int64_t>(j));
  return out;
}

Frugal::OpCall Frugal::op_call(const FrugalOptions& o, const GroupLists& l) const {
  check_group_state_bits(o, plan_.config().state_bits);  // (FrugalConfig::state_bits decides)
  const FrugalSelection* sel = pending_ ? &pending_->selection : nullptr;
  std::vector<at::Tensor> m, v, steps, subspaces;
  std::vector<int64_t> modes;
  for (size_t k = 0; k < l.params.size(); ++k) {
    const auto& p = l.params[k];
    const ParamState* s = l.states[k];
    const auto empty = at::empty({0}, p.options());
    m.push_back(s ? s->at("exp_avg") : empty);
    v.push_back(s ? s->at("exp_avg_sq") : empty);
    steps.push_back(s ? s->at("step") : at::empty({0}, p.options().dtype(at::kFloat)));
    subspaces.push_back(s && s->has("subspace") ? s->at("subspace") : empty);
    const int64_t j = plan_.block(position(p));
    modes.push_back(static_cast<int64_t>(!sel ? FrugalMode::FreeBlock
                                         : j < 0 ? FrugalMode::Adam : plan_.mode(j, *sel)));
  }
  return adam_call("frugal_", {l.params, l.grads, m, v, steps, subspaces, modes}, o,
                   {o.proj_params_lr_scale(), o.state_free_lr_scale(),
                    static_cast<int64_t>(plan_.rule())},
                   {"exp_avg", "exp_avg_sq"});
}

std::vector<Frugal::OpCall> Frugal::group_calls(const FrugalOptions& o,
                                                const GroupLists& l) const {
  GroupLists rows, rest;  // the embedding mode's tensors (per-row v), the others
  for (size_t k = 0; k < l.params.size(); ++k) {
    GroupLists& to = plan_.per_row_v(position(l.params[k])) ? rows : rest;
    to.params.push_back(l.params[k]);
    to.grads.push_back(l.grads[k]);
    to.states.push_back(l.states[k]);
  }
  std::vector<OpCall> calls;
  if (!rows.params.empty())  // (never state-free: not projectable, state from the first step)
    calls.push_back(with_last_args(adam_mini_call(o, rows, [&](const at::Tensor& p) {
                                     return plan_.row_blocks(position(p));
                                   }),
                                   o, rows));
  if (!rest.params.empty()) calls.push_back(full_call(o, rest));
  return calls;
}

Frugal::StateChanges Frugal::begin_step(const std::vector<GroupLists>& lists) {
  // The gradients first, every tensor state-free: the selection may read them ("svd").
  pending_.reset();
  for (size_t i = 0; i < lists.size(); ++i) {
    GroupLists free = lists[i];
    free.states.assign(free.params.size(), nullptr);
    dispatch(full_call(group_options(i), free), /*validate=*/true);
  }
  std::vector<int64_t> with_grad;
  for (size_t j = 0; j < projs_.size(); ++j)
    if (projs_[j].grad().defined()) with_grad.push_back(static_cast<int64_t>(j));
  pending_ = plan_.begin_step(with_grad, holding(), [&](int64_t j) { return projs_[j].grad(); });
  StateChanges changes;
  for (size_t j = 0; j < projs_.size(); ++j) {
    const auto& p = projs_[j];
    const auto change = static_cast<FrugalStateChange>(pending_->changes[j]);
    if (change == FrugalStateChange::Drop) changes[p.unsafeGetTensorImpl()] = nullptr;
    if (change != FrugalStateChange::Start && change != FrugalStateChange::Carry) continue;
    auto s = change == FrugalStateChange::Carry
                 ? std::make_unique<ParamState>(*state_of(p))
                 : make_state(p, plan_.layout(position(p), static_cast<FrugalMode>(pending_->modes[j])));
    if (pending_->subspaces[j].defined()) s->set("subspace", pending_->subspaces[j].to(p.device()));
    changes[p.unsafeGetTensorImpl()] = std::move(s);
  }
  for (const auto& l : lists)  // not projectable: AdamW state from the first gradient
    for (const auto& p : l.params)
      if (plan_.block(position(p)) < 0 && !state_of(p))
        changes[p.unsafeGetTensorImpl()] = make_state(p, plan_.state(position(p)));
  return changes;
}

void Frugal::commit_step(const at::Tensor& found) {
  if (found.defined()) {
    ++uncounted_;
    uncounted_skips_ = add_skip(uncounted_skips_, found);
  } else {
    plan_.commit(*pending_);
  }
  pending_.reset();
}

bool Frugal::decides_on_device(const std::vector<GroupLists>& lists) const {
  std::vector<int64_t> with_grad;
  for (size_t i = 0; i < lists.size(); ++i) {
    if (lists[i].params.empty()) continue;
    if (group_options(i).stochastic_rounding()) return false;
    for (const auto& p : lists[i].params)
      if (!plan_.state(position(p)).empty() && state_of(p) == nullptr) return false;
  }
  for (size_t j = 0; j < projs_.size(); ++j)
    if (projs_[j].grad().defined()) with_grad.push_back(static_cast<int64_t>(j));
  return plan_.steady(with_grad, holding(), uncounted_);
}

void Frugal::count_device_steps() {
  if (uncounted_ == 0) return;
  plan_.advance(uncounted_ - uncounted_skips_.item<int64_t>());
  uncounted_ = 0;
  uncounted_skips_ = at::Tensor();
}

void Frugal::save(torch::serialize::OutputArchive& archive) const {
  // The saved count is the steps taken: const only to torch::optim, the count is brought up to
  // date first (the same steps, now counted).
  const_cast<Frugal*>(this)->count_device_steps();
  PlanOptimizer::save(archive);
  for (const auto& [key, value] : plan_.save(holding())) {
    if (value.isTensor()) archive.write("frugal_" + key, value.toTensor());  // as always saved
    else archive.write("frugal_" + key, value);
  }
}

void Frugal::load(torch::serialize::InputArchive& archive) {
  FrugalSavedFields saved;
  for (const auto& key : FrugalPlan::saved_keys()) {
    c10::IValue value;
    if (archive.try_read("frugal_" + key, value)) saved.emplace_back(key, std::move(value));
  }
  loading_ = plan_.read(saved);
  auto reset = c10::make_scope_exit([this] { loading_.reset(); });
  PlanOptimizer::load(archive);
  plan_.adopt(std::move(*loading_));
  uncounted_ = 0;  // the loaded count replaces the plan's
  uncounted_skips_ = at::Tensor();
}

}  // namespace memopt
