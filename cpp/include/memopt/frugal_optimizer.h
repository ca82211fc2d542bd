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

namespace memopt {

// Per-group options: Adam's, plus the two FRUGAL learning-rate scales.
struct FrugalOptions : public torch::optim::OptimizerCloneableOptions<FrugalOptions> {
  FrugalOptions(double lr = 1e-3) { this->lr(lr); }  // NOLINT(google-explicit-constructor)
  MEMOPT_ADAM_OPTIONS_ARGS(0.0)  // the Python front end's default decay
  TORCH_ARG(double, proj_params_lr_scale) = 1.0;
  TORCH_ARG(double, state_free_lr_scale) = 1.0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// `subspace` exists for column/row/randk selections (int32 indices) and projections (P).
struct FrugalParamState : public AdamFamilyParamState<FrugalParamState> {
  TORCH_ARG(torch::Tensor, subspace);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

void check_frugal_options(const FrugalOptions& options);

class Frugal : public AdamFamily<FrugalOptions, FrugalParamState> {
 public:
  // Roles from names and shapes (role_from_name); which tensors are projectable is the plan's
  // rule (attention and MLP weights; embeddings, norms, output layer with config.proj_*). Every
  // other parameter takes plain AdamW at the group lr, as memopt_core.Frugal(named_params).
  Frugal(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
         FrugalOptions defaults = {}, FrugalConfig config = {});
  // Explicit roles.
  Frugal(const std::vector<std::pair<torch::Tensor, Role>>& params_with_roles,
         FrugalOptions defaults = {}, FrugalConfig config = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  const FrugalPlan& plan() const { return plan_; }
  using Described = std::pair<std::vector<at::Tensor>, std::vector<FrugalTensor>>;
  // The projectable tensors' indices (in optimizer order) that hold Adam state now (block mode).
  const std::vector<int64_t>& active_blocks() const { return plan_.selection().active; }

 protected:
  void adopt_params(const std::vector<at::Tensor>& params, const FrugalOptions&) override;
  std::vector<int64_t> exp_avg_sizes(const at::Tensor& param) const override;
  std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const override;
  void check_extra_state(FrugalParamState& state, const at::Tensor& param,
                         const std::string& where) const override;
  void update(const FrugalOptions& options, const GroupLists& lists) override;

 private:
  Frugal(const Described& params, FrugalOptions defaults, FrugalConfig config);
  int64_t block_of(const at::Tensor& p) const;  // projectable number, or -1
  FrugalMode mode(const at::Tensor& p, const FrugalSelection& sel) const;
  // The selection being loaded while load() checks the archive's state, else the plan's.
  const FrugalSelection& selection() const { return loading_ ? *loading_ : plan_.selection(); }
  FrugalParamState* state_of(const at::Tensor& p) const;
  const at::Tensor& placeholder(at::ScalarType dtype, const c10::Device& device) const;
  void op_lists(const GroupLists& l, const FrugalSelection* sel,
                std::vector<at::Tensor>& subspaces, std::vector<int64_t>& modes) const;
  using StateFor = std::function<FrugalParamState*(const at::Tensor&)>;
  GroupLists lists(size_t group, const StateFor& state_for) const;
  void check(size_t group, const GroupLists& l, const FrugalSelection* sel) const;

  FrugalPlan plan_;
  std::vector<at::Tensor> projs_;                // projectable tensors, plan order
  ska::flat_hash_map<void*, int64_t> index_;      // TensorImpl* -> position in projs_
  std::optional<FrugalSelection> loading_;
  mutable ska::flat_hash_map<int64_t, at::Tensor> empty_;  // placeholder() by (dtype, device)
};

}  // namespace memopt
