// memopt::AdamMini and memopt::SlimAdam, the LibTorch optimizers: memopt::BlockPlan decides each
// tensor's blocks and weight decay once, at construction; one fused adam_mini_ call per group.
#include "memopt/optimizers.h"

namespace memopt {

RoleInfo AdamMiniOptions::head_geometry() const {
  TORCH_CHECK_VALUE(dim() >= 0 && n_heads() >= 0 && n_kv_heads() >= 0 && head_dim() >= 0,
                    "AdamMini: dim, n_heads, n_kv_heads and head_dim must be >= 0");
  RoleInfo info;
  info.head_dim = head_dim();
  if (info.head_dim == 0 && n_heads() > 0) {
    TORCH_CHECK_VALUE(dim() > 0 && dim() % n_heads() == 0, "AdamMini: dim (", dim(),
                      ") must be a positive multiple of n_heads (", n_heads(),
                      "), or give head_dim");
    info.head_dim = dim() / n_heads();
  }
  info.q_heads = n_heads();
  info.kv_heads = n_kv_heads() > 0 ? n_kv_heads() : n_heads();
  TORCH_CHECK_VALUE(n_kv_heads() == 0 || (n_heads() > 0 && n_heads() % n_kv_heads() == 0),
                    "AdamMini: n_heads (", n_heads(), ") must be a multiple of n_kv_heads (",
                    n_kv_heads(), ")");
  return info;
}

// Bare named parameters: roles as the Python front end decides them (infer_role with names only,
// the options' head geometry); SlimAdam's table keeps Q/K roles without heads.
AdamMini::Planned AdamMini::planned(const NamedParams& named, const AdamMiniOptions& o,
                                    BlockAlgorithm algorithm) {
  const RoleInfo g = o.head_geometry();
  TensorFacts facts;
  facts.qk_need_heads = algorithm != BlockAlgorithm::SlimAdam;
  facts.heads = {o.dim(), g.q_heads, g.kv_heads, g.head_dim};
  std::vector<BlockTensor> tensors;
  std::vector<at::Tensor> params;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "AdamMini: parameter '", name, "' is an undefined tensor");
    const InferredRole r = infer_role(name, p.sizes(), facts);
    tensors.push_back({name, p.sizes().vec(), r.info, r.note});
    params.push_back(p);
  }
  BlockPlanConfig config{algorithm};
  config.state_bits = o.state_bits();
  return {BlockPlan(std::move(tensors), std::move(config)), std::move(params)};
}

// Explicit roles, their head geometry filled in from the options where left 0.
AdamMini::Planned AdamMini::planned(const std::vector<std::pair<at::Tensor, RoleInfo>>& given,
                                    const AdamMiniOptions& o, BlockAlgorithm algorithm) {
  const RoleInfo g = o.head_geometry();
  std::vector<BlockTensor> tensors;
  std::vector<at::Tensor> params;
  for (auto [p, info] : given) {
    TORCH_CHECK_VALUE(p.defined(), "AdamMini: a parameter is an undefined tensor");
    if (info.head_dim == 0) info.head_dim = g.head_dim;
    if (info.q_heads == 0) info.q_heads = g.q_heads;
    if (info.kv_heads == 0) info.kv_heads = g.kv_heads;
    tensors.push_back({"parameter " + std::to_string(params.size()), p.sizes().vec(), info, ""});
    params.push_back(p);
  }
  BlockPlanConfig config{algorithm};
  config.state_bits = o.state_bits();
  return {BlockPlan(std::move(tensors), std::move(config)), std::move(params)};
}

namespace {
// The plan's weight decay as two groups: decayed (the defaults), and exempt (weight_decay 0).
std::vector<torch::optim::OptimizerParamGroup> decay_groups(const BlockPlan& plan,
                                                            const std::vector<at::Tensor>& params,
                                                            const AdamMiniOptions& defaults) {
  std::vector<at::Tensor> decay, no_decay;
  for (size_t i = 0; i < params.size(); ++i)
    (plan.decision(static_cast<int64_t>(i)).decay ? decay : no_decay).push_back(params[i]);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) groups.emplace_back(std::move(decay));
  if (!no_decay.empty())
    groups.emplace_back(std::move(no_decay),
                        std::make_unique<AdamMiniOptions>(AdamMiniOptions(defaults).weight_decay(0)));
  return groups;
}
}  // namespace

AdamMini::AdamMini(Planned p, const AdamMiniOptions& defaults)
    : PlanOptimizer(decay_groups(p.first, p.second, defaults), defaults, std::move(p.first),
                    p.second) {}

void AdamMini::extend_plan(const std::vector<at::Tensor>& params, const AdamMiniOptions&) {
  std::vector<BlockTensor> tensors;
  for (const auto& p : params) {
    RoleInfo info;
    info.role = p.dim() >= 2 ? Role::Linear : Role::Elementwise;
    tensors.push_back({"added parameter", p.sizes().vec(), info, ""});
  }
  plan_.add(std::move(tensors));
}

AdamMini::OpCall AdamMini::op_call(const AdamMiniOptions& o, const GroupLists& l) const {
  check_group_state_bits(o, plan_.config().state_bits);
  return adam_mini_call(o, l, [&](const at::Tensor& p) { return plan_.encoded(position(p)); });
}

}  // namespace memopt
