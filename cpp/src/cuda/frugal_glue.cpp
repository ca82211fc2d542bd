// memopt::frugal_ for the CUDA dispatch key. Validates like the CPU op (check_frugal_inputs)
// before anything is written, then per call:
//   modes 0-1 (AdamW on a whole tensor): launch_adamw, whose math is cpu::adamw_span's;
//   modes 2-5 (state-free block, columns, rows, randk): multi-tensor frugal_split launches;
//   modes 6-7 (projections): per tensor, frugal_project_glue.cpp (chunked GEMMs around the fused
//   kernels of cuda/frugal.cu).
// With found_inf the step counters live on the device (cuda/step_scalars.cu advances them,
// per-tensor learning rates, FRUGAL's decay) and every kernel returns at once on a set flag.
// frugal_run is also the finish of the row-sharded op (frugal_shard_glue.cpp).
#include "frugal_glue.h"

#include "adamw_coded.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace memopt::cuda {
namespace {

using SP = FrugalSplitParams;
constexpr int64_t kAdamChunk = 65536;

bool is_index_mode(FrugalMode m) { return m >= FrugalMode::Columns && m <= FrugalMode::RandK; }

// What the CPU check leaves to the device: index subspaces on the parameters' CUDA device
// (it only asks that they are off the CPU) and below 2^31 entries (the kernels' slot type).
void check_cuda_inputs(TensorList params, TensorList subspaces, at::IntArrayRef modes) {
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.type() == kKernelDevice, "frugal_update_: expected CUDA tensors, got ",
                    device);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!is_index_mode(static_cast<FrugalMode>(modes[i]))) continue;
    TORCH_CHECK_VALUE(subspaces[i].device() == device, "frugal_update_: tensor ", i,
                      ": subspace indices must be on ", device, ", got ", subspaces[i].device());
    TORCH_CHECK_VALUE(subspaces[i].numel() < std::numeric_limits<int32_t>::max(),
                      "frugal_update_: tensor ", i, ": too many subspace indices");
  }
}

// `members` grouped by (value dtype, state dtype, int8 group), in order: one launch sequence
// per group, since a kernel instance has one storage type per list. A state-free tensor has no
// state and joins the first group of its value dtype and int8 group.
struct Group {
  at::ScalarType value, state;
  int64_t int8_group;
  std::vector<int64_t> members;
};
std::vector<Group> dtype_groups(const FrugalCall& c, const std::vector<int64_t>& members) {
  std::vector<Group> groups;
  auto add = [&](int64_t i, bool stateless) {
    const auto vt = value_dtype(c.params[i], c.g[i]);
    const auto st = stateless ? vt : c.exp_avgs[i].scalar_type();
    const int64_t group = c.int8_group(i);
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.value == vt && g.int8_group == group && (stateless || g.state == st);
    });
    if (it == groups.end()) it = groups.insert(groups.end(), Group{vt, st, group, {}});
    it->members.push_back(i);
  };
  for (int64_t i : members)
    if (static_cast<FrugalMode>(c.modes[i]) != FrugalMode::FreeBlock) add(i, false);
  for (int64_t i : members)
    if (static_cast<FrugalMode>(c.modes[i]) == FrugalMode::FreeBlock) add(i, true);
  return groups;
}

// Calls launch(indices, int8 group) per dtype group, with prm's dtypes and Adam constants set.
template <typename Params, typename Launch>
void per_dtype_group(const FrugalCall& c, const std::vector<int64_t>& members, Params& prm,
                     Launch launch) {
  prm.beta1 = c.beta1, prm.beta2 = c.beta2, prm.eps = c.eps;
  for (const auto& grp : dtype_groups(c, members)) {
    prm.param_dtype = dtype_of(grp.value);
    prm.state_dtype = dtype_of(grp.state);
    prm.int8_group = static_cast<int32_t>(grp.int8_group);
    launch(grp.members, grp.int8_group);
  }
}

