"""Frugal with DTensor (FSDP2) parameters: which selections can step on local row shards, how
their state is laid out (the plan's placements, memopt::FrugalPlan::layout), and the op calls
of a sharded step. Why each selection shards as it does, and what crosses ranks: README,
"Frugal under FSDP2"."""
from __future__ import annotations

import warnings

import torch

from . import _C
from .state_bits import check_sharded_codes
from .distributed import ShardedCall, as_dtensor, is_dtensor, local, local_value, reduce_stats

SHARDABLE_SELECTIONS = ("block", "columns", "svd", "random", "randperm")
_SVD_GATHER = (
    "Frugal(selection='svd') on parameters sharded over ranks: at every re-selection (every "
    "update_gap steps) each split projectable gradient is all-gathered (grad.full_tensor()) so "
    "that every rank takes the same SVD of the full gradient; this costs one full gradient per "
    "projectable tensor in memory and traffic at those steps. selection='random' needs none.")


class FrugalShard:
    """The DTensor-specific parts of memopt_core.Frugal (mixed in before MemoptOptimizer)."""

    def _split(self, p) -> bool:
        return is_dtensor(p) and self._shard_layout(p).group is not None

    def _check_sharding(self) -> None:
        """Raise if a projectable tensor is split over ranks under a selection that cannot step
        on local row shards (replicated DTensors, one shard holding every row, are fine); warn
        once that "svd" all-gathers split gradients at its re-selections."""
        if self.selection == "block":  # (8-bit state: whole tensors of the block selection)
            check_sharded_codes(self, list(self._position), [
                self.plan.layout(i, _C.FrugalMode.ActiveBlock if p in self._index else
                                 _C.FrugalMode.Adam) for p, i in self._position.items()])
        split = [p for p in self._projs if self._split(p)]
        if not split:
            return
        if self.selection == "svd":
            warnings.warn(_SVD_GATHER, stacklevel=3)
        if self.selection in SHARDABLE_SELECTIONS:
            return
        p = split[0]
        raise ValueError(
            f"Frugal(selection={self.selection!r}) cannot step parameters sharded over ranks (a "
            f"{tuple(p.shape)} DTensor with placements {tuple(p.placements)}): its moments of a "
            f"random subset of rows/coordinates do not split into the parameter's row shards. "
            f"Under FSDP2/DTensor sharding use selection='block' (the paper's pre-training "
            f"default), 'columns', 'random', 'randperm' or 'svd'.")

    def _state_sharded(self, p, key: str, shape: tuple) -> bool:
        """The plan's placement (memopt::FrugalPlan::layout): decided by the mode, not by
        comparing shapes (a (rows, r) moment has one row per parameter row even when r == cols;
        a left (r, cols) moment never does; a left P (rows, r) is read one row at a time)."""
        i = self._position[p]
        # state being created for a block the pending selection activates (the plan has not
        # committed it yet): only "block" selections change a tensor's mode, to an active block
        specs = self.plan.state(i) or self.plan.layout(i, _C.FrugalMode.ActiveBlock)
        return self._shard_layout(p).dim in {k: a for k, _, _, _, a, _ in specs}[key]

    def _subspace_value(self, p, value: torch.Tensor, dtype: torch.dtype):
        """A subspace tensor (indices or projection) as p's state holds it: on p's device in
        `dtype`; for a DTensor parameter a DTensor, replicated (all ranks draw the same one) or,
        for a left projection, sharded by rows like p. `value` may be a plain full tensor or a
        DTensor of any placements (a sharded optimizer's state_dict)."""
        if not is_dtensor(p):
            return local(value).to(dtype=dtype, device=p.device)
        shape = tuple(value.shape)
        sharded = self._state_sharded(p, "subspace", shape)
        layout = self._shard_layout(p)
        # copy a row slice, so that the full drawn matrix is not kept alive as its storage
        mine = local_value(value, layout, sharded).to(dtype=dtype, device=p.device, copy=sharded)
        return as_dtensor(mine, layout, shape, sharded)

    def _projection_source(self, p) -> torch.Tensor:
        """The gradient a projection of p is drawn from: "svd" reads the full weight's gradient
        (all-gathered when split); "random"/"randperm" read only its global shape and dtype."""
        g = p.grad
        if not is_dtensor(g):
            return g
        if self.selection == "svd":
            return g.full_tensor() if self._split(p) else local(g)
        return torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")

    def _prepared_call(self, params: list, args: tuple, **found_inf):
        """(run_stats or None, ShardedCall) of one (group, device, process group) batch, with
        `args` the op arguments on local shards, validated here before anything is written.
        Batches with left projections of split tensors take frugal_shard_stats_ (run_stats, to
        call before the all-reduce of stats), then frugal_shard_update_; others one frugal_."""
        modes = args[6]
        numel = _C.frugal_shard_stats_numel(args[2], modes) if self._split(params[0]) else 0
        if not numel:  # found_inf: the step's flag when decided on the device
            torch.ops.memopt.check_frugal_(*args, **found_inf)
            return None, ShardedCall(lambda: torch.ops.memopt.frugal_(*args, **found_inf))
        # on the parameters' device: NCCL reduces GPU buffers, the CUDA ops read them there
        stats = torch.zeros(numel, dtype=torch.float64, device=args[0][0].device)
        # (the shard ops take no weight_scales or state_scales: 8-bit moments are whole-tensor
        # ones, of the block selection, which has no left projections)
        full = (*args[:7], stats, *args[7:-2])
        torch.ops.memopt.check_frugal_shard_update_(*full, **found_inf)
        return (lambda: torch.ops.memopt.frugal_shard_stats_(*full),
                ShardedCall(lambda: torch.ops.memopt.frugal_shard_update_(*full, **found_inf),
                            stats, self._shard_layout(params[0]).group))

    def _run_prepared(self, runs: list) -> None:
        """Runs _prepared_call's results: every partial statistic, their one all-reduce per
        process group (distributed.reduce_stats), then every update."""
        for run_stats, _ in runs:
            if run_stats is not None:
                run_stats()
        self.reduced_bytes = reduce_stats([call for _, call in runs])
        for _, call in runs:
            call.finish()
