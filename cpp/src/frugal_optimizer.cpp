// memopt::Frugal, the LibTorch optimizer: memopt::FrugalPlan's decisions (the same plan as the
// Python front end's, so the same selections and generator draws) applied to plain per-tensor
// state, stepped by the memopt::frugal_ op.
#include "memopt/frugal_optimizer.h"

#include <ATen/core/dispatch/Dispatcher.h>

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

// The op's subspaces and modes for a group's lists under `sel` (nullptr: every tensor free).
void Frugal::op_lists(const GroupLists& l, const FrugalSelection* sel,
                      std::vector<at::Tensor>& subspaces, std::vector<int64_t>& modes) const {
  for (size_t j = 0; j < l.params.size(); ++j) {
    const auto* s = l.states[j];
    subspaces.push_back(s && s->subspace().defined()
                            ? s->subspace()
                            : placeholder(l.params[j].scalar_type(), l.params[j].device()));
    modes.push_back(static_cast<int64_t>(sel ? mode(l.params[j], *sel) : FrugalMode::FreeBlock));
  }
}

// One group's parameters with a gradient and the state `state_for` gives each (nullptr: the
// op's placeholders), as the op's lists.
Frugal::GroupLists Frugal::lists(size_t group, const StateFor& state_for) const {
  GroupLists l;
  for (const auto& p : param_groups_[group].params()) {
    if (!p.grad().defined()) continue;
    FrugalParamState* s = state_for(p);
    l.params.push_back(p);
    l.grads.push_back(p.grad());
    l.exp_avgs.push_back(s ? s->exp_avg() : placeholder(p.scalar_type(), p.device()));
    l.exp_avg_sqs.push_back(s ? s->exp_avg_sq() : placeholder(p.scalar_type(), p.device()));
    l.steps.push_back(s ? s->step() : placeholder(at::kFloat, p.device()));
    l.states.push_back(s);
  }
  return l;
}

// Everything the op checks before it writes, for a group's lists under `sel`.
void Frugal::check(size_t group, const GroupLists& l, const FrugalSelection* sel) const {
  std::vector<at::Tensor> subspaces;
  std::vector<int64_t> modes;
  op_lists(l, sel, subspaces, modes);
  const auto& o = group_options(group);
  check_frugal_inputs(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, subspaces, modes,
                      o.proj_params_lr_scale(), o.state_free_lr_scale(),
                      static_cast<int64_t>(plan_.rule()));
}

void check_frugal_options(const FrugalOptions& o) {
  for (double s : {o.proj_params_lr_scale(), o.state_free_lr_scale()})
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

void FrugalParamState::serialize(InputArchive& archive) {
  AdamFamilyParamState<FrugalParamState>::serialize(archive);
  torch::Tensor t;  // fresh: try_read set_()s a defined tensor in place
  if (archive.try_read("subspace", t)) subspace(t);
}
void FrugalParamState::serialize(OutputArchive& archive) const {
  AdamFamilyParamState<FrugalParamState>::serialize(archive);
  if (subspace().defined()) archive.write("subspace", subspace());
}

Frugal::Frugal(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
               FrugalOptions defaults, FrugalConfig config)
    : Frugal(described(named_params), std::move(defaults), std::move(config)) {}

Frugal::Frugal(const std::vector<std::pair<torch::Tensor, Role>>& params_with_roles,
               FrugalOptions defaults, FrugalConfig config)
    : Frugal(described(params_with_roles), std::move(defaults), std::move(config)) {}

Frugal::Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config)
    : AdamFamily({torch::optim::OptimizerParamGroup(params.first)}, defaults),
      plan_(params.second, std::move(config)) {
  for (int64_t i : plan_.projectable()) {
    index_[params.first[i].unsafeGetTensorImpl()] = static_cast<int64_t>(projs_.size());
    projs_.push_back(params.first[i]);
  }
}

void Frugal::adopt_params(const std::vector<at::Tensor>&, const FrugalOptions&) {
  // Parameters of a later group are not in the plan: plain AdamW at the group's lr.
}

int64_t Frugal::block_of(const at::Tensor& p) const {
  auto it = index_.find(p.unsafeGetTensorImpl());
  return it == index_.end() ? -1 : it->second;
}

FrugalMode Frugal::mode(const at::Tensor& p, const FrugalSelection& sel) const {
  const int64_t j = block_of(p);
  return j < 0 ? FrugalMode::Adam : plan_.mode(j, sel);
}

std::vector<int64_t> Frugal::exp_avg_sizes(const at::Tensor& p) const {
  const int64_t j = block_of(p);
  if (j < 0) return p.sizes().vec();
  auto sizes = plan_.moment_shape(j, plan_.mode(j, selection()));
  if (!sizes) plan_.check_loaded(j, selection(), true, std::nullopt);  // raises: state-free
  return *sizes;
}
std::vector<int64_t> Frugal::exp_avg_sq_sizes(const at::Tensor& p) const {
  return exp_avg_sizes(p);
}

