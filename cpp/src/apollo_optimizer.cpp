// memopt::Apollo / ApolloMini, the LibTorch optimizers: memopt::ApolloPlan decides groups,
// projections, seeds and state once; then one fused call per group through the dispatcher
// (memopt::apollo_ for rank > 0, memopt::adamw_ with the group's adamw_rule otherwise).
#include "memopt/optimizers.h"

#include "plan_optimizer_impl.h"

namespace memopt {

using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

ApolloSettings ApolloOptions::settings() const {
  ApolloSettings s;
  if (rank() > 0) s.rank = rank();
  s.proj = proj();
  s.proj_type = proj_type();
  s.scale_type = scale_type();
  s.update_proj_gap = update_proj_gap();
  s.scale = scale();
  s.norm_growth_limit = norm_growth_limit();
  s.scale_front = scale_front();
  s.store_projection = store_projection();
  s.adamw_rule = adamw_rule();
  return s;
}

void ApolloOptions::check() const {
  TORCH_CHECK_VALUE(rank() >= 0, "Apollo: rank must be >= 0 (0: plain AdamW), got ", rank());
  ApolloPlan().add_group({}, settings());  // the plan's checks, naming the key
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

namespace {
// Attention and MLP weights (roles from names only, as the Python front end infers them for bare
// named parameters) in groups per effective rank, then the AdamW tensors (ApolloPlan's rule).
std::vector<torch::optim::OptimizerParamGroup> apollo_groups(
    const std::vector<std::pair<std::string, torch::Tensor>>& named, const ApolloOptions& d) {
  std::vector<ApolloCandidate> candidates;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "Apollo: parameter '", name, "' is an undefined tensor");
    candidates.push_back({p.sizes().vec(), infer_role(name, p.sizes(), TensorFacts{}).info.role});
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (const auto& [rank, members] : apollo_rank_groups(apollo_ranks(candidates, d.rank()))) {
    std::vector<at::Tensor> params;
    for (int64_t i : members) params.push_back(named[i].second);
    groups.emplace_back(std::move(params), rank == d.rank() ? nullptr
                                           : std::make_unique<ApolloOptions>(ApolloOptions(d).rank(rank)));
  }
  return groups;
}
}  // namespace

Apollo::Apollo(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
               ApolloOptions defaults)
    : Apollo(apollo_groups(named_params, defaults), defaults) {}

Apollo::Apollo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
               ApolloOptions defaults)
    : PlanOptimizer(param_groups, defaults) {
  for (size_t i = 0; i < param_groups_.size(); ++i)
    extend_plan(param_groups_[i].params(), group_options(i));
}

void Apollo::extend_plan(const std::vector<at::Tensor>& params, const ApolloOptions& o) {
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& p : params) shapes.push_back(p.sizes().vec());
  plan_.add_group(shapes, o.settings());
}

// Through the dispatcher, as the Python front end: memopt::apollo_ for a projected group,
// memopt::adamw_ with the group's rule for a rank-0 group (or their validators).
void Apollo::run(const ApolloOptions& o, const GroupLists& l, bool validate) const {
  const at::Tensor lr = at::scalar_tensor(o.lr(), at::kDouble);
  const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
  if (o.rank() == 0) {
    call_op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                 const at::Tensor&, double, double, double, double, c10::string_view)>(
        "adamw_", validate, l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
        l.list("step"), lr, b1, b2, o.eps(), o.weight_decay(), c10::string_view(o.adamw_rule()));
    return;
  }
  std::vector<at::Tensor> projs, seeds;
  if (o.store_projection()) projs = l.list("proj");
  if (o.proj() == "random") seeds = l.list("seed");
  call_op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
               at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double, double,
               double, double, int64_t, c10::string_view, c10::string_view, c10::string_view,
               int64_t, double, double, bool)>(
      "apollo_", validate, l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"), projs,
      seeds, l.list("limiter_norm"), l.list("step"), lr, b1, b2, o.eps(), o.weight_decay(),
      o.rank(), c10::string_view(o.proj()), c10::string_view(o.proj_type()),
      c10::string_view(o.scale_type()), o.update_proj_gap(), o.scale(), o.norm_growth_limit(),
      o.scale_front());
}

template class PlanOptimizer<ApolloOptions>;

}  // namespace memopt