void launch_whole(const FrugalCall& c, const std::vector<int64_t>& members) {
  AdamWParams prm{};
  prm.stochastic = c.stochastic;
  prm.device = c.device;
  per_dtype_group(c, members, prm, [&](const std::vector<int64_t>& idx, int64_t group) {
    launch_chunked(
        "frugal_update_", prm, static_cast<int64_t>(idx.size()),
        group > 0 ? int8_chunk(group) : kAdamChunk,
        [&](int64_t k) { return c.params[idx[k]].numel(); },
        [&](int slot, int64_t k) {
          const int64_t i = idx[k];
          prm.p[slot] = c.params[i].data_ptr();
          prm.scales[slot] = c.scales(i);
          prm.g[slot] = c.g[i].data_ptr();
          prm.m[slot] = c.exp_avgs[i].data_ptr();
          prm.v[slot] = c.exp_avg_sqs[i].data_ptr();
          prm.scalars[slot] = {c.s[i].decay, c.s[i].step_size, c.s[i].bc2_sqrt, c.round_key[i]};
          prm.tensor[slot] = static_cast<int32_t>(i);
          prm.round_first[slot] = 0;
        },
        [&](const AdamWParams& launch) { return launch_adamw(launch, c.stream); });
  });
}

// Tiles of tensor i (see FrugalSplitParams); 2-D tiles get balanced widths <= kThreads.
struct Tiling {
  int64_t tiles = 0;
  int32_t rows = 0, cols = 0, col_tiles = 0;
};
Tiling tiling(const Tensor& p, FrugalMode mode, int64_t int8_group) {
  Tiling t;
  if (p.numel() == 0) return t;
  if (int8_group > 0) {  // FrugalSplitParams::int8_tile: whole groups of one row
    const int64_t width = SP::int8_tile(int8_group, p.size(1));
    t.cols = static_cast<int32_t>(width);
    t.tiles = p.size(0) * ((p.size(1) + width - 1) / width);
    return t;
  }
  if (mode == FrugalMode::FreeBlock || mode == FrugalMode::RandK) {
    t.tiles = (p.numel() + SP::kTile - 1) / SP::kTile;
    return t;
  }
  const int64_t rows = p.size(0), cols = p.size(1);
  const int64_t fewest = (cols + SP::kThreads - 1) / SP::kThreads;
  const int64_t width = (cols + fewest - 1) / fewest;  // balanced
  const int64_t ct = (cols + width - 1) / width;       // so that no column tile is empty
  t.col_tiles = static_cast<int32_t>(ct);
  t.cols = static_cast<int32_t>(width);
  t.rows = static_cast<int32_t>(std::clamp<int64_t>(SP::kTile / t.cols, 1, SP::kMapSize));
  t.tiles = (rows + t.rows - 1) / t.rows * ct;
  return t;
}

void launch_split(const FrugalCall& c, const std::vector<int64_t>& members) {
  // The rule none without weight decay leaves a state-free block as it is (the CPU skips it).
  auto untouched = [&](int64_t i) {
    const bool fp64 = c.params[i].scalar_type() == at::kDouble;  // (int8 codes: float)
    return c.rule == 0 && (fp64 ? c.decay == 1.0 : static_cast<float>(c.decay) == 1.0f);
  };
  std::vector<Tiling> tiles(c.params.size());
  for (int64_t i : members)
    tiles[i] = tiling(c.params[i], static_cast<FrugalMode>(c.modes[i]), c.int8_group(i));
  SP prm{};
  prm.rule = static_cast<int32_t>(c.rule);
  prm.decay = c.decay, prm.lr_free = c.lr_free;
  prm.stochastic = c.stochastic;
  prm.device = c.device;
  per_dtype_group(c, members, prm, [&](const std::vector<int64_t>& idx, int64_t) {
    launch_chunked(
        "frugal_update_", prm, static_cast<int64_t>(idx.size()), /*chunk_size=*/1,
        [&](int64_t k) {
          const int64_t i = idx[k];
          const bool stateless = static_cast<FrugalMode>(c.modes[i]) == FrugalMode::FreeBlock;
          return stateless && untouched(i) ? 0 : tiles[i].tiles;
        },
        [&](int slot, int64_t k) {
          const int64_t i = idx[k];
          const auto mode = static_cast<FrugalMode>(c.modes[i]);
          const bool stateful = mode != FrugalMode::FreeBlock;
          prm.p[slot] = c.params[i].data_ptr();
          prm.scales[slot] = c.scales(i);
          prm.g[slot] = c.g[i].data_ptr();
          prm.m[slot] = stateful ? c.exp_avgs[i].data_ptr() : nullptr;
          prm.v[slot] = stateful ? c.exp_avg_sqs[i].data_ptr() : nullptr;
          prm.idx[slot] = stateful ? c.subspaces[i].data_ptr<int32_t>() : nullptr;
          prm.numel[slot] = c.params[i].numel();
          prm.cols[slot] = c.params[i].dim() == 2 ? c.params[i].size(1) : 0;
          prm.k[slot] = stateful ? c.subspaces[i].numel() : 0;
          prm.mode[slot] = static_cast<int32_t>(mode);
          prm.tile_rows[slot] = tiles[i].rows;
          prm.tile_cols[slot] = tiles[i].cols;
          prm.col_tiles[slot] = tiles[i].col_tiles;
          prm.step_size[slot] = stateful ? c.s[i].step_size : 0.0;
          prm.bc2_sqrt[slot] = stateful ? c.s[i].bc2_sqrt : 1.0;
          prm.round_key[slot] = c.round_key[i];
          prm.tensor[slot] = static_cast<int32_t>(i);
        },
        [&](const SP& launch) { return launch_frugal_split(launch, c.stream); });
  });
}

