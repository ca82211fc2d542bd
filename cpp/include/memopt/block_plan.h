// memopt::BlockPlan: every decision of the optimizers that run on the Adam ops (AdamW on adamw_,
// Adam-mini and SlimAdam on adam_mini_), made once from the tensors' names, shapes and roles and
// the options, for both front ends: each tensor's second-moment blocks, its weight decay, its
// state layout and, for SlimAdam, which rule decided its layout.
//
// What the front end does first: infer each tensor's role (memopt/roles.h; the Python front end
// reads the module facts from nn.Module types) and read a rules file. The plan takes the role as
// decided; it only refines it into blocks.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "memopt/partition.h"
#include "memopt/plan.h"
#include "memopt/roles.h"

namespace memopt {

enum class BlockAlgorithm { AdamW, AdamMini, SlimAdam };
BlockAlgorithm block_algorithm_from_string(const std::string& name);  // adamw | adam_mini | slim_adam

// One tensor, in the front end's optimizer order.
struct BlockTensor {
  std::string name;
  std::vector<int64_t> shape;
  RoleInfo role;     // infer_role's decision (unused by AdamW and by partition="reference")
  std::string note;  // infer_role's note: why the paper's per-head blocks were not used
};

// One entry of SlimAdam's rules as the user wrote it: the dims to average (empty or null:
// uncompressed), "table" (the static table's choice), or anything else, kept as written so the
// error can quote it.
struct SlimRule {
  enum class Kind { Dims, Table, Invalid } kind = Kind::Dims;
  std::vector<int64_t> dims;
  std::string text;  // Invalid: the value as written
};

// SlimAdam's rules: the paper's static table, none (every tensor uncompressed: AdamW), or an
// explicit map from parameter name (a torch.compile "_orig_mod." prefix is ignored) to a rule.
struct SlimRules {
  enum class Kind { Table, None, Map } kind = Kind::Table;
  std::vector<std::pair<std::string, SlimRule>> map;  // Map: in the user's order; a repeat wins
};

struct BlockPlanConfig {
  BlockAlgorithm algorithm = BlockAlgorithm::AdamMini;
  // Adam-mini: "auto" (the paper's blocks on the given roles) or "reference" (PyPI adam-mini
  // 1.1.1's name-substring partition, with the model's dim and n_heads; 0: adam-mini's defaults).
  std::string partition = "auto";
  int64_t dim = 0, n_heads = 0;
  bool role_overrides = false;  // the user overrode roles (which partition="reference" ignores)
  SlimRules rules;              // SlimAdam
  int64_t state_bits = 32;      // memopt/plan.h check_state_bits: m (and AdamW's v) at 32/16/8
};

// What the plan decided for one tensor.
struct BlockDecision {
  Role role = Role::Elementwise;
  BlockSpec spec;          // the second moment's blocks (AdamW: elementwise)
  int64_t count = 0;       // second-moment entries = blocks
  bool decay = true;       // decoupled weight decay applies
  std::string note;        // why the paper's blocks were not used, if they were not
  // SlimAdam: v in the reference's keepdim shape (1-D for a fused QKV split), the dims averaged
  // over (empty: none), whether the table split a fused QKV instead (then no dims say it), and
  // the rule as describe() shows it.
  std::vector<int64_t> v_shape;
  std::vector<int64_t> dims;
  bool split = false;
  std::string rule;
};

class BlockPlan : public OptimizerPlan {
 public:
  // Raises c10::ValueError for an invalid option or rule, naming it.
  BlockPlan(std::vector<BlockTensor> tensors, BlockPlanConfig config);

  // Tensors of a param group added later (the LibTorch add_param_group), decided under the same
  // config (a rules map, which named the tensors of the construction, leaves them uncompressed);
  // raises, changing nothing, as the constructor does.
  void add(std::vector<BlockTensor> tensors);

  int64_t size() const override { return static_cast<int64_t>(tensors_.size()); }
  // AdamW: exp_avg, exp_avg_sq shaped like the parameter. Adam-mini, SlimAdam: exp_avg shaped
  // like it, exp_avg_sq one entry per block, replicated (every rank updates all blocks). Under
  // state_bits the full-size moments take moment_specs' dtype (8 bits: with their "_scales").
  StateLayout state(int64_t i) const override;

  const BlockPlanConfig& config() const { return config_; }
  const BlockTensor& tensor(int64_t i) const;
  const BlockDecision& decision(int64_t i) const;
  // Tensor i's blocks in the ops' flat list (encode_block_specs): the op takes a group's
  // concatenated in its tensor order.
  std::vector<int64_t> encoded(int64_t i) const;

  // SlimAdam with a rules map: parameter names it does not name (they stay uncompressed) and
  // its names that match no parameter (sorted), and the warning a front end shows for them
  // (empty when both are empty).
  const std::vector<std::string>& missing_rules() const { return missing_; }
  const std::vector<std::string>& unknown_rules() const { return unknown_; }
  std::string rules_warning() const;

 private:
  BlockDecision adam_mini(const BlockTensor& t) const;
  BlockDecision slim_adam(const BlockTensor& t, const SlimRule& rule) const;

  std::vector<BlockTensor> tensors_;
  BlockPlanConfig config_;
  std::vector<BlockDecision> decisions_;
  std::vector<std::string> missing_, unknown_;
};

}  // namespace memopt
