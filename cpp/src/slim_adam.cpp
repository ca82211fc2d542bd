// SlimAdam's second-moment layouts as Adam-mini blocks (the update itself is adam_mini_update_).
#include "memopt/slim_adam.h"

#include <algorithm>
#include <c10/util/Exception.h>
#include <sstream>

namespace memopt {
namespace {

// Dims sorted and checked: in range (negative counts from the end) and not repeated.
std::vector<int64_t> normalized(at::IntArrayRef shape, const std::vector<int64_t>& dims) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  std::vector<int64_t> out;
  for (int64_t d : dims) {
    TORCH_CHECK_VALUE(d >= -nd && d < nd, "SlimAdam: dim ", d, " is out of range for a tensor of ",
                      nd, " dims (shape ", shape, ")");
    out.push_back(d < 0 ? d + nd : d);
  }
  std::sort(out.begin(), out.end());
  TORCH_CHECK_VALUE(std::adjacent_find(out.begin(), out.end()) == out.end(),
                    "SlimAdam: dims ", dims, " repeat a dim");
  return out;
}

// The tensor as runs of consecutive averaged (true) or kept (false) dims, size-1 dims dropped:
// a size-1 dim changes no offsets, so it can join either side.
std::vector<std::pair<int64_t, bool>> runs_of(at::IntArrayRef shape, const std::vector<int64_t>& k) {
  std::vector<std::pair<int64_t, bool>> runs;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 1) continue;
    const bool avg = std::binary_search(k.begin(), k.end(), static_cast<int64_t>(i));
    if (!runs.empty() && runs.back().second == avg)
      runs.back().first *= shape[i];
    else
      runs.emplace_back(shape[i], avg);
  }
  return runs;
}

bool fits(const std::vector<std::pair<int64_t, bool>>& runs) {
  const auto n_avg = std::count_if(runs.begin(), runs.end(), [](const auto& r) { return r.second; });
  return n_avg <= 1 || (n_avg == 2 && runs.back().second);
}

std::string dims_text(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "mean over dim" << (dims.size() > 1 ? "s" : "");
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? "," : " ") << dims[i];
  return s.str();
}

SlimLayout uncompressed(at::IntArrayRef shape, std::string why) {
  auto l = slim_adam_dims_layout(shape, {});
  l.rule = std::move(why);
  return l;
}

}  // namespace

bool slim_adam_dims_supported(at::IntArrayRef shape, const std::vector<int64_t>& dims) {
  return fits(runs_of(shape, normalized(shape, dims)));
}

SlimLayout slim_adam_dims_layout(at::IntArrayRef shape, const std::vector<int64_t>& dims) {
  const auto k = normalized(shape, dims);
  const int64_t numel = c10::multiply_integers(shape);
  SlimLayout out;
  out.dims = k;
  out.rule = k.empty() ? "none" : dims_text(k);
  // An empty tensor has no blocks, so no v entries: v_shape is then its own (empty) shape. The
  // keepdim shape would promise entries (a mean over an empty dim) that are not stored.
  if (numel == 0) {
    out.v_shape.assign(shape.begin(), shape.end());
    return out;
  }
  for (size_t i = 0; i < shape.size(); ++i)
    out.v_shape.push_back(std::binary_search(k.begin(), k.end(), static_cast<int64_t>(i)) ? 1 : shape[i]);
  const auto runs = runs_of(shape, k);
  TORCH_CHECK_VALUE(fits(runs), "SlimAdam: the mean over dims ", dims, " of a tensor of shape ",
                    shape, " is not supported (the averaged dims must form one run of "
                    "neighbouring dims, or two runs the second of which ends the tensor); "
                    "choose other dims or null");
  // One segment of rows x cols. Averaged run A (rows, stride cols) and/or averaged run B
  // (trailing, contiguous) make the tile; the kept dims before A number the bands of tiles and
  // the kept dims between A and B the tiles within a row: block order = kept dims row-major.
  int64_t before = 1, a = 1, mid = 1, b = 1;
  const auto n_avg = std::count_if(runs.begin(), runs.end(), [](const auto& r) { return r.second; });
  const bool b_last = !runs.empty() && runs.back().second;
  bool seen_a = false;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto [size, avg] = runs[i];
    if (avg && b_last && i + 1 == runs.size()) b = size;
    else if (avg && !seen_a && !(b_last && n_avg == 1)) { a = size; seen_a = true; }
    else if (seen_a) mid *= size;
    else before *= size;
  }
  // Nothing averaged (only size-1 dims were named): elementwise, as plain Adam.
  out.spec = {n_avg == 0 ? Segment{0, numel, 1, 1, 1, 1}
                          : Segment{0, before * a, mid * b, mid * b, a, b}};
  return out;
}

SlimLayout slim_adam_table_layout(const RoleInfo& info, at::IntArrayRef shape) {
  if (const int64_t g = kv_groups(info, shape)) {  // the split of one kv group, repeated
    const RoleInfo one{Role::FusedQKV, false, info.head_dim, info.q_heads / g, 1};
    SlimLayout l = slim_adam_table_layout(one, {shape[0] / g, shape[1]});
    l.spec = per_kv_group(l.spec, shape, g);
    l.v_shape[0] *= g;
    l.rule += ", per kv group (" + std::to_string(g) + ")";
    return l;
  }
  const int64_t nd = static_cast<int64_t>(shape.size());
  const bool tr = info.transposed && nd == 2;
  auto mean_over = [&](int64_t dim, const char* what) {
    auto l = slim_adam_dims_layout(shape, {dim});
    l.rule = std::string(what) + " (" + dims_text({dim}) + ")";
    return l;
  };
  if (nd < 2) return uncompressed(shape, "none (1-D)");
  switch (info.role) {
    case Role::Embedding:  // one value per token (position): the last dim holds the features
      return mean_over(nd - 1, "per token");
    case Role::Output:
      return mean_over(tr ? 0 : nd - 1, "per token");
    case Role::Query:
    case Role::Key:
      if (nd != 2) break;
      return mean_over(tr ? 0 : 1, "fan-in");
    case Role::Value:
    case Role::AttnOut:
    case Role::Mlp:
      if (nd != 2) break;
      return mean_over(tr ? 1 : 0, "fan-out");
    case Role::FusedQKV: {
      if (nd != 2) break;
      const int64_t out = tr ? shape[1] : shape[0], in = tr ? shape[0] : shape[1];
      const int64_t hd = info.head_dim, qk = (info.q_heads + info.kv_heads) * hd,
                    v = info.kv_heads * hd;
      if (hd <= 0 || info.q_heads <= 0 || info.kv_heads <= 0 || qk + v != out)
        return uncompressed(shape, "none (fused QKV of " + std::to_string(out) +
                                       " outputs does not split into q, k, v heads)");
      SlimLayout l;
      l.rule = "q,k fan-in; v fan-out";
      if (tr)  // (in, out): q,k outputs are columns (one value each), v's inputs are rows
        l.spec = {Segment{0, in, qk, out, in, 1}, Segment{qk, in, v, out, 1, v}};
      else     // (out, in): q,k outputs are rows, v's inputs are columns of its row band
        l.spec = {Segment{0, qk, in, in, 1, in}, Segment{qk * in, v, in, in, v, 1}};
      l.v_shape = {num_blocks(l.spec)};
      return l;
    }
    default:
      break;
  }
  return uncompressed(shape, "none");
}

}  // namespace memopt