void frugal_kernels(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, TensorList subspaces,
                    at::IntArrayRef modes, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double proj_lr_scale, double free_lr_scale, int64_t rule,
                    const Tensor* left_stats, const Rounding& rounding,
                    TensorList weight_scales, TensorList state_scales,
                    const std::optional<Tensor>& found_inf) {
  if (params.empty()) return;
  check_cuda_inputs(params, subspaces, modes);
  const c10::DeviceGuard guard(params[0].device());

  // Allocations first (contiguous gradients, projection scratch shared by the projected
  // tensors, one pair per compute dtype), so that running out of memory writes nothing.
  const size_t n = params.size();
  FrugalCall c{params, exp_avgs, exp_avg_sqs, subspaces, modes, std::vector<Tensor>(n),
               std::vector<AdamScalars>(n), beta1, beta2, eps, 1.0 - lr * weight_decay,
               lr * proj_lr_scale * free_lr_scale, rule, current_stream(params[0].device()),
               std::vector<uint64_t>(n, 0), rounding.stochastic(), weight_scales};
  std::vector<int64_t> whole, split, projected;
  std::vector<FrugalProjShape> shapes(n);
  std::vector<Tensor> pcs(n);  // each P in its compute type, as on the CPU (rank-sized)
  int64_t need[2][2] = {{-1, -1}, {-1, -1}};  // [float, double][low, tile] elements
  for (size_t i = 0; i < n; ++i) {
    c.g[i] = contiguous_grad(grads[i]);
    const auto mode = static_cast<FrugalMode>(modes[i]);
    // (8-bit moments, of whole-tensor modes only: AdamW's 8-bit kernel below)
    if (coded_moments(state_scales, static_cast<int64_t>(i))) continue;
    auto& list = mode <= FrugalMode::ActiveBlock ? whole
                 : mode <= FrugalMode::RandK     ? split
                                                 : projected;
    list.push_back(static_cast<int64_t>(i));
    if (mode < FrugalMode::ProjRight) continue;
    shapes[i] = frugal_proj_shape(c, static_cast<int64_t>(i));
    const Tensor& sub = subspaces[i];
    pcs[i] = sub.scalar_type() == shapes[i].cdt ? sub : sub.to(shapes[i].cdt);
    auto& nd = need[shapes[i].cdt == at::kDouble];
    nd[0] = std::max(nd[0], shapes[i].low_elems());
    nd[1] = std::max(nd[1], shapes[i].tile_elems());
  }
  Tensor scratch[2][2];
  for (int d = 0; d < 2; ++d)
    for (int b = 0; b < 2; ++b)
      if (need[d][b] >= 0)
        scratch[d][b] = at::empty({need[d][b]},
                                  params[0].options().dtype(d ? at::kDouble : at::kFloat));

  // From here on steps advance and tensors are written. With found_inf the counters advance on
  // the device (cuda/step_scalars.cu), state-free tensors' placeholders left alone.
  std::optional<StepPlan> on_device;
  if (found_inf.has_value()) {
    std::vector<double> lrs(n);
    for (size_t i = 0; i < n; ++i)
      lrs[i] = static_cast<FrugalMode>(modes[i]) == FrugalMode::Adam ? lr : lr * proj_lr_scale;
    on_device = plan_steps(steps, lrs, beta1, beta2, weight_decay, AdamWRule::kTorch, rounding,
                           found_inf, c.stream, c.decay);
    c.device = on_device->device;
  }
  for (size_t i = 0; i < n && !on_device; ++i) {
    const auto mode = static_cast<FrugalMode>(modes[i]);
    if (mode == FrugalMode::FreeBlock) {  // no step count (step 0): the counter changes per step
      if (c.stochastic) c.round_key[i] = rounding.key(i, 0.0);
      continue;
    }
    // AdamW at lr for non-projectable tensors, lr * proj_lr_scale otherwise; decay at lr.
    const double lr_adam = mode == FrugalMode::Adam ? lr : lr * proj_lr_scale;
    c.s[i] = AdamScalars::make(lr_adam, beta1, beta2, eps, weight_decay, advance_step(steps[i]));
    c.s[i].decay = c.decay;
    if (c.stochastic) c.round_key[i] = rounding.key(i, c.s[i].step);
  }
  if (!state_scales.empty()) {
    AdamWParams base{};
    base.beta1 = beta1, base.beta2 = beta2, base.eps = eps;
    base.stochastic = c.stochastic;  // (torch's rule: decay before the update)
    adamw_coded_kernels(params, c.g, exp_avgs, exp_avg_sqs,
                        on_device ? *on_device : StepPlan::on_host(c.s, rounding), base,
                        state_scales, c.weight_scales, c.stream);
  }
  if (!whole.empty()) launch_whole(c, whole);
  if (!split.empty()) launch_split(c, split);
  int64_t stats_at = 0;  // left_stats: every left tensor's summed P^T G, in order
  for (int64_t i : projected) {
    const bool fp64 = shapes[i].cdt == at::kDouble;
    Tensor summed;
    if (left_stats && !shapes[i].right) {
      const Tensor& m = exp_avgs[i];
      summed = left_stats->narrow(0, stats_at, m.numel()).view(m.sizes());
      stats_at += m.numel();
    }
    frugal_projected_update(c, i, shapes[i], pcs[i], scratch[fp64][0], scratch[fp64][1],
                            summed.defined() ? &summed : nullptr);
  }
}

}  // namespace

