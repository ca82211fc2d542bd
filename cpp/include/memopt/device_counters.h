// The step counters of a LibTorch optimizer whose non-finite skip a GPU decides
// (PlanOptimizer::step, memopt/nonfinite.h): while the ops advance them on the device, the host
// knows each count only within a range, and the skipped steps only as a count on the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/flat_hash_map.h>

#include <functional>
#include <utility>
#include <vector>

#include "memopt/param_state.h"

namespace memopt {

// `count` (a long on the device; undefined: none yet) plus the steps `found` (a step's
// found_inf) skipped, on found's device: nothing is read.
at::Tensor add_skip(const at::Tensor& count, const at::Tensor& found);

class DeviceCounters {
 public:
  // A parameter's state by its TensorImpl*, or nullptr.
  using Lookup = std::function<ParamState*(void*)>;
  // New states' counts, to join once the step that made them is validated (adopt).
  using Fresh = std::vector<std::pair<void*, int64_t>>;

  // The steps skipped on the device so far (reads them: a synchronisation; 0 for none).
  int64_t skipped() const;
  // (lo, hi): the bounds of the count of `param` (whose state is `s`) that the host knows
  // without reading a device: exact for a counter on the CPU; for one moved to the device, its
  // count then plus up to one per step decided on the device since (each taken or skipped).
  std::pair<int64_t, int64_t> range(const at::Tensor& param, const ParamState& s) const;
  // Before a step decided on the device: moves the counters of `params` to their devices,
  // where the ops given found_inf advance them (as torch's fused optimizers keep theirs). Every
  // counter so stepped has its range kept (on the CPU too, where tests stand it in for a GPU):
  // existing ones (`state`) now; those of `fresh` states (begin_step's) are returned.
  Fresh move_beside(const std::vector<at::Tensor>& params, const Lookup& state,
                    const Lookup& fresh);
  void adopt(const Fresh& counts);
  // After the step of `params` ran with `found`: the skip counted, each range widened by one.
  void stepped(const std::vector<at::Tensor>& params, const at::Tensor& found);
  // Before a step decided on the host: brings the counters of `params` kept on a device back to
  // the CPU (one read per device, the synchronisation that decision makes anyway), so that the
  // ops read them there and their ranges are exact again.
  void bring_home(const std::vector<at::Tensor>& params, const Lookup& state);
  // After a load: every counter on the CPU, exact; no skip counted on the device.
  void reset();

 private:
  struct Beside {
    int64_t count;  // the counter's value when it moved to the device
    int64_t calls;  // steps decided on the device since
  };
  ska::flat_hash_map<void*, Beside> beside_;  // parameters whose counters are on a device
  at::Tensor skips_;                          // skips decided on the device (a long on it)
  bool moved_ = false;  // whether a counter ever left the CPU (bring_home has work)
};

}  // namespace memopt
