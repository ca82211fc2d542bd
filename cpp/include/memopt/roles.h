// What each tensor is in the network (its role), decided once for every optimizer and both front
// ends: from the facts the module tree gives (the Python front end reads them from nn.Module
// types and model configs; names alone otherwise), the head geometry, and user overrides.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace memopt {

// What a tensor is in the network; decides its blocks, projection and weight decay.
enum class Role {
  Embedding, Output, Query, Key, Value, AttnOut, FusedQKV, Mlp, Norm, Bias, Conv, Linear,
  Scalar,      // one block for the whole tensor
  Elementwise  // plain Adam
};
std::string role_name(Role role);
Role role_from_string(const std::string& name);  // throws on an unknown name, listing valid ones
std::vector<std::string> role_names();

// What the algorithms decide from a role alone: the one table that replaces per-optimizer sets.
struct RoleTraits {
  bool attention_or_mlp;  // Q/K/V/O, fused QKV, MLP: what FRUGAL splits (2-D)
  bool hidden_matrix;     // those and other hidden linear maps: what APOLLO projects (2-D)
  bool decays;            // decoupled weight decay applies (to tensors with >= 2 dims)
  bool needs_shape;       // blocks follow the tensor's own shape (a flattened one is refused)
  bool per_head;          // Q/K/fused QKV: blocks need the head geometry
};
const RoleTraits& role_traits(Role role);

struct RoleInfo {
  Role role = Role::Linear;
  bool transposed = false;  // stored (in, out), as HF GPT-2 Conv1D; output neurons are columns
  int64_t head_dim = 0;     // Query / Key / FusedQKV: rows (cols if transposed) per head
  int64_t q_heads = 0;      // FusedQKV: query heads; key and value have kv_heads each
  int64_t kv_heads = 0;
  // FusedQKV whose rows are kv_heads repeats of [q_heads/kv_heads query heads | key | value]
  // (torchtitan's FusedQKVLinear) rather than q | k | v
  bool kv_interleaved = false;
};

// Role from a parameter name and shape alone (used when no module tree is available).
Role role_from_name(const std::string& name, at::IntArrayRef shape);

// The kind of module that holds a tensor, as the front end reads it from the module tree.
enum class OwnerKind { Other, Linear, TransposedLinear, Embedding, Norm, Conv, MultiheadAttention };
OwnerKind owner_kind_from_string(const std::string& kind);  // "linear", "conv1d", ... ("other")

// One module holding the tensor (a tied tensor has several) and the attribute it holds it as.
struct Owner {
  OwnerKind kind = OwnerKind::Other;
  std::string attr;  // "weight", "bias", "in_proj_weight", ...
};

// The model's head geometry near a tensor (0 = unknown): its attention module's or config's,
// overridden by what the user passed.
struct HeadGeometry {
  int64_t dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
};

struct TensorFacts {
  std::vector<Owner> owners;    // empty: no module tree (names decide)
  bool is_output_head = false;  // the model's output projection (its vocabulary head)
  bool kv_interleaved = false;  // owned by an interleaved fused QKV (torchtitan)
  HeadGeometry heads;
  std::optional<Role> forced;   // a user override
  // Whether Q/K blocks need the head geometry (Adam-mini's per-head blocks). SlimAdam's table
  // averages Q/K over fan-in whatever the heads, so for it a Q/K without heads stays Q/K.
  bool qk_need_heads = true;
};

// The decision: role and layout facts for the partitioner, where they came from ("module",
// "name" or "override") and, when the paper's per-head blocks cannot be used, why (an inferred
// Q/K/QKV then becomes Linear: one block per output neuron; an override keeps its role).
struct InferredRole {
  RoleInfo info;
  std::string source;
  std::string note;
};
InferredRole infer_role(const std::string& name, at::IntArrayRef shape, const TensorFacts& facts);

}  // namespace memopt
