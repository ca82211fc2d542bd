// memopt::Frugal, the LibTorch optimizer for FRUGAL (frugal.h): the Python front end's state
// machine (block or subspace selection every update_gap steps, state only where Adam runs) on the
// memopt::frugal_ op, with the selection (step count, cursor, active set, cycles, generator)
// saved by torch::save so that a resumed run continues exactly.
#pragma once

#include <optional>

#include "memopt/frugal.h"
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

// How subspaces are chosen, for the whole optimizer (fixed at construction).
struct FrugalConfig {
  double density = 0.25;
  int64_t update_gap = 200;
  std::string selection = "block";  // block | columns | rows | randk | svd | random | randperm
  std::string block_order = "descending";  // descending | ascending | mirror | random
  std::string state_free = "sign_sgd";     // sign_sgd | sgd | none
  bool reset_statistics = true;
  std::optional<int64_t> seed;  // none: drawn from torch's global generator
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
  // Attention and MLP weights (roles from names, 2-D) are projectable; every other parameter
  // takes plain AdamW at the group lr. Groups as in memopt_core.Frugal(model.named_parameters()).
  Frugal(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
         FrugalOptions defaults = {}, FrugalConfig config = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // The projectable tensors' indices (in optimizer order) that hold Adam state now (block mode).
  const std::vector<int64_t>& active_blocks() const { return sel_.active; }

 protected:
  void adopt_params(const std::vector<at::Tensor>& params, const FrugalOptions&) override;
  std::vector<int64_t> exp_avg_sizes(const at::Tensor& param) const override;
  std::vector<int64_t> exp_avg_sq_sizes(const at::Tensor& param) const override;
  void check_extra_state(FrugalParamState& state, const at::Tensor& param,
                         const std::string& where) const override;
  void update(const FrugalOptions& options, const GroupLists& lists) override;

 private:
  // The selection: what torch::save stores beside the moments.
  struct Selection {
    int64_t t = 0, cursor = -1, block_cycle = 0;
    std::vector<int64_t> active, cycle;
    at::Tensor rng;  // torch.Generator state (uint8)
  };
  // A projectable tensor's subspace geometry for non-block selections.
  struct Sub {
    FrugalMode mode = FrugalMode::FreeBlock;
    std::vector<int64_t> moments, subspace;
    at::ScalarType dtype = at::kInt;
    int64_t k = 0;
  };
  FrugalMode mode(const at::Tensor& p, const Selection& sel) const;
  std::vector<int64_t> moment_sizes(const at::Tensor& p, const Selection& sel) const;
  bool holds_state(const at::Tensor& p, const Selection& sel) const;
  FrugalParamState* state_of(const at::Tensor& p) const;
  const at::Tensor& placeholder(at::ScalarType dtype, const c10::Device& device) const;
  void op_lists(const GroupLists& l, const Selection& sel, std::vector<at::Tensor>& subspaces,
                std::vector<int64_t>& modes) const;

  FrugalConfig config_;
  int64_t k_blocks_ = 0;
  std::vector<at::Tensor> projs_;                // projectable tensors, optimizer order
  ska::flat_hash_map<void*, int64_t> index_;      // TensorImpl* -> position in projs_
  ska::flat_hash_map<void*, Sub> subs_;
  Selection sel_;
  mutable ska::flat_hash_map<int64_t, at::Tensor> empty_;  // placeholder() by (dtype, device)
};

}  // namespace memopt
