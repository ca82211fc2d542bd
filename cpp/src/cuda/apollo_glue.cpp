// memopt::apollo_ for the CUDA dispatch key; cuda/apollo.cu has the kernels and bytes moved.
// The host does what the CPU op does on the host, so that P is bit-identical to the CPU's:
//   - the step counters (CPU tensors: read without a sync; with found_inf they live on the
//     device and cuda/step_scalars.cu advances them, the kernels returning at once on a set
//     flag, and the call refreshes no projection), the seed chain and the Gaussian P,
//     drawn by memopt::Projector with the CPU generator into pinned memory and copied to the
//     device (non_blocking; the host allocator keeps the block until the copy is done). That is
//     at each refresh, or every step with store_projection=False, as the CPU op redraws it every
//     step too: r x L normal draws and an r x L H2D copy per tensor and step, plus one D2H read
//     of the seeds per call when they live on the device (a sync);
//   - SVD bases: the gradient is copied to the host and decomposed there in float32 as the CPU
//     op does (every update_proj_gap steps: a gradient-sized host copy and a sync).
// On the device, per tensor: R = P^T G or G P^T by an ATen GEMM (fp32 accumulation and output;
// bf16/fp16 inputs through mm's out_dtype, exact as the CPU's widen-then-fp32-GEMM since their
// products are exact in fp32), then the moments and gradient-norm kernels; per call: the factor
// kernel and the multi-tensor update. Scratch (R, per-channel sums, P when not stored) is carved
// from the device Workspace, sized by r and the channel counts, never by a parameter. The
// Workspace is shared by the ops of a device: calls on different streams must be ordered by the
// caller, as the steps of one training loop are.
#include <torch/library.h>

#include <ATen/Context.h>

#include "launch.h"
#include "memopt/apollo.h"
#include "memopt/arena.h"

namespace memopt::cuda {
namespace {

constexpr const char* kOp = "apollo_update_";

// One tensor's step as the host sees it, settled before anything is written.
struct Plan {
  explicit Plan(Projector p) : proj(std::move(p)) {}
  Projector proj;
  bool left = false, refresh = false, draw = false, new_seed = false;
  int64_t step_before = 0, seed = 0;  // seed: the one P is drawn from this step
  int64_t ch_off = 0, g2_off = 0;     // this tensor's slice of the per-channel scratch
  int32_t splits = 1;
  Tensor svd;                         // proj="svd" at a refresh: the new P, computed (and able
                                      // to fail, e.g. on a non-finite gradient) before any write
};

Tensor pinned(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).pinned_memory(
                              kKernelDevice == c10::DeviceType::CUDA));  // host emulation: none
}

// P for `seed` in the parameter dtype: drawn in float32 by the CPU generator and rounded (or
// widened) once, the values the CPU op multiplies with.
Tensor host_gaussian(const Projector& proj, int64_t seed, at::ScalarType dtype) {
  Tensor out = pinned(proj.proj_shape(), dtype);
  Tensor scratch = dtype == at::kFloat ? Tensor() : at::empty(proj.proj_shape(), at::kFloat);
  proj.gaussian_(out, seed, scratch);
  return out;
}

Tensor host_svd(const Projector& proj, const Tensor& g) {
  Tensor out = pinned(proj.proj_shape(), g.scalar_type());
  proj.svd_(out, g.to(at::kCPU));
  return out;
}

// The current seeds of the tensors that draw P this step: one D2H copy for all device seeds.
void read_seeds(TensorList seeds, std::vector<Plan>& plans) {
  std::vector<Tensor> on_device;
  std::vector<size_t> which;
  for (size_t i = 0; i < plans.size(); ++i) {
    if (!plans[i].draw) continue;
    if (seeds[i].device().is_cpu()) {
      plans[i].seed = seeds[i].item<int64_t>();
    } else {
      on_device.push_back(seeds[i].reshape({1}));
      which.push_back(i);
    }
  }
  if (on_device.empty()) return;
  const Tensor host = at::cat(on_device).to(at::kCPU);
  for (size_t k = 0; k < which.size(); ++k) plans[which[k]].seed = host.data_ptr<int64_t>()[k];
}

