// LibTorch front end: memopt::AdamW, AdamMini, SlimAdam, Apollo and ApolloMini, each
// memopt::PlanOptimizer (plan_optimizer.h) over its options and its plan (BlockPlan, ApolloPlan),
// with LibTorch's Options / step(closure) shape and torch::save / torch::load.
//
//   memopt::AdamMini opt(named_params, memopt::AdamMiniOptions(3e-4).dim(768).n_heads(12));
//   opt.zero_grad(); loss.backward(); opt.step();
//   torch::save(opt, "opt.pt");  ...  torch::load(opt, "opt.pt");
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "memopt/apollo_plan.h"
#include "memopt/block_plan.h"
#include "memopt/common.h"
#include "memopt/plan_optimizer.h"

namespace memopt {

// The hyperparameters every Adam-family options class has. A macro rather than a base class so
// that chained setters (AdamMiniOptions().lr(1e-3).dim(512)) return the derived type: TORCH_ARG
// setters return the class that declares them.
#define MEMOPT_ADAM_OPTIONS_ARGS(DEFAULT_WEIGHT_DECAY)         \
 public:                                                       \
  using betas_t = std::tuple<double, double>;                  \
  TORCH_ARG(double, lr) = 1e-3;                                \
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);     \
  TORCH_ARG(double, eps) = 1e-8;                               \
  TORCH_ARG(double, weight_decay) = DEFAULT_WEIGHT_DECAY;      \
  /* "propagate" or "skip" (nonfinite.h); the optimizer's */   \
  /* defaults decide, for the whole step */                    \
  TORCH_ARG(std::string, nonfinite) = "propagate";             \
                                                               \
 public:                                                       \
  double get_lr() const override { return lr(); }              \
  void set_lr(const double new_lr) override { lr(new_lr); }

struct AdamWOptions : public torch::optim::OptimizerCloneableOptions<AdamWOptions> {
  // Implicit from a double, as LibTorch's loader constructs options from 0.
  AdamWOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_ADAM_OPTIONS_ARGS(1e-2)  // torch.optim.AdamW's default decay
  void check() const {}           // Adam's hyperparameters only (PlanOptimizer checks them)
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// Head geometry decides the per-head blocks of Q/K (and fused QKV) weights. It is read once, at
// construction: the blocks of a tensor never change afterwards, even if the options are edited
// or loaded from a checkpoint.
struct AdamMiniOptions : public torch::optim::OptimizerCloneableOptions<AdamMiniOptions> {
  AdamMiniOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_ADAM_OPTIONS_ARGS(0.0)  // adam-mini 1.1.1's default decay
  TORCH_ARG(int64_t, dim) = 0;         // model width
  TORCH_ARG(int64_t, n_heads) = 0;     // query heads (0: no per-head blocks)
  TORCH_ARG(int64_t, n_kv_heads) = 0;  // key/value heads (0: n_heads)
  TORCH_ARG(int64_t, head_dim) = 0;    // 0: dim / n_heads

 public:
  // The head geometry: >= 0, dim a multiple of n_heads (or head_dim given), n_heads a
  // multiple of n_kv_heads; RoleInfo fields as they fill in a role's 0s.
  void check() const { head_geometry(); }
  RoleInfo head_geometry() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// APOLLO / APOLLO-Mini (apollo.h). A group with rank > 0 is projected (2-D parameters only);
// rank 0 makes it a plain AdamW group (embeddings, norms, output layer). Like Adam-mini's head
// geometry, a parameter's projected shapes are fixed at construction from its group's options.
struct ApolloOptions : public torch::optim::OptimizerCloneableOptions<ApolloOptions> {
  ApolloOptions(double lr = 1e-3) { this->lr(lr).eps(1e-6); }  // NOLINT(google-explicit-constructor)
  MEMOPT_ADAM_OPTIONS_ARGS(0.0)  // apollo-torch's defaults: eps 1e-6, no decay
  TORCH_ARG(int64_t, rank) = 256;
  TORCH_ARG(std::string, proj) = "random";       // "random" | "svd"
  TORCH_ARG(std::string, proj_type) = "std";     // "std" | "reverse_std" | "left" | "right"
  TORCH_ARG(std::string, scale_type) = "channel";  // "channel" | "tensor"
  TORCH_ARG(int64_t, update_proj_gap) = 200;
  TORCH_ARG(double, scale) = 1.0;
  TORCH_ARG(double, norm_growth_limit) = 1.01;   // 0 turns the limiter off
  TORCH_ARG(bool, scale_front) = false;
  TORCH_ARG(bool, store_projection) = true;      // false: regenerate P from its seed each step
  // The rank-0 (AdamW) groups' rule: "apollo" (apollo-torch's AdamW: eps before bias correction,
  // decay after the update) or "torch" (torch.optim.AdamW's); see AdamWRule in common.h. A
  // checkpoint saved before this option existed loads as "torch", the rule it was stepped with.
  TORCH_ARG(std::string, adamw_rule) = "apollo";

