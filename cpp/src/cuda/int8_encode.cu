// torch.ops.memopt.int8_encode_ on CUDA: float weights to int8 codes and group scales, to
// nearest, with the encoder every CUDA update uses (weights.cuh), so that a weight quantized on
// the GPU has the codes the CPU op gives it.
#include "weights.cuh"

namespace memopt::cuda {
namespace {

constexpr int kThreads = 256;

template <typename P>
__global__ void __launch_bounds__(kThreads) encode_kernel(const Int8EncodeParams prm) {
  const int64_t chunk = int8_chunk(prm.group), first = blockIdx.x * chunk;
  const int64_t n = min(chunk, prm.numel - first);
  const P* values = static_cast<const P*>(prm.values) + first;
  with_weights<P>(prm.codes, prm.scales, prm.group, first, n, 0, 0, [&](const auto& w) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) w.put(j, load<float>(values + j), first + j);
  });
}

}  // namespace

int launch_int8_encode(const Int8EncodeParams& prm, Stream stream) {
  if (prm.numel == 0) return 0;
  const auto ctas = static_cast<unsigned>((prm.numel + int8_chunk(prm.group) - 1) /
                                          int8_chunk(prm.group));
  const auto st = static_cast<cudaStream_t>(stream);
  if (prm.dtype == Dtype::kBFloat16)
    encode_kernel<__nv_bfloat16><<<ctas, kThreads, 0, st>>>(prm);
  else if (prm.dtype == Dtype::kFloat32)
    encode_kernel<float><<<ctas, kThreads, 0, st>>>(prm);
  else
    return static_cast<int>(cudaErrorInvalidValue);
  return last_launch_error();
}

}  // namespace memopt::cuda
