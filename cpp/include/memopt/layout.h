// Parameter layouts (issue 17): how every op, CPU and CUDA, sees a parameter that is not
// contiguous. The decision lives here only; each op declares one fact about its structure (how
// freely it may reorder a tensor's elements) and hands its lists to ParamLayouts.
//
// Paths, per parameter p (and the tensors shaped like it: gradient, full-size state):
//   contiguous    p as is.
//   memory order  p is dense and non-overlapping (channels_last, channels_last_3d, a transposed
//                 matrix, any permuted-dense layout) and the op's structure allows it: the kernel
//                 gets p.permute(dims by decreasing stride), a contiguous view of the same memory,
//                 and every tensor shaped like p permuted alike. No copy is made; a companion
//                 whose strides differ from p's (a contiguous gradient, state loaded from a
//                 contiguous checkpoint) is staged in p's memory order (the kernels stage
//                 gradients, ParamLayouts the state it writes back).
//                 The structure allows it when the op may visit the elements in any order within
//                 aligned runs of `run` logical elements, where `run` = the product of the sizes
//                 after the longest leading dims that stay outermost, in order, in memory
//                 (memory_order_run; channels_last (O, C, H, W): run = C*H*W, one output channel).
//                 Elementwise ops (AdamW, FRUGAL's Adam and state-free tensors) allow any run;
//                 Adam-mini / SlimAdam blocks allow it when every block is a union of whole runs
//                 (per-output-channel blocks of a channels_last conv: yes).
//   staged        anything else: a view with gaps, or a dense layout that reorders what the op's
//                 structure indexes (a transposed matrix under APOLLO or FRUGAL's column, row,
//                 randk and projection modes; Adam-mini blocks that cut a run): p and the state
//                 shaped like it are copied into the staging workspace in logical order, updated
//                 there and copied back once the kernel has returned (it validates before it
//                 writes, so a refused call leaves the caller's tensors untouched).
//   overlapping   (expanded, zero strides) refused with a ValueError by check_param_layout, which
//                 every validator (CPU, Meta, CUDA) runs before anything is written: an in-place
//                 update of memory two elements share is ill-defined.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "memopt/arena.h"
#include "memopt/common.h"

namespace memopt {

// Whether no two elements of `t` share memory (dims of size > 1 nest by stride).
bool is_non_overlapping(const Tensor& t);
// ValueError naming `what` unless `t` is non-overlapping.
void check_param_layout(const std::string& what, const Tensor& t);
// Dense (no gaps) and non-overlapping: a permutation of a contiguous tensor.
bool is_dense_layout(const Tensor& t);
// The elements of the runs within which t's memory order differs from its logical order
// (1: contiguous). Meaningful for dense tensors.
int64_t memory_order_run(const Tensor& t);

// The strides optimizer state of shape `sizes` created for parameter p takes: p's when the state
// is shaped like p and p is dense (so the update is one pass over memory), else (or p undefined:
// state that is not elementwise with p) contiguous.
std::vector<int64_t> state_strides(at::IntArrayRef sizes, const Tensor& p);
// Zeroed state of shape `sizes` for p, in state_strides (the LibTorch classes' state).
Tensor state_zeros(at::IntArrayRef sizes, const Tensor& p, const at::TensorOptions& options);
// `value` (a loaded checkpoint's state) copied into a fresh tensor in state_strides for p.
Tensor state_like_param(const Tensor& value, const Tensor& p, const at::TensorOptions& options);

// Whether an op may visit tensor i's elements in any order within aligned runs of `run`
// logical elements (run > 1 only for non-contiguous dense parameters).
using OrderFreeWithin = std::function<bool(size_t i, int64_t run)>;
inline bool any_order(size_t, int64_t) { return true; }
inline bool logical_order_only(size_t, int64_t run) { return run <= 1; }

// The tensors one op call's kernel sees (see the paths above). Construct after validation and
// before the first write; call write_back() once the kernel has returned.
class ParamLayouts {
 public:
  // params: written in place unless params_written is false; written: lists of state the
  // kernel updates (a tensor not shaped like its parameter, or undefined, passes through).
  ParamLayouts(TensorList params, std::initializer_list<TensorList> written,
               const OrderFreeWithin& order_free, bool params_written = true);
  ParamLayouts(const ParamLayouts&) = delete;
  ~ParamLayouts();

  const std::vector<Tensor>& params() const { return params_; }
  const std::vector<Tensor>& written(size_t k) const { return written_[k]; }
  // Read-only tensors shaped like the params (gradients), presented in each param's order (a
  // kernel then stages one whose strides differ, as it stages any non-contiguous gradient).
  std::vector<Tensor> follow(TensorList like_params) const;
  // Whether parameter i is presented in memory order (false: logical order).
  bool in_memory_order(size_t i) const { return !order_[i].empty(); }
  // Copies staged tensors back into the caller's.
  void write_back();

 private:
  Tensor present(const Tensor& t, const Tensor& p, size_t i, bool write, int64_t* bytes,
                 bool carve);
  std::vector<std::vector<int64_t>> order_;  // per param: permutation, or empty (logical)
  std::vector<Tensor> params_;
  std::vector<std::vector<Tensor>> written_;
  std::vector<std::pair<Tensor, Tensor>> staged_;  // (caller's tensor, presented; buffer)
  std::unique_ptr<Workspace::Lease> lease_;
};

}  // namespace memopt
