// What every plan shares: state dtypes and the check of a checkpoint's state against a layout.
#include "memopt/plan.h"

#include <functional>
#include <numeric>

#include "memopt/partition.h"
#include "memopt/state_codes.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace memopt {

bool state_on_host(StateDType dtype, at::IntArrayRef shape) {
  return dtype == StateDType::Int64 && shape.empty();
}

at::ScalarType resolve_dtype(StateDType dtype, at::ScalarType param) {
  switch (dtype) {
    case StateDType::Param: return param;
    case StateDType::Float32: return at::kFloat;
    case StateDType::Int64: return at::kLong;
    case StateDType::Int32: return at::kInt;
    case StateDType::Scalar: return param == at::kDouble ? at::kDouble : at::kFloat;
    case StateDType::BFloat16: return at::kBFloat16;
    case StateDType::Int8: return at::kChar;
    case StateDType::UInt8: return at::kByte;
  }
  TORCH_CHECK_VALUE(false, "unknown StateDType ", static_cast<int64_t>(dtype));
}

void check_state_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits == 32 || bits == 16 || bits == 8,
                    "state_bits must be 32, 16 or 8, got ", bits);
}

std::vector<StateSpec> moment_specs(const std::string& key, const std::vector<int64_t>& shape,
                                    int64_t bits, bool square, const std::vector<int64_t>& along) {
  if (bits == 32 || !low_bit_state(shape)) return {{key, shape, StateDType::Param, true, along, 0.0}};
  if (bits == 16) return {{key, shape, StateDType::BFloat16, true, along, 0.0}};
  // The codes follow the parameter's memory layout: block k is elements [256 k, 256 k + 256) in
  // memory order. Where rows (dim 0) are whole blocks, the scales are [rows, blocks per row], so
  // that a shard of rows (FSDP2's Shard(0)) holds its rows' codes and scales and nothing else:
  // sharded along dim 0 like the parameter. Otherwise a shard boundary may cut a block, and the
  // scales are one flat vector that no shard can split (memopt_core/state_bits.py refuses it).
  const int64_t numel =
      std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  const int64_t row = numel / shape[0];
  const bool rows_of_blocks = row % kStateBlock == 0;
  const bool row_shards = std::find(along.begin(), along.end(), 0) != along.end();
  StateSpec scales{key + "_scales", {state_blocks(numel)}, StateDType::Float32, false, {}, 0.0};
  if (rows_of_blocks) {
    scales.shape = {shape[0], row / kStateBlock};
    if (row_shards) scales.sharded_along = {0};
  }
  return {{key, shape, square ? StateDType::UInt8 : StateDType::Int8, true, along, 0.0}, scales};
}

std::vector<int64_t> per_row_blocks(const std::vector<int64_t>& shape) {
  const int64_t numel =
      std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  const int64_t rows = shape.size() >= 2 ? shape[0] : 1;
  const int64_t cols = numel / std::max<int64_t>(rows, 1);
  return encode_block_specs({{Segment{0, rows, cols, cols, 1, cols}}});
}

StateLayout per_row_moments(const std::vector<int64_t>& shape, int64_t bits,
                            const std::vector<int64_t>& along) {
  StateLayout out = moment_specs("exp_avg", shape, bits, false, along);
  const StateDType m = out.front().dtype;
  out.insert(out.begin() + 1, StateSpec{"exp_avg_sq", {shape.size() >= 2 ? shape[0] : 1},
                                        m == StateDType::Int8 ? StateDType::Param : m, false,
                                        {}, 0.0});
  return out;
}

bool low_bit_state(const std::vector<int64_t>& shape) {
  const int64_t numel =
      std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  return shape.size() >= 2 && numel >= kStateMinNumel;
}

void OptimizerPlan::check_saved_state(const StateLayout& layout,
                                      const std::vector<std::pair<std::string, at::Tensor>>& saved,
                                      at::ScalarType param, const std::string& where) {
  const auto find = [&](const std::string& key) -> const at::Tensor* {
    auto it = std::find_if(saved.begin(), saved.end(), [&](const auto& kv) { return kv.first == key; });
    return it == saved.end() ? nullptr : &it->second;
  };
  const at::Tensor* step = find("step");
  TORCH_CHECK_VALUE(step && step->defined() && step->numel() == 1 &&
                        step->scalar_type() == at::kFloat,
                    where, ": step must be a one-element float32 tensor");
  for (const auto& [key, value] : saved) {
    const bool known = key == "step" || std::any_of(layout.begin(), layout.end(),
                                                     [&](const StateSpec& s) { return s.key == key; });
    TORCH_CHECK_VALUE(known, where, ": has state '", key, "', which this optimizer does not keep",
                      layout.empty() ? " (it keeps none for this tensor)" : "");
  }
  for (const auto& spec : layout) {
    const at::Tensor* t = find(spec.key);
    TORCH_CHECK_VALUE(t && t->defined(), where, " lacks state '", spec.key, "'");
    const bool flat_scales = spec.key.size() > 7 &&
                             spec.key.compare(spec.key.size() - 7, 7, "_scales") == 0 &&
                             t->dim() == 1 && spec.shape.size() == 2 &&
                             t->numel() == spec.shape[0] * spec.shape[1];
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(spec.shape) || flat_scales, where,
                      ": state '", spec.key,
                      "' has shape ", t->sizes(), " but this optimizer keeps ",
                      at::IntArrayRef(spec.shape), " for it");
    const auto want = resolve_dtype(spec.dtype, param);
    const bool ok = t->scalar_type() == want ||
                    (spec.dtype == StateDType::Param && t->scalar_type() == at::kFloat);
    TORCH_CHECK_TYPE(ok, where, ": state '", spec.key, "' has dtype ", t->scalar_type(),
                     " but this optimizer keeps ", want, spec.dtype == StateDType::Param ? " (or float32)" : "");
  }
}

}  // namespace memopt
