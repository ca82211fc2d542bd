// What the C++ tests share: PASS/FAIL lines, a failure count, exception checks, gradients.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace memopt_test {
inline int failures = 0;

inline void check(bool ok, const std::string& what) {
  std::cout << (ok ? "PASS " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

template <typename E>
bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

inline void set_grads(const std::vector<torch::Tensor>& ps, int64_t step) {
  torch::manual_seed(1000 + step);
  for (const auto& p : ps) p.mutable_grad() = torch::randn_like(p);
}

inline bool same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

// The test binary's exit: "all passed" and 0, or "FAILED" and 1.
inline int finish() {
  std::cout << (failures ? "FAILED" : "all passed") << "\n";
  return failures ? 1 : 0;
}

}  // namespace memopt_test
