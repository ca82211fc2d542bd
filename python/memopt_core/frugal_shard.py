"""Frugal with DTensor (FSDP2) parameters: which selections can step on local row shards, and
how their state is laid out.

FSDP2 gives each rank a contiguous run of whole rows of every parameter (Shard(0)). Frugal's
selection is drawn on the host from the optimizer's own generator, seeded identically on every
rank, and every draw depends only on global shapes, so all ranks choose the same subspace; the
fused op then runs on the local shards with no communication:

- "block": whole tensors are active or not, and the update of an active one is elementwise, so
  its moments are sharded exactly like the parameter.
- "columns": every rank holds all columns of its rows, so the shared column subspace applies to
  its local rows: the (rows, k) moments are sharded by rows, the k column indices replicated.

"rows" / "randk" keep moments for a random subset of rows / coordinates: a rank's part is a run
of the selection whose length depends on the draw, which no chunk-style Shard(0) DTensor can
describe (so DCP could not reshard it). "svd" / "random" / "randperm" project the gradient by
contracting a dimension across all rows, which needs cross-shard statistics the ops do not
compute. These selections raise at construction when a projectable tensor is split over ranks.
"""
from __future__ import annotations

import torch

from .distributed import as_dtensor, is_dtensor, local

SHARDABLE_SELECTIONS = ("block", "columns")


class FrugalShard:
    """The DTensor-specific parts of memopt_core.Frugal (mixed in before MemoptOptimizer)."""

    def _check_sharding(self) -> None:
        """Raise if a projectable tensor is split over ranks under a selection that cannot step
        on local row shards. Replicated DTensors (one shard holds every row) are fine."""
        if self.selection in SHARDABLE_SELECTIONS:
            return
        for p in self._projs:
            if is_dtensor(p) and self._shard_layout(p).group is not None:
                why = ("its moments of a random subset of rows/coordinates do not split into the "
                       "parameter's row shards" if self.selection in ("rows", "randk") else
                       "its projection contracts the sharded dimension, which needs cross-shard "
                       "statistics")
                raise ValueError(
                    f"Frugal(selection={self.selection!r}) cannot step parameters sharded over "
                    f"ranks (a {tuple(p.shape)} DTensor with placements {tuple(p.placements)}): "
                    f"{why}. Under FSDP2/DTensor sharding use selection='block' (the paper's "
                    f"pre-training default) or 'columns'.")

    def _state_sharded(self, p, key: str, shape: tuple) -> bool:
        # A column subspace keeps a (rows, k) moment: one row of state per parameter row, so it
        # is split by rows like the parameter even though its shape differs.
        if key in ("exp_avg", "exp_avg_sq") and self._sub.get(p) is not None and \
                self._sub[p][0] == self._COLUMNS_MODE:
            return True
        return super()._state_sharded(p, key, shape)

    def _subspace_value(self, p, value: torch.Tensor, dtype: torch.dtype):
        """A subspace tensor (indices or projection) as p's state holds it: on p's device in
        `dtype`, and for a DTensor parameter a replicated DTensor (every rank holds all of it,
        since all ranks draw the same one). `value` may be a plain tensor or a replicated
        DTensor (a sharded optimizer's state_dict)."""
        value = local(value).to(dtype=dtype, device=p.device)
        if not is_dtensor(p):
            return value
        return as_dtensor(value, self._shard_layout(p), tuple(value.shape), sharded=False)