// R = P^T G (Left) or G P^T (Right) into R (compute dtype).
void project(Tensor R, const Tensor& P, const Tensor& g, bool left) {
  const Tensor a = left ? P.t() : g, b = left ? g : P.t();
  if (R.scalar_type() == g.scalar_type())
    at::mm_out(R, a, b);
  else if (kKernelDevice == c10::DeviceType::CUDA)
    at::mm_out(R, a, b, R.scalar_type());  // bf16/fp16 in, fp32 accumulated and out
  else  // host emulation: the CPU has no mixed-dtype mm; the same fp32 product
    R.copy_(at::mm(a.to(R.scalar_type()), b.to(R.scalar_type())));
}

void apollo_kernels(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                 const Tensor& lr_t, double beta1, double beta2, double eps, double weight_decay,
                 int64_t rank, c10::string_view proj, c10::string_view proj_type,
                 c10::string_view scale_type, int64_t update_proj_gap, double scale,
                 double norm_growth_limit, bool scale_front, at::IntArrayRef rounding,
                 TensorList weight_scales, const std::optional<Tensor>& found_inf) {
  // ---- validation, exactly the CPU op's, then what only CUDA needs; nothing written yet ----
  const ApolloConfig cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap,
                                              scale, norm_growth_limit, scale_front, rounding,
                                              params.size());
  check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                      cfg, weight_scales);
  const double lr = read_lr(lr_t);
  check_adam_hparams(lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  check_same_cuda_device(kOp, {params, grads, exp_avgs, exp_avg_sqs});
  const bool fp16_accumulation = at::globalContext().allowFP16AccumulationCuBLAS();
  for (const auto& p : params)  // (int8 codes take float32 or bf16 gradients)
    TORCH_CHECK_VALUE(p.scalar_type() != at::kHalf || !fp16_accumulation, kOp,
                      ": float16 parameters need torch.backends.cuda.matmul."
                      "allow_fp16_accumulation = False (R is accumulated in float32)");
  const c10::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  const Stream stream = current_stream(device);
  const bool stored = !projs.empty(), random = cfg.proj == "random";
  const bool limiter = cfg.norm_growth_limit > 0.0;
  const size_t n = params.size();

  // The dtype P, R and the update compute in: the parameter's, or an int8 one's gradient's.
  std::vector<at::ScalarType> vt(n);
  for (size_t i = 0; i < n; ++i) vt[i] = value_dtype(params[i], grads[i]);
  std::vector<Plan> plans;
  plans.reserve(n);
  std::vector<Tensor> g(n), norm_dev(n);
  int64_t r_bytes = 0, p_bytes = 0, channels = 0, g2_count = 0;
  for (size_t i = 0; i < n; ++i) {
    Plan& pl = plans.emplace_back(Projector(cfg.proj, cfg.proj_type, cfg.rank, params[i].sizes()));
    g[i] = contiguous_grad(grads[i]);  // allocates (strided grads only), writes nothing
    const int64_t r = pl.proj.rank(), K = pl.proj.channels(), L = pl.proj.contraction();
    pl.left = pl.proj.side() == ProjSide::Left;
    // With found_inf the counters live on the device, unread, and the call refreshes nothing
    // (memopt/apollo.h: the caller steps where a refresh may be due without found_inf).
    pl.step_before = apollo_step_before(steps[i], found_inf);
    pl.refresh = !found_inf && Projector::refresh_due(pl.step_before, cfg.update_proj_gap);
    pl.draw = random && (pl.refresh || !stored);
    pl.new_seed = random && pl.refresh && pl.step_before > 0;
    if (!random && pl.refresh) pl.svd = host_svd(pl.proj, g[i]);
    const int64_t c_size = vt[i] == at::kDouble ? 8 : 4;
    r_bytes = std::max(r_bytes, r * K * c_size);
    if (!stored) p_bytes = std::max(p_bytes, r * L * static_cast<int64_t>(c10::elementSize(vt[i])));
    pl.ch_off = channels;
    channels += K;
    if (limiter) {
      pl.splits = pl.left ? apollo_grad_norm_splits(pl.proj.rows()) : 1;
      pl.g2_off = g2_count;
      g2_count += pl.splits * K;
    }
  }
  if (random) read_seeds(seeds, plans);
  for (auto& pl : plans)
    if (pl.new_seed) pl.seed = Projector::next_seed(pl.seed);

  // ---- scratch: R and P of one tensor at a time (reused in stream order), sums of all ----
  using WL = Workspace::Lease;
  WL lease(Workspace::of(device));
  lease.reserve(WL::bytes_for<char>(r_bytes) + WL::bytes_for<char>(p_bytes) +
                WL::bytes_for<double>(channels) * 3 + WL::bytes_for<double>(g2_count));
  const Tensor r_buf = lease.take_tensor({r_bytes}, at::kByte);
  const Tensor p_buf = lease.take_tensor({p_bytes}, at::kByte);
  double* sum_rt2 = lease.take<double>(channels);
  double* sum_r2 = lease.take<double>(channels);
  double* coef = lease.take<double>(channels);
  double* g2 = lease.take<double>(g2_count);
  // The step counters (APOLLO's step size is StepScalars' under AdamWRule::kApollo), advanced
  // here or, with found_inf, on the device; the first write of the step.
  const StepPlan step = plan_steps(steps, lr, beta1, beta2, weight_decay, AdamWRule::kApollo,
                                   cfg.rounding, found_inf, stream);

  // ---- per tensor: projection, step, GEMM, moments, gradient norms ----
  for (size_t i = 0; i < n; ++i) {
    Plan& pl = plans[i];
    const Tensor& p = params[i];
    if (pl.new_seed) seeds[i].fill_(pl.seed);
    const int64_t p_size = pl.proj.rank() * pl.proj.contraction() *
                           static_cast<int64_t>(c10::elementSize(vt[i]));
    Tensor P = stored ? projs[i]
                      : p_buf.narrow(0, 0, p_size).view(vt[i]).view(pl.proj.proj_shape());
    if (pl.draw)
      P.copy_(host_gaussian(pl.proj, pl.seed, vt[i]), /*non_blocking=*/true);
    else if (pl.svd.defined())
      P.copy_(pl.svd, /*non_blocking=*/true);

    const int64_t r = pl.proj.rank(), K = pl.proj.channels();
    const at::ScalarType ct = vt[i] == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor R = r_buf.narrow(0, 0, r * K * c10::elementSize(ct)).view(ct)
                         .view(pl.proj.low_rank_shape());
    project(R, P, g[i], pl.left);

    ApolloMomentsParams mp{};
    mp.param_dtype = dtype_of(vt[i]);
    mp.state_dtype = dtype_of(exp_avgs[i].scalar_type());
    mp.left = pl.left;
    mp.R = R.data_ptr();
    mp.m = exp_avgs[i].data_ptr();
    mp.v = exp_avg_sqs[i].data_ptr();
    mp.sum_rt2 = sum_rt2 + pl.ch_off;
    mp.sum_r2 = sum_r2 + pl.ch_off;
    mp.r = r, mp.K = K;
    mp.beta1 = beta1, mp.beta2 = beta2, mp.eps = eps;
    mp.found_inf = step.device.found_inf;
    check_launch(launch_apollo_moments(mp, stream), kOp);

    if (limiter) {
      ApolloGradNormParams gp{};
      gp.param_dtype = mp.param_dtype;
      gp.left = pl.left;
      gp.g = g[i].data_ptr();
      gp.out = g2 + pl.g2_off;
      gp.rows = p.size(0), gp.cols = p.size(1);
      gp.splits = pl.splits;
      gp.rows_per_split = (gp.rows + pl.splits - 1) / pl.splits;
      check_launch(launch_apollo_grad_norms(gp, stream), kOp);
      // A limiter norm kept on the CPU makes a round trip (the kernel reads and writes it).
      const Tensor& norm = limiter_norms[i];
      norm_dev[i] = norm.device().is_cpu() ? norm.to(device) : norm;
    }
  }

  // ---- per call: factors and limiter (one CTA per tensor), then the update ----
  ApolloFactorParams fp{};
  fp.channel = cfg.channel, fp.limiter = limiter, fp.scale_front = cfg.scale_front;
  fp.sum_rt2 = sum_rt2, fp.sum_r2 = sum_r2, fp.g2 = g2, fp.coef = coef;
  fp.alpha = std::sqrt(cfg.scale), fp.gamma = cfg.norm_growth_limit;
  fp.device = step.device;
  for (size_t i = 0; i < n; ++i) {
    const int s = fp.n_tensors++;
    fp.ch_off[s] = plans[i].ch_off, fp.g2_off[s] = plans[i].g2_off;
    fp.K[s] = plans[i].proj.channels(), fp.splits[s] = plans[i].splits;
    fp.step_size[s] = step.of(i).step_size;
    fp.tensor[s] = static_cast<int32_t>(i);
    if (limiter) {
      fp.norm[s] = norm_dev[i].data_ptr();
      fp.norm_is_double[s] = norm_dev[i].scalar_type() == at::kDouble;
    }
    if (fp.n_tensors == ApolloFactorParams::kMaxTensors || i + 1 == n) {
      check_launch(launch_apollo_factors(fp, stream), kOp);
      fp.n_tensors = 0;
    }
  }
  for (size_t i = 0; i < n && limiter; ++i)
    if (limiter_norms[i].device().is_cpu()) limiter_norms[i].copy_(norm_dev[i]);

  ApolloUpdateParams up{};
  up.lr_wd = lr * weight_decay;
  up.stochastic = cfg.rounding.stochastic();
  up.device = step.device;
  for (const TensorBatch& batch : by_dtypes(params, grads, grads, weight_scales)) {
    const auto& idx = batch.idx;
    up.param_dtype = batch.value_dtype;
    up.int8_group = static_cast<int32_t>(batch.int8_group);
    launch_chunked(
        kOp, up, static_cast<int64_t>(idx.size()), batch.chunk(kApolloUpdateChunk),
        [&](int64_t k) { return params[idx[k]].numel(); },
        [&](int slot, int64_t k) {
          const int64_t i = idx[k];
          up.p[slot] = params[i].data_ptr();
          up.scales[slot] = TensorBatch::scales(weight_scales, i);
          up.g[slot] = g[i].data_ptr();
          up.coef[slot] = coef + plans[i].ch_off;
          up.cols[slot] = params[i].size(1);
          up.mode[slot] = !cfg.channel ? kApolloPerTensor
                          : plans[i].left ? kApolloPerColumn : kApolloPerRow;
          up.round_key[slot] = step.of(i).round_key;
          up.tensor[slot] = static_cast<int32_t>(i);
        },
        [&](const ApolloUpdateParams& launch) { return launch_apollo_update(launch, stream); });
  }
}

