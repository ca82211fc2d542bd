// LibTorch front end: memopt::AdamW, AdamMini, SlimAdam, Apollo and ApolloMini as torch::optim::Optimizer subclasses,
// with LibTorch's Options / ParamState / step(closure) shape and torch::save / torch::load.
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

#include "memopt/common.h"
#include "memopt/partition.h"
#include "memopt/projection.h"

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
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// The APOLLO-specific options (adamw_rule for every group, the rest for a projected group,
// rank > 0): ValueError naming the key.
void check_apollo_options(const ApolloOptions& options);

// Per-parameter state of the Adam family. `step` is a 0-dim float32 CPU tensor (the fused
// update increments it, as torch.optim's fused Adam does), so a checkpoint holds only tensors.
template <typename Derived>
struct AdamFamilyParamState : public torch::optim::OptimizerCloneableParamState<Derived> {
  TORCH_ARG(torch::Tensor, step);
  TORCH_ARG(torch::Tensor, exp_avg);     // param-shaped
  TORCH_ARG(torch::Tensor, exp_avg_sq);  // see the derived state

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// exp_avg_sq is param-shaped.
struct AdamWParamState : public AdamFamilyParamState<AdamWParamState> {};
// exp_avg_sq is 1-D, one entry per block of the parameter's BlockSpec.
struct AdamMiniParamState : public AdamFamilyParamState<AdamMiniParamState> {};
// Projected parameters: the moments have R's shape; `proj` (if stored), `seed` (int64, random
// projections) and `limiter_norm` (the norm-growth limiter's last norm, -1 before the first)
// travel with the checkpoint. A rank-0 group's parameters hold AdamW's state only.
struct ApolloParamState : public AdamFamilyParamState<ApolloParamState> {
  TORCH_ARG(torch::Tensor, proj);
  TORCH_ARG(torch::Tensor, seed);
  TORCH_ARG(torch::Tensor, limiter_norm);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// What AdamW and AdamMini share: step(closure) with lazily created state and exactly one fused
// update call per param group, and save/load that validates a checkpoint completely before it
// touches the optimizer.
template <typename Options, typename State>
class AdamFamily : public torch::optim::Optimizer {
 public:
  // Runs `closure` (if given) with grad mode on, then steps every parameter with a gradient.
  // Bad input (dtype, shape, device, hyperparameters) raises before anything is written.
  torch::Tensor step(LossClosure closure = nullptr) override;
  // LibTorch's add_param_group replaces the options of a group of a non-built-in optimizer by
  // the defaults; this one keeps the group's own options (validated), like the constructor.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);
  void save(torch::serialize::OutputArchive& archive) const override;
  // Raises, leaving state and options as they were, unless the checkpoint has this optimizer's
  // groups, group sizes and state shapes.
  void load(torch::serialize::InputArchive& archive) override;
  // Steps left out because a gradient was not finite (defaults' nonfinite "skip"); saved.
  int64_t skipped_steps() const { return skipped_steps_; }

 protected:
  // One group's parameters that have gradients, as the parallel lists the fused ops take.
  struct GroupLists {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    std::vector<State*> states;  // parallel to params
  };

  // Groups that carry options keep them as given. (LibTorch merges group options only for its
  // own optimizer types and would otherwise replace them with the defaults.)
  AdamFamily(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
             const Options& defaults);

  const Options& group_options(size_t group) const {
    return static_cast<const Options&>(param_groups_[group].options());
  }
  // Called for the parameters of a group added after construction, with the options the group
  // will have (AdamMini assigns blocks, Apollo projections); may raise to refuse the group.
  virtual void adopt_params(const std::vector<at::Tensor>&, const Options&) {}
  // Sizes of a parameter's moments: for new state and to validate a checkpoint.
  virtual std::vector<int64_t> exp_avg_sizes(const at::Tensor& param) const {
    return param.sizes().vec();
  }
  virtual std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const = 0;
  // Whether the moments are elementwise with the parameter, and so take its layout
  // (memopt/layout.h); false for APOLLO's projected moments, whatever their shape.
  virtual bool moments_follow_param(const at::Tensor&) const { return true; }
  // State beyond step and the moments: set for new state, validated (and moved to the
  // parameter's device) for loaded state.
  virtual void init_extra_state(State&, const at::Tensor&) const {}
  virtual void check_extra_state(State&, const at::Tensor&, const std::string&) const {}
  // Everything the group's update checks before it writes (raises on bad input).
  virtual void check_group(const std::string& op, const Options&, const GroupLists& l) const {
    check_update_lists(op.c_str(), l.params, l.grads, l.exp_avgs, l.steps);
  }
  // The single fused update call for one group.
  virtual void update(const Options& options, const GroupLists& lists) = 0;
  // Whether this step must change nothing: the defaults' nonfinite is "skip" and a gradient of
  // the step is not finite (then counted). Called before anything is created or written.
  bool skips_step();
  int64_t skipped_steps_ = 0;

 private:
  void keep_group_options(size_t index, const torch::optim::OptimizerParamGroup& group);
  void check_loaded_state(State& state, const at::Tensor& param, size_t group, size_t index) const;
};

class AdamW : public AdamFamily<AdamWOptions, AdamWParamState> {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 AdamWOptions defaults = {});
  explicit AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults = {});

