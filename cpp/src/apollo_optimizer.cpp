// memopt::Apollo / ApolloMini, the LibTorch optimizers: memopt::ApolloPlan decides groups,
// projections, seeds and state once; then one fused call per group (memopt::apollo_ for
// rank > 0, memopt::adamw_ with the group's adamw_rule otherwise).
#include "memopt/optimizers.h"
#include "memopt/projection.h"

namespace memopt {

namespace {
// Attention and MLP weights (roles from names only, as the Python front end infers them for bare
// named parameters) in groups per effective rank, then the AdamW tensors (ApolloPlan's rule).
std::vector<torch::optim::OptimizerParamGroup> apollo_groups(const NamedParams& named,
                                                             const ApolloOptions& d) {
  std::vector<ApolloCandidate> candidates;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "Apollo: parameter '", name, "' is an undefined tensor");
    candidates.push_back({p.sizes().vec(), infer_role(name, p.sizes(), TensorFacts{}).info.role});
  }
  d.check();
  const bool per_token = d.embeddings() == "adam_mini";
  const auto token_role = [&](int64_t i) {
    return candidates[i].role == Role::Embedding || candidates[i].role == Role::Output;
  };
  bool any_token = false;
  for (size_t i = 0; i < candidates.size(); ++i) any_token = any_token || token_role(i);
  TORCH_CHECK_VALUE(!per_token || any_token, "Apollo(embeddings='adam_mini'): no embedding or "
                    "output tensor found (roles come from the parameters' names)");
  std::vector<torch::optim::OptimizerParamGroup> groups;
  const auto add = [&](const std::vector<int64_t>& members, std::unique_ptr<ApolloOptions> own) {
    std::vector<at::Tensor> params;
    for (int64_t i : members) params.push_back(named[i].second);
    if (!params.empty()) groups.emplace_back(std::move(params), std::move(own));
  };
  for (const auto& [rank, members] : apollo_rank_groups(apollo_ranks(candidates, d.rank()))) {
    if (rank > 0 || !per_token) {
      add(members, rank == d.rank() ? nullptr
                                    : std::make_unique<ApolloOptions>(ApolloOptions(d).rank(rank)));
      continue;
    }
    std::vector<int64_t> rows, rest;
    for (int64_t i : members) (token_role(i) ? rows : rest).push_back(i);
    add(rows, std::make_unique<ApolloOptions>(ApolloOptions(d).rank(0)));
    add(rest, std::make_unique<ApolloOptions>(ApolloOptions(d).rank(0).embeddings("adamw")));
  }
  return groups;
}
}  // namespace

Apollo::Apollo(const NamedParams& named_params, ApolloOptions defaults)
    : Apollo(apollo_groups(named_params, defaults), defaults) {}

Apollo::OpCall Apollo::op_call(const ApolloOptions& o, const GroupLists& l) const {
  if (o.per_row_v())  // the embedding mode: Adam-mini's op, one block per row
    return adam_mini_call(o, l, [&](const at::Tensor& p) { return plan_.row_blocks(position(p)); });
  if (o.rank() == 0)
    return adam_call("adamw_", {l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
                                l.list("step")}, o, {o.adamw_rule()}, {"exp_avg", "exp_avg_sq"});
  const std::vector<at::Tensor> none;
  return adam_call("apollo_",
                   {l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
                    o.store_projection() ? l.list("proj") : none,
                    o.proj() == "random" ? l.list("seed") : none, l.list("limiter_norm"),
                    l.list("step")},
                   o,
                   {o.rank(), o.proj(), o.proj_type(), o.scale_type(), o.update_proj_gap(),
                    o.scale(), o.norm_growth_limit(), o.scale_front()});
}

bool Apollo::decides_on_device(const std::vector<GroupLists>& lists) const {
  for (size_t i = 0; i < lists.size(); ++i) {
    const ApolloOptions& o = group_options(i);
    if (o.rank() == 0) continue;  // AdamW
    for (const auto& p : lists[i].params) {
      if (state_of(p) == nullptr) return false;  // its first step draws P
      const auto [lo, hi] = step_range(p);
      if (Projector::refresh_maybe_due(lo, hi, o.update_proj_gap())) return false;
    }
  }
  return true;
}

}  // namespace memopt
