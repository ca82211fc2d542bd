// memopt::Frugal, the LibTorch optimizer: memopt::FrugalPlan's decisions (the same plan as the
// Python front end's, so the same selections and generator draws) applied to plain per-tensor
// state, stepped by the memopt::frugal_ op.
#include "memopt/frugal_optimizer.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "plan_optimizer_impl.h"

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

namespace {
// The parameters and what the plan knows of each, from names (infer_role with names only, as
// the Python front end decides for bare named parameters) ...
Frugal::Described described(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  Frugal::Described out;
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
Frugal::Described described(const std::vector<std::pair<torch::Tensor, Role>>& with_roles) {
  Frugal::Described out;
  for (const auto& [p, role] : with_roles) {
    const auto name = "parameter " + std::to_string(out.first.size());
    TORCH_CHECK_VALUE(p.defined(), "Frugal: ", name, " is an undefined tensor");
    out.first.push_back(p);
    out.second.push_back({name, p.sizes().vec(), role});
  }
  return out;
}
}  // namespace

// The empty tensor that stands for a state-free tensor's state in the op's lists (the op ignores
// it), one per (dtype, device) for the optimizer's lifetime, as the Python front end keeps them.
const at::Tensor& Frugal::placeholder(at::ScalarType dtype, const c10::Device& device) const {
  const int64_t key = (static_cast<int64_t>(dtype) << 24) |
                      (static_cast<int64_t>(device.type()) << 12) | (device.index() + 1);
  auto it = empty_.find(key);
  if (it == empty_.end())
    it = empty_.emplace(key, at::empty({0}, at::TensorOptions().dtype(dtype).device(device))).first;
  return it->second;
}

void FrugalOptions::check() const {
  for (double s : {proj_params_lr_scale(), state_free_lr_scale()})
    TORCH_CHECK_VALUE(std::isfinite(s) && s >= 0.0, "Frugal: proj_params_lr_scale and "
                      "state_free_lr_scale must be finite and >= 0, got ", s);
}

void FrugalOptions::serialize(InputArchive& archive) {
  AdamWOptions adam;
  adam.serialize(archive);
  lr(adam.lr()).betas(adam.betas()).eps(adam.eps()).weight_decay(adam.weight_decay());
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, proj_params_lr_scale);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, state_free_lr_scale);
}
void FrugalOptions::serialize(OutputArchive& archive) const {
  AdamWOptions(lr()).betas(betas()).eps(eps()).weight_decay(weight_decay()).serialize(archive);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(proj_params_lr_scale);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(state_free_lr_scale);
}

Frugal::Frugal(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
               FrugalOptions defaults, FrugalConfig config)
    : Frugal(described(named_params), std::move(defaults), std::move(config)) {}

Frugal::Frugal(const std::vector<std::pair<torch::Tensor, Role>>& params_with_roles,
               FrugalOptions defaults, FrugalConfig config)
    : Frugal(described(params_with_roles), std::move(defaults), std::move(config)) {}

Frugal::Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config)
    : PlanOptimizer({torch::optim::OptimizerParamGroup(params.first)}, defaults),
      plan_(params.second, std::move(config)) {
  for (int64_t i : plan_.projectable()) projs_.push_back(params.first[i]);
}

// Parameters of a later group are not in the selection: plain AdamW at the group's lr.
void Frugal::extend_plan(const std::vector<at::Tensor>& params, const FrugalOptions&) {
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& p : params) shapes.push_back(p.sizes().vec());
  plan_.add_adamw(shapes);
}

FrugalMode Frugal::mode(const at::Tensor& p, const FrugalSelection& sel) const {
  const int64_t j = plan_.block(position(p));
  return j < 0 ? FrugalMode::Adam : plan_.mode(j, sel);
}

std::vector<int64_t> Frugal::holding() const {
  std::vector<int64_t> out;
  for (size_t j = 0; j < projs_.size(); ++j)
    if (state_of(projs_[j])) out.push_back(static_cast<int64_t>(j));
  return out;
}

// One group's op call (or its check) under `sel` (nullptr: every tensor state-free); a tensor
// without state (nullptr in l.states) passes the op's placeholders, which it ignores.
void Frugal::run(const FrugalOptions& o, const GroupLists& l, const FrugalSelection* sel,
                 bool check_only) const {
  std::vector<at::Tensor> m, v, steps, subspaces;
  std::vector<int64_t> modes;
  for (size_t k = 0; k < l.params.size(); ++k) {
    const auto& p = l.params[k];
    const ParamState* s = l.states[k];
    const auto& empty = placeholder(p.scalar_type(), p.device());
    m.push_back(s ? s->at("exp_avg") : empty);
    v.push_back(s ? s->at("exp_avg_sq") : empty);
    steps.push_back(s ? s->at("step") : placeholder(at::kFloat, p.device()));
    subspaces.push_back(s && s->has("subspace") ? s->at("subspace") : empty);
    modes.push_back(static_cast<int64_t>(sel ? mode(p, *sel) : FrugalMode::FreeBlock));
  }
  const auto rule = static_cast<int64_t>(plan_.rule());
  if (check_only) {
    check_frugal_inputs(l.params, l.grads, m, v, steps, subspaces, modes,
                        o.proj_params_lr_scale(), o.state_free_lr_scale(), rule);
    return;
  }
  // Through the dispatcher, as torch.ops.memopt.frugal_ (the device's kernel).
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("memopt::frugal_", "")
      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  at::TensorList, at::IntArrayRef, const at::Tensor&, double, double, double,
                  double, double, double, int64_t)>();
  op.call(l.params, l.grads, m, v, steps, subspaces, modes,
          at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()), std::get<1>(o.betas()),
          o.eps(), o.weight_decay(), o.proj_params_lr_scale(), o.state_free_lr_scale(), rule);
}

