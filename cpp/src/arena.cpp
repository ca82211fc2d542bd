// Workspace (reusable scratch) and state pool (one flat allocation per dtype).
#include "memopt/arena.h"

#include <map>
#include <memory>
#include <tuple>

namespace memopt {

namespace {
Workspace* registered(const c10::Device& device, int kind, Workspace* (*make)(c10::Device)) {
  static std::mutex registry_mutex;
  static std::map<std::tuple<int, int, int>, std::unique_ptr<Workspace>> registry;
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& slot = registry[{static_cast<int>(device.type()), static_cast<int>(device.index()), kind}];
  if (!slot) slot.reset(make(device));
  return slot.get();
}
}  // namespace

Workspace& Workspace::of(const c10::Device& device) {
  return *registered(device, 0, [](c10::Device d) { return new Workspace(d); });
}

Workspace& Workspace::staging_of(const c10::Device& device) {
  return *registered(device, 1, [](c10::Device d) { return new Workspace(d); });
}

void Workspace::release() {
  std::lock_guard<std::mutex> lock(mutex_);
  buffer_ = at::Tensor();
  largest_request_ = 0;  // the next phase's sizing starts afresh
}

Workspace::Lease::Lease(Workspace& ws) : guard_(ws.mutex_), ws_(ws) {}

void Workspace::Lease::reserve(int64_t bytes) {
  used_ = 0;
  ws_.largest_request_ = std::max(ws_.largest_request_, bytes);
  if (bytes <= ws_.capacity_bytes()) return;
  // Grow to the largest need seen so far; drop the old buffer first so peak stays at one buffer.
  ws_.buffer_ = at::Tensor();
  ws_.buffer_ = at::empty({aligned(bytes)}, at::TensorOptions().dtype(at::kByte).device(ws_.device_));
  ++ws_.grows_;
}

void* Workspace::Lease::take_bytes(int64_t bytes) {
  const int64_t need = aligned(bytes);
  TORCH_INTERNAL_ASSERT(used_ + need <= ws_.capacity_bytes(),
                        "workspace carve exceeds its reservation");
  void* p = static_cast<uint8_t*>(ws_.buffer_.data_ptr()) + used_;
  used_ += need;
  return p;
}

at::Tensor Workspace::Lease::take_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t offset = used_;
  take_bytes(numel * static_cast<int64_t>(c10::elementSize(dtype)));
  return ws_.buffer_.narrow(0, offset, numel * c10::elementSize(dtype)).view(dtype).view(sizes);
}

std::vector<at::Tensor> pool_views(const std::vector<std::vector<int64_t>>& shapes,
                                   at::ScalarType dtype, const c10::Device& device) {
  const int64_t align = 64 / static_cast<int64_t>(c10::elementSize(dtype));  // elements
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& shape : shapes) {
    offsets.push_back(total);
    total += (c10::multiply_integers(shape) + align - 1) / align * align;
  }
  at::Tensor flat = at::zeros({total}, at::TensorOptions().dtype(dtype).device(device));
  std::vector<at::Tensor> views;
  views.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i)
    views.push_back(flat.narrow(0, offsets[i], c10::multiply_integers(shapes[i])).view(shapes[i]));
  return views;
}

int64_t pool_storage_bytes(const at::Tensor& view) {
  return static_cast<int64_t>(view.storage().nbytes());
}

}  // namespace memopt
