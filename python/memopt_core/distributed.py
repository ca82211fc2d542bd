"""DTensor (FSDP2, HSDP, distribute_tensor) parameters: where each rank's shard sits in the full
tensor, state that follows the parameter's placements, and the one packed all-reduce per step.

The optimizers run their ops on local shards. Elementwise updates need nothing else; a statistic
that spans shards (Adam-mini's block means, APOLLO's projection and norms) is computed as
partial sums on each shard, summed over the parameter's own shard group in one all-reduce per
(step, process group), and then finished. Supported placements are those FSDP2 makes: Shard(0)
on one mesh dimension (even, uneven or empty shards) and Replicate on the others (HSDP), so a
rank's shard is a run of whole rows of the full tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor, or t itself."""
    return t.to_local() if is_dtensor(t) else t


def local_args(args: tuple) -> tuple:
    """An op's arguments with every DTensor (alone or in a list) replaced by its local shard."""
    return tuple([local(t) for t in a] if isinstance(a, list) else local(a) for a in args)


_SHAPED_ROLES = frozenset({"embedding", "output", "query", "key", "value", "attn_out", "qkv",
                           "mlp", "conv"})


def refuse_flattened(name: str, p, role: str, weight_of: list) -> None:
    """Wrappers that flatten parameters (FSDP1 without use_orig_params, DeepSpeed ZeRO) hide the
    shapes every role but elementwise Adam needs: say so, instead of partitioning a flat buffer
    as if it were a bias. `weight_of`: the modules whose `weight` p is."""
    kind = ("an FSDP1 FlatParameter" if type(p).__name__ == "FlatParameter" else
            "a DeepSpeed ZeRO parameter" if hasattr(p, "ds_id") else None)
    if kind:
        raise ValueError(f"{name} is {kind}: memopt optimizers other than AdamW need each "
                         "parameter's own shape. Use FSDP2 (fully_shard) or FSDP1 with "
                         "use_orig_params=True; DeepSpeed ZeRO is not supported")
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)
    if p.dim() < 2 and (role in _SHAPED_ROLES or any(isinstance(m, layers) for m in weight_of)):
        raise ValueError(f"{name} is a {role} weight of shape {tuple(p.shape)}: flattened (by "
                         "DeepSpeed ZeRO or FSDP1), which hides the shape memopt needs; use FSDP2 "
                         "(fully_shard), which keeps it")


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard of a DTensor parameter sits: rows [row0, row0 + local_shape[0])
    of the full tensor (all of it when not split), and the group its statistics sum over."""
    mesh: object
    placements: tuple
    global_shape: tuple
    local_shape: tuple
    row0: int
    group: Optional[object]  # ProcessGroup of the Shard(0) mesh dim; None when not split

    @property
    def row_numel(self) -> int:
        return math.prod(self.global_shape[1:])

    @property
    def flat_lo(self) -> int:
        """Index of this shard's first element in the flattened full tensor."""
        return self.row0 * self.row_numel

    @property
    def numel(self) -> int:
        return math.prod(self.global_shape)


def shard_layout(p) -> Optional[ShardLayout]:
    """The layout of a DTensor parameter, or None for a plain tensor. Raises for placements
    other than FSDP2's (Shard(0) on one mesh dim, Replicate elsewhere)."""
    if not is_dtensor(p):
        return None
    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in placements) or len(shard_dims) > 1 \
            or any(placements[i].dim != 0 for i in shard_dims) or \
            any(type(placements[i]) is not Shard for i in shard_dims):
        raise ValueError(
            f"memopt_core optimizers support DTensor parameters sharded as FSDP2 shards them "
            f"(Shard(0) on one mesh dimension, Replicate on the others); got placements "
            f"{placements} for a parameter of shape {tuple(p.shape)}. Tensor-parallel layouts "
            f"(Shard(1), strided shards) are not supported yet.")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    group = None
    if shard_dims and p.device_mesh.size(shard_dims[0]) > 1:
        group = p.device_mesh.get_group(shard_dims[0])
    return ShardLayout(p.device_mesh, placements, tuple(p.shape), tuple(shape),
                       int(offset[0]) if offset else 0, group)


def local_shape(layout: ShardLayout, shape: tuple, sharded: bool) -> tuple:
    """Local shape of a state tensor of global `shape`: rows split like the parameter's
    (`sharded`, dim 0 of the same length) or whole (replicated)."""
    if not sharded:
        return tuple(shape)
    return (layout.local_shape[0],) + tuple(shape[1:])


def as_dtensor(local_tensor: torch.Tensor, layout: ShardLayout, shape: tuple, sharded: bool):
    """A state DTensor on the parameter's mesh: placements of the parameter when `sharded`,
    Replicate on every mesh dim otherwise."""
    placements = layout.placements if sharded else tuple(Replicate() for _ in layout.placements)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, layout.mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def local_value(value, layout: ShardLayout, sharded: bool) -> torch.Tensor:
    """The local part of a loaded state value for this rank: a DTensor is redistributed to the
    state's placements, a full plain tensor (a single-process checkpoint) is sliced by rows."""
    if is_dtensor(value):
        target = layout.placements if sharded else tuple(Replicate() for _ in layout.placements)
        if tuple(value.placements) != target:
            value = value.redistribute(value.device_mesh, target)
        return value.to_local()
    if sharded and value.dim() > 0:
        return value.narrow(0, layout.row0, layout.local_shape[0])
    return value


@dataclass
class ShardedCall:
    """One (param group, device) batch of a sharded step: `stats` (float64) hold this rank's
    partial statistics, summed over `group` before `finish()` runs the update. No statistics:
    `finish()` is the whole update."""
    finish: Callable[[], None]
    stats: Optional[torch.Tensor] = None
    group: Optional[object] = None


def reduce_stats(calls: list) -> int:
    """Sums every call's stats over its process group: one all-reduce per group, all of that
    group's statistics packed into one flat float64 buffer. Returns the bytes all-reduced."""
    by_group: dict = {}
    for c in calls:
        if c.stats is not None and c.stats.numel() and c.group is not None:
            by_group.setdefault(c.group, []).append(c.stats)
    sent = 0
    for group, stats in by_group.items():
        flat = torch.cat([s.reshape(-1) for s in stats]) if len(stats) > 1 else stats[0].reshape(-1)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if len(stats) > 1:
            at = 0
            for s in stats:
                s.copy_(flat[at:at + s.numel()].view_as(s))
                at += s.numel()
        sent += flat.numel() * flat.element_size()
    return sent