// The kernels on the tensors memopt/layout.h presents (frugal_order_free: elementwise modes in
// memory order, the others staged), then the staged ones copied back.
void frugal_run(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList steps, TensorList subspaces, at::IntArrayRef modes, double lr,
                double beta1, double beta2, double eps, double weight_decay, double proj_lr_scale,
                double free_lr_scale, int64_t rule, const Tensor* left_stats,
                const Rounding& rounding, TensorList weight_scales, TensorList state_scales,
                const std::optional<Tensor>& found_inf) {
  ParamLayouts layouts(params, {exp_avgs, exp_avg_sqs}, frugal_order_free(modes));
  frugal_kernels(layouts.params(), layouts.follow(grads), layouts.written(0), layouts.written(1),
                 steps, subspaces, modes, lr, beta1, beta2, eps, weight_decay, proj_lr_scale,
                 free_lr_scale, rule, left_stats, rounding, weight_scales, state_scales,
                 found_inf);
  layouts.write_back();
}

namespace {

void frugal_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList steps, TensorList subspaces, at::IntArrayRef modes, const Tensor& lr_t,
                 double beta1, double beta2, double eps, double weight_decay, double proj_lr_scale,
                 double free_lr_scale, int64_t rule, at::IntArrayRef rounding,
                 OptionalTensors weight_scales, OptionalTensors state_scales,
                 const std::optional<Tensor>& found_inf) {
  check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                      proj_lr_scale, free_lr_scale, rule, true, listed(weight_scales),
                      listed(state_scales));
  check_found_inf("frugal_update_", found_inf, params, steps);
  check_coded_cuda("frugal_update_", params, listed(weight_scales), listed(state_scales));
  const Rounding round(rounding, params.size(), "frugal_update_");
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  frugal_run(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes, lr, beta1, beta2, eps,
             weight_decay, proj_lr_scale, free_lr_scale, rule, nullptr, round,
             listed(weight_scales), listed(state_scales), found_inf);
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("frugal_", &memopt::cuda::frugal_cuda); }
