// The LibTorch optimizers' Adam options (serialization shared by every options class) and
// memopt::AdamW. The machinery they share: plan_optimizer_impl.h.
#include "memopt/optimizers.h"

#include "plan_optimizer_impl.h"

namespace memopt {

namespace {
using torch::serialize::InputArchive;
using torch::serialize::OutputArchive;

template <typename T>
T read_value(InputArchive& archive, const char* key) {
  c10::IValue value;
  archive.read(key, value);  // raises, naming the key, when the checkpoint lacks it
  return value.to<T>();
}

template <typename Options>
void write_adam_hparams(OutputArchive& archive, const Options& o) {
  archive.write("lr", c10::IValue(o.lr()));
  archive.write("betas", c10::IValue(o.betas()));
  archive.write("eps", c10::IValue(o.eps()));
  archive.write("weight_decay", c10::IValue(o.weight_decay()));
}

template <typename Options>
void read_adam_hparams(InputArchive& archive, Options& o) {
  o.lr(read_value<double>(archive, "lr"));
  o.betas(read_value<typename Options::betas_t>(archive, "betas"));
  o.eps(read_value<double>(archive, "eps"));
  o.weight_decay(read_value<double>(archive, "weight_decay"));
}

}  // namespace

void AdamWOptions::serialize(InputArchive& archive) { read_adam_hparams(archive, *this); }
void AdamWOptions::serialize(OutputArchive& archive) const { write_adam_hparams(archive, *this); }

void AdamMiniOptions::serialize(InputArchive& archive) {
  read_adam_hparams(archive, *this);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, dim);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, n_heads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, n_kv_heads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, head_dim);
}
void AdamMiniOptions::serialize(OutputArchive& archive) const {
  write_adam_hparams(archive, *this);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dim);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(n_heads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(n_kv_heads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(head_dim);
}

namespace {
std::vector<BlockTensor> unnamed(const std::vector<at::Tensor>& params) {
  std::vector<BlockTensor> out;
  for (const auto& p : params) {
    TORCH_CHECK_VALUE(p.defined(), "AdamW: a parameter is an undefined tensor");
    out.push_back({"", p.sizes().vec(), {}, ""});
  }
  return out;
}

std::vector<at::Tensor> all_params(const std::vector<torch::optim::OptimizerParamGroup>& groups) {
  std::vector<at::Tensor> out;
  for (const auto& g : groups) out.insert(out.end(), g.params().begin(), g.params().end());
  return out;
}

BlockPlanConfig adamw_config() {
  BlockPlanConfig c;
  c.algorithm = BlockAlgorithm::AdamW;
  return c;
}
}  // namespace

AdamW::AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
             AdamWOptions defaults)
    : PlanOptimizer(param_groups, defaults),
      plan_(unnamed(all_params(param_groups)), adamw_config()) {}

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults)
    : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void AdamW::extend_plan(const std::vector<at::Tensor>& params, const AdamWOptions&) {
  plan_.add(unnamed(params));
}

// Through the dispatcher, as torch.ops.memopt.adamw_: the kernel for the parameters' device
// (CPU, or CUDA when built) runs, exactly as for the Python front end.
void AdamW::run(const AdamWOptions& o, const GroupLists& l, bool validate) const {
  call_op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
               const at::Tensor&, double, double, double, double, c10::string_view)>(
      "adamw_", validate, l.params, l.grads, l.list("exp_avg"), l.list("exp_avg_sq"),
      l.list("step"), at::scalar_tensor(o.lr(), at::kDouble), std::get<0>(o.betas()),
      std::get<1>(o.betas()), o.eps(), o.weight_decay(), c10::string_view("torch"));
}

template class PlanOptimizer<AdamWOptions>;

}  // namespace memopt
