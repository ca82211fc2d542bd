// module_roles: the facts of a LibTorch module tree, handed to infer_role.
#include "memopt/module_roles.h"

#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <string>
#include <unordered_map>

namespace memopt {

namespace {
// The module kind from LibTorch's class name ("torch::nn::LinearImpl" -> linear), in the order
// the Python front end tests types (an embedding before a norm before a conv ...).
OwnerKind kind_of(const torch::nn::Module& m) {
  const std::string n = m.name();
  const auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  if (has("Embedding")) return OwnerKind::Embedding;
  if (has("Norm")) return OwnerKind::Norm;
  if (has("Conv")) return OwnerKind::Conv;
  if (has("MultiheadAttention")) return OwnerKind::MultiheadAttention;
  if (has("Linear")) return OwnerKind::Linear;
  return OwnerKind::Other;
}
}  // namespace

std::vector<std::pair<torch::Tensor, RoleInfo>> module_roles(const torch::nn::Module& model,
                                                             const HeadGeometry& heads) {
  std::unordered_map<const void*, std::vector<Owner>> owners;
  int64_t vocab = -1;
  const void* output = nullptr;
  // The model itself may live on the stack (no shared_ptr to it): its own parameters are read
  // from it, the submodules through named_modules without self.
  std::vector<const torch::nn::Module*> modules{&model};
  for (const auto& item : model.named_modules("", /*include_self=*/false))
    modules.push_back(item.value().get());
  for (const auto* m : modules) {
    if (const auto* e = dynamic_cast<const torch::nn::EmbeddingImpl*>(m))
      vocab = std::max(vocab, e->options.num_embeddings());
    for (const auto& p : m->named_parameters(/*recurse=*/false))
      owners[p.value().unsafeGetTensorImpl()].push_back({kind_of(*m), p.key()});
  }
  for (const auto* m : modules)  // the last Linear onto the vocabulary
    if (const auto* l = dynamic_cast<const torch::nn::LinearImpl*>(m))
      if (l->options.out_features() == vocab) output = l->weight.unsafeGetTensorImpl();
  std::vector<std::pair<torch::Tensor, RoleInfo>> out;
  for (const auto& p : model.named_parameters()) {
    TensorFacts facts;
    facts.owners = owners[p.value().unsafeGetTensorImpl()];
    facts.is_output_head = p.value().unsafeGetTensorImpl() == output;
    facts.heads = heads;
    out.emplace_back(p.value(), infer_role(p.key(), p.value().sizes(), facts).info);
  }
  return out;
}

}  // namespace memopt
