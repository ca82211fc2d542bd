// memopt::Frugal, the LibTorch optimizer for FRUGAL (frugal.h): memopt::FrugalPlan's decisions
// (frugal_plan.h, shared with the Python front end) applied to plain state, stepped by the
// memopt::frugal_ op; torch::save stores the plan's selection so that a resumed run continues
// exactly.
#pragma once

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "memopt/frugal_plan.h"
#include "memopt/optimizers.h"

namespace memopt {

// Per-group options: Adam's, plus the two FRUGAL learning-rate scales (finite, >= 0).
#define MEMOPT_FRUGAL_FIELDS(X) \
  X(double, proj_params_lr_scale, 1.0, {}) X(double, state_free_lr_scale, 1.0, {})
struct FrugalOptions : public torch::optim::OptimizerCloneableOptions<FrugalOptions> {
  FrugalOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_OPTIONS(0.0, MEMOPT_FRUGAL_FIELDS)  // the Python front end's default decay
  void check() const {
    for (double s : {proj_params_lr_scale(), state_free_lr_scale()})
      TORCH_CHECK_VALUE(std::isfinite(s) && s >= 0.0, "Frugal: proj_params_lr_scale and "
                        "state_free_lr_scale must be finite and >= 0, got ", s);
  }
};

class Frugal : public PlanOptimizer<FrugalOptions, FrugalPlan> {
 public:
  // Roles from names and shapes (infer_role); which tensors are projectable is the plan's rule
  // (attention and MLP weights; embeddings, norms, output layer with config.proj_*). Every
  // other parameter takes plain AdamW at the group lr, as memopt_core.Frugal(named_params).
  Frugal(const NamedParams& named_params, FrugalOptions defaults = {}, FrugalConfig config = {})
      : Frugal(described(named_params), std::move(defaults), std::move(config)) {}
  // Explicit roles.
  Frugal(const std::vector<std::pair<torch::Tensor, Role>>& params_with_roles,
         FrugalOptions defaults = {}, FrugalConfig config = {})
      : Frugal(described(params_with_roles), std::move(defaults), std::move(config)) {}

  // Adds the plan's selection, as archive keys "frugal_<key>".
  void save(torch::serialize::OutputArchive& archive) const override;
  // Checks the saved selection, and the moments against it, before anything changes.
  void load(torch::serialize::InputArchive& archive) override;
  // The projectable tensors' indices (in optimizer order) that hold Adam state now (block mode).
  const std::vector<int64_t>& active_blocks() const { return plan_.selection().active; }

 protected:
  // Parameters of a later group are not in the selection: plain AdamW at the group's lr.
  void extend_plan(const std::vector<at::Tensor>& params, const FrugalOptions&) override;
  // The plan's decision for this step: its selection, and the states it starts, carries, drops.
  StateChanges begin_step(const std::vector<GroupLists>& lists) override;
  // A step decided on the device is steady (decides_on_device): nothing to commit but the
  // count, added by count_device_steps once the host reads how many of them were skipped.
  void commit_step(const at::Tensor& found) override;
  // frugal_ given found_inf runs a step whose selection and state stay as they are, and the host
  // cannot know afterwards whether it was taken: so a step decides its skip on the device only
  // when the plan's decision is steady for every count the host does not know (FrugalPlan::
  // steady, from its count to that plus the uncounted steps) and every tensor that steps with
  // state holds it already. The host decides the rest (about one step per update_gap, where a
  // cycle may begin) and steps with stochastic rounding (its bits follow the count).
  bool decides_on_device(const std::vector<GroupLists>& lists) const override;
  // Adds the uncounted steps, less those skipped (one read), to the plan's count.
  void count_device_steps() override;
  // The op's arguments under begin_step's selection (before it: every tensor state-free); a
  // tensor without state (nullptr in l.states) passes empty tensors, which the op ignores.
  OpCall op_call(const FrugalOptions& o, const GroupLists& l) const override;
  // The embedding mode's tensors (FrugalConfig::embeddings "adam_mini": per-row v) take
  // memopt::adam_mini_ with one block per row, at the group's options; the rest frugal_.
  std::vector<OpCall> group_calls(const FrugalOptions& o, const GroupLists& l) const override;
  // Steps taken: the rounding counter of the state-free blocks, which have no step count (exact:
  // with stochastic rounding the host decides every step).
  int64_t rounding_counter() const override { return plan_.selection().t; }
  StateLayout loaded_layout(int64_t i) const override {
    return plan_.state(i, loading_ ? *loading_ : plan_.selection());
  }

 private:
  using Described = std::pair<std::vector<at::Tensor>, std::vector<FrugalTensor>>;
  static Described described(const NamedParams& named);
  static Described described(const std::vector<std::pair<torch::Tensor, Role>>& with_roles);
  Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config);
  std::vector<int64_t> holding() const;  // projectable tensors holding state now

  std::vector<at::Tensor> projs_;  // projectable tensors, plan order
  std::optional<FrugalStepDecision> pending_;  // begin_step's, until commit_step
  std::optional<FrugalSelection> loading_;     // the selection load() checks state against
  // Steps decided on the device since the plan's count was last brought up to date, and how
  // many of them were skipped (a long on the device; save() counts them first).
  int64_t uncounted_ = 0;
  at::Tensor uncounted_skips_;
};

}  // namespace memopt
