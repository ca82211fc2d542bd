// LibTorch front end: memopt::AdamW, AdamMini, SlimAdam, Apollo and ApolloMini, each
// memopt::PlanOptimizer (plan_optimizer.h) over its options and its plan (BlockPlan, ApolloPlan).
//
//   memopt::AdamMini opt(named_params, memopt::AdamMiniOptions(3e-4).dim(768).n_heads(12));
//   opt.zero_grad(); loss.backward(); opt.step();
//   torch::save(opt, "opt.pt");  ...  torch::load(opt, "opt.pt");
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "memopt/apollo_plan.h"
#include "memopt/block_plan.h"
#include "memopt/plan_optimizer.h"

namespace memopt {

using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

// Options are implicit from a double, as LibTorch's loader constructs them from 0.
struct AdamWOptions : public torch::optim::OptimizerCloneableOptions<AdamWOptions> {
  AdamWOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_OPTIONS(1e-2, MEMOPT_NO_FIELDS)  // torch.optim.AdamW's default decay
  void check() const {}
};

// Head geometry decides the per-head blocks of Q/K (and fused QKV) weights, once, at
// construction: a tensor's blocks never change, even if the options are edited or loaded.
#define MEMOPT_ADAM_MINI_FIELDS(X)                                        \
  X(int64_t, dim, 0, {})        /* model width */                         \
  X(int64_t, n_heads, 0, {})    /* query heads (0: no per-head blocks) */ \
  X(int64_t, n_kv_heads, 0, {}) /* key/value heads (0: n_heads) */        \
  X(int64_t, head_dim, 0, {})   /* 0: dim / n_heads */
struct AdamMiniOptions : public torch::optim::OptimizerCloneableOptions<AdamMiniOptions> {
  AdamMiniOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_OPTIONS(0.0, MEMOPT_ADAM_MINI_FIELDS)  // adam-mini 1.1.1's default decay
  // The head geometry: >= 0, dim a multiple of n_heads (or head_dim given), n_heads a
  // multiple of n_kv_heads; RoleInfo fields as they fill in a role's 0s.
  void check() const { head_geometry(); }
  RoleInfo head_geometry() const;
};

// APOLLO / APOLLO-Mini (apollo.h). A group with rank > 0 is projected (2-D parameters only,
// shapes fixed at construction); rank 0 makes it an AdamW group stepped with adamw_rule,
// "apollo" (apollo-torch's) or "torch" (AdamWRule, common.h): the rule a checkpoint from before
// the option was stepped with, and loads as.
#define MEMOPT_APOLLO_FIELDS(X)                                                      \
  X(int64_t, rank, 256, {})                                                          \
  X(std::string, proj, "random", {})        /* "random" | "svd" */                   \
  X(std::string, proj_type, "std", {})      /* std | reverse_std | left | right */   \
  X(std::string, scale_type, "channel", {}) /* "channel" | "tensor" */               \
  X(int64_t, update_proj_gap, 200, {})                                               \
  X(double, scale, 1.0, {})                                                          \
  X(double, norm_growth_limit, 1.01, {})    /* 0 turns the limiter off */            \
  X(bool, scale_front, false, {})                                                    \
  X(bool, store_projection, true, {})       /* false: P regenerated from its seed */ \
  X(std::string, adamw_rule, "apollo", std::string(ApolloSettings::kLegacyAdamWRule))  \
  X(std::string, embeddings, "adamw", std::string("adamw")) /* "adam_mini": per-row v */
struct ApolloOptions : public torch::optim::OptimizerCloneableOptions<ApolloOptions> {
  ApolloOptions(double lr = 1e-3) { this->lr(lr).eps(1e-6); }  // NOLINT(google-explicit-constructor)
  MEMOPT_OPTIONS(0.0, MEMOPT_APOLLO_FIELDS)  // apollo-torch's defaults: eps 1e-6, no decay
  // APOLLO-Mini's defaults (arXiv 2412.05270 §3.3): rank 1, one tensor-wise factor, scale 128.
  static ApolloOptions mini(double lr = 1e-3) {
    return ApolloOptions(lr).rank(1).scale_type("tensor").scale(128.0);
  }
  ApolloSettings settings() const {  // as ApolloPlan takes them (rank 0: AdamW)
    return {rank() > 0 ? std::optional<int64_t>(rank()) : std::nullopt, proj(), proj_type(),
            scale_type(), update_proj_gap(), scale(), norm_growth_limit(), scale_front(),
            store_projection(), adamw_rule(), state_bits(), per_row_v()};
  }
  // The low-memory embedding mode of an AdamW group (rank 0) with embeddings "adam_mini":
  // Adam-mini's per-row v on memopt::adam_mini_ (ApolloSettings::per_row_v).
  bool per_row_v() const { return rank() == 0 && embeddings() == "adam_mini"; }
  void check() const {  // rank >= 0, adamw_rule, and a projected group's settings
    TORCH_CHECK_VALUE(rank() >= 0, "Apollo: rank must be >= 0 (0: plain AdamW), got ", rank());
    TORCH_CHECK_VALUE(embeddings() == "adamw" || embeddings() == "adam_mini",
                      "Apollo: embeddings must be 'adamw' or 'adam_mini' (per-token v), got '",
                      embeddings(), "'");
    ApolloPlan().add_group({}, settings());  // the plan's checks, naming the key
  }
};

// AdamW (torch.optim.AdamW's rule) on the memopt::adamw_ op.
class AdamW : public PlanOptimizer<AdamWOptions, BlockPlan> {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 AdamWOptions defaults = {})
      : PlanOptimizer(param_groups, defaults,
                      BlockPlan({}, {BlockAlgorithm::AdamW, "auto", 0, 0, false, {},
                                     defaults.state_bits()})) {
    for (const auto& group : param_groups_) extend_plan(group.params(), defaults);
  }
  explicit AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults = {})
      : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

 protected:
  void extend_plan(const std::vector<at::Tensor>& params, const AdamWOptions&) override {
    std::vector<BlockTensor> tensors;
    for (const auto& p : params) {
      TORCH_CHECK_VALUE(p.defined(), "AdamW: a parameter is an undefined tensor");
      tensors.push_back({"", p.sizes().vec()});
    }
    plan_.add(std::move(tensors));
  }
  OpCall op_call(const AdamWOptions& o, const GroupLists& l) const override {
    check_group_state_bits(o, plan_.config().state_bits);
    return adam_call("adamw_", {l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
                                l.list("step")}, o, {"torch"}, {"exp_avg", "exp_avg_sq"});
  }
};

