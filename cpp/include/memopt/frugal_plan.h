// memopt::FrugalPlan: every decision FRUGAL makes, once, for both front ends (the Python
// memopt_core.Frugal and the LibTorch memopt::Frugal). It decides which tensors are projectable,
// each one's mode and state shapes, validates the options, runs the selection state machine
// (block re-selection every update_gap steps, per-tensor subspace cycles, which tensors keep,
// drop or start state) and saves / validates / restores the selection. The front ends only apply
// its decisions to their state storage (Python: pooled, DTensor-sharded; LibTorch: plain).
#pragma once

#include <ATen/core/ivalue.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "memopt/frugal.h"
#include "memopt/partition.h"
#include "memopt/plan.h"

namespace memopt {

// How subspaces are chosen, for the whole optimizer (fixed at construction).
struct FrugalConfig {
  double density = 0.25;
  int64_t update_gap = 200;
  std::string selection = "block";  // block | columns | rows | randk | svd | random | randperm
  std::string block_order = "descending";  // descending | ascending | mirror | random
  std::string state_free = "sign_sgd";     // sign_sgd | sgd | none
  bool reset_statistics = true;
  std::optional<int64_t> seed;  // none: drawn from torch's global generator
  // Embeddings, norms and the output layer take plain AdamW unless these make them projectable.
  bool proj_embeds = false, proj_norms = false, proj_logits = false;
  // The moments' bits (memopt/plan.h check_state_bits): whole-tensor moments as AdamW's
  // (moment_specs: bfloat16, or 8-bit codes with selection "block" only), a subspace's in
  // bfloat16 where low_bit_state says. The LibTorch Frugal sets it from its options' state_bits.
  int64_t state_bits = 32;
  // "adamw", or "adam_mini": the low-memory embedding mode, the embedding and output tensors
  // that take AdamW (not projectable) keep Adam-mini's per-token v (memopt/plan.h
  // per_row_moments) and are stepped by the Adam-mini op. The Python front end's option (the
  // LibTorch Frugal refuses it: one op call per group).
  std::string embeddings = "adamw";
};

// What the plan knows of one parameter (in optimizer order).
struct FrugalTensor {
  std::string name;  // for messages only
  std::vector<int64_t> shape;
  Role role = Role::Linear;
  // An attention weight (q / k / fused qkv) whose head count is unknown: infer_role calls it a
  // plain linear (with a note), as its per-head blocks cannot be cut, but FRUGAL splits it like
  // any attention weight.
  bool heads_unknown = false;
};

// The selection: what a checkpoint stores beside the moments.
struct FrugalSelection {
  int64_t t = 0;             // steps taken (with at least one gradient)
  int64_t cursor = -1;       // upstream's next_block_start (-1 before the first selection)
  int64_t block_cycle = 0;   // t / update_gap of the last block selection
  std::vector<int64_t> active;  // sorted active blocks ("block" selection)
  std::vector<int64_t> cycle;   // per projectable tensor: cycle of its last subspace draw, or -1
  at::Tensor rng;               // torch.Generator state (uint8) the next draw starts from
  // Only in a selection read from a checkpoint that recorded it: the projectable tensors that
  // held state when it was saved.
  std::optional<std::vector<int64_t>> held;
};

// What happens to a projectable tensor's state in one step.
enum class FrugalStateChange : int64_t {
  None = 0,   // holds none and gets none (state-free now, or no gradient yet)
  Keep = 1,   // keeps its state as it is
  Carry = 2,  // keeps moments and step, takes the redrawn subspace (reset_statistics=False)
  Start = 3,  // starts from zeroed moments and step (with the redrawn subspace, if any)
  Drop = 4,   // loses its state (a block that became inactive)
};

// One step's decision, made by begin_step without changing the plan; commit() adopts it.
struct FrugalStepDecision {
  FrugalSelection selection;         // the selection this step runs under
  std::vector<int64_t> modes;        // FrugalMode per projectable tensor
  std::vector<int64_t> changes;      // FrugalStateChange per projectable tensor
  std::vector<at::Tensor> subspaces;  // per projectable tensor: the redrawn subspace (on the
                                      // CPU) or undefined
  // Some projectable tensor starts, drops or redraws: a front end that keeps their state in
  // one pool rebuilds it (with every kept tensor's values) so that the old pool is freed whole.
  bool repack = false;
};

// A saved selection as (key, value) pairs: the Python front end stores them as the dict under
// every param group's "frugal" key, the LibTorch one as archive keys "frugal_<key>".
using FrugalSavedFields = std::vector<std::pair<std::string, c10::IValue>>;

class FrugalPlan : public OptimizerPlan {
 public:
  // Raises c10::ValueError on a bad option, or on a projectable tensor the selection cannot
  // split (columns / rows / projections need 2-D tensors).
  FrugalPlan(const std::vector<FrugalTensor>& tensors, FrugalConfig config);

  // Tensor i (in the order given, then those added by add_adamw): its position's state under
  // the current selection, or under `sel`, or in `mode`: moments (where the mode holds
  // state) and the subspace (columns / rows / coordinates as int32, or a projection P).
  int64_t size() const override { return static_cast<int64_t>(shapes_all_.size()); }
  StateLayout state(int64_t i) const override { return state(i, selection_); }
  StateLayout state(int64_t i, const FrugalSelection& sel) const;
  StateLayout layout(int64_t i, FrugalMode mode) const;
  // Projectable number j of tensor i, or -1 (plain AdamW).
  int64_t block(int64_t i) const { return block_of_.at(i); }
  // Whether tensor i is in the embedding mode (FrugalConfig::embeddings), and its blocks then.
  bool per_row_v(int64_t i) const { return per_row_.at(i); }
  std::vector<int64_t> row_blocks(int64_t i) const;
  // Tensors added after construction (a later param group): plain AdamW, outside the selection.
  void add_adamw(const std::vector<std::vector<int64_t>>& shapes);

