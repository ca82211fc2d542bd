// Roles: names, the traits table, the name heuristic, and infer_role, which turns the facts a
// front end reads from the module tree into the role every optimizer uses.
#include "memopt/roles.h"

#include <array>
#include <c10/util/Exception.h>
#include <sstream>

#include "memopt/partition.h"
#include "name_match.h"

namespace memopt {

namespace {
struct RoleRow {
  Role role;
  const char* name;
  RoleTraits traits;  // attention_or_mlp, hidden_matrix, decays, needs_shape, per_head
};
// Weight decay: weight matrices only, as adam-mini (which exempts norms and biases by name) and
// common LLM recipes (which exempt every 1-D tensor) do.
constexpr std::array<RoleRow, 14> kRoles{{
    {Role::Embedding, "embedding", {false, false, true, true, false}},
    {Role::Output, "output", {false, false, true, true, false}},
    {Role::Query, "query", {true, true, true, true, true}},
    {Role::Key, "key", {true, true, true, true, true}},
    {Role::Value, "value", {true, true, true, true, false}},
    {Role::AttnOut, "attn_out", {true, true, true, true, false}},
    {Role::FusedQKV, "qkv", {true, true, true, true, true}},
    {Role::Mlp, "mlp", {true, true, true, true, false}},
    {Role::Norm, "norm", {false, false, false, false, false}},
    {Role::Bias, "bias", {false, false, false, false, false}},
    {Role::Conv, "conv", {false, false, true, true, false}},
    {Role::Linear, "linear", {false, true, true, false, false}},
    {Role::Scalar, "scalar", {false, false, false, false, false}},
    {Role::Elementwise, "adam", {false, false, true, false, false}},
}};

const RoleRow& row(Role role) {
  for (const auto& r : kRoles)
    if (r.role == role) return r;
  TORCH_CHECK(false, "unknown Role value ", static_cast<int>(role));
}
}  // namespace

std::string role_name(Role role) { return row(role).name; }
const RoleTraits& role_traits(Role role) { return row(role).traits; }

std::vector<std::string> role_names() {
  std::vector<std::string> out;
  for (const auto& r : kRoles) out.emplace_back(r.name);
  return out;
}

Role role_from_string(const std::string& name) {
  for (const auto& r : kRoles)
    if (name == r.name) return r.role;
  std::ostringstream valid;
  for (const auto& n : role_names()) valid << " " << n;
  TORCH_CHECK_VALUE(false, "unknown role '", name, "'; valid roles:", valid.str());
}

Role role_from_name(const std::string& name, at::IntArrayRef shape) {
  using names::contains_any;
  using names::one_of;
  // Module names are matched exactly (not as substrings) so that e.g. "keypoint_head" is not a
  // key projection and "network" not an attention output ("wo").
  const std::string n = names::lower(name);
  auto parts = names::split_dots(n);
  const std::string leaf = parts.empty() ? n : parts.back();
  const std::string module = parts.size() >= 2 ? parts[parts.size() - 2] : "";
  const std::string parent = parts.size() >= 3 ? parts[parts.size() - 3] : "";
  const bool is_bias = names::is_bias_leaf(leaf);
  if (shape.size() <= 1) {
    if (is_bias) return Role::Bias;
    if (contains_any(n, {"norm", "ln"})) return Role::Norm;
    return Role::Scalar;
  }
  const bool in_layer = std::any_of(parts.begin(), parts.end(), [](const std::string& p) {
    return !p.empty() && std::all_of(p.begin(), p.end(), ::isdigit);
  });
  if (!in_layer && one_of(module, {"lm_head", "output", "head", "final_layer", "embed_out"}))
    return Role::Output;
  if (contains_any(n, {"embed", "embd", "wte", "wpe", "tok_embeddings"})) return Role::Embedding;
  // GPT-NeoX's query_key_value interleaves q, k, v per head, which q|k|v segments do not
  // describe; it is left to per-neuron blocks.
  if (one_of(module, {"c_attn", "qkv", "qkv_proj", "wqkv", "w_pack"}) || leaf == "in_proj_weight")
    return Role::FusedQKV;
  if (one_of(module, {"q_proj", "wq", "query", "to_q", "q"})) return Role::Query;
  if (one_of(module, {"k_proj", "wk", "key", "to_k", "k"})) return Role::Key;
  if (one_of(module, {"v_proj", "wv", "value", "to_v", "v"})) return Role::Value;
  const bool attention = contains_any(parent, {"attn", "attention"});
  if (one_of(module, {"o_proj", "wo", "out_proj", "to_out"}) ||
      (attention && one_of(module, {"c_proj", "proj", "dense"})) ||
      (module == "dense" && parent == "output" && contains_any(n, {"attention.output"})))
    return Role::AttnOut;
  if (one_of(module, {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc",
                      "c_proj", "dense_h_to_4h", "dense_4h_to_h"}) ||
      contains_any(n, {"mlp", "feed_forward", "ffn", "intermediate", "output.dense"}))
    return Role::Mlp;
  if (shape.size() >= 3) return Role::Conv;
  return Role::Linear;
}

OwnerKind owner_kind_from_string(const std::string& kind) {
  static const std::array<std::pair<const char*, OwnerKind>, 7> kinds{{
      {"other", OwnerKind::Other}, {"linear", OwnerKind::Linear},
      {"conv1d", OwnerKind::TransposedLinear}, {"embedding", OwnerKind::Embedding},
      {"norm", OwnerKind::Norm}, {"conv", OwnerKind::Conv},
      {"mha", OwnerKind::MultiheadAttention}}};
  for (const auto& [n, k] : kinds)
    if (kind == n) return k;
  TORCH_CHECK_VALUE(false, "unknown module kind '", kind,
                    "' (other, linear, conv1d, embedding, norm, conv, mha)");
}

namespace {
struct OwnerRole {
  Role role;
  bool transposed = false;
  const char* source = "module";  // "name" where the module only says it is a linear map
};

// The role the owning modules give, or nullopt when they do not say.
std::optional<OwnerRole> role_from_owners(const std::string& name, at::IntArrayRef shape,
                                          const TensorFacts& f) {
  if (f.owners.empty()) return std::nullopt;
  const Owner& first = f.owners.front();
  for (const auto& o : f.owners)
    if (names::is_bias_leaf(names::lower(o.attr))) return OwnerRole{Role::Bias};
  if (shape.size() <= 1) {  // a 1-D tensor is never cut per row: norm, or the name decides
    if (first.kind == OwnerKind::Norm) return OwnerRole{Role::Norm};
    return std::nullopt;
  }
  for (const auto& o : f.owners)  // a head tied to the embedding: per token anyway
    if (o.kind == OwnerKind::Embedding) return OwnerRole{Role::Embedding};
  if (f.is_output_head) return OwnerRole{Role::Output};
  switch (first.kind) {
    case OwnerKind::Norm: return OwnerRole{Role::Norm};
    case OwnerKind::Conv: return OwnerRole{Role::Conv};
    case OwnerKind::MultiheadAttention:
      if (first.attr == "in_proj_weight") return OwnerRole{Role::FusedQKV};
      if (first.attr == "q_proj_weight") return OwnerRole{Role::Query};
      if (first.attr == "k_proj_weight") return OwnerRole{Role::Key};
      if (first.attr == "v_proj_weight") return OwnerRole{Role::Value};
      return std::nullopt;
    case OwnerKind::Linear:  // which linear (q, k, mlp ...): the name says
    case OwnerKind::TransposedLinear:
      return OwnerRole{role_from_name(name, shape), first.kind == OwnerKind::TransposedLinear,
                       "name"};
    default:
      return std::nullopt;
  }
}

// Head sizes for a Q/K/QKV role; `why` says why per-head blocks cannot be used, if they cannot.
RoleInfo with_heads(RoleInfo r, at::IntArrayRef shape, const HeadGeometry& h, bool layout_known,
                    std::string& why) {
  int64_t hd = h.head_dim;
  const int64_t q = h.n_heads;
  if (!hd && q && shape.size() == 2) {  // n_heads alone: the hidden size is the input width
    const int64_t width = r.transposed ? shape[0] : shape[1];
    hd = width % q == 0 ? width / q : 0;
  }
  // kv heads if `out` features split as q | k | v heads, else 0
  const auto kv_split = [&](int64_t out) -> int64_t {
    const int64_t rest = hd && out % hd == 0 ? out / hd - q : 0;
    return rest > 0 && rest % 2 == 0 ? rest / 2 : 0;
  };
  r.head_dim = hd;
  if (r.role == Role::FusedQKV && shape.size() == 2) {
    if (!layout_known && !kv_split(shape[0]) && kv_split(shape[1]))
      r.transposed = true;  // names only: only the columns split, so Conv1D
    // kv heads from the shape: configs often omit n_kv_heads when it equals n_heads
    const int64_t kv = kv_split(r.transposed ? shape[1] : shape[0]);
    r.q_heads = q;
    r.kv_heads = kv ? kv : h.n_kv_heads;
  }
  if (!hd || (r.role == Role::FusedQKV && !q))
    why = role_name(r.role) + ": no head count known (pass n_heads= or a model whose config "
          "has it); one block per output neuron";
  else
    adam_mini_blocks(r, shape, &why);
  return r;
}
}  // namespace

InferredRole infer_role(const std::string& name, at::IntArrayRef shape, const TensorFacts& f) {
  const auto found = role_from_owners(name, shape, f);
  InferredRole out;
  out.info.role = found ? found->role : role_from_name(name, shape);
  out.info.transposed = found && found->transposed;
  out.source = found ? found->source : "name";
  if (f.forced) {
    out.info.role = *f.forced;
    out.source = "override";
  }
  out.info.kv_interleaved = out.info.role == Role::FusedQKV && f.kv_interleaved;
  const Role r = out.info.role;
  if (!role_traits(r).per_head || (!f.qk_need_heads && r != Role::FusedQKV)) return out;
  out.info = with_heads(out.info, shape, f.heads, found.has_value(), out.note);
  if (out.note.empty() || out.source == "override") return out;
  const bool transposed = out.info.transposed;
  out.info = RoleInfo{Role::Linear, transposed};  // one block per output neuron
  return out;
}

}  // namespace memopt
