// Shared helpers for the update kernels: dtype dispatch, input validation, bias corrections.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <string>
#include <vector>

#include "memopt/step_scalars.h"

namespace memopt {

using at::Tensor;
using at::TensorList;

// Elements handed to one thread at a time; matches ATen's own grain (at::internal::GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

// Which AdamW a plain (full-state) Adam step follows. Both decay decoupled by lr * wd; they
// differ in where eps enters and when the decay applies:
//   kTorch  (torch.optim.AdamW):  p *= 1 - lr wd;  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
//   kApollo (apollo-torch 1.0.3's APOLLOAdamW on a group without `rank`):
//           p -= lr sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps);  p *= 1 - lr wd
enum class AdamWRule : int32_t { kTorch = 0, kApollo = 1 };

// Scalars every Adam-family step needs, computed once per tensor in double. Every kernel
// computes  p = (p * pre - step_size * m / (sqrt(v) / bc2_sqrt + eps)) * post  with
// (pre, post) = (decay, 1), or (1, decay) when decay_after.
struct AdamScalars {
  double lr, beta1, beta2, eps, weight_decay;
  double step;            // after increment
  double decay;           // 1 - lr * weight_decay (decoupled weight decay)
  double step_size;       // lr / (1 - beta1^step); kApollo: times sqrt(1 - beta2^step)
  double bc2_sqrt;        // sqrt(1 - beta2^step); kApollo: 1 (eps on the uncorrected sqrt(v))
  bool decay_after = false;  // kApollo: the decay multiplies the updated p
  static AdamScalars make(double lr, double b1, double b2, double eps, double wd, double step,
                          AdamWRule rule = AdamWRule::kTorch) {
    const bool apollo = rule == AdamWRule::kApollo;
    const StepScalars k = adam_step_scalars(lr, b1, b2, wd, step, apollo);
    return AdamScalars{lr, b1, b2, eps, wd, step, k.decay, k.step_size, k.bc2_sqrt, apollo};
  }
};

// The ops' `found_inf` (adamw_, adam_mini_: `Tensor? found_inf=None`), as torch's fused
// optimizers take it from torch.amp.GradScaler or the front end's non-finite check
// (nonfinite.py): None, the step runs; else a one-element float32 tensor on the parameters'
// device, where the step counters live too, and a non-zero value makes the op change nothing
// (parameters, moments, scales, steps). The CUDA kernels read it on the device (kernel_params.h
// DeviceSteps), so a skipped step needs no host synchronisation; the CPU op reads it first.
void check_found_inf(const char* op, const std::optional<Tensor>& found_inf, TensorList params,
                     TensorList steps);
// Whether a CPU found_inf (checked by check_found_inf) is set (false for None).
bool found_on_host(const std::optional<Tensor>& found_inf);

// Hyperparameter checks shared by every Adam-family op (messages name the argument).
void check_adam_hparams(double lr, double beta1, double beta2, double eps, double weight_decay);

// The ops' `weight_scales` argument (memopt/int8_weights.h): [] when no parameter is int8, else
// one tensor per parameter: empty for a float parameter, the float32 scales of an int8 one (whose
// entry in `params` holds its codes). Parameter i is int8 when weight_scale(ws, i) is non-empty.
const Tensor& weight_scale(TensorList weight_scales, size_t i);
// Whether `scales` (an entry of weight_scales) marks an int8 parameter: it is non-empty.
inline bool int8_scales(const Tensor& scales) { return scales.defined() && scales.numel() > 0; }
// The schemas' optional list (`Tensor[]? weight_scales=None`) as a list ([] for None).
using OptionalTensors = std::optional<TensorList>;
inline TensorList listed(const OptionalTensors& tensors) {
  return tensors ? *tensors : TensorList();
}
// The dtype parameter p's values are computed from and its state follows: its own, or for int8
// codes its gradient's (float32 or bfloat16).
inline at::ScalarType value_dtype(const Tensor& p, const Tensor& g) {
  return p.scalar_type() == at::kChar ? g.scalar_type() : p.scalar_type();
}
// Validates `weight_scales` against params and grads: one per parameter (or none), int8 codes
// exactly where scales are given, 2-D contiguous codes of whole groups of kInt8MinGroup to
// kInt8MaxGroup elements along rows, float32 contiguous scales (rows, cols / group), gradients in
// float32 or bfloat16.
void check_weight_scales(const char* op, TensorList params, TensorList grads,
                         TensorList weight_scales);
// The group size of int8 parameter i (elements per scale).
int64_t int8_group(const Tensor& codes, const Tensor& scales);
// int8_encode_'s validation (cpp/src/ops_int8.cpp), on every device: float32 or bf16 values
// shaped like the codes, and codes and scales as weight_scales takes them.
void check_int8_encode(const Tensor& values, const Tensor& codes, const Tensor& scales);

// Validates the tensor lists of a multi-tensor update before anything is written:
// check_param_lists: equal lengths, one device, floating dtypes (or int8 codes with
// weight_scales), dense real grads shaped like params, float32 step scalars; check_update_lists
// also exp_avgs shaped like params, in the value dtype or float32 (an op whose moments are not
// shaped like the parameters checks them itself after check_param_lists).
// exp_avgs may also be bfloat16 (state_bits=16), or int8 codes where state_scales (below) gives
// their block scales.
void check_param_lists(const char* op, TensorList params, TensorList grads, TensorList steps,
                       TensorList weight_scales = {});
void check_update_lists(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                        TensorList steps, TensorList weight_scales = {},
                        TensorList state_scales = {});

// The ops' `state_scales` argument (memopt/state_codes.h): [] when every moment is float, else
// one tensor per parameter for each moment the op can keep in 8 bits, concatenated in the op's
// moment order (adamw_: exp_avg, then exp_avg_sq; adam_mini_: exp_avg): empty for a float
// moment, else the float32 block scales of its codes (int8 for exp_avg, uint8 for exp_avg_sq).
const Tensor& state_scale(TensorList state_scales, size_t n_params, size_t moment, size_t i);
// Whether moment `moment` of tensor i is 8-bit codes.
inline bool coded_state(TensorList state_scales, size_t n_params, size_t moment, size_t i) {
  const Tensor& s = state_scale(state_scales, n_params, moment, i);
  return s.defined() && s.numel() > 0;
}
// Validates state_scales against the moments ({tensors, code dtype} in the op's order): [] or
// one list per moment; an 8-bit moment is codes of its code dtype, of the parameter's number of
// elements, with contiguous float32 scales of state_blocks(numel) entries on its device.
void check_state_scales(const char* op, TensorList params, TensorList state_scales,
                        const std::vector<std::pair<TensorList, at::ScalarType>>& moments);
// check_state_scales for Adam's pair (int8 exp_avg, uint8 exp_avg_sq), which are 8-bit together
// or not at all.
void check_adam_codes(const char* op, TensorList params, TensorList exp_avgs,
                      TensorList exp_avg_sqs, TensorList state_scales);

// Under dynamic-shape tracing the Meta kernels see symbolic sizes, which have no numel() to
// check; shape validation then happens in the real kernel at run time.
inline bool has_symbolic_shapes(std::initializer_list<TensorList> lists) {
  for (const auto& list : lists)
    for (const auto& t : list)
      if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return true;
  return false;
}

// The learning rate as a double; accepts a 0-dim/1-element tensor on any device.
double read_lr(const Tensor& lr);

// An op's `rounding` argument (memopt/rounding.h) for its n parameters: [] (nearest even) or
// [seed, counter, id_0, ..., id_{n-1}]. The constructor checks the length.
class Rounding {
 public:
  Rounding() = default;  // nearest
  Rounding(at::IntArrayRef rounding, size_t n, const char* op);
  bool stochastic() const { return !values_.empty(); }
  // Parameter i's key at `step` (its step count after the increment; 0 without one).
  uint64_t key(size_t i, double step) const;
  // [seed, counter, id_0, ...] as given (the device computes keys from them: cuda/step_scalars.cu).
  const std::vector<int64_t>& values() const { return values_; }

 private:
  std::vector<int64_t> values_;
};

// Dispatches on (param dtype, state dtype): state is either the param dtype or float32.
// Inside the lambda: scalar_t (param/grad storage), state_t (moment storage), opmath_t (compute).
#define MEMOPT_DISPATCH_PARAM_STATE(PARAM_DTYPE, STATE_DTYPE, NAME, ...)                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, PARAM_DTYPE, NAME, [&] {           \
    using opmath_t = at::opmath_type<scalar_t>;                                               \
    if ((STATE_DTYPE) == (PARAM_DTYPE)) {                                                     \
      using state_t = scalar_t;                                                               \
      __VA_ARGS__();                                                                          \
    } else if ((STATE_DTYPE) == at::kBFloat16) { /* state_bits=16 */                          \
      using state_t = c10::BFloat16;                                                          \
      __VA_ARGS__();                                                                          \
    } else {                                                                                  \
      using state_t = float;                                                                  \
      __VA_ARGS__();                                                                          \
    }                                                                                         \
  })

}  // namespace memopt
