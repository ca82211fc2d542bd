// memopt::ApolloPlan: every decision APOLLO / APOLLO-Mini make, once, for both front ends (the
// Python memopt_core.Apollo and the LibTorch memopt::Apollo): which tensors are projected and at
// which rank, each tensor's settings (validated), its apollo-torch seed and its state layout.
// The front ends keep their own param groups and only apply what the plan lays out.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "memopt/apollo.h"
#include "memopt/plan.h"
#include "memopt/roles.h"

namespace memopt {

// ---- which tensors are projected (the constructor's grouping, before any param group exists)
// One tensor as the grouping rule sees it: its shape and, when the front end knows its name, its
// role (nullopt: an unnamed tensor, which is projected whenever it is a matrix).
struct ApolloCandidate {
  std::vector<int64_t> shape;
  std::optional<Role> role;
};

// Each tensor's effective rank, 0 for a tensor that takes AdamW: the 2-D tensors whose role is a
// hidden matrix (attention and MLP linears, as apollo-torch's pre-training scripts pick them), or
// every 2-D tensor when it has no role, get max(1, min(rank, rows, cols)): a rank above the
// smaller side would keep more state than AdamW. rank 0 projects nothing; rank < 0 raises.
std::vector<int64_t> apollo_ranks(const std::vector<ApolloCandidate>& tensors, int64_t rank);

// Param groups for those ranks: one per distinct effective rank in order of first appearance
// (apollo-torch takes one rank per group), then one of the AdamW tensors (rank 0) if any. Each
// is (rank, positions in `ranks`).
std::vector<std::pair<int64_t, std::vector<int64_t>>> apollo_rank_groups(
    const std::vector<int64_t>& ranks);

// ---- the plan
// One param group's settings: apollo-torch's group keys. rank nullopt: the group takes AdamW
// (its adamw_rule); the other keys then do not matter and are not checked.
struct ApolloSettings {
  std::optional<int64_t> rank;
  std::string proj = "random", proj_type = "std", scale_type = "channel";
  int64_t update_proj_gap = 200;
  double scale = 1.0;
  double norm_growth_limit = 1.01;  // 0: no limiter
  bool scale_front = false;
  bool store_projection = true;     // false: P is regenerated from its seed every step
  std::string adamw_rule = "apollo";
  // AdamW groups: their full-size moments' bits (memopt/plan.h check_state_bits), and, with
  // per_row_v (the low-memory embedding mode: embeddings and output head), Adam-mini's per-token
  // second moment (one v per row, adam_mini_) instead of AdamW's.
  int64_t state_bits = 32;
  bool per_row_v = false;
  // The adamw_rule of a group saved before the option existed: such checkpoints were stepped
  // with torch.optim.AdamW's rule and resume with it.
  static constexpr const char* kLegacyAdamWRule = "torch";
};

class ApolloPlan : public OptimizerPlan {
 public:
  // Appends a param group's tensors, positions size() .. size() + shapes.size() - 1 (the front
  // end's optimizer order). `split[k]` (empty: none): tensor k is sharded over more than one
  // rank (FSDP2), which proj="svd" cannot step. Raises c10::ValueError naming the bad setting
  // or tensor, leaving the plan as it was; the tensors already planned never change.
  void add_group(const std::vector<std::vector<int64_t>>& shapes, const ApolloSettings& settings,
                 const std::vector<bool>& split = {});

  int64_t size() const override { return static_cast<int64_t>(tensors_.size()); }
  // Projected: exp_avg, exp_avg_sq (R's shape; sharded with the weight along the dim that holds
  // R's channels), proj (stored only), seed (proj="random"), limiter_norm (-1: no norm yet).
  // AdamW: exp_avg, exp_avg_sq shaped and laid out like the parameter.
  StateLayout state(int64_t i) const override;

  bool projected(int64_t i) const { return tensor(i).projector.has_value(); }
  // An AdamW-group tensor with per_row_v: its blocks in the ops' flat list (encode_block_specs:
  // one per row; a 1-D tensor is one block), for adam_mini_. Raises for any other tensor.
  std::vector<int64_t> row_blocks(int64_t i) const;
  // Tensor i's projector; raises for an AdamW tensor.
  const Projector& projector(int64_t i) const;
  const ApolloSettings& settings(int64_t i) const { return groups_[tensor(i).group]; }
  // The op's config for tensor i's group (projected tensors only).
  ApolloConfig config(int64_t i) const;
  // apollo-torch's first seed of tensor i: its 1-based position among all parameters.
  int64_t seed(int64_t i) const;
  // Scaling factors its update computes: one per channel, or one for the tensor; 0 for AdamW.
  int64_t scale_factors(int64_t i) const;
  // Workspace bytes of tensor i's update (0 for AdamW): the planner's scratch figure.
  int64_t workspace_bytes(int64_t i, at::ScalarType dtype) const;

 private:
  struct Planned {
    size_t group = 0;  // index into groups_
    std::vector<int64_t> shape;
    std::optional<Projector> projector;
  };
  const Planned& tensor(int64_t i) const;

  std::vector<ApolloSettings> groups_;
  std::vector<Planned> tensors_;
};

}  // namespace memopt
