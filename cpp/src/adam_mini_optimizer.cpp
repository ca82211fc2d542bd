// memopt::AdamMini, the LibTorch optimizer: roles -> blocks once, at construction, then one
// fused adam_mini_update_ call per param group (shared machinery: optimizers.cpp).
#include <ATen/core/dispatch/Dispatcher.h>

#include "memopt/adam_mini.h"
#include "memopt/optimizers.h"
#include "memopt/slim_adam.h"

namespace memopt {

namespace {
using RoleParams = std::vector<std::pair<at::Tensor, RoleInfo>>;

// The query/key head geometry the options describe, validated.
RoleInfo head_geometry(const AdamMiniOptions& o) {
  TORCH_CHECK_VALUE(o.dim() >= 0 && o.n_heads() >= 0 && o.n_kv_heads() >= 0 && o.head_dim() >= 0,
                    "AdamMini: dim, n_heads, n_kv_heads and head_dim must be >= 0");
  RoleInfo info;
  info.head_dim = o.head_dim();
  if (info.head_dim == 0 && o.n_heads() > 0) {
    TORCH_CHECK_VALUE(o.dim() > 0 && o.dim() % o.n_heads() == 0, "AdamMini: dim (", o.dim(),
                      ") must be a positive multiple of n_heads (", o.n_heads(),
                      "), or give head_dim");
    info.head_dim = o.dim() / o.n_heads();
  }
  info.q_heads = o.n_heads();
  info.kv_heads = o.n_kv_heads() > 0 ? o.n_kv_heads() : o.n_heads();
  TORCH_CHECK_VALUE(o.n_kv_heads() == 0 || (o.n_heads() > 0 && o.n_heads() % o.n_kv_heads() == 0),
                    "AdamMini: n_heads (", o.n_heads(), ") must be a multiple of n_kv_heads (",
                    o.n_kv_heads(), ")");
  return info;
}

// Roles of bare named parameters, decided as the Python front end decides them (infer_role with
// names only), with the head geometry of the options.
RoleParams roles_from_names(const std::vector<std::pair<std::string, at::Tensor>>& named,
                            const AdamMiniOptions& o, bool qk_need_heads) {
  const RoleInfo g = head_geometry(o);
  TensorFacts facts;
  facts.qk_need_heads = qk_need_heads;
  facts.heads = {o.dim(), g.q_heads, g.kv_heads, g.head_dim};
  RoleParams out;
  for (const auto& [name, p] : named) {
    TORCH_CHECK_VALUE(p.defined(), "AdamMini: parameter '", name, "' is an undefined tensor");
    out.emplace_back(p, infer_role(name, p.sizes(), facts).info);
  }
  return out;
}

// Decoupled weight decay: tensors with >= 2 dims whose role decays (roles.h), or, as
// SlimAdam's reference does, every tensor with >= 2 dims.
std::vector<torch::optim::OptimizerParamGroup> decay_groups(const RoleParams& params,
                                                            const AdamMiniOptions& defaults,
                                                            bool by_dims_only) {
  std::vector<at::Tensor> decay, no_decay;
  for (const auto& [p, info] : params) {
    TORCH_CHECK_VALUE(p.defined(), "AdamMini: a parameter is an undefined tensor");
    const bool decays = p.dim() >= 2 && (by_dims_only || role_traits(info.role).decays);
    (decays ? decay : no_decay).push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) groups.emplace_back(std::move(decay));
  if (!no_decay.empty())
    groups.emplace_back(std::move(no_decay),
                        std::make_unique<AdamMiniOptions>(AdamMiniOptions(defaults).weight_decay(0)));
  return groups;
}
}  // namespace

AdamMini::AdamMini(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                   AdamMiniOptions defaults)
    : AdamMini(roles_from_names(named_params, defaults, true), defaults) {}

SlimAdam::SlimAdam(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                   AdamMiniOptions defaults)
    : SlimAdam(roles_from_names(named_params, defaults, false), defaults) {}

SlimAdam::SlimAdam(const RoleParams& params, AdamMiniOptions defaults)
    : AdamMini(params, std::move(defaults), [](const RoleInfo& info, at::IntArrayRef shape) {
        return slim_adam_table_layout(info, shape).spec;
      }, /*decay_by_dims_only=*/true) {}

AdamMini::AdamMini(const RoleParams& params, AdamMiniOptions defaults)
    : AdamMini(params, std::move(defaults),
               [](const RoleInfo& info, at::IntArrayRef shape) {
                 return adam_mini_blocks(info, shape);
               }, /*decay_by_dims_only=*/false) {}

AdamMini::AdamMini(const RoleParams& params, AdamMiniOptions defaults, const BlockRule& rule,
                   bool decay_by_dims_only)
    : AdamFamily(decay_groups(params, defaults, decay_by_dims_only), defaults) {
  const RoleInfo geometry = head_geometry(defaults);
  for (const auto& [p, given] : params) {
    RoleInfo info = given;
    if (info.head_dim == 0) info.head_dim = geometry.head_dim;
    if (info.q_heads == 0) info.q_heads = geometry.q_heads;
    if (info.kv_heads == 0) info.kv_heads = geometry.kv_heads;
    BlockSpec spec = rule(info, p.sizes());
    check_block_spec(spec, p.numel(), "AdamMini: " + role_name(info.role) + " parameter");
    specs_.emplace(p.unsafeGetTensorImpl(), std::move(spec));
  }
}

const BlockSpec& AdamMini::block_spec(const torch::Tensor& param) const {
  auto it = specs_.find(param.unsafeGetTensorImpl());
  TORCH_CHECK_VALUE(it != specs_.end(),
                    "AdamMini: tensor of shape ", param.sizes(),
                    " was not given to the constructor; a parameter added later has no role, "
                    "so no blocks (construct the optimizer with it)");
  return it->second;
}

void AdamMini::adopt_params(const std::vector<at::Tensor>& params, const AdamMiniOptions&) {
  for (const auto& p : params) {
    RoleInfo info;
    info.role = p.dim() >= 2 ? Role::Linear : Role::Elementwise;
    specs_[p.unsafeGetTensorImpl()] = adam_mini_blocks(info, p.sizes());
  }
}

std::vector<int64_t> AdamMini::exp_avg_sq_sizes(const at::Tensor& param) const {
  return {num_blocks(block_spec(param))};
}

void AdamMini::update(const AdamMiniOptions& o, const GroupLists& l) {
  std::vector<BlockSpec> specs;
  specs.reserve(l.params.size());
  for (const auto& p : l.params) specs.push_back(block_spec(p));
  // Through the dispatcher, as torch.ops.memopt.adam_mini_ (device-dispatched kernels).
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("memopt::adam_mini_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                   at::TensorList, at::IntArrayRef, const at::Tensor&, double,
                                   double, double, double)>();
  const auto blocks = encode_block_specs(specs);
  op.call(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.steps, blocks,
          at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()),
          std::get<1>(o.betas()), o.eps(), o.weight_decay());
}

}  // namespace memopt
