// Host side of the CUDA ops (internal header for the *_glue.cpp files): ATen only, no CUDA
// headers, so a CPU torch wheel compiles the glue too (see kernel_params.h).
#pragma once

#include <functional>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "memopt/common.h"
#include "memopt/kernel_params.h"
#include "memopt/layout.h"

namespace memopt::cuda {

inline Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    case at::kDouble: return Dtype::kFloat64;
    default: TORCH_CHECK_TYPE(false, "memopt CUDA kernels do not support dtype ", t);
  }
}

// MEMOPT_CUDA_EMULATION: the glue built for tools/cuda_emu, which runs the kernels on the host
// (CPU tensors, no stream) so that CI checks them against the CPU ops without a GPU.
#ifdef MEMOPT_CUDA_EMULATION
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif

// The current CUDA stream of `device` (cudaStream_t), through c10's device-generic interface.
inline Stream current_stream(const c10::Device& device) {
  if (kKernelDevice != c10::DeviceType::CUDA) return nullptr;
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

inline void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA kernel failed: ", error_string(code));
}

// Every tensor of every list on params[0]'s CUDA device (the CPU checks allow CPU steps).
inline void check_same_cuda_device(const char* op, std::initializer_list<TensorList> lists) {
  const c10::Device device = lists.begin()->at(0).device();
  TORCH_CHECK_VALUE(device.type() == kKernelDevice, op, ": expected CUDA tensors, got ", device);
  for (const auto& list : lists)
    for (const auto& t : list)
      TORCH_CHECK_VALUE(t.device() == device, op, ": all tensors must be on ", device, ", got ",
                        t.device());
}

// The gradient as a contiguous tensor. A non-contiguous gradient is copied through the caching
// allocator (the CPU path stages it in its workspace): the only case that allocates memory of a
// gradient's size, and autograd never produces one for a contiguous parameter.
inline Tensor contiguous_grad(const Tensor& g) { return g.is_contiguous() ? g : g.contiguous(); }

// a b in the compute type ct: bf16/fp16 inputs of one dtype are multiplied with fp32
// accumulation into an fp32 result (no widened copy on a GPU); the host emulation, which has no
// mixed-dtype GEMM, and inputs of two dtypes widen both first.
inline Tensor gemm(const Tensor& a, const Tensor& b, at::ScalarType ct) {
  if (a.scalar_type() == ct && b.scalar_type() == ct) return at::mm(a, b);
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(ct));
  if (kKernelDevice == c10::DeviceType::CUDA && a.scalar_type() == b.scalar_type())
    return at::mm_out(out, a, b, ct);
  return out.copy_(at::mm(a.to(ct), b.to(ct)));
}

// Increments a step counter and returns the new value. Steps normally live on the CPU (no
// synchronisation); a step tensor on the GPU is advanced there and read back, which waits.
inline double advance_step(const Tensor& step) {
  if (step.device().is_cpu()) {
    float* s = step.data_ptr<float>();
    *s += 1.0f;
    return *s;
  }
  step.add_(1);
  return step.item<double>();
}

// APOLLO's step count before this step's increment, read on the host, or -1 with the op's
// found_inf: the counter then lives on the device unread, and the call refreshes no projection
// (memopt/apollo.h check_found_inf_refreshes_nothing).
inline int64_t apollo_step_before(const Tensor& step, const std::optional<Tensor>& found_inf) {
  return found_inf.has_value() ? -1 : static_cast<int64_t>(step.item<float>());
}

// The gradients as contiguous tensors (contiguous_grad).
std::vector<Tensor> contiguous_grads(TensorList grads);

// What every Adam-family glue needs per tensor once its inputs are validated: the gradient as
// a contiguous tensor, and the step's AdamScalars after advancing the tensor's step counter.
struct AdamStepInputs {
  std::vector<Tensor> grads;
  std::vector<AdamScalars> scalars;
};
inline AdamStepInputs adam_step_inputs(TensorList grads, TensorList steps, double lr,
                                       double beta1, double beta2, double eps,
                                       double weight_decay,
                                       AdamWRule rule = AdamWRule::kTorch) {
  AdamStepInputs in{contiguous_grads(grads), {}};
  in.scalars.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    in.scalars.push_back(
        AdamScalars::make(lr, beta1, beta2, eps, weight_decay, advance_step(steps[i]), rule));
  return in;
}