 protected:
  std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const override;
  void update(const AdamWOptions& options, const GroupLists& lists) override;
};

// Adam-mini: one second moment per Hessian block (see adam_mini.h and partition.h). Parameters
// are split into two groups: those with weight decay, and norms, biases and 1-D tensors with
// weight_decay 0 (an empty group is left out).
class AdamMini : public AdamFamily<AdamMiniOptions, AdamMiniParamState> {
 public:
  // Roles from names and shapes (role_from_name), e.g. model.named_parameters().
  AdamMini(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
           AdamMiniOptions defaults = {});
  // Explicit roles. RoleInfo fields head_dim, q_heads, kv_heads left 0 take the options' values.
  AdamMini(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {});

  // The blocks of a parameter given at construction (throws for any other tensor).
  const BlockSpec& block_spec(const torch::Tensor& param) const;

 protected:
  // Blocks of a parameter from its role (head geometry filled in from the options).
  using BlockRule = std::function<BlockSpec(const RoleInfo&, at::IntArrayRef)>;
  AdamMini(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params, AdamMiniOptions defaults,
           const BlockRule& rule, bool decay_by_dims_only);

  // Parameters of a group added later have no name: blocks from the shape alone (per output
  // neuron for >= 2-D, plain Adam for 1-D). Pass roles at construction for anything else.
  void adopt_params(const std::vector<at::Tensor>& params, const AdamMiniOptions&) override;
  std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const override;
  void update(const AdamMiniOptions& options, const GroupLists& lists) override;

 private:
  ska::flat_hash_map<void*, BlockSpec> specs_;  // keyed by TensorImpl*, as state_ is
};

// SlimAdam (Kalra et al., arXiv 2503.01843) with the paper's static table on roles (slim_adam.h):
// Adam-mini's update with other blocks (v averaged over fan-in for embedding, output, Q, K; over
// fan-out for V, attention output, MLP; norms, biases and unknown tensors uncompressed), on the
// same op. Weight decay on every tensor with >= 2 dims, as the reference. SNR-derived rules (any
// dim set per tensor) are available in the Python front end (memopt_core.SlimAdam(rules=...)).
class SlimAdam : public AdamMini {
 public:
  SlimAdam(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
           AdamMiniOptions defaults = {});
  SlimAdam(const std::vector<std::pair<torch::Tensor, RoleInfo>>& params,
           AdamMiniOptions defaults = {});
};

// APOLLO (Zhu et al., arXiv 2412.05270) as apollo-torch 1.0.3's APOLLOAdamW: the fused
// memopt::apollo_ op for projected groups (rank > 0), memopt::adamw_ with the group's
// adamw_rule (apollo-torch's by default) for the others. Random
// projections are seeded as apollo-torch seeds them: a parameter's 1-based position in the
// optimizer, so the same parameters in the same order give the Python front end's P.
class Apollo : public AdamFamily<ApolloOptions, ApolloParamState> {
 public:
  // Attention and MLP weights (roles from names, 2-D) are projected with the defaults' rank;
  // every other parameter goes to a rank-0 (AdamW) group.
  Apollo(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
         ApolloOptions defaults = {});
  // Explicit groups: each group's own options (or the defaults) decide; rank 0 = AdamW.
  explicit Apollo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                  ApolloOptions defaults = {});

 protected:
  void adopt_params(const std::vector<at::Tensor>& params, const ApolloOptions& options) override;
  std::vector<int64_t> exp_avg_sizes(const at::Tensor& param) const override;
  std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const override;
  bool moments_follow_param(const at::Tensor& param) const override;
  void init_extra_state(ApolloParamState& state, const at::Tensor& param) const override;
  void check_extra_state(ApolloParamState& state, const at::Tensor& param,
                         const std::string& where) const override;
  void check_group(const std::string& op, const ApolloOptions& o,
                   const GroupLists& l) const override;
  void update(const ApolloOptions& options, const GroupLists& lists) override;

 private:
  struct Layout {
    std::vector<int64_t> low_rank, proj;  // empty low_rank: not projected (AdamW)
    int64_t seed;
    bool random, store;
  };
  const Layout& layout(const at::Tensor& param) const;
  void add_layouts(const std::vector<at::Tensor>& params, const ApolloOptions& options);
  ska::flat_hash_map<void*, Layout> layouts_;
};

// APOLLO-Mini: Apollo with ApolloOptions::mini() defaults.
class ApolloMini : public Apollo {
 public:
  ApolloMini(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
             ApolloOptions defaults = ApolloOptions::mini())
      : Apollo(named_params, std::move(defaults)) {}
};

extern template struct AdamFamilyParamState<AdamWParamState>;
extern template struct AdamFamilyParamState<AdamMiniParamState>;
extern template struct AdamFamilyParamState<ApolloParamState>;
extern template class AdamFamily<AdamWOptions, AdamWParamState>;
extern template class AdamFamily<AdamMiniOptions, AdamMiniParamState>;
extern template class AdamFamily<ApolloOptions, ApolloParamState>;

}  // namespace memopt
