// SlimAdam (Kalra et al., arXiv 2503.01843): Adam whose second moment is averaged along the dims
// of a tensor where its signal-to-noise ratio is high.
//
// The update is Adam-mini's equation for equation (reference utils/slimadam.py, SlimAdamW.step):
//   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*mean_K(g^2)  (keepdim, broadcast over K)
//   p *= 1 - lr*wd;  p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)
// and sqrt(v/(1-b2^t)) = sqrt(v)/sqrt(1-b2^t), which is adam_mini_update_'s denominator. So
// SlimAdam runs on memopt::adam_mini_update_ (torch.ops.memopt.adam_mini_); this file only cuts
// "mean over dims K" into that kernel's blocks (one block per slice of the kept dims).
// Non-contiguous parameters take adam_mini_update_'s paths (AdamMiniLayouts, adam_mini.h).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "memopt/partition.h"

namespace memopt {

struct SlimLayout {
  BlockSpec spec;                             // blocks for adam_mini_update_
  std::vector<int64_t> v_shape;               // the reference's keepdim shape of v; 1-D for a split
  std::optional<std::vector<int64_t>> dims;   // dims averaged over (empty: none); nullopt: split
  std::string rule;                           // what was decided, for describe()
};

// v = mean of g^2 over `dims` (any order, negative allowed; empty: uncompressed, plain Adam).
// The blocks' order is the row-major order of the keepdim mean, so v.view(v_shape) is the
// reference's `nu` (an empty tensor has no entries: v_shape is then its own shape). Raises
// ValueError for dims out of range or repeated, or a set the tile model cannot express (see
// slim_adam_dims_supported).
SlimLayout slim_adam_dims_layout(at::IntArrayRef shape, const std::vector<int64_t>& dims);

// Whether mean-over-`dims` fits one Segment: after dropping size-1 dims and merging neighbours of
// the same kind, the averaged dims form one run, or two runs with an averaged run last. Every
// subset of a 1-, 2- or 3-D tensor does; of 4-D, all but {0, 2}-like patterns.
bool slim_adam_dims_supported(at::IntArrayRef shape, const std::vector<int64_t>& dims);

// The paper's static table (§4, Table 1; reference DEFAULT_COMPRESSION_RULES), keyed on roles so
// that layouts the reference's substring match gets wrong are handled (transposed Conv1D weights,
// fused QKV, torchtitan names, 1-D biases):
//   embedding, output, query, key: mean over fan-in (one value per token / output row);
//   value, attn_out, mlp: mean over fan-out (one value per input column);
//   fused qkv: q and k rows over fan-in, v rows over fan-out (uncompressed if heads do not split);
//   norm, bias, scalar, conv, unknown linear, 1-D tensors: uncompressed.
SlimLayout slim_adam_table_layout(const RoleInfo& info, at::IntArrayRef shape);

}  // namespace memopt