// Validation on the caller's tensors, then the kernels on the tensors memopt/layout.h presents
// (a non-contiguous parameter in its memory order, or staged), and the staged ones copied back.
void apollo_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList projs, TensorList seeds, TensorList limiter_norms, TensorList steps,
                 const Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t rank, c10::string_view proj, c10::string_view proj_type,
                 c10::string_view scale_type, int64_t update_proj_gap, double scale,
                 double norm_growth_limit, bool scale_front, at::IntArrayRef rounding,
                 OptionalTensors weight_scales, const std::optional<Tensor>& found_inf) {
  const ApolloConfig cfg = make_apollo_config(rank, proj, proj_type, scale_type, update_proj_gap,
                                              scale, norm_growth_limit, scale_front, rounding,
                                              params.size());
  check_apollo_inputs(params, grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms, steps,
                      cfg, listed(weight_scales));
  check_found_inf("apollo_", found_inf, params, steps);
  check_found_inf_refreshes_nothing(steps, cfg, found_inf);  // (reads host counters only)
  // R's channels are logical rows/columns: a non-contiguous weight is staged in logical order.
  ParamLayouts layouts(params, {}, logical_order_only);
  apollo_kernels(layouts.params(), grads, exp_avgs, exp_avg_sqs, projs, seeds, limiter_norms,
                 steps, lr, beta1, beta2, eps, weight_decay, rank, proj, proj_type, scale_type,
                 update_proj_gap, scale, norm_growth_limit, scale_front, rounding,
                 listed(weight_scales), found_inf);
  layouts.write_back();
}

}  // namespace
}  // namespace memopt::cuda

TORCH_LIBRARY_IMPL(memopt, CUDA, m) { m.impl("apollo_", &memopt::cuda::apollo_cuda); }
