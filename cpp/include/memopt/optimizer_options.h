// How the LibTorch optimizers' options classes are declared: each field once, from which come
// its setter (TORCH_ARG) and its checkpoint key. Used by plan_optimizer.h and its optimizers.
#pragma once

#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <optional>
#include <string>
#include <tuple>

namespace memopt {

// An options class's fields, each declared once as X(type, name, default, absent): its TORCH_ARG
// (whose setters return the class, for chaining) and its key in both serialize() overloads;
// `absent` is what a checkpoint without the key reads as ({}: the key is required). Adam's
// hyperparameters come first, then stochastic rounding of bf16 parameters (memopt/rounding.h;
// a checkpoint from before it was rounded to nearest), then the moments' bits (memopt/plan.h
// check_state_bits; a checkpoint from before it kept them in the parameter's dtype: 32). `nonfinite` ("propagate" or "skip") is
// not saved: the optimizer's defaults decide it for the whole step.
#define MEMOPT_ADAM_FIELDS(X, WEIGHT_DECAY)                                    \
  X(double, lr, 1e-3, {}) X(betas_t, betas, (std::make_tuple(0.9, 0.999)), {}) \
  X(double, eps, 1e-8, {}) X(double, weight_decay, WEIGHT_DECAY, {})           \
  X(bool, stochastic_rounding, false, false) X(int64_t, rounding_seed, 0, 0)   \
  X(int64_t, state_bits, 32, 32)
#define MEMOPT_NO_FIELDS(X)
#define MEMOPT_DECLARE_FIELD(T, name, value, absent) TORCH_ARG(T, name) = value;
#define MEMOPT_WRITE_FIELD(T, name, value, absent) archive.write(#name, c10::IValue(name##_));
#define MEMOPT_READ_FIELD(T, name, value, absent) name##_ = read_option<T>(archive, #name, absent);
#define MEMOPT_OPTIONS(WEIGHT_DECAY, FIELDS)                                \
 public:                                                                    \
  using betas_t = std::tuple<double, double>;                               \
  MEMOPT_ADAM_FIELDS(MEMOPT_DECLARE_FIELD, WEIGHT_DECAY)                    \
  FIELDS(MEMOPT_DECLARE_FIELD)                                              \
  TORCH_ARG(std::string, nonfinite) = "propagate";                          \
                                                                            \
 public:                                                                    \
  double get_lr() const override { return lr(); }                           \
  void set_lr(const double new_lr) override { lr(new_lr); }                 \
  void serialize(torch::serialize::OutputArchive& archive) const override { \
    MEMOPT_ADAM_FIELDS(MEMOPT_WRITE_FIELD, 0) FIELDS(MEMOPT_WRITE_FIELD)    \
  }                                                                         \
  void serialize(torch::serialize::InputArchive& archive) override {        \
    MEMOPT_ADAM_FIELDS(MEMOPT_READ_FIELD, 0) FIELDS(MEMOPT_READ_FIELD)      \
  }

template <typename T>
T read_option(torch::serialize::InputArchive& archive, const char* key, std::optional<T> absent) {
  c10::IValue value;
  if (!absent) archive.read(key, value);  // raises, naming the key, when it is missing
  else if (!archive.try_read(key, value)) return *absent;
  return value.to<T>();
}

}  // namespace memopt
