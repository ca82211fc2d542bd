// memopt::Frugal, the LibTorch optimizer: the selection state machine of the Python front end
// (python/memopt_core/frugal.py, same decisions, same generator draws) on the memopt::frugal_ op.
#include "memopt/frugal_optimizer.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/CPUGeneratorImpl.h>

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

namespace {
bool projectable_role(Role role) {  // the Python front end's PROJECTABLE_ROLES
  switch (role) {
    case Role::Query: case Role::Key: case Role::Value: case Role::AttnOut:
    case Role::FusedQKV: case Role::Mlp: return true;
    default: return false;
  }
}

int64_t rule_of(const std::string& state_free) {
  if (state_free == "none") return static_cast<int64_t>(FrugalRule::None);
  if (state_free == "sgd") return static_cast<int64_t>(FrugalRule::Sgd);
  TORCH_CHECK_VALUE(state_free == "sign_sgd", "Frugal: state_free must be 'sign_sgd', 'sgd' or "
                    "'none', got '", state_free, "'");
  return static_cast<int64_t>(FrugalRule::SignSgd);
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

// The op's subspaces and modes for a group's lists under `sel`.
void Frugal::op_lists(const GroupLists& l, const Selection& sel, std::vector<at::Tensor>& subspaces,
                      std::vector<int64_t>& modes) const {
  for (size_t j = 0; j < l.params.size(); ++j) {
    const auto* s = l.states[j];
    subspaces.push_back(s && s->subspace().defined()
                            ? s->subspace()
                            : placeholder(l.params[j].scalar_type(), l.params[j].device()));
    modes.push_back(static_cast<int64_t>(mode(l.params[j], sel)));
  }
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
    : AdamFamily({torch::optim::OptimizerParamGroup([&] {
                   std::vector<at::Tensor> ps;
                   for (const auto& np : named_params) ps.push_back(np.second);
                   return ps;
                 }())},
                 defaults),
      config_(std::move(config)) {
  const auto& c = config_;
  TORCH_CHECK_VALUE(c.density >= 0.0 && c.density <= 1.0, "Frugal: density must be in [0, 1]");
  TORCH_CHECK_VALUE(c.update_gap >= 1, "Frugal: update_gap must be >= 1");
  rule_of(c.state_free);
  static const std::vector<std::string> kSelections = {"block", "columns", "rows", "randk",
                                                      "svd", "random", "randperm"};
  TORCH_CHECK_VALUE(std::find(kSelections.begin(), kSelections.end(), c.selection) !=
                        kSelections.end(), "Frugal: unknown selection '", c.selection, "'");
  for (const auto& [name, p] : named_params) {
    TORCH_CHECK_VALUE(p.defined(), "Frugal: parameter '", name, "' is an undefined tensor");
    if (p.dim() != 2 || !projectable_role(role_from_name(name, p.sizes()))) continue;
    index_[p.unsafeGetTensorImpl()] = static_cast<int64_t>(projs_.size());
    projs_.push_back(p);
    Sub s;
    const int64_t rows = p.size(0), cols = p.size(1);
    const double d = c.density;
    if (c.selection == "randk" || c.selection == "columns" || c.selection == "rows") {
      const int64_t total = c.selection == "randk" ? p.numel() : c.selection == "columns" ? cols : rows;
      s.k = static_cast<int64_t>(static_cast<double>(total) * d);
      s.mode = c.selection == "randk" ? FrugalMode::RandK
               : c.selection == "columns" ? FrugalMode::Columns : FrugalMode::Rows;
      s.moments = c.selection == "randk" ? std::vector<int64_t>{s.k}
                  : c.selection == "columns" ? std::vector<int64_t>{rows, s.k}
                                             : std::vector<int64_t>{s.k, cols};
      s.subspace = {s.k};
    } else if (c.selection != "block") {  // GaLore's side: compress the smaller dimension
      const bool right = rows >= cols;
      s.k = frugal_round(static_cast<double>(right ? cols : rows) * d);
      s.mode = right ? FrugalMode::ProjRight : FrugalMode::ProjLeft;
      s.moments = right ? std::vector<int64_t>{rows, s.k} : std::vector<int64_t>{s.k, cols};
      s.subspace = right ? std::vector<int64_t>{s.k, cols} : std::vector<int64_t>{rows, s.k};
      s.dtype = p.scalar_type();
    }
    if (c.selection != "block" && s.k == 0) s.mode = FrugalMode::FreeBlock;
    subs_[p.unsafeGetTensorImpl()] = std::move(s);
  }
  const int64_t seed = c.seed ? *c.seed : at::randint(0, int64_t{1} << 62, {1}, at::kLong).item<int64_t>();
  sel_.rng = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed)).get_state();
  sel_.cycle.assign(projs_.size(), -1);
  k_blocks_ = frugal_round(static_cast<double>(projs_.size()) * c.density);
  if (c.selection == "block")  // chosen now, as the Python front end does
    sel_.active = frugal_select_blocks(static_cast<int64_t>(projs_.size()), k_blocks_,
                                       c.block_order, sel_.cursor, sel_.rng);
}

void Frugal::adopt_params(const std::vector<at::Tensor>&, const FrugalOptions&) {
  // Parameters of a later group are not projectable: plain AdamW at the group's lr.
}

FrugalMode Frugal::mode(const at::Tensor& p, const Selection& sel) const {
  auto it = index_.find(p.unsafeGetTensorImpl());
  if (it == index_.end()) return FrugalMode::Adam;
  if (config_.selection == "block")
    return std::binary_search(sel.active.begin(), sel.active.end(), it->second)
               ? FrugalMode::ActiveBlock : FrugalMode::FreeBlock;
  return subs_.at(p.unsafeGetTensorImpl()).mode;
}

bool Frugal::holds_state(const at::Tensor& p, const Selection& sel) const {
  return mode(p, sel) != FrugalMode::FreeBlock;
}

std::vector<int64_t> Frugal::moment_sizes(const at::Tensor& p, const Selection& sel) const {
  const auto m = mode(p, sel);
  if (m == FrugalMode::Adam || m == FrugalMode::ActiveBlock) return p.sizes().vec();
  TORCH_CHECK_VALUE(m != FrugalMode::FreeBlock, "Frugal: a tensor of shape ", p.sizes(),
                    " keeps no state under the current selection");
  return subs_.at(p.unsafeGetTensorImpl()).moments;
}
std::vector<int64_t> Frugal::exp_avg_sizes(const at::Tensor& p) const {
  return moment_sizes(p, sel_);
}
std::vector<int64_t> Frugal::exp_avg_sq_sizes(const at::Tensor& p) const { return exp_avg_sizes(p); }

void Frugal::check_extra_state(FrugalParamState& s, const at::Tensor& p,
                               const std::string& where) const {
  const auto m = mode(p, sel_);
  if (m == FrugalMode::Adam || m == FrugalMode::ActiveBlock) return;
  const auto& sub = subs_.at(p.unsafeGetTensorImpl());
  TORCH_CHECK_VALUE(s.subspace().defined() &&
                        s.subspace().sizes() == at::IntArrayRef(sub.subspace),
                    where, ": the subspace must have shape ", at::IntArrayRef(sub.subspace));
  s.subspace(s.subspace().to(p.device(), sub.dtype).contiguous());
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
  std::vector<std::vector<at::Tensor>> with_grad(param_groups_.size());
  ska::flat_hash_map<void*, bool> has_grad;
  for (size_t i = 0; i < param_groups_.size(); ++i)
    for (const auto& p : param_groups_[i].params())
      if (p.grad().defined()) with_grad[i].push_back(p), has_grad[p.unsafeGetTensorImpl()] = true;
  const int64_t rule = rule_of(config_.state_free);
  // 1. gradients and options, with every tensor state-free, before anything is selected
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    const auto& o = group_options(i);
    std::vector<at::Tensor> grads, none;
    for (const auto& p : with_grad[i]) {
      grads.push_back(p.grad());
      none.push_back(placeholder(at::kFloat, p.device()));
    }
    check_frugal_inputs(with_grad[i], grads, none, none, none, none,
                        std::vector<int64_t>(with_grad[i].size(),
                                             static_cast<int64_t>(FrugalMode::FreeBlock)),
                        o.proj_params_lr_scale(), o.state_free_lr_scale(), rule);
  }
  // 2. this step's selection and states, as candidates (upstream's order of random draws)
  Selection sel = sel_;
  sel.rng = sel_.rng.clone();
  const int64_t cycle = sel.t / config_.update_gap;
  ska::flat_hash_map<void*, at::Tensor> new_subspace;
  if (config_.selection == "block" && cycle != sel.block_cycle) {
    sel.active = frugal_select_blocks(static_cast<int64_t>(projs_.size()), k_blocks_,
                                      config_.block_order, sel.cursor, sel.rng);
    sel.block_cycle = cycle;
  }
  if (config_.selection != "block") {
    for (size_t j = 0; j < projs_.size(); ++j) {
      const auto& p = projs_[j];
      if (!has_grad.count(p.unsafeGetTensorImpl()) || sel.cycle[j] == cycle) continue;
      sel.cycle[j] = cycle;
      const auto& sub = subs_.at(p.unsafeGetTensorImpl());
      if (sub.mode == FrugalMode::FreeBlock) continue;
      if (sub.mode == FrugalMode::Columns || sub.mode == FrugalMode::Rows ||
          sub.mode == FrugalMode::RandK) {
        const int64_t total = sub.mode == FrugalMode::Columns ? p.size(1)
                              : sub.mode == FrugalMode::Rows  ? p.size(0) : p.numel();
        new_subspace[p.unsafeGetTensorImpl()] = frugal_select_indices(total, sub.k, sel.rng);
      } else {
        new_subspace[p.unsafeGetTensorImpl()] = frugal_projection(
            p.grad(), sub.k, sub.mode == FrugalMode::ProjRight, config_.selection, sel.rng);
      }
    }
  }
  // states after this step: kept, fresh (zeros), or dropped (nullptr)
  ska::flat_hash_map<void*, std::unique_ptr<FrugalParamState>> fresh;
  std::vector<void*> dropped;
  for (const auto& group : param_groups_) {
    for (const auto& p : group.params()) {
      void* key = p.unsafeGetTensorImpl();
      FrugalParamState* old = state_of(p);
      if (!holds_state(p, sel)) {
        if (old) dropped.push_back(key);
        continue;
      }
      auto sub = new_subspace.find(key);
      const bool reselected = sub != new_subspace.end();
      if (old && !(reselected && config_.reset_statistics)) {
        if (reselected) {  // moments carried over unprojected, as upstream does without reset
          auto kept = std::make_unique<FrugalParamState>(*old);
          kept->subspace(sub->second.to(p.device()));
          fresh[key] = std::move(kept);
        }
        continue;
      }
      if (!old && !has_grad.count(key)) continue;  // gets its state when it has a gradient
      const auto sizes = moment_sizes(p, sel);
      auto s = std::make_unique<FrugalParamState>();
      s->step(torch::zeros({}, torch::kFloat));
      s->exp_avg(state_zeros(sizes, p, p.options()));  // p's layout if shaped like p
      s->exp_avg_sq(state_zeros(sizes, p, p.options()));
      if (reselected) s->subspace(sub->second.to(p.device()));
      fresh[key] = std::move(s);
    }
  }
  // 3. the full check of every group against the candidates
  std::vector<GroupLists> lists(param_groups_.size());
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    GroupLists& l = lists[i];
    for (const auto& p : with_grad[i]) {
      void* key = p.unsafeGetTensorImpl();
      auto f = fresh.find(key);
      FrugalParamState* s = f != fresh.end() ? f->second.get()
                            : holds_state(p, sel) ? state_of(p) : nullptr;
      const auto dev = p.device();
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      l.exp_avgs.push_back(s ? s->exp_avg() : placeholder(p.scalar_type(), dev));
      l.exp_avg_sqs.push_back(s ? s->exp_avg_sq() : placeholder(p.scalar_type(), dev));
      l.steps.push_back(s ? s->step() : placeholder(at::kFloat, dev));
      l.states.push_back(s);
    }
    std::vector<at::Tensor> subspaces;
    std::vector<int64_t> modes;
    op_lists(l, sel, subspaces, modes);
    const auto& o = group_options(i);
    check_frugal_inputs(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, subspaces, modes,
                        o.proj_params_lr_scale(), o.state_free_lr_scale(), rule);
  }
  // 4. commit, then run
  for (void* key : dropped) state_.erase(key);
  for (auto& [key, s] : fresh) state_[key] = std::move(s);
  sel.t += 1;
  sel_ = std::move(sel);
  for (size_t i = 0; i < param_groups_.size(); ++i) {
    if (!lists[i].params.empty()) update(group_options(i), lists[i]);
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
  op_lists(l, sel_, subspaces, modes);
  op.call(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, subspaces, modes,
          at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()), std::get<1>(o.betas()),
          o.eps(), o.weight_decay(), o.proj_params_lr_scale(), o.state_free_lr_scale(),
          rule_of(config_.state_free));
}

