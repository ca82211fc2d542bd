// Block partitioner: roles and shapes -> Segment lists (see partition.h for the tile model).
#include "memopt/partition.h"

#include <algorithm>
#include <array>
#include <c10/util/Exception.h>
#include <numeric>
#include <sstream>

#include "name_match.h"

namespace memopt {

bool Segment::operator==(const Segment& o) const {
  return offset == o.offset && rows == o.rows && cols == o.cols && row_stride == o.row_stride &&
         tile_rows == o.tile_rows && tile_cols == o.tile_cols;
}

int64_t num_blocks(const BlockSpec& spec) {
  int64_t n = 0;
  for (const auto& s : spec) n += s.num_blocks();
  return n;
}

void check_block_spec(const BlockSpec& spec, int64_t numel, const std::string& what) {
  TORCH_CHECK(!spec.empty() || numel == 0, what, ": block spec has no segments");
  int64_t covered = 0;
  std::vector<std::pair<int64_t, int64_t>> extents;  // [first, last] element of each segment
  for (const auto& s : spec) {
    TORCH_CHECK(s.offset >= 0 && s.rows > 0 && s.cols > 0 && s.tile_rows > 0 && s.tile_cols > 0,
                what, ": block spec segment has a non-positive size");
    TORCH_CHECK(s.row_stride >= s.cols, what, ": segment row_stride ", s.row_stride,
                " is smaller than its cols ", s.cols);
    TORCH_CHECK(s.rows % s.tile_rows == 0 && s.cols % s.tile_cols == 0, what, ": segment of ",
                s.rows, "x", s.cols, " is not divisible into ", s.tile_rows, "x", s.tile_cols,
                " tiles");
    const int64_t last = s.offset + (s.rows - 1) * s.row_stride + s.cols - 1;
    TORCH_CHECK(last < numel, what, ": block spec reaches element ", last, " of a tensor of ",
                numel);
    covered += s.rows * s.cols;
    extents.emplace_back(s.offset, last);
  }
  TORCH_CHECK(covered == numel, what, ": block spec covers ", covered, " of ", numel, " elements");
  // Interleaved (strided) segments may share an extent; only contiguous ones must not overlap.
  std::sort(extents.begin(), extents.end());
  for (size_t i = 1; i < spec.size(); ++i) {
    const bool all_contiguous = std::all_of(spec.begin(), spec.end(),
                                            [](const Segment& s) { return s.row_stride == s.cols; });
    if (all_contiguous)
      TORCH_CHECK(extents[i].first > extents[i - 1].second, what, ": block spec segments overlap");
  }
}

std::vector<int64_t> encode_block_specs(const std::vector<BlockSpec>& specs) {
  std::vector<int64_t> flat;
  for (const auto& spec : specs) {
    flat.push_back(static_cast<int64_t>(spec.size()));
    for (const auto& s : spec)
      flat.insert(flat.end(), {s.offset, s.rows, s.cols, s.row_stride, s.tile_rows, s.tile_cols});
  }
  return flat;
}

std::vector<BlockSpec> decode_block_specs(at::IntArrayRef flat, int64_t n_tensors) {
  std::vector<BlockSpec> specs(n_tensors);
  size_t pos = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    TORCH_CHECK(pos < flat.size(), "blocks: spec list ends before tensor ", t);
    const int64_t n = flat[pos++];
    TORCH_CHECK(n >= 0 && pos + n * kSegmentInts <= flat.size(), "blocks: tensor ", t,
                " declares ", n, " segments but the list is too short");
    for (int64_t k = 0; k < n; ++k, pos += kSegmentInts)
      specs[t].push_back({flat[pos], flat[pos + 1], flat[pos + 2], flat[pos + 3], flat[pos + 4],
                          flat[pos + 5]});
  }
  TORCH_CHECK(pos == flat.size(), "blocks: ", flat.size() - pos, " trailing ints after ",
              n_tensors, " tensor specs");
  return specs;
}

namespace {
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t round_up(int64_t a, int64_t b) { return -floor_div(-a, b) * b; }
int64_t round_down(int64_t a, int64_t b) { return floor_div(a, b) * b; }
}  // namespace

