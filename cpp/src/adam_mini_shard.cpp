// Adam-mini (and SlimAdam) on shards of a tensor (FSDP2): the block means span shards, so a step
// is split in two ops around one all-reduce that the front end runs:
//   adam_mini_block_sums_: this shard's partial sum of g^2 per block of the full tensor;
//   adam_mini_shard_update_: from the summed block sums, v of every block (replicated, equal on
//   every rank) and the update of this shard's elements.
// Together they equal adam_mini_update_ on the full tensor.
#include "memopt/adam_mini.h"

#include <algorithm>

#include "cpu_loops.h"
#include "cpu_states.h"

namespace memopt {

namespace {

// Per tensor: [lo, numel] = this shard's first element in the full tensor and the full numel.
void check_shards(const char* op, TensorList tensors, const std::vector<BlockSpec>& specs,
                  at::IntArrayRef shards, const Tensor& sums, TensorList state_scales = {}) {
  TORCH_CHECK_VALUE(shards.size() == 2 * tensors.size() && specs.size() == tensors.size(), op,
                    ": need one block spec and one [first element, full numel] pair per tensor (",
                    tensors.size(), " tensors, ", specs.size(), " specs, ", shards.size(),
                    " shard ints)");
  int64_t blocks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t lo = shards[2 * i], numel = shards[2 * i + 1];
    TORCH_CHECK_VALUE(lo >= 0 && lo + tensors[i].numel() <= numel, op, ": tensor ", i, " of ",
                      tensors[i].numel(), " elements cannot start at element ", lo,
                      " of a full tensor of ", numel);
    check_block_spec(specs[i], numel, std::string(op) + ": tensor " + std::to_string(i));
    blocks += num_blocks(specs[i]);
    // 8-bit m: the shard's code blocks must be the full tensor's (memopt/plan.h moment_specs).
    const int64_t end = lo + tensors[i].numel();
    TORCH_CHECK_VALUE(!coded_state(state_scales, tensors.size(), 0, i) ||
                          (lo % kStateBlock == 0 && (end % kStateBlock == 0 || end == numel)),
                      op, ": tensor ", i, ": a shard of elements [", lo, ", ", end, ") of ", numel,
                      " cuts 8-bit state blocks of ", kStateBlock, " elements");
  }
  // On the tensors' device: it is the buffer the collective (NCCL on GPUs) reduces.
  const c10::Device device = tensors.empty() ? sums.device() : tensors[0].device();
  TORCH_CHECK_VALUE(sums.scalar_type() == at::kDouble && sums.device() == device &&
                        sums.dim() == 1 && sums.is_contiguous() && sums.numel() == blocks,
                    op, ": block sums must be a contiguous float64 vector on ", device,
                    " with one entry per block of the full tensors (", blocks, "), got ",
                    sums.scalar_type(), " ", sums.sizes(), " on ", sums.device());
}

// Calls f(first element, length, first block, tile_cols) for every tile row of the shard. Tiles of
// one column (SlimAdam's mean over fan-out, per-neuron columns of transposed weights,
// elementwise segments) come a row at a time, their blocks consecutive: f sees
// (row start, cols, first block, 1) and handles the row in one vectorised pass.
template <typename F>
void for_each_tile_row(const std::vector<ShardPiece>& pieces, F&& f) {
  for (const auto& pc : pieces) {
    const Segment& s = pc.seg;
    for (int64_t r = 0; r < s.rows; ++r) {
      const int64_t at = s.offset + r * s.row_stride;
      if (s.tile_cols == 1) {
        f(at, s.cols, pc.block_of(r / s.tile_rows, 0), int64_t{1});
        continue;
      }
      for (int64_t j = 0; j < s.tiles_per_row(); ++j)
        f(at + j * s.tile_cols, s.tile_cols, pc.block_of(r / s.tile_rows, j), s.tile_cols);
    }
  }
}

// One tile row of for_each_tile_row: elements [at, at + n) of the shard with factor `block`
// (tile_cols 1: factors block, block + 1, ... per element).
struct TileRow {
  int64_t at, n, block, tile_cols;
};

// The shard's tile rows in memory order, so that a span of elements finds its own.
std::vector<TileRow> tile_rows(const std::vector<ShardPiece>& pieces) {
  std::vector<TileRow> out;
  for_each_tile_row(pieces, [&](int64_t at, int64_t n, int64_t b, int64_t tc) {
    out.push_back({at, n, b, tc});
  });
  std::sort(out.begin(), out.end(), [](const TileRow& a, const TileRow& b) { return a.at < b.at; });
  return out;
}

// The shard's update with 8-bit m: in parallel spans of whole code blocks, every element's
// factor from its tile row, then cpu::factor_coded_span (adam_mini_update_'s coded pass).
template <typename P, typename C, typename R>
void coded_shard_update(P* p, const P* g, cpu::MomentCodes m, int64_t numel,
                        const std::vector<TileRow>& tiles, const C* factor, C decay, C b1c,
                        const R& round, float* buffers, int64_t span) {
  cpu::with_lerp_form(b1c, [&](auto near) {
    cpu::for_state_spans(numel, span, buffers, cpu::factor_coded_floats(span),
                         [&](int64_t b, int64_t len, float* buf) {
      float* mb = buf;
      C* fb = reinterpret_cast<C*>(buf + kStateBlock);
      auto it = std::upper_bound(tiles.begin(), tiles.end(), b,
                                 [](int64_t x, const TileRow& t) { return x < t.at; });
      int64_t covered = 0;
      for (it = it == tiles.begin() ? it : it - 1; it != tiles.end() && it->at < b + len; ++it) {
        const int64_t lo = std::max(it->at, b), hi = std::min(it->at + it->n, b + len);
        if (lo >= hi) continue;
        if (it->tile_cols == 1)  // a factor per element
          std::copy_n(factor + it->block + (lo - it->at), hi - lo, fb + (lo - b));
        else
          std::fill_n(fb + (lo - b), hi - lo, factor[it->block]);
        covered += hi - lo;
      }
      TORCH_CHECK(covered == len, "adam_mini_shard_update_: the shard's tiles cover ", covered,
                  " of the ", len, " elements at ", b);
      cpu::factor_coded_span<P, C, decltype(near)::value>(p + b, g + b, m, b, len, decay, b1c, fb,
                                                          round.at(b), mb);
    });
  });
}

}  // namespace

