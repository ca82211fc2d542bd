// torch op registration: schemas (mutable, like aten::_fused_adamw_), CPU and Meta kernels.
// This file owns TORCH_LIBRARY(memopt); other algorithms add their ops from their own
// ops_<name>.cpp with TORCH_LIBRARY_FRAGMENT(memopt, m).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <regex>

#include "define_op.h"
#include "memopt/adam_mini.h"
#include "memopt/adamw.h"

namespace memopt {
namespace {

using OptionalTensor = std::optional<Tensor>;

void adamw_check(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList steps, const Tensor& lr, double beta1, double beta2, double eps,
                 double weight_decay, c10::string_view rule, at::IntArrayRef rounding,
                 OptionalTensors weight_scales, OptionalTensors state_scales,
                 const OptionalTensor& found_inf) {
  parse_adamw_rule(rule);
  Rounding(rounding, params.size(), "adamw_update_");
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, listed(weight_scales),
                     listed(state_scales));
  check_found_inf("adamw_update_", found_inf, params, steps);
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               TensorList steps, const Tensor& lr, double beta1, double beta2, double eps,
               double weight_decay, c10::string_view rule, at::IntArrayRef rounding,
               OptionalTensors weight_scales, OptionalTensors state_scales,
               const OptionalTensor& found_inf) {
  check_found_inf("adamw_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    adamw_check(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                weight_decay, rule, rounding, weight_scales, state_scales, found_inf);
    return;
  }
  adamw_update_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                parse_adamw_rule(rule), rounding, listed(weight_scales), listed(state_scales));
}

void adamw_meta(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, const Tensor&, double, double, double, double,
                c10::string_view rule, at::IntArrayRef rounding, OptionalTensors weight_scales,
                OptionalTensors state_scales, const OptionalTensor& found_inf) {
  parse_adamw_rule(rule);
  Rounding(rounding, params.size(), "adamw_update_");
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == params.size(), "adamw_update_: list lengths differ");
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, listed(weight_scales),
                            listed(state_scales)})) {
    check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, listed(weight_scales),
                       listed(state_scales));
    check_found_inf("adamw_update_", found_inf, params, steps);
  }
}

void adam_mini_check(TensorList params, TensorList grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                     const Tensor& lr, double beta1, double beta2, double eps,
                     double weight_decay, at::IntArrayRef rounding, OptionalTensors weight_scales,
                     OptionalTensors state_scales, const OptionalTensor& found_inf) {
  check_adam_mini_inputs(params, grads, exp_avgs, exp_avg_sqs, steps,
                         decode_block_specs(blocks, static_cast<int64_t>(params.size())),
                         listed(weight_scales), listed(state_scales));
  check_found_inf("adam_mini_update_", found_inf, params, steps);
  Rounding(rounding, params.size(), "adam_mini_update_");
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void adam_mini_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                   TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                   const Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                   at::IntArrayRef rounding, OptionalTensors weight_scales,
                   OptionalTensors state_scales, const OptionalTensor& found_inf) {
  check_found_inf("adam_mini_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    adam_mini_check(params, grads, exp_avgs, exp_avg_sqs, steps, blocks, lr, beta1, beta2, eps,
                    weight_decay, rounding, weight_scales, state_scales, found_inf);
    return;
  }
  adam_mini_update_(params, grads, exp_avgs, exp_avg_sqs, steps,
                    decode_block_specs(blocks, static_cast<int64_t>(params.size())), lr, beta1,
                    beta2, eps, weight_decay, rounding, listed(weight_scales),
                    listed(state_scales));
}

void adam_mini_meta(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                    const Tensor&, double, double, double, double, at::IntArrayRef rounding,
                    OptionalTensors weight_scales, OptionalTensors state_scales,
                    const OptionalTensor& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  Rounding(rounding, params.size(), "adam_mini_update_");
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs, listed(weight_scales),
                            listed(state_scales)})) {
    check_adam_mini_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs,
                           listed(weight_scales), listed(state_scales));
    check_found_inf("adam_mini_update_", found_inf, params, steps);
  }
}

void adam_mini_block_sums_cpu(TensorList grads, at::IntArrayRef blocks, at::IntArrayRef shards,
                              const Tensor& sums) {
  adam_mini_block_sums_(grads, decode_block_specs(blocks, static_cast<int64_t>(grads.size())),
                        shards, sums);
}

void adam_mini_block_sums_meta(TensorList grads, at::IntArrayRef blocks, at::IntArrayRef, const Tensor&) {
  decode_block_specs(blocks, static_cast<int64_t>(grads.size()));
}