void Frugal::check_group(const FrugalOptions& o, const GroupLists& l) const {
  run(o, l, &plan_.selection(), true);
}
void Frugal::update(const FrugalOptions& o, const GroupLists& l) {
  run(o, l, &plan_.selection(), false);
}

torch::Tensor Frugal::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  const torch::Tensor loss = evaluate(closure);
  if (skips_step()) return loss;
  // One group's parameters with a gradient and the state `state_for` gives each.
  const auto lists = [&](size_t i, const std::function<ParamState*(const at::Tensor&)>& state_for) {
    GroupLists l;
    for (const auto& p : param_groups_[i].params()) {
      if (!p.grad().defined()) continue;
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      l.states.push_back(state_for(p));
    }
    return l;
  };
  // 1. gradients and options, with every tensor state-free, before anything is selected
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    validate_options(group_options(i));
    run(group_options(i), lists(i, [](const at::Tensor&) { return nullptr; }), nullptr, true);
  }
  // 2. the plan's decision, and the states it asks for as candidates
  std::vector<int64_t> grad_blocks;
  for (size_t j = 0; j < projs_.size(); ++j)
    if (projs_[j].grad().defined()) grad_blocks.push_back(static_cast<int64_t>(j));
  const FrugalStepDecision d =
      plan_.begin_step(grad_blocks, holding(), [&](int64_t j) { return projs_[j].grad(); });
  ska::flat_hash_map<void*, std::unique_ptr<ParamState>> fresh;
  std::vector<void*> dropped;
  for (size_t j = 0; j < projs_.size(); ++j) {
    const auto& p = projs_[j];
    const auto change = static_cast<FrugalStateChange>(d.changes[j]);
    const auto& sub = d.subspaces[j];
    if (change == FrugalStateChange::Drop) dropped.push_back(p.unsafeGetTensorImpl());
    if (change != FrugalStateChange::Start && change != FrugalStateChange::Carry) continue;
    auto s = change == FrugalStateChange::Carry
                 ? std::make_unique<ParamState>(*state_of(p))
                 : make_state(p, plan_.layout(position(p), static_cast<FrugalMode>(d.modes[j])));
    if (sub.defined()) s->set("subspace", sub.to(p.device()));
    fresh[p.unsafeGetTensorImpl()] = std::move(s);
  }
  for (const auto& group : param_groups_)  // not projectable: AdamW state from the first gradient
    for (const auto& p : group.params())
      if (p.grad().defined() && plan_.block(position(p)) < 0 && !state_of(p))
        fresh[p.unsafeGetTensorImpl()] = make_state(p, plan_.state(position(p)));
  // 3. the full check of every group against the candidates
  std::vector<GroupLists> all;
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    all.push_back(lists(i, [&](const at::Tensor& p) -> ParamState* {
      auto f = fresh.find(p.unsafeGetTensorImpl());
      if (f != fresh.end()) return f->second.get();
      return mode(p, d.selection) != FrugalMode::FreeBlock ? mutable_state(p) : nullptr;
    }));
    run(group_options(i), all.back(), &d.selection, true);
  }
  // 4. commit, then run
  for (void* key : dropped) state_.erase(key);
  for (auto& [key, s] : fresh) state_[key] = std::move(s);
  plan_.commit(d);
  for (size_t i = 0; i < param_groups_.size(); ++i)
    if (!all[i].params.empty()) update(group_options(i), all[i]);
  return loss;
}

// The plan's saved fields as archive keys "frugal_<key>" (the generator state as a tensor, as
// checkpoints written before the plan stored it).
void Frugal::save(OutputArchive& archive) const {
  PlanOptimizer::save(archive);
  for (const auto& [key, value] : plan_.save(holding())) {
    if (value.isTensor()) archive.write("frugal_" + key, value.toTensor());
    else archive.write("frugal_" + key, value);
  }
}

void Frugal::load(InputArchive& archive) {
  FrugalSavedFields saved;
  for (const auto& key : FrugalPlan::saved_keys()) {
    if (key == "rng") {
      torch::Tensor rng;
      if (archive.try_read("frugal_rng", rng)) saved.emplace_back(key, rng);
      continue;
    }
    c10::IValue value;
    if (archive.try_read("frugal_" + key, value)) saved.emplace_back(key, std::move(value));
  }
  // The moments are checked against the loaded selection (loaded_layout); on failure nothing
  // changes.
  loading_ = plan_.read(saved);
  try {
    PlanOptimizer::load(archive);
  } catch (...) {
    loading_.reset();
    throw;
  }
  plan_.adopt(std::move(*loading_));
  loading_.reset();
}

template class PlanOptimizer<FrugalOptions>;

}  // namespace memopt
