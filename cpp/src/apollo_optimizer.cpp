// memopt::Apollo / ApolloMini, the LibTorch optimizers: projected shapes and seeds fixed at
// construction, then one fused call per group through the dispatcher (memopt::apollo_ for
// rank > 0, memopt::adamw_ with the group's adamw_rule otherwise). Shared machinery:
// optimizers.cpp.
#include <ATen/core/dispatch/Dispatcher.h>

#include "memopt/adamw.h"
#include "memopt/apollo.h"
#include "memopt/optimizers.h"

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

namespace {
ApolloConfig config_of(const ApolloOptions& o) {
  return make_apollo_config(o.rank(), o.proj(), o.proj_type(), o.scale_type(),
                            o.update_proj_gap(), o.scale(), o.norm_growth_limit(),
                            o.scale_front());
}

std::vector<torch::optim::OptimizerParamGroup> apollo_groups(
    const std::vector<std::pair<std::string, torch::Tensor>>& named, const ApolloOptions& d) {
  // one group per effective rank (never above a tensor's smaller side), in order of first
  // appearance, then the AdamW tensors: as python/memopt_core/apollo_groups.py groups them
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> by_rank;
  std::vector<at::Tensor> rest;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "Apollo: parameter '", name, "' is an undefined tensor");
    // names only: roles as the Python front end infers them from bare named parameters
    const Role role = infer_role(name, p.sizes(), TensorFacts{}).info.role;
    if (d.rank() <= 0 || p.dim() != 2 || !role_traits(role).hidden_matrix) {
      rest.push_back(p);
      continue;
    }
    const int64_t r = std::max<int64_t>(1, std::min({d.rank(), p.size(0), p.size(1)}));
    auto it = std::find_if(by_rank.begin(), by_rank.end(), [&](const auto& g) { return g.first == r; });
    if (it == by_rank.end()) it = by_rank.insert(by_rank.end(), {r, {}});
    it->second.push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (auto& [r, params] : by_rank)
    groups.emplace_back(std::move(params), r == d.rank() ? nullptr
                                                         : std::make_unique<ApolloOptions>(ApolloOptions(d).rank(r)));
  if (!rest.empty())
    groups.emplace_back(std::move(rest), std::make_unique<ApolloOptions>(ApolloOptions(d).rank(0)));
  return groups;
}
}  // namespace

void check_apollo_options(const ApolloOptions& o) {
  parse_adamw_rule(o.adamw_rule());
  TORCH_CHECK_VALUE(o.rank() >= 0, "Apollo: rank must be >= 0 (0: plain AdamW), got ", o.rank());
  if (o.rank() == 0) return;
  config_of(o);  // raises, naming the key
  TORCH_CHECK_VALUE(o.proj() != "svd" || o.store_projection(), "Apollo: proj='svd' needs "
                    "store_projection(true): an SVD basis cannot be regenerated from a seed");
}

void ApolloOptions::serialize(InputArchive& archive) {
  AdamWOptions adam;  // the shared Adam hyperparameters, read and checked alike
  adam.serialize(archive);
  lr(adam.lr()).betas(adam.betas()).eps(adam.eps()).weight_decay(adam.weight_decay());
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, rank);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, proj);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, proj_type);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, scale_type);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, update_proj_gap);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, scale);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, norm_growth_limit);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, scale_front);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, store_projection);
  // Absent from checkpoints saved before the option existed: those stepped their AdamW groups
  // with torch's rule, and resume with it.
  c10::IValue rule;
  adamw_rule(archive.try_read("adamw_rule", rule) ? rule.toStringRef() : std::string("torch"));
}

void ApolloOptions::serialize(OutputArchive& archive) const {
  AdamWOptions(lr()).betas(betas()).eps(eps()).weight_decay(weight_decay()).serialize(archive);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rank);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(proj);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(proj_type);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(scale_type);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(update_proj_gap);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(scale);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(norm_growth_limit);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(scale_front);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(store_projection);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adamw_rule);
}

// proj / seed / limiter_norm exist only for projected parameters: written when defined.
void ApolloParamState::serialize(InputArchive& archive) {
  AdamFamilyParamState<ApolloParamState>::serialize(archive);
  // A fresh tensor per key: try_read set_()s a defined tensor in place.
  for (const char* key : {"proj", "seed", "limiter_norm"}) {
    torch::Tensor t;
    if (!archive.try_read(key, t)) continue;
    if (key[0] == 'p') proj(t);
    else if (key[0] == 's') seed(t);
    else limiter_norm(t);
  }
}

void ApolloParamState::serialize(OutputArchive& archive) const {
  AdamFamilyParamState<ApolloParamState>::serialize(archive);
  if (proj().defined()) archive.write("proj", proj());
  if (seed().defined()) archive.write("seed", seed());
  if (limiter_norm().defined()) archive.write("limiter_norm", limiter_norm());
}

Apollo::Apollo(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
               ApolloOptions defaults)
    : Apollo(apollo_groups(named_params, defaults), defaults) {}

Apollo::Apollo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
               ApolloOptions defaults)
    : AdamFamily(param_groups, defaults) {
  for (size_t i = 0; i < param_groups_.size(); ++i)
    add_layouts(param_groups_[i].params(), group_options(i));
}

