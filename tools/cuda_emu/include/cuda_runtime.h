// Host emulation of the CUDA runtime subset the kernels use (tools/cuda_emu, test harness only):
// blocks run one after another; each block runs its threads as cooperative ucontext fibers on one
// OS thread, and __syncthreads and the warp shuffles are barriers the scheduler releases when
// every thread of the block / warp waits. It checks a kernel's indexing, reductions and numerics
// against the CPU ops; it cannot show races (threads run in a fixed order) or timing.
#pragma once
#include <cstring>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <vector>

#define __grid_constant__
using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "invalid value" : "no error"; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
enum State { kRun, kBlock, kWarp, kDone };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kRun;
};
inline ucontext_t sched;
inline std::vector<Fiber> fibers;
inline unsigned current = 0;
inline const std::function<void()>* body = nullptr;
inline std::vector<double> warp_vals;
inline int sync_count = 0;  // __syncthreads_count's tally

inline void entry() {
  (*body)();
  fibers[current].state = kDone;
  swapcontext(&fibers[current].ctx, &sched);
}
inline void wait(State s) {
  fibers[current].state = s;
  swapcontext(&fibers[current].ctx, &sched);
}
inline void run_block(unsigned n) {
  if (fibers.size() < n) fibers.resize(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.state = kRun;
    if (f.stack.empty()) f.stack.resize(1 << 16);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
  }
  for (;;) {
    bool progress = false;
    for (unsigned t = 0; t < n; ++t)
      if (fibers[t].state == kRun) {
        current = t;
        threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y,
                         t / (blockDim.x * blockDim.y));  // warps: consecutive linear ids
        swapcontext(&sched, &fibers[t].ctx);
        progress = true;
      }
    unsigned done = 0, at_block = 0;
    for (unsigned t = 0; t < n; ++t) done += fibers[t].state == kDone, at_block += fibers[t].state == kBlock;
    if (done == n) return;
    if (at_block > 0 && at_block + done == n) {
      if (done) { std::fprintf(stderr, "emu: __syncthreads after some threads exited\n"); std::abort(); }
      for (unsigned t = 0; t < n; ++t) fibers[t].state = kRun;
      continue;
    }
    for (unsigned w = 0; w * 32 < n; ++w) {
      const unsigned e = std::min(n, 32 * w + 32);
      bool all = true;
      for (unsigned t = 32 * w; t < e; ++t) all &= fibers[t].state == kWarp;
      if (all) {
        for (unsigned t = 32 * w; t < e; ++t) fibers[t].state = kRun;
        progress = true;
      }
    }
    if (!progress) { std::fprintf(stderr, "emu: deadlock\n"); std::abort(); }
  }
}
inline void launch(dim3 grid, dim3 block, const std::function<void()>& fn) {
  gridDim = grid;
  blockDim = block;
  body = &fn;
  const unsigned threads = block.x * block.y * block.z;
  warp_vals.assign(threads, 0.0);
  sync_count = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block(threads);
      }
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::kBlock); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
// Threads run one at a time between barriers, so an atomic is a plain read-modify-write.
inline unsigned atomicMax(unsigned* address, unsigned value) {
  const unsigned old = *address;
  if (value > old) *address = value;
  return old;
}
// Barrier that also counts the threads whose predicate is non-zero: tally, read, then reset
// (each step behind a barrier, so no thread reads before all have added or adds before reset).
inline int __syncthreads_count(int pred) {
  emu::wait(emu::kBlock);
  emu::sync_count += pred != 0;
  emu::wait(emu::kBlock);
  const int n = emu::sync_count;
  emu::wait(emu::kBlock);
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) emu::sync_count = 0;
  return n;
}
namespace emu {
// Every thread of the warp posts x, then reads the value of lane `src(lane)`.
template <typename T, typename Src>
T warp_exchange(T x, Src src) {
  static_assert(std::is_same_v<T, double> || std::is_same_v<T, float> ||
                    std::is_same_v<T, unsigned>,
                "double, float or unsigned (exact in the double exchange slot) only");
  const unsigned t = current, w = t / 32;  // linear thread id
  warp_vals[t] = x;
  wait(kWarp);
  const T y = static_cast<T>(warp_vals[w * 32 + src(t % 32)]);
  wait(kWarp);
  return y;
}
}  // namespace emu
template <typename T>
T __shfl_xor_sync(unsigned, T x, int o) {
  return emu::warp_exchange(x, [o](unsigned lane) { return lane ^ o; });
}
template <typename T>
T __shfl_sync(unsigned, T x, int src) {
  return emu::warp_exchange(x, [src](unsigned) { return static_cast<unsigned>(src); });
}
using std::max;
using std::min;
using std::sqrt;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
