// memopt_core._C bindings for FRUGAL: the op's validator and the subspace selection.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "memopt/frugal.h"
#include "tensor_caster.h"

namespace nb = nanobind;
using namespace memopt;

void bind_frugal(nb::module_& m) {
  using TL = std::vector<at::Tensor>;
  m.def("check_frugal_",
        [](const TL& params, const TL& grads, const TL& exp_avgs, const TL& exp_avg_sqs,
           const TL& steps, const TL& subspaces, const std::vector<int64_t>& modes,
           const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
           double proj_lr_scale, double free_lr_scale, int64_t rule) {
          check_frugal_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces, modes,
                              proj_lr_scale, free_lr_scale, rule);
          check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
        },
        "Everything torch.ops.memopt.frugal_ checks before it writes (same arguments).");
  m.def("check_frugal_shard_",
        [](const TL& params, const TL& grads, const TL& exp_avgs, const TL& exp_avg_sqs,
           const TL& steps, const TL& subspaces, const std::vector<int64_t>& modes,
           const at::Tensor& stats, const at::Tensor& lr, double beta1, double beta2, double eps,
           double weight_decay, double proj_lr_scale, double free_lr_scale, int64_t rule) {
          check_frugal_shard_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, subspaces,
                                    modes, stats, proj_lr_scale, free_lr_scale, rule);
          check_adam_hparams(read_lr(lr), beta1, beta2, eps, weight_decay);
        },
        "Everything torch.ops.memopt.frugal_shard_stats_ / frugal_shard_update_ check before "
        "they write (same arguments).");
  m.def("frugal_shard_stats_numel",
        [](const TL& exp_avgs, const std::vector<int64_t>& modes) {
          return frugal_shard_stats_numel(exp_avgs, modes);
        },
        nb::arg("exp_avgs"), nb::arg("modes"),
        "Float64 values of frugal_shard_stats_'s buffer: the moments' size of every left-"
        "projected tensor.");
  m.def("frugal_round", &frugal_round, nb::arg("x"), "Python's round(): ties to even.");
  m.def("frugal_select_blocks",
        [](int64_t n, int64_t k, const std::string& order, int64_t cursor, at::Tensor rng_state) {
          auto active = frugal_select_blocks(n, k, order, cursor, rng_state);
          return std::make_tuple(active, cursor, rng_state);
        },
        nb::arg("n"), nb::arg("k"), nb::arg("order"), nb::arg("cursor"), nb::arg("rng_state"),
        "(sorted active block indices, next cursor, next rng_state).");
  m.def("frugal_select_indices",
        [](int64_t total, int64_t k, at::Tensor rng_state) {
          auto idx = frugal_select_indices(total, k, rng_state);
          return std::make_tuple(idx, rng_state);
        },
        nb::arg("total"), nb::arg("k"), nb::arg("rng_state"),
        "(sorted int32 indices of randperm(total)[:k], next rng_state).");
  m.def("frugal_projection",
        [](const at::Tensor& grad, int64_t rank, bool right, const std::string& kind,
           at::Tensor rng_state) {
          auto proj = frugal_projection(grad, rank, right, kind, rng_state);
          return std::make_tuple(proj, rng_state);
        },
        nb::arg("grad"), nb::arg("rank"), nb::arg("right"), nb::arg("kind"), nb::arg("rng_state"),
        "(projection matrix, next rng_state); kind: 'svd', 'random' or 'randperm'.");
}
