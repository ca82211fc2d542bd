// memopt::adam_mini_ for the CUDA dispatch key (used by AdamMini and SlimAdam): validates like
// the CPU op before anything is written, advances the step counters (launch.h StepPlan), puts
// every segment on a kernel path (cuda/adam_mini.cu explains them) and launches them in
// multi-segment batches on the current stream, checking every launch.
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "launch.h"
#include "memopt/adam_mini.h"
#include "memopt/arena.h"

namespace memopt::cuda {
namespace {

using AM = AdamMiniParams;
constexpr int64_t kElementwiseChunk = 65536;  // adamw.cu's chunk (a multiple of 4 x its CTA)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int32_t narrow(int64_t x) {
  TORCH_CHECK(x >= 0 && x <= INT32_MAX, "adam_mini_update_: segment too large for the CUDA "
              "kernel's 32-bit counts (", x, ")");
  return static_cast<int32_t>(x);
}

// True if some row of `a` shares an element with some row of `b`. Used only for segments whose
// extents overlap, which check_block_spec allows when they are strided (interleaved columns).
bool segments_meet(const Segment& a, const Segment& b) {
  auto last = [](const Segment& x) { return x.offset + (x.rows - 1) * x.row_stride + x.cols - 1; };
  if (last(a) < b.offset || last(b) < a.offset) return false;  // extents apart: the usual case
  const int64_t d = b.offset - a.offset;
  if (a.row_stride == b.row_stride) {  // rows i of a and j of b meet iff k = i - j has
    const int64_t s = a.row_stride;    // d - a.cols < k*s < d + b.cols
    auto floor_div = [](int64_t x, int64_t y) { return x / y - (x % y != 0 && (x < 0) != (y < 0)); };
    const int64_t k_lo = floor_div(d - a.cols, s) + 1, k_hi = -floor_div(-(d + b.cols), s) - 1;
    return std::max(k_lo, -(b.rows - 1)) <= std::min(k_hi, a.rows - 1);
  }
  for (int64_t i = 0; i < a.rows; ++i) {  // row i of a against the rows of b it could meet
    const int64_t x = a.offset + i * a.row_stride - b.offset;  // row i is [x, x + a.cols) in b
    const int64_t j_hi = x + a.cols - 1 < 0 ? -1 : (x + a.cols - 1) / b.row_stride;
    const int64_t j_lo = x - b.cols + 1 <= 0 ? 0 : ceil_div(x - b.cols + 1, b.row_stride);
    if (std::max<int64_t>(j_lo, 0) <= std::min(j_hi, b.rows - 1)) return true;
  }
  return false;
}

// The CUDA path updates all segments of a tensor at once, so shared elements would race (the
// CPU updates them twice, one segment after the other). check_block_spec, which the CPU runs,
// accepts any strided segments whose element counts add up; here they must also be disjoint.
void check_disjoint(const BlockSpec& spec, int64_t i) {
  for (size_t a = 0; a < spec.size(); ++a)
    for (size_t b = a + 1; b < spec.size(); ++b)
      TORCH_CHECK_VALUE(!segments_meet(spec[a], spec[b]), "adam_mini_update_: tensor ", i,
                        ": block spec segments ", a, " and ", b, " share elements");
}

// Batches of segments per path for one (param, state) dtype pair; a full batch is moved to
// `ready`, in order. Two-pass batches record the largest scratch any of them needs.
struct Planner {
  AM pending[AM::kNumPaths];
  std::vector<AM>& ready;
  int64_t& max_partials;
  int64_t& max_tiles;

