// memopt::BlockPlan (block_plan.h): the blocks, weight decay and state of AdamW, Adam-mini and
// SlimAdam, decided once per tensor.
#include "memopt/block_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "memopt/slim_adam.h"

namespace memopt {
namespace {

// torch.compile wraps a model as `_orig_mod`; rules saved from a compiled run name its tensors
// with this prefix, and the reference strips it, so a rule applies with or without it.
constexpr const char* kCompilePrefix = "_orig_mod.";

std::string without_compile_prefix(const std::string& name) {
  const std::string prefix = kCompilePrefix;
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

// adam-mini 1.1.1's defaults, which partition="reference" uses where the model states none.
constexpr int64_t kReferenceDim = 2048, kReferenceHeads = 32;

const char* algorithm_name(BlockAlgorithm a) {
  switch (a) {
    case BlockAlgorithm::AdamW: return "AdamW";
    case BlockAlgorithm::AdamMini: return "AdamMini";
    case BlockAlgorithm::SlimAdam: return "SlimAdam";
  }
  return "?";
}

// The rules map with each entry checked and the compile prefix stripped from its name.
std::map<std::string, SlimRule> checked_rules(const SlimRules& rules) {
  std::map<std::string, SlimRule> out;
  for (const auto& [name, rule] : rules.map) {
    TORCH_CHECK_VALUE(rule.kind != SlimRule::Kind::Invalid, "rules['", name,
                      "'] must be a list of dims, null or 'table', got ", rule.text);
    out[without_compile_prefix(name)] = rule;
  }
  return out;
}

}  // namespace

BlockAlgorithm block_algorithm_from_string(const std::string& name) {
  if (name == "adamw") return BlockAlgorithm::AdamW;
  if (name == "adam_mini") return BlockAlgorithm::AdamMini;
  if (name == "slim_adam") return BlockAlgorithm::SlimAdam;
  TORCH_CHECK_VALUE(false, "algorithm must be 'adamw', 'adam_mini' or 'slim_adam', got '", name, "'");
}

void BlockPlan::add(std::vector<BlockTensor> tensors) {
  BlockPlanConfig config = config_;
  if (config.rules.kind == SlimRules::Kind::Map) config.rules = SlimRules{SlimRules::Kind::None, {}};
  BlockPlan more(std::move(tensors), std::move(config));
  tensors_.insert(tensors_.end(), more.tensors_.begin(), more.tensors_.end());
  decisions_.insert(decisions_.end(), more.decisions_.begin(), more.decisions_.end());
}

BlockPlan::BlockPlan(std::vector<BlockTensor> tensors, BlockPlanConfig config)
    : tensors_(std::move(tensors)), config_(std::move(config)) {
  const BlockAlgorithm algo = config_.algorithm;
  check_state_bits(config_.state_bits);
  if (algo == BlockAlgorithm::AdamMini) {
    const std::string& part = config_.partition;
    TORCH_CHECK_VALUE(part == "auto" || part == "reference",
                      "partition must be 'auto' or 'reference', got '", part, "'");
    TORCH_CHECK_VALUE(part == "auto" || !config_.role_overrides,
                      "roles= overrides apply to partition='auto' only");
  }
  const bool mapped = algo == BlockAlgorithm::SlimAdam && config_.rules.kind == SlimRules::Kind::Map;
  const auto rules = mapped ? checked_rules(config_.rules) : std::map<std::string, SlimRule>{};
  std::set<std::string> named;  // parameter names as the rules key them
  decisions_.reserve(tensors_.size());
  for (const BlockTensor& t : tensors_) {
    BlockDecision d;
    switch (algo) {
      case BlockAlgorithm::AdamW:  // torch.optim.AdamW: elementwise, every tensor decays
        d.spec = adam_mini_blocks(RoleInfo{Role::Elementwise}, t.shape);
        break;
      case BlockAlgorithm::AdamMini:
        d = adam_mini(t);
        break;
      case BlockAlgorithm::SlimAdam: {
        SlimRule rule;  // uncompressed, for rules=None and for names a map leaves out
        if (config_.rules.kind == SlimRules::Kind::Table) rule.kind = SlimRule::Kind::Table;
        if (mapped) {
          const std::string key = without_compile_prefix(t.name);
          named.insert(key);
          auto it = rules.find(key);
          if (it == rules.end()) missing_.push_back(t.name);
          else rule = it->second;
        }
        d = slim_adam(t, rule);
        break;
      }
    }
    check_block_spec(d.spec, c10::multiply_integers(t.shape),
                     std::string(algorithm_name(algo)) + ": '" + t.name + "' (" + role_name(d.role) + ")");
    d.count = num_blocks(d.spec);
    decisions_.push_back(std::move(d));
  }
  for (const auto& [key, rule] : rules)  // std::map: sorted
    if (!named.count(key)) unknown_.push_back(key);
}

BlockDecision BlockPlan::adam_mini(const BlockTensor& t) const {
  BlockDecision d;
  if (config_.partition == "reference") {  // adam-mini 1.1.1: roles and decay by name
    const auto r = adam_mini_reference_blocks(t.name, t.shape,
                                              config_.dim > 0 ? config_.dim : kReferenceDim,
                                              config_.n_heads > 0 ? config_.n_heads : kReferenceHeads);
    d.role = r.role;
    d.spec = r.spec;
    d.decay = r.weight_decay;
    return d;
  }
  std::string why;
  d.role = t.role.role;
  d.spec = adam_mini_blocks(t.role, t.shape, &why);
  d.note = t.note.empty() ? why : t.note;  // the role's own reason first (it is the earlier one)
  // The paper's recipe (and adam-mini's by name): no decay on norms, biases, scalars, 1-D tensors.
  d.decay = role_traits(t.role.role).decays && t.shape.size() > 1;
  return d;
}

BlockDecision BlockPlan::slim_adam(const BlockTensor& t, const SlimRule& rule) const {
  SlimLayout layout;
  BlockDecision d;
  d.role = t.role.role;
  if (rule.kind == SlimRule::Kind::Table) {
    layout = slim_adam_table_layout(t.role, t.shape);
    d.note = t.note;
  } else {
    try {
      layout = slim_adam_dims_layout(t.shape, rule.dims);
    } catch (const c10::ValueError& e) {
      TORCH_CHECK_VALUE(false, "rules['", t.name, "']: ", e.msg());
    }
  }
  d.spec = std::move(layout.spec);
  d.v_shape = std::move(layout.v_shape);
  d.split = !layout.dims.has_value();
  d.dims = layout.dims.value_or(std::vector<int64_t>{});
  d.rule = std::move(layout.rule);
  d.decay = t.shape.size() >= 2;  // the reference decays every tensor of >= 2 dims, by dims alone
  return d;
}

StateLayout BlockPlan::state(int64_t i) const {
  const BlockTensor& t = tensor(i);
  std::vector<int64_t> every(t.shape.size());
  std::iota(every.begin(), every.end(), 0);  // elementwise: sharded with the parameter on any dim
  const int64_t bits = config_.state_bits;
  StateLayout out = moment_specs("exp_avg", t.shape, bits, false, every);
  StateLayout v = config_.algorithm == BlockAlgorithm::AdamW
                      ? moment_specs("exp_avg_sq", t.shape, bits, true, every)
                      // One entry per block of the whole tensor, so every rank of a sharded one
                      // keeps all of them; in m's dtype (the kernels' one state type), or the
                      // parameter's beside 8-bit m: they are few.
                      : StateLayout{{"exp_avg_sq", {decision(i).count},
                                     out.front().dtype == StateDType::Int8 ? StateDType::Param
                                                                           : out.front().dtype,
                                     false, {}, 0.0}};
  // Keys in the order exp_avg, exp_avg_sq, then the scales.
  out.insert(out.begin() + 1, v.front());
  out.insert(out.end(), v.begin() + 1, v.end());
  return out;
}

const BlockTensor& BlockPlan::tensor(int64_t i) const {
  TORCH_CHECK_INDEX(i >= 0 && i < size(), "BlockPlan: tensor ", i, " of ", size());
  return tensors_[i];
}

const BlockDecision& BlockPlan::decision(int64_t i) const {
  tensor(i);  // the range check
  return decisions_[i];
}

std::vector<int64_t> BlockPlan::encoded(int64_t i) const {
  return encode_block_specs({decision(i).spec});
}

std::string BlockPlan::rules_warning() const {
  if (missing_.empty() && unknown_.empty()) return "";
  std::ostringstream s;
  s << "SlimAdam rules: " << missing_.size() << " parameter(s) not in the rules stay uncompressed";
  if (!missing_.empty()) s << " (" << missing_.front() << ", ...)";
  s << "; " << unknown_.size() << " rule name(s) match no parameter";
  if (!unknown_.empty()) s << " (" << unknown_.front() << ", ...)";
  return s.str();
}

}  // namespace memopt