// Adam-mini: one second moment per Hessian block (memopt::BlockPlan's blocks on the roles).
// Parameters are split into two groups: those with weight decay, and those the plan exempts
// (norms, biases, 1-D tensors) with weight_decay 0 (an empty group is left out).
class AdamMini : public PlanOptimizer<AdamMiniOptions, BlockPlan> {
 public:
  // Roles from names and shapes (infer_role with names only, as the Python front end decides
  // for bare named parameters), e.g. model.named_parameters().
  AdamMini(const NamedParams& named_params, AdamMiniOptions defaults = {})
      : AdamMini(planned(named_params, defaults, BlockAlgorithm::AdamMini), defaults) {}
  // Explicit roles. RoleInfo fields head_dim, q_heads, kv_heads left 0 take the options' values.
  AdamMini(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {})
      : AdamMini(planned(params, defaults, BlockAlgorithm::AdamMini), defaults) {}

  // The blocks of a parameter (raises for a tensor the optimizer does not have).
  const BlockSpec& block_spec(const torch::Tensor& param) const {
    return plan_.decision(position(param)).spec;
  }

 protected:
  using Planned = std::pair<BlockPlan, std::vector<at::Tensor>>;  // parameters in plan order
  AdamMini(Planned planned, const AdamMiniOptions& defaults);
  static Planned planned(const NamedParams& named, const AdamMiniOptions& o, BlockAlgorithm a);
  static Planned planned(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
                         const AdamMiniOptions& o, BlockAlgorithm a);
  // A group added later has no names: blocks from the shape alone (per output neuron for >= 2-D,
  // plain Adam for 1-D). Pass roles at construction for anything else.
  void extend_plan(const std::vector<at::Tensor>& params, const AdamMiniOptions&) override;
  OpCall op_call(const AdamMiniOptions& o, const GroupLists& l) const override;
};