void Apollo::add_layouts(const std::vector<at::Tensor>& params, const ApolloOptions& o) {
  // Every layout is built before any is kept, so a refused group leaves the optimizer as it was.
  std::vector<std::pair<void*, Layout>> added;
  int64_t position = static_cast<int64_t>(layouts_.size());
  for (const auto& p : params) {
    Layout l{{}, {}, ++position, o.proj() == "random", o.store_projection()};
    if (o.rank() > 0) {
      TORCH_CHECK_VALUE(p.dim() == 2, "Apollo: a projected group (rank ", o.rank(),
                        ") takes 2-D parameters only, got shape ", p.sizes(),
                        "; put it in a rank-0 group");
      const Projector proj(o.proj(), o.proj_type(), o.rank(), p.sizes());
      l.low_rank = proj.low_rank_shape();
      l.proj = proj.proj_shape();
    }
    added.emplace_back(p.unsafeGetTensorImpl(), std::move(l));
  }
  for (auto& [key, l] : added) layouts_.emplace(key, std::move(l));
}

void Apollo::adopt_params(const std::vector<at::Tensor>& params, const ApolloOptions& o) {
  add_layouts(params, o);
}

const Apollo::Layout& Apollo::layout(const at::Tensor& param) const {
  auto it = layouts_.find(param.unsafeGetTensorImpl());
  TORCH_CHECK_VALUE(it != layouts_.end(), "Apollo: tensor of shape ", param.sizes(),
                    " is not a parameter of this optimizer");
  return it->second;
}

std::vector<int64_t> Apollo::exp_avg_sizes(const at::Tensor& p) const {
  const auto& l = layout(p);
  return l.low_rank.empty() ? p.sizes().vec() : l.low_rank;
}
std::vector<int64_t> Apollo::exp_avg_sq_sizes(const at::Tensor& p) const { return exp_avg_sizes(p); }
bool Apollo::moments_follow_param(const at::Tensor& p) const { return layout(p).low_rank.empty(); }

void Apollo::init_extra_state(ApolloParamState& s, const at::Tensor& p) const {
  const auto& l = layout(p);
  if (l.low_rank.empty()) return;
  if (l.store) s.proj(torch::zeros(l.proj, p.options()));
  if (l.random) s.seed(torch::scalar_tensor(l.seed, torch::kLong));
  // -1: no norm yet (the limiter starts from the first update's norm).
  s.limiter_norm(torch::scalar_tensor(-1.0, p.scalar_type() == at::kDouble ? torch::kDouble
                                                                          : torch::kFloat));
}

void Apollo::check_extra_state(ApolloParamState& s, const at::Tensor& p,
                               const std::string& where) const {
  const auto& l = layout(p);
  if (l.low_rank.empty()) return;
  if (l.store) {
    TORCH_CHECK_VALUE(s.proj().defined() && s.proj().sizes() == at::IntArrayRef(l.proj), where,
                      ": the projection must have shape ", at::IntArrayRef(l.proj));
    s.proj(s.proj().to(p.device(), p.scalar_type()).contiguous());
  }
  if (l.random) {
    TORCH_CHECK_VALUE(s.seed().defined() && s.seed().numel() == 1 &&
                          s.seed().scalar_type() == at::kLong,
                      where, ": lacks its int64 projection seed");
    s.seed(s.seed().to(at::kCPU).reshape({}));
  }
  TORCH_CHECK_VALUE(s.limiter_norm().defined() && s.limiter_norm().numel() == 1, where,
                    ": lacks its limiter_norm");
  s.limiter_norm(s.limiter_norm().to(at::kCPU).reshape({}));
}

namespace {
struct ApolloLists {
  std::vector<at::Tensor> projs, seeds, norms;
};
template <typename State>
ApolloLists extra_lists(const ApolloOptions& o, const std::vector<State*>& states) {
  ApolloLists out;
  for (const auto* s : states) {
    if (o.store_projection()) out.projs.push_back(s->proj());
    if (o.proj() == "random") out.seeds.push_back(s->seed());
    out.norms.push_back(s->limiter_norm());
  }
  return out;
}
}  // namespace

void Apollo::check_group(const std::string& op, const ApolloOptions& o,
                         const GroupLists& l) const {
  if (o.rank() == 0) {  // adamw_rule: checked with the options
    check_adamw_inputs(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps);
    return;
  }
  const auto x = extra_lists(o, l.states);
  check_apollo_inputs(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, x.projs, x.seeds, x.norms,
                      l.steps, config_of(o));
  (void)op;  // check_apollo_inputs names the op itself
}

void Apollo::update(const ApolloOptions& o, const GroupLists& l) {
  const at::Tensor lr = at::scalar_tensor(o.lr(), at::kDouble);
  const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
  if (o.rank() == 0) {
    call_adamw_op(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, lr, b1, b2, o.eps(),
                  o.weight_decay(), o.adamw_rule());
    return;
  }
  static auto apollo = c10::Dispatcher::singleton().findSchemaOrThrow("memopt::apollo_", "")
      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double,
                  double, double, double, int64_t, c10::string_view, c10::string_view,
                  c10::string_view, int64_t, double, double, bool)>();
  const auto x = extra_lists(o, l.states);
  apollo.call(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, x.projs, x.seeds, x.norms, l.steps,
              lr, b1, b2, o.eps(), o.weight_decay(), o.rank(), o.proj(), o.proj_type(),
              o.scale_type(), o.update_proj_gap(), o.scale(), o.norm_growth_limit(),
              o.scale_front());
}

}  // namespace memopt