// The StepScalars of every tensor of an Adam-family call (kernel_params.h DeviceSteps): with
// host counters (no found_inf), advanced and computed here; with the op's found_inf, on the
// device: cuda/step_scalars.cu advances the counters unless *found_inf is set and writes the
// scalars into `buffer`, which the kernels read through `device`. Either way nothing is read
// back from the device.
struct StepPlan {
  std::vector<StepScalars> host;  // per tensor (unused with device counters)
  DeviceSteps device{};
  Tensor buffer;
  // Host counters already advanced by the caller: their AdamScalars and rounding keys.
  static StepPlan on_host(const std::vector<AdamScalars>& scalars, const Rounding& rounding);
  const StepScalars& of(size_t i) const { return host[i]; }
};
// lr: one learning rate, or one per tensor. A tensor whose counter is empty (FRUGAL's
// state-free tensors: a placeholder) gets zero scalars and no advance. decay: every tensor's
// decay instead of 1 - lr weight_decay (FRUGAL decays at the base lr whatever the tensor's).
StepPlan plan_steps(TensorList steps, at::ArrayRef<double> lr, double beta1, double beta2,
                    double weight_decay, AdamWRule rule, const Rounding& rounding,
                    const std::optional<Tensor>& found_inf, Stream stream,
                    std::optional<double> decay = std::nullopt);

// Tensors that one multi-tensor launch sequence takes: one (value dtype, state dtype) and, for
// int8 weights, one group size (kernel_params.h). A call normally has one batch.
struct TensorBatch {
  std::vector<int64_t> idx;
  Dtype value_dtype, state_dtype;
  int64_t int8_group = 0;  // > 0: int8 codes with that many elements per scale
  // Elements per chunk: float_chunk for float parameters, whole groups for int8 ones.
  int64_t chunk(int64_t float_chunk) const {
    return int8_group > 0 ? int8_chunk(int8_group) : float_chunk;
  }
  // The scales of tensor i of this batch, or null for float parameters.
  static float* scales(TensorList weight_scales, size_t i) {
    const Tensor& s = weight_scale(weight_scales, i);
    return int8_scales(s) ? s.data_ptr<float>() : nullptr;
  }
};

// The tensors' indices in batches, in order of first appearance (`states` gives each tensor's
// state dtype; weight_scales, memopt/common.h, marks int8 parameters); `take`, if given, says
// which tensors to batch (the rest run elsewhere: AdamW's 8-bit states).
inline std::vector<TensorBatch> by_dtypes(TensorList params, TensorList grads, TensorList states,
                                          TensorList weight_scales = {},
                                          const std::function<bool(int64_t)>& take = {}) {
  std::vector<TensorBatch> batches;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    if (take && !take(i)) continue;
    const Tensor& scales = weight_scale(weight_scales, i);
    TensorBatch key{{}, dtype_of(value_dtype(params[i], grads[i])),
                    dtype_of(states[i].scalar_type()),
                    int8_scales(scales) ? int8_group(params[i], scales) : 0};
    size_t k = 0;
    while (k < batches.size() &&
           !(batches[k].value_dtype == key.value_dtype && batches[k].state_dtype == key.state_dtype &&
             batches[k].int8_group == key.int8_group))
      ++k;
    if (k == batches.size()) batches.push_back(key);
    batches[k].idx.push_back(i);
  }
  return batches;
}

// Packs tensors 0..count-1 into multi-tensor launches. For tensor i with numel(i) > 0,
// fill(slot, i) writes its pointers and scalars into slot `slot` of params; launch(params)
// runs a full (or the last) batch and returns its error code. A tensor whose chunks span two
// launches is re-filled into slot 0 of the next one.
template <typename Params, typename Numel, typename Fill, typename Launch>
void launch_chunked(const char* op, Params& prm, int64_t count, int64_t chunk_size,
                    Numel numel, Fill fill, Launch launch) {
  auto& map = prm.map;
  using Map = std::remove_reference_t<decltype(map)>;
  map.chunk_size = chunk_size;
  map.n_tensors = map.n_chunks = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = numel(i);
    if (n == 0) continue;
    int slot = map.n_tensors++;
    map.numel[slot] = n;
    fill(slot, i);
    const int64_t chunks = (n + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      map.slot[map.n_chunks] = static_cast<int16_t>(slot);
      map.chunk[map.n_chunks] = static_cast<int32_t>(c);
      ++map.n_chunks;
      const bool last_chunk = c == chunks - 1;
      if (map.n_chunks < Map::max_chunks && !(last_chunk && map.n_tensors == Map::max_tensors))
        continue;
      check_launch(launch(prm), op);
      map.n_chunks = 0;
      map.n_tensors = 0;
      if (!last_chunk) {  // the rest of this tensor goes on in slot 0 of the next launch
        slot = map.n_tensors++;
        map.numel[slot] = n;
        fill(slot, i);
      }
    }
  }
  if (map.n_chunks > 0) check_launch(launch(prm), op);
}

}  // namespace memopt::cuda
