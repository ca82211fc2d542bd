// memopt::OptimizerPlan: what every optimizer's plan answers, so that each front end applies any
// optimizer's decisions the same way. A plan is built once from the tensors (names, shapes,
// roles) and the optimizer's options; the Python MemoptOptimizer and the LibTorch classes only
// store what it lays out and call the op it names. FrugalPlan adds its per-step decisions
// (begin_step / commit); the other optimizers' state never changes shape once created.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace memopt {

// A state tensor's dtype, relative to its parameter's.
enum class StateDType : int64_t {
  Param = 0,    // the parameter's dtype (moments, projections)
  Float32 = 1,
  Int64 = 2,    // seeds
  Int32 = 3,    // index subspaces
  Scalar = 4,   // a float statistic: float64 for float64 parameters, else float32
  BFloat16 = 5, // a moment under state_bits=16
  Int8 = 6,     // 8-bit codes of a signed moment (memopt/state_codes.h)
  UInt8 = 7,    // 8-bit codes of a second moment
};

at::ScalarType resolve_dtype(StateDType dtype, at::ScalarType param);
// Whether a state tensor lives on the CPU whatever its parameter's device: seeds (APOLLO's), which
// the ops read on the host to draw P, so that no step reads a device for them (a step whose
// non-finite skip is decided on the GPU synchronises nowhere). Every other state lives with its
// parameter (a limiter norm too: the kernels update it in place, without a copy back).
bool state_on_host(StateDType dtype, at::IntArrayRef shape);

// One state tensor a parameter keeps, besides its step counter (a 0-dim float32 tensor that
// every front end adds and every op increments: on the CPU, or beside the parameter while a
// GPU decides the non-finite skip).
struct StateSpec {
  std::string key;             // "exp_avg", "exp_avg_sq", "proj", "seed", "limiter_norm", ...
  std::vector<int64_t> shape;
  StateDType dtype = StateDType::Param;
  // Elementwise with the parameter: created in its memory layout (memopt/layout.h).
  bool follows_param = false;
  // The parameter dims along which, when the parameter is sharded (FSDP2) along one of them,
  // this state is sharded the same way; empty: replicated (every rank updates it alike).
  std::vector<int64_t> sharded_along;
  double fill = 0.0;           // initial value (a seed's, a limiter's "no norm yet")
};
using StateLayout = std::vector<StateSpec>;

// How many bits a full-size moment keeps (the optimizers' state_bits): 32 (the parameter's dtype,
// as before the option existed), 16 (bfloat16) or 8 (block codes, memopt/state_codes.h); small
// tensors and vectors keep the parameter's dtype (low_bit_state). Raises ValueError for other values.
void check_state_bits(int64_t bits);
// The StateSpecs of full-size moment `key` of a tensor of `shape` under `bits`: the moment
// (follows the parameter, sharded along `along`) and, for 8-bit codes, its "<key>_scales".
std::vector<StateSpec> moment_specs(const std::string& key, const std::vector<int64_t>& shape,
                                    int64_t bits, bool square, const std::vector<int64_t>& along);
// Whether a tensor of `shape` keeps its full-size moments in state_bits' format (16 or 8): at
// least 2-D and kStateMinNumel elements. Vectors (norms, biases) and small tensors keep the
// parameter's dtype: their state is next to nothing, and a vector's blocks could not follow a
// shard of its rows.
bool low_bit_state(const std::vector<int64_t>& shape);
// The low-memory embedding mode (APOLLO's and FRUGAL's embeddings="adam_mini"): Adam-mini's
// per-token v, one block per row (dim 0) of a tensor of `shape`. per_row_blocks: the blocks in
// the Adam-mini op's flat list (encode_block_specs); per_row_moments: exp_avg as moment_specs
// lays it out under `bits`, then v (one entry per row, in m's dtype or the parameter's beside
// 8-bit m, replicated: every shard needs all rows' statistics), then m's scales.
std::vector<int64_t> per_row_blocks(const std::vector<int64_t>& shape);
StateLayout per_row_moments(const std::vector<int64_t>& shape, int64_t bits,
                            const std::vector<int64_t>& along);

class OptimizerPlan {
 public:
  virtual ~OptimizerPlan() = default;
  // Tensors in the plan (positions are the front end's optimizer order).
  virtual int64_t size() const = 0;
  // The state tensor i keeps once it has had a gradient (empty: none), in a fixed key order.
  virtual StateLayout state(int64_t i) const = 0;

  // Raises c10::ValueError (naming `where` and the key) unless `saved`, tensor i's state read
  // from a checkpoint (step included), is the state this plan lays out for a parameter of
  // dtype `param`: every key present and no other, shapes equal, dtypes as laid out (one of the
  // parameter's dtype may be float32), step a one-element float32 tensor. 8-bit block scales
  // saved flat (stop 27's checkpoints, before they were shaped [rows, blocks per row]) hold the
  // same values in the same order and are accepted: the front ends reshape what they load.
  void check_saved(int64_t i, const std::vector<std::pair<std::string, at::Tensor>>& saved,
                   at::ScalarType param, const std::string& where) const {
    check_saved_state(state(i), saved, param, where);
  }
  // The same check against any layout (FRUGAL's under a selection being loaded).
  static void check_saved_state(const StateLayout& layout,
                                const std::vector<std::pair<std::string, at::Tensor>>& saved,
                                at::ScalarType param, const std::string& where);
};

}  // namespace memopt
