// memopt_core._C: thin bindings over the C++ core (partitioner, workspace, state pool).
// Importing it also registers the torch ops (torch.ops.memopt.*) from the linked core.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "memopt/adam_mini.h"
#include "memopt/adamw.h"
#include "memopt/arena.h"
#include "memopt/common.h"
#include "memopt/nonfinite.h"
#include "memopt/partition.h"
#include "option_text.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

void bind_slim_adam(nb::module_& m);   // slim_adam.cpp: which dim sets SlimAdam supports
void bind_frugal(nb::module_& m);      // frugal.cpp
void bind_apollo(nb::module_& m);      // apollo.cpp: the Projector, the scratch planner
void bind_apollo_plan(nb::module_& m);  // apollo_plan.cpp: memopt::ApolloPlan
void bind_roles(nb::module_& m);       // roles.cpp: role inference and the role traits
void bind_plan(nb::module_& m);        // plan.cpp: OptimizerPlan, the plans' base class
void bind_block_plan(nb::module_& m);  // block_plan.cpp: AdamW's, Adam-mini's, SlimAdam's plan

namespace {
using SegmentTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

std::vector<SegmentTuple> to_tuples(const BlockSpec& spec) {
  std::vector<SegmentTuple> out;
  for (const auto& s : spec)
    out.emplace_back(s.offset, s.rows, s.cols, s.row_stride, s.tile_rows, s.tile_cols);
  return out;
}
BlockSpec from_tuples(const std::vector<SegmentTuple>& tuples) {
  BlockSpec spec;
  for (const auto& [o, r, c, rs, tr, tc] : tuples) spec.push_back({o, r, c, rs, tr, tc});
  return spec;
}
c10::Device parse_device(const std::string& device) { return c10::Device(device); }
// A Python value as an AdamWRule: a str naming one; anything else gets the same ValueError.
AdamWRule adamw_rule_of(nb::handle rule) { return parse_adamw_rule(option_text(rule)); }
}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "memopt_core C++ core: partitioner, workspace, state pool (ops: torch.ops.memopt)";
  // An optimizer holds its plan (_C.BlockPlan, ...), and torch can keep an optimizer alive past
  // interpreter shutdown in cycles the garbage collector cannot see (a post-accumulate-grad hook,
  // held in C++ autograd metadata, that closes over it: LayerwiseStep). nanobind's exit-time leak
  // report would then blame these bindings for objects torch never released.
  nb::set_leak_warnings(false);
  // c10's typed errors become the Python exceptions torch raises for them (TORCH_CHECK_VALUE ->
  // ValueError, ...), without the C++ backtrace; torch.ops calls get this from torch already.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

#ifdef MEMOPT_WITH_CUDA
  m.attr("cuda_kernels") = true;   // the memopt ops are registered for the CUDA dispatch key
#else
  m.attr("cuda_kernels") = false;
#endif
  m.def("check_adam_hparams", &check_adam_hparams, nb::arg("lr"), nb::arg("beta1"),
        nb::arg("beta2"), nb::arg("eps"), nb::arg("weight_decay"),
        "Raises ValueError for an invalid Adam-family hyperparameter.");
  m.def("skips_nonfinite", [](nb::handle v) { return skips_nonfinite(option_text(v)); },
        nb::arg("nonfinite").none(),
        "True for 'skip', False for 'propagate'; ValueError otherwise (memopt/nonfinite.h).");
  m.def("adam_mini_blocks",
        [](const std::string& role, const std::vector<int64_t>& shape, bool transposed,
           int64_t head_dim, int64_t q_heads, int64_t kv_heads, bool kv_interleaved) {
          std::string note;
          RoleInfo info{role_from_string(role), transposed, head_dim, q_heads, kv_heads,
                        kv_interleaved};
          auto spec = adam_mini_blocks(info, shape, &note);
          return std::make_pair(to_tuples(spec), note);
        },
        nb::arg("role"), nb::arg("shape"), nb::arg("transposed") = false, nb::arg("head_dim") = 0,
        nb::arg("q_heads") = 0, nb::arg("kv_heads") = 0, nb::arg("kv_interleaved") = false,
        "Adam-mini blocks of a tensor: (segments, note); a segment is (offset, rows, cols, "
        "row_stride, tile_rows, tile_cols).");
  m.def("encode_block_specs",
        [](const std::vector<std::vector<SegmentTuple>>& specs) {
          std::vector<BlockSpec> all;
          for (const auto& t : specs) all.push_back(from_tuples(t));
          return encode_block_specs(all);
        },
        "The flat int list torch.ops.memopt.adam_mini_ takes.");
  m.def("check_block_spec",
        [](const std::vector<SegmentTuple>& spec, int64_t numel) {
          check_block_spec(from_tuples(spec), numel, "block spec");
        },
        "Raises ValueError/RuntimeError unless the segments exactly tile `numel` elements.");

  m.def("workspace_stats",
        [](const std::string& device, bool staging) {
          auto& ws = staging ? Workspace::staging_of(parse_device(device))
                             : Workspace::of(parse_device(device));
          return std::make_tuple(ws.capacity_bytes(), ws.largest_request_bytes(), ws.grow_count());
        },
        nb::arg("device") = "cpu", nb::arg("staging") = false,
        "(capacity_bytes, largest_request_bytes, grow_count) of the scratch workspace, or of the "
        "one that stages non-contiguous parameters (memopt/layout.h) with staging=True.");
  m.def("workspace_release",
        [](const std::string& device) {
          Workspace::of(parse_device(device)).release();
          Workspace::staging_of(parse_device(device)).release();
        },
        nb::arg("device") = "cpu");
  m.def("state_strides",
        [](const std::vector<int64_t>& sizes, const at::Tensor& p) { return state_strides(sizes, p); },
        nb::arg("sizes"), nb::arg("param"),
        "Strides of optimizer state of shape `sizes` for parameter `param` (memopt/layout.h): "
        "the parameter's when the state is shaped like it and it is dense, else contiguous.");
  m.def("pool_views",
        [](const std::vector<std::vector<int64_t>>& shapes, at::Tensor like) {
          return pool_views(shapes, like.scalar_type(), like.device());
        },
        nb::arg("shapes"), nb::arg("like"),
        "Zeroed tensors of the given shapes, all views of one flat allocation of like's dtype "
        "and device (64-byte aligned).");

  bind_roles(m);
  bind_plan(m);  // before every plan's binding, which derives from it
  bind_block_plan(m);
  bind_slim_adam(m);
  bind_frugal(m);
  bind_apollo(m);
  bind_apollo_plan(m);
}