std::vector<ShardPiece> shard_pieces(const BlockSpec& spec, int64_t lo, int64_t hi) {
  std::vector<ShardPiece> out;
  int64_t base = 0;  // first block of the current segment
  for (const auto& s : spec) {
    const int64_t tr = s.tile_rows, tc = s.tile_cols, tpr = s.tiles_per_row();
    auto start = [&](int64_t r) { return s.offset + r * s.row_stride; };
    // Rows [a, b) inside one band or a run of whole bands, all of each row in the shard.
    auto rows = [&](int64_t a, int64_t b, int64_t tile_rows) {
      if (b > a)
        out.push_back({{start(a) - lo, b - a, s.cols, s.row_stride, tile_rows, tc},
                       base + (a / tr) * tpr, tpr});
    };
    // Columns [c0, c1) of row r: a run of whole tiles, or part of one tile.
    auto cols = [&](int64_t r, int64_t c0, int64_t c1, bool whole) {
      if (c1 > c0)
        out.push_back({{start(r) + c0 - lo, 1, c1 - c0, c1 - c0, 1, whole ? tc : c1 - c0},
                       base + (r / tr) * tpr + c0 / tc, tpr});
    };
    // Rows wholly in the shard are [ra, rb): row starts grow by row_stride >= cols, so only
    // rows ra - 1 and rb can be cut by the shard's ends.
    const int64_t ra = std::clamp(-floor_div(s.offset - lo, s.row_stride), int64_t{0}, s.rows);
    const int64_t rb = std::max(ra, std::clamp(floor_div(hi - s.offset - s.cols, s.row_stride) + 1,
                                               int64_t{0}, s.rows));
    const int64_t h1 = std::min(rb, round_up(ra, tr)), t0 = std::max(h1, round_down(rb, tr));
    rows(ra, h1, h1 - ra);
    rows(h1, t0, tr);
    rows(t0, rb, rb - t0);
    for (const int64_t r : {ra - 1, rb == ra - 1 ? int64_t{-1} : rb}) {  // (one row cut twice)
      if (r < 0 || r >= s.rows) continue;
      const int64_t c0 = std::max<int64_t>(0, lo - start(r)), c1 = std::min(s.cols, hi - start(r));
      const int64_t u = std::min(c1, round_up(c0, tc)), w = std::max(u, round_down(c1, tc));
      cols(r, c0, u, false);
      cols(r, u, w, true);
      cols(r, w, c1, false);
    }
    base += s.num_blocks();
  }
  return out;
}

namespace {
// The tensor as rows x cols: dim 0 by the rest (a 1-D tensor is one column).
std::pair<int64_t, int64_t> as_matrix(at::IntArrayRef shape) {
  const int64_t numel = c10::multiply_integers(shape);
  if (shape.empty()) return {1, 1};
  const int64_t rows = shape[0];
  return {rows, rows == 0 ? 0 : numel / rows};
}

Segment whole(int64_t rows, int64_t cols, int64_t tr, int64_t tc) {
  return {0, rows, cols, cols, tr, tc};
}

// Blocks of one output neuron each: rows of (out, in), columns of a transposed (in, out) weight.
Segment per_neuron(int64_t rows, int64_t cols, bool transposed) {
  return transposed ? whole(rows, cols, rows, 1) : whole(rows, cols, 1, cols);
}
}  // namespace

int64_t kv_groups(const RoleInfo& info, at::IntArrayRef shape) {
  const int64_t g = info.kv_interleaved && info.role == Role::FusedQKV ? info.kv_heads : 0;
  const bool ok = g > 0 && !info.transposed && shape.size() == 2 && shape[0] % g == 0 &&
                  info.q_heads % g == 0;
  return ok ? g : 0;
}

BlockSpec per_kv_group(const BlockSpec& group, at::IntArrayRef shape, int64_t g) {
  const int64_t step = shape[0] / g * shape[1];
  BlockSpec out;
  for (int64_t i = 0; i < g; ++i)
    for (Segment s : group) {
      s.offset += i * step;
      out.push_back(s);
    }
  return out;
}

