// Roles from a LibTorch module tree, decided by infer_role (roles.h) from the same facts the
// Python front end reads from an nn.Module: the module type holding each parameter (Linear,
// Embedding, *Norm, Conv*, MultiheadAttention), the output head, and the head geometry given.
//
//   memopt::AdamMini opt(memopt::module_roles(*model, {768, 12, 4, 0}), options);
#pragma once

#include <torch/nn/module.h>

#include <utility>
#include <vector>

#include "memopt/roles.h"

namespace memopt {

// (parameter, role) for every parameter of `model`, in named_parameters() order. The output head
// is the last Linear onto the vocabulary (the largest Embedding's num_embeddings), as the Python
// front end finds it when a model has no get_output_embeddings().
std::vector<std::pair<torch::Tensor, RoleInfo>> module_roles(const torch::nn::Module& model,
                                                             const HeadGeometry& heads = {});

}  // namespace memopt
