// memopt::DeviceCounters (device_counters.h): the LibTorch optimizers' step counters while a GPU
// decides the non-finite skip.
#include "memopt/device_counters.h"

#include <map>
#include <string>

namespace memopt {
namespace {
// A step count: read for free on the CPU (a counter on a device outside beside_, after a step
// that failed its validation, is read: a synchronisation).
int64_t count_of(const ParamState& s) { return static_cast<int64_t>(s.at("step").item<double>()); }
}  // namespace

at::Tensor add_skip(const at::Tensor& count, const at::Tensor& found) {
  const at::Tensor skipped = (found > 0).sum().to(at::kLong);
  return count.defined() ? count.to(skipped.device()) + skipped : skipped;
}

int64_t DeviceCounters::skipped() const { return skips_.defined() ? skips_.item<int64_t>() : 0; }

std::pair<int64_t, int64_t> DeviceCounters::range(const at::Tensor& param,
                                                  const ParamState& s) const {
  auto it = beside_.find(param.unsafeGetTensorImpl());
  if (it != beside_.end()) return {it->second.count, it->second.count + it->second.calls};
  const int64_t n = count_of(s);
  return {n, n};
}

DeviceCounters::Fresh DeviceCounters::move_beside(const std::vector<at::Tensor>& params,
                                                  const Lookup& state, const Lookup& fresh) {
  Fresh out;
  for (const auto& p : params) {
    void* key = p.unsafeGetTensorImpl();
    ParamState* made = fresh(key);
    ParamState* s = made != nullptr ? made : state(key);
    if (s == nullptr) continue;  // (Frugal's state-free tensors)
    if (made != nullptr) out.emplace_back(key, count_of(*s));
    else if (!beside_.count(key)) beside_[key] = Beside{count_of(*s), 0};
    const at::Tensor& step = s->at("step");
    if (step.device() != p.device()) s->set("step", step.to(p.device())), moved_ = true;
  }
  return out;
}

void DeviceCounters::adopt(const Fresh& counts) {
  for (const auto& [key, count] : counts) beside_[key] = Beside{count, 0};
}

void DeviceCounters::stepped(const std::vector<at::Tensor>& params, const at::Tensor& found) {
  skips_ = add_skip(skips_, found);
  for (const auto& p : params) {
    auto it = beside_.find(p.unsafeGetTensorImpl());
    if (it != beside_.end()) ++it->second.calls;
  }
}

void DeviceCounters::bring_home(const std::vector<at::Tensor>& params, const Lookup& state) {
  if (beside_.empty() && !moved_) return;  // no counter has left the CPU
  std::map<std::string, std::vector<ParamState*>> away;
  for (const auto& p : params) {
    beside_.erase(p.unsafeGetTensorImpl());
    ParamState* s = state(p.unsafeGetTensorImpl());
    if (s != nullptr && !s->at("step").device().is_cpu())
      away[s->at("step").device().str()].push_back(s);
  }
  for (auto& [device, states] : away) {
    std::vector<at::Tensor> counts;
    for (auto* s : states) counts.push_back(s->at("step"));
    const at::Tensor home = at::stack(counts).cpu();
    for (size_t k = 0; k < states.size(); ++k) states[k]->set("step", home[k].clone());
  }
}

void DeviceCounters::reset() {
  beside_.clear();
  skips_ = at::Tensor();
  moved_ = false;
}

}  // namespace memopt