  const FrugalConfig& config() const { return config_; }
  // Positions (in the tensors given) of the projectable ones; projectable tensor j is block j.
  const std::vector<int64_t>& projectable() const { return projectable_; }
  int64_t num_projectable() const { return static_cast<int64_t>(projectable_.size()); }
  FrugalRule rule() const { return rule_; }
  const FrugalSelection& selection() const { return selection_; }
  // Active blocks per block selection: round(density * number of projectable tensors).
  int64_t blocks_per_cycle() const { return k_blocks_; }

  // Projectable tensor j's mode under `sel` (the current selection by default); every tensor
  // that is not projectable is FrugalMode::Adam.
  FrugalMode mode(int64_t j) const { return mode(j, selection_); }
  FrugalMode mode(int64_t j, const FrugalSelection& sel) const;
  // Shapes of j's moments (nullopt: no state) and of its subspace tensor (nullopt: none) in
  // `mode`; a subspace of column / row / coordinate indices is int32, a projection P has the
  // parameter's dtype.
  std::optional<std::vector<int64_t>> moment_shape(int64_t j, FrugalMode mode) const;
  std::optional<std::vector<int64_t>> subspace_shape(int64_t j, FrugalMode mode) const;
  bool subspace_is_index(int64_t j) const;

  // This step's decision. `with_grad`: the projectable tensors (j) with a gradient;
  // `holding`: those holding state now; `gradient(j)`: the full gradient a projection of j is
  // drawn from ("svd" reads its values, "random" / "randperm" only its shape and dtype).
  FrugalStepDecision begin_step(const std::vector<int64_t>& with_grad,
                                const std::vector<int64_t>& holding,
                                const std::function<at::Tensor(int64_t)>& gradient) const;
  void commit(const FrugalStepDecision& decision);
  // Whether begin_step's decision, for any step count from the selection's t to t + pending
  // (steps taken that the front end has not counted yet: decided on the device), would change
  // nothing but the count: no new cycle, no draw, every projectable tensor's state kept (or
  // none). Such a step may be taken without begin_step / commit, its count added later by
  // advance(): it is how a GPU step decides a non-finite skip without the host.
  bool steady(const std::vector<int64_t>& with_grad, const std::vector<int64_t>& holding,
              int64_t pending) const;
  void advance(int64_t steps);

  // The selection to save, with `holding` (the projectable tensors holding state now).
  FrugalSavedFields save(const std::vector<int64_t>& holding) const;
  static const std::vector<std::string>& saved_keys();
  // A saved selection, validated completely (types, lengths, ranges, and that selection,
  // density and the number of projectable tensors are this plan's): raises c10::ValueError
  // naming the first bad field. Changes nothing; adopt() takes the result.
  FrugalSelection read(const FrugalSavedFields& saved) const;
  void adopt(FrugalSelection sel);
  // After adopting a loaded selection without loading state (the Python front end's
  // load_selection, before a DCP load): which projectable tensors hold state in the
  // checkpoint's layout; `holding`: those holding state now (used if `sel` has no record).
  // nullopt where the layout does not depend on the selection (every selection but "block").
  std::optional<std::vector<int64_t>> holders(const FrugalSelection& sel,
                                              const std::vector<int64_t>& holding) const;
  // Raises unless loaded state fits `sel`: whether projectable tensor j has saved state, and
  // the shape of its saved subspace (nullopt: none saved).
  void check_loaded(int64_t j, const FrugalSelection& sel, bool has_state,
                    const std::optional<std::vector<int64_t>>& subspace) const;

 private:
  // What a step does to projectable tensor j's state in mode m (begin_step's rule).
  FrugalStateChange state_change(FrugalMode m, bool grad, bool holds, bool redrawn) const;
  struct Geometry {  // a projectable tensor under a non-block selection
    FrugalMode mode = FrugalMode::FreeBlock;
    std::vector<int64_t> moments, subspace;
    int64_t k = 0, total = 0;  // subspace size; columns / rows / coordinates drawn from
  };
  Geometry geometry(const FrugalTensor& tensor) const;

  FrugalConfig config_;
  FrugalRule rule_ = FrugalRule::SignSgd;
  bool block_ = true;
  std::vector<bool> per_row_;  // per tensor: embeddings="adam_mini" applies
  int64_t k_blocks_ = 0;
  std::vector<int64_t> projectable_;
  std::vector<std::vector<int64_t>> shapes_all_;  // every tensor's
  std::vector<int64_t> block_of_;                 // every tensor's projectable number, or -1
  std::vector<std::vector<int64_t>> shapes_;  // per projectable tensor
  std::vector<Geometry> geometry_;            // per projectable tensor (non-block selections)
  FrugalSelection selection_;
};

// Which tensors FRUGAL splits: 2-D attention and MLP weights (q/k also when their heads are
// unknown), plus embeddings / norms / output layer (any shape) when the config asks.
bool frugal_projectable(const FrugalTensor& tensor, const FrugalConfig& config);

}  // namespace memopt