void check_adam_mini_block_sums_inputs(TensorList grads, const std::vector<BlockSpec>& specs,
                                      at::IntArrayRef shards, const Tensor& sums) {
  check_shards("adam_mini_block_sums_", grads, specs, shards, sums);
}

void check_adam_mini_shard_inputs(TensorList params, TensorList grads, TensorList exp_avgs,
                                  TensorList exp_avg_sqs, TensorList steps,
                                  const std::vector<BlockSpec>& specs, at::IntArrayRef shards,
                                  const Tensor& sums, TensorList state_scales) {
  const char* op = "adam_mini_shard_update_";
  check_update_lists(op, params, grads, exp_avgs, steps, {}, state_scales);
  check_state_scales(op, params, state_scales, {{exp_avgs, at::kChar}});
  check_shards(op, params, specs, shards, sums, state_scales);
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == params.size(), op, ": ", params.size(), " params but ",
                    exp_avg_sqs.size(), " exp_avg_sqs");
  for (size_t i = 0; i < params.size(); ++i)
    check_block_v(op, i, exp_avg_sqs[i], specs[i], params[i], grads[i], exp_avgs[i],
                  coded_state(state_scales, params.size(), 0, i));
}

void adam_mini_block_sums_(TensorList grads_in, const std::vector<BlockSpec>& specs,
                           at::IntArrayRef shards, const Tensor& sums) {
  check_adam_mini_block_sums_inputs(grads_in, specs, shards, sums);
  // Summed in the memory order adam_mini_shard_update_ steps the parameter in (read only).
  AdamMiniLayouts layouts(grads_in, {}, {}, specs, shards, /*params_written=*/false);
  TensorList grads = layouts.params();
  double* out = sums.data_ptr<double>();
  Workspace::Lease lease(Workspace::of(c10::Device(c10::kCPU)));
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].device().is_cpu(), "adam_mini_block_sums_: no kernel for device ",
                      grads[i].device(), " in this build");
    lease.reserve(cpu::staging_bytes(grads[i]));
    const Tensor g = cpu::contiguous_grad(lease, grads[i]);
    const auto pieces = shard_pieces(specs[i], shards[2 * i], shards[2 * i] + g.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "block_sums", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      for_each_tile_row(pieces, [&](int64_t at, int64_t n, int64_t b, int64_t tc) {
        if (tc == 1)
          cpu::add_squares(out + b, gp + at, n);
        else
          out[b] += cpu::sum_squares(gp + at, n);
      });
    });
    out += num_blocks(specs[i]);
  }
}

void check_shard_rounding(TensorList params, const Rounding& rounding) {
  TORCH_CHECK_VALUE(!rounding.stochastic() || params.empty() || !params[0].is_cuda(),
                    "adam_mini_shard_update_: stochastic rounding is not implemented for sharded "
                    "(FSDP2) parameters on CUDA; train them in fp32 or bf16 rounded to nearest");
}