void Frugal::check_extra_state(FrugalParamState& s, const at::Tensor& p, const std::string&) const {
  const int64_t j = block_of(p);
  if (j < 0) return;
  std::optional<std::vector<int64_t>> saved;
  if (s.subspace().defined()) saved = s.subspace().sizes().vec();
  plan_.check_loaded(j, selection(), true, saved);
  if (plan_.subspace_shape(j, plan_.mode(j, selection())))
    s.subspace(s.subspace()
                   .to(p.device(), plan_.subspace_is_index(j) ? at::kInt : p.scalar_type())
                   .contiguous());
}

FrugalParamState* Frugal::state_of(const at::Tensor& p) const {
  auto it = state_.find(p.unsafeGetTensorImpl());
  return it == state_.end() ? nullptr : static_cast<FrugalParamState*>(it->second.get());
}

torch::Tensor Frugal::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (skips_step()) return loss;
  // 1. gradients and options, with every tensor state-free, before anything is selected
  for (size_t i = 0; i < param_groups_.size(); ++i)
    check(i, lists(i, [](const at::Tensor&) -> FrugalParamState* { return nullptr; }), nullptr);
  // 2. the plan's decision, and the states it asks for as candidates
  std::vector<int64_t> grad_blocks, holding;
  for (size_t j = 0; j < projs_.size(); ++j) {
    if (projs_[j].grad().defined()) grad_blocks.push_back(static_cast<int64_t>(j));
    if (state_of(projs_[j])) holding.push_back(static_cast<int64_t>(j));
  }
  const FrugalStepDecision d =
      plan_.begin_step(grad_blocks, holding, [&](int64_t j) { return projs_[j].grad(); });
  ska::flat_hash_map<void*, std::unique_ptr<FrugalParamState>> fresh;
  std::vector<void*> dropped;
  auto zeroed = [](const at::Tensor& p, at::IntArrayRef sizes) {
    auto s = std::make_unique<FrugalParamState>();
    s->step(torch::zeros({}, torch::kFloat));
    s->exp_avg(state_zeros(sizes, p, p.options()));  // p's layout if shaped like p
    s->exp_avg_sq(state_zeros(sizes, p, p.options()));
    return s;
  };
  for (size_t j = 0; j < projs_.size(); ++j) {
    const auto& p = projs_[j];
    const auto change = static_cast<FrugalStateChange>(d.changes[j]);
    const auto& sub = d.subspaces[j];
    if (change == FrugalStateChange::Drop) dropped.push_back(p.unsafeGetTensorImpl());
    if (change != FrugalStateChange::Start && change != FrugalStateChange::Carry) continue;
    auto s = change == FrugalStateChange::Carry
                 ? std::make_unique<FrugalParamState>(*state_of(p))
                 : zeroed(p, *plan_.moment_shape(j, static_cast<FrugalMode>(d.modes[j])));
    if (sub.defined()) s->subspace(sub.to(p.device()));
    fresh[p.unsafeGetTensorImpl()] = std::move(s);
  }
  for (const auto& group : param_groups_)  // not projectable: AdamW state from the first gradient
    for (const auto& p : group.params())
      if (p.grad().defined() && block_of(p) < 0 && !state_of(p))
        fresh[p.unsafeGetTensorImpl()] = zeroed(p, p.sizes());
  // 3. the full check of every group against the candidates
  std::vector<GroupLists> all;
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    all.push_back(lists(i, [&](const at::Tensor& p) -> FrugalParamState* {
      auto f = fresh.find(p.unsafeGetTensorImpl());
      if (f != fresh.end()) return f->second.get();
      return mode(p, d.selection) != FrugalMode::FreeBlock ? state_of(p) : nullptr;
    }));
    check(i, all.back(), &d.selection);
  }
  // 4. commit, then run
  for (void* key : dropped) state_.erase(key);
  for (auto& [key, s] : fresh) state_[key] = std::move(s);
  plan_.commit(d);
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    if (!all[i].params.empty()) update(group_options(i), all[i]);
  }
  return loss;
}

// Through the dispatcher, as torch.ops.memopt.frugal_; modes from the committed selection.
void Frugal::update(const FrugalOptions& o, const GroupLists& l) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("memopt::frugal_", "")
      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  at::TensorList, at::IntArrayRef, const at::Tensor&, double, double, double,
                  double, double, double, int64_t)>();
  std::vector<at::Tensor> subspaces;
  std::vector<int64_t> modes;
  op_lists(l, &plan_.selection(), subspaces, modes);
  op.call(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, subspaces, modes,
          at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()), std::get<1>(o.betas()),
          o.eps(), o.weight_decay(), o.proj_params_lr_scale(), o.state_free_lr_scale(),
          static_cast<int64_t>(plan_.rule()));
}

// The plan's saved fields as archive keys "frugal_<key>" (the generator state as a tensor, as
// checkpoints written before the plan stored it).
void Frugal::save(OutputArchive& archive) const {
  AdamFamily::save(archive);
  std::vector<int64_t> holding;
  for (size_t j = 0; j < projs_.size(); ++j)
    if (state_of(projs_[j])) holding.push_back(static_cast<int64_t>(j));
  for (const auto& [key, value] : plan_.save(holding)) {
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
  // The moments are checked against the loaded selection; on failure nothing changes.
  loading_ = plan_.read(saved);
  try {
    AdamFamily::load(archive);
  } catch (...) {
    loading_.reset();
    throw;
  }
  plan_.adopt(std::move(*loading_));
  loading_.reset();
}

}  // namespace memopt