BlockSpec adam_mini_blocks(const RoleInfo& info, at::IntArrayRef shape, std::string* note) {
  if (info.kv_interleaved && info.role == Role::FusedQKV) {
    const int64_t g = kv_groups(info, shape);
    if (g == 0) {
      if (note) {
        std::ostringstream why;
        why << "qkv interleaved per kv head: " << shape << " does not split into "
            << info.kv_heads << " groups of query heads + key + value; one block per output "
            << "neuron";
        *note = why.str();
      }
      return adam_mini_blocks(RoleInfo{Role::Linear}, shape);
    }
    const RoleInfo one{Role::FusedQKV, false, info.head_dim, info.q_heads / g, 1};
    return per_kv_group(adam_mini_blocks(one, {shape[0] / g, shape[1]}, note), shape, g);
  }
  const auto [rows, cols] = as_matrix(shape);
  if (rows * cols == 0) return {};
  const bool tr = info.transposed && shape.size() == 2;
  const int64_t out = tr ? cols : rows;  // output features
  auto fallback = [&](const std::string& why) {
    if (note) *note = why + "; using one block per output neuron";
    return BlockSpec{per_neuron(rows, cols, tr)};
  };
  switch (info.role) {
    case Role::Norm:
    case Role::Scalar:
      return {whole(rows, cols, rows, cols)};
    case Role::Bias:
    case Role::Elementwise:
      return {whole(rows, cols, 1, 1)};
    case Role::Embedding:
    case Role::Output: {  // one block per token (or position): the last dim is the features
      const int64_t features = shape.empty() ? 1 : shape.back();
      const int64_t tokens = rows * cols / features;
      return {whole(tokens, features, 1, features)};
    }
    case Role::Query:
    case Role::Key: {
      if (shape.size() < 2) return {whole(rows, cols, rows, cols)};
      const int64_t hd = info.head_dim;
      if (hd <= 0 || out % hd != 0)
        return fallback("head_dim " + std::to_string(hd) + " does not divide " +
                        std::to_string(out) + " output features");
      return {tr ? whole(rows, cols, rows, hd) : whole(rows, cols, hd, cols)};
    }
    case Role::FusedQKV: {
      if (shape.size() < 2) return {whole(rows, cols, rows, cols)};
      const int64_t hd = info.head_dim, q = info.q_heads * hd, kv = info.kv_heads * hd;
      if (hd <= 0 || q <= 0 || kv <= 0 || q + 2 * kv != out)
        return fallback("fused QKV of " + std::to_string(out) + " outputs does not split into " +
                        std::to_string(info.q_heads) + "+2x" + std::to_string(info.kv_heads) +
                        " heads of " + std::to_string(hd));
      BlockSpec spec;
      const std::array<std::pair<int64_t, bool>, 3> parts{{{q, true}, {kv, true}, {kv, false}}};
      int64_t start = 0;
      for (const auto& [width, per_head] : parts) {
        const int64_t tile = per_head ? hd : 1;  // q, k per head; v per neuron
        if (tr)
          spec.push_back({start, rows, width, cols, rows, tile});
        else
          spec.push_back({start * cols, width, cols, cols, tile, cols});
        start += width;
      }
      return spec;
    }
    case Role::Value:
    case Role::AttnOut:
    case Role::Mlp:
    case Role::Conv:
    case Role::Linear:
      if (shape.size() < 2) return {whole(rows, cols, rows, cols)};  // 1-D: one block
      return {per_neuron(rows, cols, tr)};
  }
  return {whole(rows, cols, rows, cols)};
}

ReferencePartition adam_mini_reference_blocks(const std::string& name, at::IntArrayRef shape,
                                              int64_t dim, int64_t n_heads) {
  using names::contains_any;
  const std::string n = names::lower(name);
  const int64_t numel = c10::multiply_integers(shape);
  const bool decay = !contains_any(n, {"norm", "ln", "bias"});
  if (contains_any(n, {"bias"})) return {{whole(numel, 1, 1, 1)}, Role::Elementwise, decay};
  if (contains_any(n, {"k_proj", "q_proj", "wq", "wk", "query", "key"})) {
    const int64_t head_numel = dim * dim / n_heads;
    TORCH_CHECK_VALUE(head_numel > 0 && numel % head_numel == 0, "partition='reference': '", name,
                      "' has ", numel, " elements, not a multiple of dim*dim/n_heads = ",
                      head_numel, " (adam-mini 1.1.1 fails here too); use partition='auto'");
    return {{whole(numel / head_numel, head_numel, 1, head_numel)}, Role::Query, decay};
  }
  if (contains_any(n, {"embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv",
                       "value", "o_proj", "wo", "attn.proj", "feed_forward", "linear", "mlp"})) {
    TORCH_CHECK_VALUE(shape.size() == 2, "partition='reference': '", name, "' has ", shape.size(),
                      " dims but adam-mini 1.1.1 gives it per-row blocks, which need 2 "
                      "(adam-mini fails here too); use partition='auto'");
    return {{whole(shape[0], shape[1], 1, shape[1])}, Role::Linear, decay};
  }
  return {{whole(numel, 1, numel, 1)}, Role::Scalar, decay};
}

}  // namespace memopt