// SlimAdam (Kalra et al., arXiv 2503.01843) with the paper's static table on roles: Adam-mini's
// update with BlockPlan's SlimAdam layouts (v averaged over fan-in for embedding, output, Q, K;
// over fan-out for V, attention output, MLP; norms, biases and unknown tensors uncompressed),
// on the same op. Weight decay on every tensor with >= 2 dims, as the reference.
class SlimAdam : public AdamMini {
 public:
  SlimAdam(const NamedParams& named_params, AdamMiniOptions defaults = {})
      : AdamMini(planned(named_params, defaults, BlockAlgorithm::SlimAdam), defaults) {}
  SlimAdam(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {})
      : AdamMini(planned(params, defaults, BlockAlgorithm::SlimAdam), defaults) {}
};

// APOLLO (Zhu et al., arXiv 2412.05270) as apollo-torch 1.0.3's APOLLOAdamW, every decision
// memopt::ApolloPlan's: the memopt::apollo_ op for projected groups (rank > 0), memopt::adamw_
// with the group's adamw_rule for the others. Random projections are seeded as apollo-torch
// seeds them (a parameter's 1-based position), so the same parameters in the same order give
// the Python front end's P.
class Apollo : public PlanOptimizer<ApolloOptions, ApolloPlan> {
 public:
  // Attention and MLP weights (roles from names, 2-D) are projected with the defaults' rank,
  // capped per tensor at its smaller side, one group per effective rank; every other parameter
  // goes to a rank-0 (AdamW) group; with embeddings "adam_mini" the embeddings and output head
  // to a rank-0 group of their own in that mode, before the rest (the Python front end's
  // groups, so the same positions and seeds).
  Apollo(const NamedParams& named_params, ApolloOptions defaults = {});
  // Explicit groups: each group's own options (or the defaults) decide; rank 0 = AdamW.
  explicit Apollo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                  ApolloOptions defaults = {})
      : PlanOptimizer(param_groups, defaults, ApolloPlan()) {
    for (size_t i = 0; i < param_groups_.size(); ++i)
      extend_plan(param_groups_[i].params(), group_options(i));
  }

 protected:
  void extend_plan(const std::vector<at::Tensor>& params, const ApolloOptions& o) override {
    std::vector<std::vector<int64_t>> shapes;
    for (const auto& p : params) shapes.push_back(p.sizes().vec());
    plan_.add_group(shapes, o.settings());
  }
  OpCall op_call(const ApolloOptions& o, const GroupLists& l) const override;
  // apollo_ given found_inf refreshes no projection (memopt/apollo.h), so a step decides its
  // skip on the device only when no projected tensor can be due for a refresh: none new, and
  // no count the host may not know exactly (step_range) a multiple of update_proj_gap. About
  // one step per gap is decided on the host, the first included. (Seeds stay on the CPU, so
  // store_projection=False draws P there without a synchronisation.)
  bool decides_on_device(const std::vector<GroupLists>& lists) const override;
};

// APOLLO-Mini: Apollo with ApolloOptions::mini() defaults.
class ApolloMini : public Apollo {
 public:
  ApolloMini(const NamedParams& named_params, ApolloOptions defaults = ApolloOptions::mini())
      : Apollo(named_params, std::move(defaults)) {}
};

}  // namespace memopt