void adam_mini_shard_check(TensorList params, TensorList grads, TensorList exp_avgs,
                           TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                           at::IntArrayRef shards, const Tensor& sums, const Tensor& lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           at::IntArrayRef rounding, OptionalTensors state_scales,
                           const OptionalTensor& found_inf) {
  check_adam_mini_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps,
                               decode_block_specs(blocks, static_cast<int64_t>(params.size())),
                               shards, sums, listed(state_scales));
  check_found_inf("adam_mini_shard_update_", found_inf, params, steps);
  check_shard_rounding(params, Rounding(rounding, params.size(), "adam_mini_shard_update_"));
  check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
}

void adam_mini_shard_update_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                                TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                                at::IntArrayRef shards, const Tensor& sums, const Tensor& lr,
                                double beta1, double beta2, double eps, double weight_decay,
                                at::IntArrayRef rounding, OptionalTensors state_scales,
                                const OptionalTensor& found_inf) {
  check_found_inf("adam_mini_shard_update_", found_inf, params, steps);
  if (found_on_host(found_inf)) {  // a skipped step: checked like a taken one, then nothing
    adam_mini_shard_check(params, grads, exp_avgs, exp_avg_sqs, steps, blocks, shards, sums, lr,
                          beta1, beta2, eps, weight_decay, rounding, state_scales, found_inf);
    return;
  }
  adam_mini_shard_update_(params, grads, exp_avgs, exp_avg_sqs, steps,
                          decode_block_specs(blocks, static_cast<int64_t>(params.size())), shards,
                          sums, lr, beta1, beta2, eps, weight_decay, rounding, listed(state_scales));
}

void adam_mini_shard_update_meta(TensorList params, TensorList grads, TensorList exp_avgs,
                                 TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                                 at::IntArrayRef shards, const Tensor& sums, const Tensor&, double,
                                 double, double, double, at::IntArrayRef rounding,
                                 OptionalTensors state_scales, const OptionalTensor& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  check_shard_rounding(params, Rounding(rounding, params.size(), "adam_mini_shard_update_"));
  if (!has_symbolic_shapes({params, grads, exp_avgs, exp_avg_sqs})) {
    check_adam_mini_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs, shards, sums,
                                 listed(state_scales));
    check_found_inf("adam_mini_shard_update_", found_inf, params, steps);
  }
}

}  // namespace

std::string validator_schema(const std::string& op_schema) {
  static const std::regex alias(R"(\([a-z]!?\))");
  return "check_" + std::regex_replace(op_schema, alias, "");
}

}  // namespace memopt

TORCH_LIBRARY(memopt, m) {
  using memopt::define_op;
  // rule: "torch" (torch.optim.AdamW) or "apollo" (apollo-torch's AdamW), memopt/common.h.
  define_op(m, "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
            "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr, float beta1, float beta2, "
            "float eps, float weight_decay, str rule=\"torch\", int[] rounding=[], "
            "Tensor(e!)[]? weight_scales=None, Tensor(f!)[]? state_scales=None, "
            "Tensor? found_inf=None) -> ()",
            &memopt::adamw_check);
  define_op(m, "adam_mini_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
            "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, int[] blocks, Tensor lr, float beta1, "
            "float beta2, float eps, float weight_decay, int[] rounding=[], "
            "Tensor(e!)[]? weight_scales=None, Tensor(f!)[]? state_scales=None, "
            "Tensor? found_inf=None) -> ()",
            &memopt::adam_mini_check);
  // Adam-mini on shards of tensors (FSDP2): partial block sums, then the update from the
  // all-reduced sums (cpp/src/adam_mini_shard.cpp).
  define_op(m, "adam_mini_block_sums_(Tensor[] grads, int[] blocks, int[] shards, "
            "Tensor(a!) sums) -> ()", &memopt::adam_mini_block_sums_meta);
  define_op(m, "adam_mini_shard_update_(Tensor(a!)[] params, Tensor[] grads, "
            "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, int[] blocks, "
            "int[] shards, Tensor sums, Tensor lr, float beta1, float beta2, float eps, "
            "float weight_decay, int[] rounding=[], Tensor(e!)[]? state_scales=None, "
            "Tensor? found_inf=None) -> ()",
            &memopt::adam_mini_shard_check);
}

TORCH_LIBRARY_IMPL(memopt, CPU, m) {
  m.impl("adamw_", &memopt::adamw_cpu);
  m.impl("adam_mini_", &memopt::adam_mini_cpu);
  m.impl("adam_mini_block_sums_", &memopt::adam_mini_block_sums_cpu);
  m.impl("adam_mini_shard_update_", &memopt::adam_mini_shard_update_cpu);
}

TORCH_LIBRARY_IMPL(memopt, Meta, m) {
  m.impl("adamw_", &memopt::adamw_meta);
  m.impl("adam_mini_", &memopt::adam_mini_meta);
  m.impl("adam_mini_block_sums_", &memopt::adam_mini_block_sums_meta);
  m.impl("adam_mini_shard_update_", &memopt::adam_mini_shard_update_meta);
}
