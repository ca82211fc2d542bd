// memopt::Frugal, the LibTorch optimizer for FRUGAL (frugal.h): applies memopt::FrugalPlan's
// decisions (frugal_plan.h, shared with the Python front end) to its state and runs the
// memopt::frugal_ op; torch::save stores the plan's selection so that a resumed run continues
// exactly.
#pragma once

#include <functional>
#include <optional>

#include "memopt/frugal.h"
#include "memopt/frugal_plan.h"
#include "memopt/optimizers.h"
#include "memopt/plan_optimizer.h"

namespace memopt {

// Per-group options: Adam's, plus the two FRUGAL learning-rate scales.
struct FrugalOptions : public torch::optim::OptimizerCloneableOptions<FrugalOptions> {
  FrugalOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_ADAM_OPTIONS_ARGS(0.0)  // the Python front end's default decay
  TORCH_ARG(double, proj_params_lr_scale) = 1.0;
  TORCH_ARG(double, state_free_lr_scale) = 1.0;

 public:
  void check() const;  // the two scales: finite and >= 0
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class Frugal : public PlanOptimizer<FrugalOptions> {
 public:
  // Roles from names and shapes (infer_role); which tensors are projectable is the plan's rule
  // (attention and MLP weights; embeddings, norms, output layer with config.proj_*). Every
  // other parameter takes plain AdamW at the group lr, as memopt_core.Frugal(named_params).
  Frugal(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
         FrugalOptions defaults = {}, FrugalConfig config = {});
  // Explicit roles.
  Frugal(const std::vector<std::pair<torch::Tensor, Role>>& params_with_roles,
         FrugalOptions defaults = {}, FrugalConfig config = {});

  // The plan's decision for this step (selection, new / dropped state), then the op.
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  const FrugalPlan& plan() const override { return plan_; }
  using Described = std::pair<std::vector<at::Tensor>, std::vector<FrugalTensor>>;
  // The projectable tensors' indices (in optimizer order) that hold Adam state now (block mode).
  const std::vector<int64_t>& active_blocks() const { return plan_.selection().active; }

 protected:
  void extend_plan(const std::vector<at::Tensor>& params, const FrugalOptions&) override;
  void check_group(const FrugalOptions& o, const GroupLists& l) const override;
  void update(const FrugalOptions& o, const GroupLists& l) override;
  StateLayout loaded_layout(int64_t i) const override {
    return plan_.state(i, loading_ ? *loading_ : plan_.selection());
  }

 private:
  Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config);
  FrugalMode mode(const at::Tensor& p, const FrugalSelection& sel) const;
  const at::Tensor& placeholder(at::ScalarType dtype, const c10::Device& device) const;
  std::vector<int64_t> holding() const;  // projectable tensors holding state now
  // The op's arguments for one group, every state-free tensor's state a placeholder.
  void run(const FrugalOptions& o, const GroupLists& l, const FrugalSelection* sel,
           bool check_only) const;

  FrugalPlan plan_;
  std::vector<at::Tensor> projs_;  // projectable tensors, plan order
  std::optional<FrugalSelection> loading_;
  mutable ska::flat_hash_map<int64_t, at::Tensor> empty_;  // placeholder() by (dtype, device)
};

}  // namespace memopt