  Planner(const AM& proto, std::vector<AM>& out, int64_t& partials, int64_t& tiles)
      : ready(out), max_partials(partials), max_tiles(tiles) {
    for (int k = 0; k < AM::kNumPaths; ++k) pending[k] = proto, pending[k].path = k;
  }
  void add(int path, AdamMiniSeg seg, int64_t units, int64_t tiles, int64_t partials,
           int64_t int8_units = 0) {
    AM& b = pending[path];
    // Grid sizes stay under 2^31 (the fused warp path packs 8 units per CTA).
    if (b.n_segs == AM::kMaxSegs || b.n_units + units > INT32_MAX ||
        b.n_int8_units + int8_units > INT32_MAX)
      flush(path);
    TORCH_CHECK(units <= INT32_MAX && int8_units <= INT32_MAX, "adam_mini_update_: segment of ",
                std::max(units, int8_units), " CUDA blocks");
    seg.unit_begin = b.n_units, seg.tile_begin = b.n_tiles, seg.partials = b.n_partials;
    seg.int8_unit_begin = b.n_int8_units;
    b.seg[b.n_segs++] = seg;
    b.n_units += units, b.n_tiles += tiles, b.n_partials += partials;
    b.n_int8_units += int8_units;
  }
  void flush(int path) {
    AM& b = pending[path];
    if (b.n_segs == 0) return;
    if (path == AM::kTwoPass)
      max_partials = std::max(max_partials, b.n_partials), max_tiles = std::max(max_tiles, b.n_tiles);
    ready.push_back(b);
    b.n_segs = 0, b.n_units = b.n_tiles = b.n_partials = b.n_int8_units = 0;
  }
  void flush_all() {
    for (int k = 0; k < AM::kNumPaths; ++k) flush(k);
  }

  // A segment that is not elementwise: fused if its tiles are short contiguous runs, else
  // two-pass as runs or rectangles (see adam_mini_two_pass.cu for the geometry). Int8 weights
  // always take the two-pass path, whose update runs in units of whole groups.
  void add_blocks(const Segment& s, AdamMiniSeg seg, Dtype param) {
    const int64_t tiles = s.num_blocks(), len = s.block_numel();
    const bool runs = s.tile_cols == s.cols && (s.tile_rows == 1 || s.row_stride == s.cols);
    seg.offset = s.offset, seg.row_stride = s.row_stride, seg.cols = s.cols;
    seg.tile_rows = s.tile_rows, seg.tile_cols = s.tile_cols;
    int64_t int8_units = 0;  // as adam_mini_two_pass.cu's int8_update_kernel counts them
    const bool by_units = seg.int8_group > 0 || seg.m_scales;
    if (by_units) {
      const bool one_line = s.row_stride == s.cols;
      const int64_t line = one_line ? s.rows * s.cols : s.cols;
      int8_units = (one_line ? 1 : s.rows) * ceil_div(line, update_unit_chunk(seg.int8_group));
    }
    if (runs) {
      for (int path = AM::kWarp; path <= AM::kCta1024 && !by_units; ++path)
        if (len <= AM::fused_capacity(path, param)) return add(path, seg, tiles, tiles, 0);
      seg.kind = AM::kRuns;
      seg.pieces = narrow(ceil_div(len, AM::kRunPiece));
      return add(AM::kTwoPass, seg, tiles * seg.pieces, tiles, tiles * seg.pieces, int8_units);
    }
    const int64_t tc = s.tile_cols, tpr = s.tiles_per_row();
    seg.kind = AM::kRects;
    seg.parts_per_tile = narrow(ceil_div(tc, AM::kRectCols));
    seg.parts_per_rect = narrow(tc > AM::kRectCols ? 1 : std::min(AM::kRectCols / tc, tpr));
    seg.rects_across = narrow(ceil_div(tpr * seg.parts_per_tile, seg.parts_per_rect));
    const int64_t width = tc > AM::kRectCols ? AM::kRectCols : seg.parts_per_rect * tc;
    seg.rect_rows = narrow(std::clamp<int64_t>(AM::kRectElems / width, 1, s.tile_rows));
    seg.rects_down = narrow(ceil_div(s.tile_rows, seg.rect_rows));
    seg.pieces = narrow(int64_t{seg.rects_down} * seg.parts_per_tile);
    const int64_t bands = s.rows / s.tile_rows;
    add(AM::kTwoPass, seg, bands * seg.rects_down * seg.rects_across, tiles, tiles * seg.pieces,
        int8_units);
  }
};

struct Elementwise {
  void* p;
  float* scales;  // int8: the scales of p's first group
  const void* g;
  void* m;
  void* v;
  int64_t n;
  int64_t tensor;  // its index in the call (StepPlan)
  int64_t first;   // element index of p in its parameter
};

void* at_element(const Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * static_cast<int64_t>(t.element_size());
}

bool coded(TensorList state_scales, size_t count, int64_t i) {
  return coded_state(state_scales, count, 0, static_cast<size_t>(i));
}

// What 8-bit m takes on CUDA (the two-pass update in units of whole code blocks), checked
// before anything is written: an int8 weight's units whole code blocks too, no elementwise
// segment (its per-element v would need a factor per element), and every
// block row whole code blocks.
void check_coded_m_cuda(TensorList params, TensorList grads, const std::vector<BlockSpec>& specs,
                        TensorList weight_scales, TensorList state_scales) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (!coded(state_scales, params.size(), static_cast<int64_t>(i))) continue;
    const std::string what = "adam_mini_update_: 8-bit m of tensor " + std::to_string(i);
    const Tensor& ws = weight_scale(weight_scales, i);
    const int64_t group = int8_scales(ws) ? int8_group(params[i], ws) : 0;
    const int64_t unit = group ? update_unit_chunk(static_cast<int32_t>(group)) : 0;
    TORCH_CHECK_NOT_IMPLEMENTED(unit % kStateBlock == 0, what, ": int8 weight groups of ",
                                group, " elements make CUDA units of ", unit,
                                ", which cut code blocks of ", kStateBlock, "; it runs on the CPU");
    for (const Segment& seg : specs[i]) {
      const bool one_line = seg.row_stride == seg.cols;
      const int64_t end = seg.offset + seg.rows * seg.row_stride;
      const bool whole = seg.offset % kStateBlock == 0 &&
          (one_line ? (end % kStateBlock == 0 || end == params[i].numel())
                    : seg.row_stride % kStateBlock == 0 && seg.cols % kStateBlock == 0);
      TORCH_CHECK_NOT_IMPLEMENTED(!(seg.block_numel() == 1 && one_line) && whole, what,
                                  ": on CUDA every block row must be whole code blocks of ",
                                  kStateBlock, " elements and no segment elementwise; it runs "
                                  "on the CPU");
    }
  }
}