void adam_mini_shard_update_(TensorList params_in, TensorList grads_in, TensorList exp_avgs_in,
                             TensorList exp_avg_sqs, TensorList steps,
                             const std::vector<BlockSpec>& specs, at::IntArrayRef shards,
                             const Tensor& sums, const Tensor& lr_t, double beta1, double beta2,
                             double eps, double weight_decay, at::IntArrayRef rounding_arg,
                             TensorList state_scales) {
  check_adam_mini_shard_inputs(params_in, grads_in, exp_avgs_in, exp_avg_sqs, steps, specs,
                               shards, sums, state_scales);
  const Rounding rounding(rounding_arg, params_in.size(), "adam_mini_shard_update_");
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params_in.empty()) return;
  TORCH_CHECK(params_in[0].device().is_cpu(), "adam_mini_shard_update_: no kernel for device ",
              params_in[0].device(), " in this build");
  AdamMiniLayouts layouts(params_in, exp_avgs_in, exp_avg_sqs, specs, shards);
  const auto grads_seen = layouts.follow(grads_in);
  TensorList params = layouts.params(), grads = grads_seen, exp_avgs = layouts.exp_avgs();
  const double* sum = sums.data_ptr<double>();
  Workspace::Lease lease(Workspace::of(params[0].device()));
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const int64_t nb = num_blocks(specs[i]);
    const bool coded = coded_state(state_scales, params.size(), 0, i);
    const int64_t span = cpu::state_span(1);
    // (v: exp_avg's dtype, or with 8-bit m the parameter's or float32; check_block_v)
    MEMOPT_DISPATCH_PARAM_STATE(p.scalar_type(), v.scalar_type(), "adam_mini_shard_update_", [&] {
      using C = opmath_t;
      lease.reserve(cpu::staging_bytes(grads[i]) + Workspace::Lease::bytes_for<C>(nb) +
                    (coded ? Workspace::Lease::bytes_for<float>(at::get_num_threads() *
                                                                    cpu::factor_coded_floats(span))
                           : 0));
      const Tensor g = cpu::contiguous_grad(lease, grads[i]);
      C* factor = lease.take<C>(nb);
      const auto s = AdamScalars::make(lr, beta1, beta2, eps, weight_decay,
                                       cpu::advance_step(steps[i]));
      // v and the step factor of every block, as adam_mini_update_'s block_factor computes them.
      state_t* vp = v.data_ptr<state_t>();
      int64_t b = 0;
      for (const auto& seg : specs[i])
        for (int64_t k = 0; k < seg.num_blocks(); ++k, ++b) {
          const C vb = cpu::load<C>(s.beta2) * cpu::load<C>(vp[b]) +
                       cpu::load<C>((1.0 - s.beta2) * (sum[b] / seg.block_numel()));
          vp[b] = static_cast<state_t>(vb);
          factor[b] = cpu::load<C>(s.step_size) /
                      (std::sqrt(cpu::load<C>(vp[b])) / cpu::load<C>(s.bc2_sqrt) +
                       cpu::load<C>(s.eps));
        }
      scalar_t* pp = p.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const C decay = cpu::load<C>(s.decay), b1c = cpu::load<C>(1.0 - s.beta1);
      const auto pieces = shard_pieces(specs[i], shards[2 * i], shards[2 * i] + p.numel());
      if (coded) {
        float* buffers = lease.take<float>(at::get_num_threads() * cpu::factor_coded_floats(span));
        float* ms = state_scale(state_scales, params.size(), 0, i).data_ptr<float>();
        cpu::with_rounding<scalar_t>(rounding, i, s.step, [&](const auto& round) {
          coded_shard_update<scalar_t, C>(pp, gp, {m.data_ptr<int8_t>(), ms},
                                          p.numel(), tile_rows(pieces), factor, decay, b1c, round,
                                          buffers, span);
        });
        return;
      }
      state_t* mp = m.data_ptr<state_t>();
      cpu::with_rounding<scalar_t>(rounding, i, s.step, [&](const auto& round) {
        for_each_tile_row(pieces, [&](int64_t at, int64_t n, int64_t blk, int64_t tc) {
          if (tc == 1)
            cpu::column_update_span<scalar_t, state_t, C>(pp + at, gp + at, mp + at, n, decay,
                                                          b1c, factor + blk, round.at(at));
          else
            cpu::block_update_span<scalar_t, state_t, C>(pp + at, gp + at, mp + at, n, decay,
                                                         b1c, factor[blk], round.at(at));
        });
      });
    });
    sum += nb;
  }
  layouts.write_back();
}

}  // namespace memopt