 public:
  // APOLLO-Mini's defaults (arXiv 2412.05270 §3.3): rank 1, one tensor-wise factor, scale 128.
  static ApolloOptions mini(double lr = 1e-3) {
    return ApolloOptions(lr).rank(1).scale_type("tensor").scale(128.0);
  }
  // The group's settings as ApolloPlan takes them (rank 0: AdamW).
  ApolloSettings settings() const;
  void check() const;  // rank >= 0, adamw_rule, and a projected group's settings
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// Per-parameter state: memopt::ParamState (plan_optimizer.h), the plan's tensors by key.

// AdamW (torch.optim.AdamW's rule) on the memopt::adamw_ op.
class AdamW : public PlanOptimizer<AdamWOptions> {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 AdamWOptions defaults = {});
  explicit AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults = {});
  const BlockPlan& plan() const override { return plan_; }

 protected:
  void extend_plan(const std::vector<at::Tensor>& params, const AdamWOptions&) override;
  void check_group(const AdamWOptions& o, const GroupLists& l) const override { run(o, l, true); }
  void update(const AdamWOptions& o, const GroupLists& l) override { run(o, l, false); }

 private:
  void run(const AdamWOptions& o, const GroupLists& l, bool validate) const;
  BlockPlan plan_;
};

// Adam-mini: one second moment per Hessian block (memopt::BlockPlan's blocks on the roles).
// Parameters are split into two groups: those with weight decay, and those the plan exempts
// (norms, biases, 1-D tensors) with weight_decay 0 (an empty group is left out).
class AdamMini : public PlanOptimizer<AdamMiniOptions> {
 public:
  // Roles from names and shapes (infer_role with names only, as the Python front end decides
  // for bare named parameters), e.g. model.named_parameters().
  AdamMini(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
           AdamMiniOptions defaults = {});
  // Explicit roles. RoleInfo fields head_dim, q_heads, kv_heads left 0 take the options' values.
  AdamMini(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {});

  const BlockPlan& plan() const override { return plan_; }
  // The blocks of a parameter (raises for a tensor the optimizer does not have).
  const BlockSpec& block_spec(const torch::Tensor& param) const;

 protected:
  struct Planned;  // the plan and the parameters in its order
  AdamMini(Planned planned, const AdamMiniOptions& defaults);
  static Planned planned(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                         const AdamMiniOptions& o, BlockAlgorithm algorithm);
  static Planned planned(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
                         const AdamMiniOptions& o, BlockAlgorithm algorithm);
  // Parameters of a group added later have no name: blocks from the shape alone (per output
  // neuron for >= 2-D, plain Adam for 1-D). Pass roles at construction for anything else.
  void extend_plan(const std::vector<at::Tensor>& params, const AdamMiniOptions&) override;
  void check_group(const AdamMiniOptions& o, const GroupLists& l) const override {
    run(o, l, true);
  }
  void update(const AdamMiniOptions& o, const GroupLists& l) override { run(o, l, false); }

 private:
  void run(const AdamMiniOptions& o, const GroupLists& l, bool validate) const;
  BlockPlan plan_;
};

// SlimAdam (Kalra et al., arXiv 2503.01843) with the paper's static table on roles: Adam-mini's
// update with BlockPlan's SlimAdam layouts (v averaged over fan-in for embedding, output, Q, K;
// over fan-out for V, attention output, MLP; norms, biases and unknown tensors uncompressed),
// on the same op. Weight decay on every tensor with >= 2 dims, as the reference.
class SlimAdam : public AdamMini {
 public:
  SlimAdam(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
           AdamMiniOptions defaults = {});
  SlimAdam(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {});
};

// APOLLO (Zhu et al., arXiv 2412.05270) as apollo-torch 1.0.3's APOLLOAdamW, every decision
// memopt::ApolloPlan's: the memopt::apollo_ op for projected groups (rank > 0), memopt::adamw_
// with the group's adamw_rule (apollo-torch's by default) for the others. Random projections are
// seeded as apollo-torch seeds them (a parameter's 1-based position in the optimizer), so the
// same parameters in the same order give the Python front end's P.
class Apollo : public PlanOptimizer<ApolloOptions> {
 public:
  // Attention and MLP weights (roles from names, 2-D) are projected with the defaults' rank,
  // capped per tensor at its smaller side, one group per effective rank; every other parameter
  // goes to a rank-0 (AdamW) group.
  Apollo(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
         ApolloOptions defaults = {});
  // Explicit groups: each group's own options (or the defaults) decide; rank 0 = AdamW.
  explicit Apollo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                  ApolloOptions defaults = {});
  const ApolloPlan& plan() const override { return plan_; }

 protected:
  void extend_plan(const std::vector<at::Tensor>& params, const ApolloOptions& o) override;
  void check_group(const ApolloOptions& o, const GroupLists& l) const override { run(o, l, true); }
  void update(const ApolloOptions& o, const GroupLists& l) override { run(o, l, false); }

 private:
  void run(const ApolloOptions& o, const GroupLists& l, bool validate) const;
  ApolloPlan plan_;
};

// APOLLO-Mini: Apollo with ApolloOptions::mini() defaults.
class ApolloMini : public Apollo {
 public:
  ApolloMini(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
             ApolloOptions defaults = ApolloOptions::mini())
      : Apollo(named_params, std::move(defaults)) {}
};

}  // namespace memopt