void Frugal::save(OutputArchive& archive) const {
  AdamFamily::save(archive);
  archive.write("frugal_selection", c10::IValue(config_.selection));
  archive.write("frugal_num_projectable", c10::IValue(static_cast<int64_t>(projs_.size())));
  archive.write("frugal_t", c10::IValue(sel_.t));
  archive.write("frugal_cursor", c10::IValue(sel_.cursor));
  archive.write("frugal_block_cycle", c10::IValue(sel_.block_cycle));
  archive.write("frugal_active", c10::IValue(sel_.active));
  archive.write("frugal_cycle", c10::IValue(sel_.cycle));
  archive.write("frugal_rng", sel_.rng);
}

void Frugal::load(InputArchive& archive) {
  auto read = [&](const char* key) {
    c10::IValue v;
    TORCH_CHECK_VALUE(archive.try_read(key, v), "not a memopt::Frugal checkpoint (no ", key, ")");
    return v;
  };
  TORCH_CHECK_VALUE(read("frugal_selection").toStringRef() == config_.selection &&
                        read("frugal_num_projectable").toInt() ==
                            static_cast<int64_t>(projs_.size()),
                    "not a checkpoint of a Frugal optimizer with selection='", config_.selection,
                    "' and ", projs_.size(), " projectable tensors");
  Selection loaded;
  loaded.t = read("frugal_t").toInt();
  loaded.cursor = read("frugal_cursor").toInt();
  loaded.block_cycle = read("frugal_block_cycle").toInt();
  loaded.active = read("frugal_active").toIntVector();
  loaded.cycle = read("frugal_cycle").toIntVector();
  TORCH_CHECK_VALUE(archive.try_read("frugal_rng", loaded.rng), "no frugal_rng in checkpoint");
  loaded.rng = loaded.rng.clone();
  for (int64_t j : loaded.active)
    TORCH_CHECK_VALUE(j >= 0 && j < static_cast<int64_t>(projs_.size()),
                      "the checkpoint names an active block that does not exist");
  TORCH_CHECK_VALUE(loaded.cycle.size() == projs_.size(), "the checkpoint's selection cycles do "
                    "not match this optimizer's projectable tensors");
  // The moments are checked against the loaded selection; on failure nothing changes.
  Selection old = std::move(sel_);
  sel_ = std::move(loaded);
  try {
    AdamFamily::load(archive);
  } catch (...) {
    sel_ = std::move(old);
    throw;
  }
}

}  // namespace memopt