void adam_mini_kernels(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                    const Tensor& lr_t, double beta1, double beta2, double eps,
                    double weight_decay, const Rounding& rounding, TensorList weight_scales,
                    TensorList state_scales, const std::optional<Tensor>& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  check_adam_mini_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs, weight_scales,
                         state_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  check_same_cuda_device("adam_mini_update_", {params, grads, exp_avgs, exp_avg_sqs});
  for (size_t i = 0; i < specs.size(); ++i) check_disjoint(specs[i], static_cast<int64_t>(i));
  const c10::DeviceGuard guard(params[0].device());
  const Stream stream = current_stream(params[0].device());

  const std::vector<Tensor> g = contiguous_grads(grads);
  const StepPlan s = plan_steps(steps, lr, beta1, beta2, weight_decay, AdamWRule::kTorch,
                                rounding, found_inf, stream);

  // Plan every launch first, so the scratch is reserved once, before any kernel runs.
  std::vector<AM> launches;
  std::vector<std::pair<std::vector<Elementwise>, const TensorBatch*>> elementwise;
  int64_t max_partials = 0, max_tiles = 0;
  // Float m batches by m's dtype; 8-bit m batches (by v's dtype) after them.
  const size_t count = params.size();
  std::vector<TensorBatch> batches = by_dtypes(params, grads, exp_avgs, weight_scales,
                                               [&](int64_t i) { return !coded(state_scales, count, i); });
  const size_t float_batches = batches.size();
  for (TensorBatch& b : by_dtypes(params, grads, exp_avg_sqs, weight_scales,
                                  [&](int64_t i) { return coded(state_scales, count, i); }))
    batches.push_back(std::move(b));
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const TensorBatch& batch = batches[bi];
    const bool m_codes = bi >= float_batches;
    const auto& idx = batch.idx;
    AM proto{};
    proto.param_dtype = batch.value_dtype, proto.state_dtype = batch.state_dtype;
    proto.beta1 = beta1, proto.beta2 = beta2, proto.eps = eps;
    proto.stochastic = rounding.stochastic();
    proto.device = s.device;
    Planner plan(proto, launches, max_partials, max_tiles);
    std::vector<Elementwise> elems;
    for (const int64_t i : idx) {
      float* scales = TensorBatch::scales(weight_scales, i);
      const int64_t group = batch.int8_group;
      int64_t block = 0;  // index in exp_avg_sqs[i] of the segment's first block
      for (const Segment& seg : specs[i]) {
        if (seg.block_numel() == 1 && seg.row_stride == seg.cols) {  // plain Adam, as the CPU
          elems.push_back({at_element(params[i], seg.offset),
                           scales ? scales + seg.offset / group : nullptr,
                           at_element(g[i], seg.offset),
                           at_element(exp_avgs[i], seg.offset), at_element(exp_avg_sqs[i], block),
                           seg.rows * seg.cols, i, seg.offset});
        } else {
          AdamMiniSeg a{};
          a.p = params[i].data_ptr(), a.g = g[i].data_ptr(), a.m = exp_avgs[i].data_ptr();
          a.v = at_element(exp_avg_sqs[i], block);
          a.s = s.of(i), a.tensor = static_cast<int32_t>(i);
          a.int8_group = static_cast<int32_t>(group), a.scales = scales;
          a.m_scales = m_codes ? state_scale(state_scales, count, 0, i).data_ptr<float>() : nullptr;
          plan.add_blocks(seg, a, proto.param_dtype);
        }
        block += seg.num_blocks();
      }
    }
    plan.flush_all();
    elementwise.push_back({std::move(elems), &batch});
  }

  // Scratch: one stream's worth, reused by every two-pass batch in stream order. The device
  // Workspace is shared by the calls on this device, which is safe while they run on one
  // stream (the caching allocator's usual assumption); a second stream would need its own.
  Workspace::Lease lease(Workspace::of(params[0].device()));
  double *partials = nullptr, *factors = nullptr;
  if (max_tiles > 0) {
    lease.reserve(Workspace::Lease::bytes_for<double>(max_partials) +
                  Workspace::Lease::bytes_for<double>(max_tiles));
    partials = lease.take<double>(max_partials);
    factors = lease.take<double>(max_tiles);
  }
  for (AM& launch : launches) {
    launch.partials = partials, launch.factors = factors;
    check_launch(launch_adam_mini(launch, stream), "adam_mini_update_");
  }

  // Elementwise segments: adamw.cu's kernel, on pointers to the segment.
  for (auto& [elems, batch] : elementwise) {
    if (elems.empty()) continue;
    AdamWParams prm{};
    prm.param_dtype = batch->value_dtype, prm.state_dtype = batch->state_dtype;
    prm.int8_group = static_cast<int32_t>(batch->int8_group);
    prm.beta1 = beta1, prm.beta2 = beta2, prm.eps = eps;
    prm.stochastic = rounding.stochastic();
    prm.device = s.device;
    launch_chunked(
        "adam_mini_update_", prm, static_cast<int64_t>(elems.size()),
        batch->chunk(kElementwiseChunk),
        [&](int64_t k) { return elems[k].n; },
        [&](int slot, int64_t k) {
          const Elementwise& e = elems[k];
          prm.p[slot] = e.p, prm.g[slot] = e.g, prm.m[slot] = e.m, prm.v[slot] = e.v;
          prm.scales[slot] = e.scales;
          prm.scalars[slot] = s.of(e.tensor);
          prm.tensor[slot] = static_cast<int32_t>(e.tensor);
          prm.round_first[slot] = e.first;
        },
        [&](const AdamWParams& launch) { return launch_adamw(launch, stream); });
  }
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void adam_mini_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList steps, at::IntArrayRef blocks,
                    const Tensor& lr, double beta1, double beta2, double eps,
                    double weight_decay, at::IntArrayRef rounding, OptionalTensors weight_scales,
                    OptionalTensors state_scales, const std::optional<Tensor>& found_inf) {
  const auto specs = decode_block_specs(blocks, static_cast<int64_t>(params.size()));
  check_adam_mini_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, specs,
                         listed(weight_scales), listed(state_scales));
  check_found_inf("adam_mini_update_", found_inf, params, steps);
  check_coded_m_cuda(params, grads, specs, listed(weight_scales), listed(state_scales));
  const Rounding round(rounding, params.size(), "adam_mini_update_");
  AdamMiniLayouts layouts(params, exp_avgs, exp_avg_sqs, specs);
  adam_mini_kernels(layouts.params(), layouts.follow(grads), layouts.exp_avgs(),
                    layouts.exp_avg_sqs(), steps, blocks, lr, beta1, beta2, eps, weight_decay,
                    round, listed(weight_scales), listed(state_scales), found_inf);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("adam_mini_", &memopt::cuda::adam_mini_cuda); }
