// The block partitioner: which entries of a tensor share one second-moment value (one lr).
#pragma once

#include <ATen/ATen.h>
#include <string>
#include <vector>

#include "memopt/roles.h"

namespace memopt {

// A 2-D region of a tensor's flat storage, cut into equal tiles; each tile is one block.
// rows x cols elements, row r starting at offset + r*row_stride (column stride 1). Tiles are
// tile_rows x tile_cols and are numbered row-major. This one shape covers per-head Q/K blocks,
// per-neuron rows, per-neuron columns of transposed (Conv1D) weights, the q/k/v parts of a fused
// QKV weight, one block per tensor, and elementwise Adam (1x1 tiles).
struct Segment {
  int64_t offset = 0, rows = 0, cols = 0, row_stride = 0, tile_rows = 1, tile_cols = 1;
  int64_t tiles_per_row() const { return cols / tile_cols; }
  int64_t num_blocks() const { return (rows / tile_rows) * (cols / tile_cols); }
  int64_t block_numel() const { return tile_rows * tile_cols; }
  bool operator==(const Segment& o) const;
};
using BlockSpec = std::vector<Segment>;

constexpr int64_t kSegmentInts = 6;
int64_t num_blocks(const BlockSpec& spec);
// Throws (c10::Error) unless the segments tile disjoint regions covering all `numel` elements.
void check_block_spec(const BlockSpec& spec, int64_t numel, const std::string& what);
// The flat int list the ops take: per tensor [n_segments, 6 ints per segment...].
std::vector<int64_t> encode_block_specs(const std::vector<BlockSpec>& specs);
std::vector<BlockSpec> decode_block_specs(at::IntArrayRef flat, int64_t n_tensors);

// The blocks one shard of a tensor holds (FSDP2 keeps a run of whole rows of the full tensor on
// each rank): elements [lo, hi) of the flattened tensor, as segments in the shard's own flat
// coordinates. Local tile (i, j) of `seg` is block block0 + i * band_blocks + j of the full
// tensor's spec. A block cut by the shard boundary appears as a smaller tile whose sum of
// squares is a partial of its block's; its mean is still taken over the whole block.
struct ShardPiece {
  Segment seg;
  int64_t block0 = 0, band_blocks = 0;
  int64_t block_of(int64_t i, int64_t j) const { return block0 + i * band_blocks + j; }
};
std::vector<ShardPiece> shard_pieces(const BlockSpec& spec, int64_t lo, int64_t hi);

// How many kv groups a torchtitan interleaved fused QKV weight (RoleInfo::kv_interleaved) of
// `shape` splits into (each a small q|k|v with one kv head), or 0 when it is none or does not.
int64_t kv_groups(const RoleInfo& info, at::IntArrayRef shape);
// `group`, the blocks of one kv group's rows, repeated down the g groups of a (rows, cols) tensor.
BlockSpec per_kv_group(const BlockSpec& group, at::IntArrayRef shape, int64_t g);

// The paper's blocks (Adam-mini §3): per head for Q/K, per output neuron for V/O/MLP/linear/conv,
// per token for embedding/output, one per norm or scalar tensor, elementwise for biases.
// Falls back to per-neuron blocks (and says so in `note`) when head sizes do not divide.
BlockSpec adam_mini_blocks(const RoleInfo& info, at::IntArrayRef shape, std::string* note = nullptr);

// The partition of PyPI adam-mini 1.1.1, reproduced exactly: lower-cased name substrings,
// per-head blocks of dim*dim/n_heads contiguous elements, one block for unmatched tensors.
struct ReferencePartition {
  BlockSpec spec;
  Role role;
  bool weight_decay;  // false for names containing "norm", "ln" or "bias"
};
ReferencePartition adam_mini_reference_blocks(const std::string& name, at::IntArrayRef shape,
                                              int64_t dim, int64_t n_heads);

}  // namespace memopt
