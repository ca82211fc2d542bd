// Custom allocation for the optimizers: a reusable scratch workspace and a flat state pool.
#pragma once

#include <ATen/ATen.h>
#include <mutex>
#include <vector>

namespace memopt {

// Scratch memory for the kernels (block reductions, staged grads, projections), one per device.
// It grows to the largest single request and is then reused across tensors and steps, so a
// step never allocates: the first step sizes it, later steps only carve it.
class Workspace {
 public:
  // The process-wide workspace of a device.
  static Workspace& of(const c10::Device& device);
  // A second one per device for parameters staged around a whole kernel call (memopt/layout.h),
  // held while the kernel carves the first.
  static Workspace& staging_of(const c10::Device& device);

  // Exclusive use of the workspace for one kernel call (kernels may run from several threads).
  class Lease {
   public:
    explicit Lease(Workspace& ws);
    // Makes room for `bytes` in total for this piece of work; earlier carvings become invalid.
    void reserve(int64_t bytes);
    // Carves the next 64-byte-aligned buffer of `count` elements out of the reservation.
    template <typename T>
    T* take(int64_t count) {
      return static_cast<T*>(take_bytes(count * static_cast<int64_t>(sizeof(T))));
    }
    // A tensor view of a carved buffer (used to stage a non-contiguous gradient).
    at::Tensor take_tensor(at::IntArrayRef sizes, at::ScalarType dtype);
    // Carving position, to return to after a nested use (keeps earlier carvings valid).
    int64_t mark() const { return used_; }
    void rewind(int64_t mark) { used_ = mark; }
    // Bytes needed to carve `count` elements of T (with alignment padding).
    template <typename T>
    static int64_t bytes_for(int64_t count) {
      return aligned(count * static_cast<int64_t>(sizeof(T)));
    }

   private:
    void* take_bytes(int64_t bytes);
    std::lock_guard<std::mutex> guard_;
    Workspace& ws_;
    int64_t used_ = 0;
  };

  int64_t capacity_bytes() const { return buffer_.defined() ? buffer_.numel() : 0; }
  int64_t largest_request_bytes() const { return largest_request_; }
  int64_t grow_count() const { return grows_; }
  // Frees the buffer and resets largest_request_bytes (tests and memory-sensitive callers
  // between phases).
  void release();

  static int64_t aligned(int64_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  explicit Workspace(c10::Device device) : device_(device) {}
  c10::Device device_;
  std::mutex mutex_;
  at::Tensor buffer_;  // uint8, capacity_bytes long
  int64_t largest_request_ = 0;
  int64_t grows_ = 0;
};

// One flat allocation per dtype that holds many state tensors as views, so state memory is
// exact and unfragmented and one launch can cover a whole group. Each view starts 64-byte aligned.
// Returns zero-initialised views with the given shapes, all sharing one storage.
std::vector<at::Tensor> pool_views(const std::vector<std::vector<int64_t>>& shapes,
                                   at::ScalarType dtype, const c10::Device& device);

// The flat tensor a pool view belongs to (its storage, whole), for accounting.
int64_t pool_storage_bytes(const at::Tensor& view);

}  // namespace memopt
