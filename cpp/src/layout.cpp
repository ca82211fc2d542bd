// Parameter layouts: the one place that decides how an op sees a non-contiguous parameter
// (memopt/layout.h lists the paths).
#include "memopt/layout.h"

#include <c10/util/strides.h>

#include <algorithm>
#include <numeric>

namespace memopt {

namespace {
// (stride, size) of the dims of size > 1, innermost first; the offset the inner ones reach.
bool nests(const Tensor& t, int64_t* reach_out) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;  // this dim steps into memory an inner dim covers
    reach += stride * (size - 1);
  }
  *reach_out = reach;
  return true;
}

// Dims from outermost to innermost in memory (a dense tensor permuted by it is contiguous).
std::vector<int64_t> memory_order(const Tensor& t) {
  std::vector<int64_t> order(t.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  return order;
}
}  // namespace

bool is_non_overlapping(const Tensor& t) {
  int64_t reach = 0;
  return nests(t, &reach);
}

void check_param_layout(const std::string& what, const Tensor& t) {
  TORCH_CHECK_VALUE(is_non_overlapping(t), what, " has overlapping memory (shape ", t.sizes(),
                    ", strides ", t.strides(), ", e.g. an expand()ed tensor): an in-place update "
                    "of elements that share memory is ill-defined; pass a tensor that owns "
                    "each element (e.g. .contiguous())");
}

bool is_dense_layout(const Tensor& t) {
  int64_t reach = 0;
  return nests(t, &reach) && (t.numel() == 0 || reach + 1 == t.numel());
}

int64_t memory_order_run(const Tensor& t) {
  const int64_t nd = t.dim();
  std::vector<int64_t> after(nd + 1, 1);  // after[j]: elements of dims j.. in logical order
  for (int64_t j = nd - 1; j >= 0; --j) after[j] = after[j + 1] * t.size(j);
  int64_t k = 0;  // leading dims that are outermost in memory, in order
  while (k < nd && (t.size(k) == 1 || t.stride(k) == after[k + 1])) ++k;
  return after[k];
}

std::vector<int64_t> state_strides(at::IntArrayRef sizes, const Tensor& p) {
  if (p.defined() && sizes == p.sizes() && is_dense_layout(p)) return p.strides().vec();
  const auto contiguous = c10::contiguous_strides(sizes);
  return {contiguous.begin(), contiguous.end()};
}

Tensor state_zeros(at::IntArrayRef sizes, const Tensor& p, const at::TensorOptions& options) {
  return at::empty_strided(sizes, state_strides(sizes, p), options).zero_();
}

Tensor state_like_param(const Tensor& value, const Tensor& p, const at::TensorOptions& options) {
  return at::empty_strided(value.sizes(), state_strides(value.sizes(), p), options).copy_(value);
}

ParamLayouts::ParamLayouts(TensorList params, std::initializer_list<TensorList> written,
                           const OrderFreeWithin& order_free, bool params_written)
    : order_(params.size()) {
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    if (p.defined() && !p.is_contiguous() && is_dense_layout(p) &&
        order_free(i, memory_order_run(p)))
      order_[i] = memory_order(p);
  }
  // Two passes: the staging bytes first (one reservation), then the carving.
  for (int pass = 0; pass < 2; ++pass) {
    int64_t bytes = 0;
    const bool carve = pass == 1;
    params_.clear();
    written_.clear();
    for (size_t i = 0; i < params.size(); ++i)
      params_.push_back(present(params[i], params[i], i, params_written, &bytes, carve));
    for (const TensorList& list : written) {
      written_.emplace_back();
      for (size_t i = 0; i < list.size() && i < params.size(); ++i)
        written_.back().push_back(present(list[i], params[i], i, true, &bytes, carve));
    }
    if (!carve && bytes > 0) {
      lease_ = std::make_unique<Workspace::Lease>(Workspace::staging_of(params[0].device()));
      lease_->reserve(bytes);
    }
  }
}

ParamLayouts::~ParamLayouts() = default;

Tensor ParamLayouts::present(const Tensor& t, const Tensor& p, size_t i, bool write,
                             int64_t* bytes, bool carve) {
  if (!t.defined() || t.sizes() != p.sizes()) return t;  // not shaped like its parameter
  Tensor view = order_[i].empty() ? t : t.permute(order_[i]);
  if (view.is_contiguous()) return view;
  if (!carve) {
    *bytes += Workspace::aligned(t.numel() * static_cast<int64_t>(t.element_size()));
    return view;
  }
  Tensor buffer = lease_->take_tensor(view.sizes(), t.scalar_type());
  buffer.copy_(view);
  if (write) staged_.emplace_back(view, buffer);
  return buffer;
}

std::vector<Tensor> ParamLayouts::follow(TensorList like_params) const {
  std::vector<Tensor> out(like_params.begin(), like_params.end());
  for (size_t i = 0; i < out.size() && i < order_.size(); ++i)
    if (!order_[i].empty() && out[i].defined() && out[i].dim() == int64_t(order_[i].size()))
      out[i] = out[i].permute(order_[i]);
  return out;
}

void ParamLayouts::write_back() {
  for (auto& [caller, buffer] : staged_) caller.copy_(buffer);
  staged_.clear();
}

}  // namespace memopt
