"""DTensor (FSDP2, HSDP, distribute_tensor) parameters: where each rank's shard sits in the full
tensor, state that follows the parameter's placements, and the one packed all-reduce per step.

The optimizers run their ops on local shards. Elementwise updates need nothing else; a statistic
that spans shards (Adam-mini's block means, APOLLO's projection and norms) is computed as
partial sums on each shard, summed over the parameter's own shard group in one all-reduce per
(step, process group), and then finished. Supported placements are those FSDP2 makes: Shard(d)
on one mesh dimension (even, uneven or empty shards) and Replicate on the others (HSDP), so a
rank's shard is a run of whole rows (d = 0, FSDP2's default) or, where the optimizer supports
it (AdamW, APOLLO), of whole columns (d = 1, see apollo_shard_placement)."""
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


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard of a DTensor parameter sits: indices [offset, offset +
    local_shape[dim]) along `dim` of the full tensor (all of it when not split), and the group
    its statistics sum over."""
    mesh: object
    placements: tuple
    global_shape: tuple
    local_shape: tuple
    offset: int
    group: Optional[object]  # ProcessGroup of the Shard(dim) mesh dim; None when not split
    dim: int = 0

    @property
    def row0(self) -> int:
        """The first full-tensor row of a row shard (dim 0)."""
        assert self.dim == 0, "row0 of a column shard"
        return self.offset

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


def shard_layout(p, dims: tuple = (0,), who: str = "this optimizer") -> Optional[ShardLayout]:
    """The layout of a DTensor parameter, or None for a plain tensor. Raises for placements
    other than FSDP2's (Shard(d) for d in `dims` on one mesh dim, Replicate elsewhere); `who`
    names the optimizer in that error."""
    if not is_dtensor(p):
        return None
    placements = tuple(p.placements)
    mesh_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in placements) or len(mesh_dims) > 1 \
            or any(placements[i].dim not in dims for i in mesh_dims) or \
            any(type(placements[i]) is not Shard for i in mesh_dims):
        shards = " or ".join(f"Shard({d})" for d in dims)
        raise ValueError(
            f"{who} supports DTensor parameters sharded as FSDP2 shards them ({shards} on one "
            f"mesh dimension, Replicate on the others); got placements {placements} for a "
            f"parameter of shape {tuple(p.shape)}. Tensor-parallel layouts (strided shards, "
            f"several sharded mesh dims) are not supported yet.")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    group, dim = None, 0
    if mesh_dims:
        dim = placements[mesh_dims[0]].dim
        if p.device_mesh.size(mesh_dims[0]) > 1:
            group = p.device_mesh.get_group(mesh_dims[0])
    return ShardLayout(p.device_mesh, placements, tuple(p.shape), tuple(shape),
                       int(offset[dim]) if offset else 0, group, dim)


def apollo_shard_placement(mesh=None, proj_type: str = "std") -> Callable:
    """FSDP2's `shard_placement_fn` for APOLLO / APOLLO-Mini: Shard(1) (columns) for the 2-D
    weights APOLLO projects from the left (with proj_type "std": those with fewer rows than
    columns, as LLaMA's down_proj) whose columns split evenly over the shard group (FSDP2 shards
    dims other than 0 only evenly), Shard(0) for the rest. Under Shard(0) a Left weight's
    R = P G contracts the split rows, so its whole r x n partial R is all-reduced every step
    and its moments are replicated; split by columns, each rank owns its columns' R and
    moments and only norms cross ranks::

        place = memopt_core.distributed.apollo_shard_placement(mesh)
        fully_shard(layer, mesh=mesh, shard_placement_fn=place)

    mesh: the DeviceMesh given to fully_shard (its last dim shards), or the shard group's size;
    None: the default process group's size. Pass the optimizer's proj_type. Other memopt
    optimizers (but AdamW) refuse column shards."""
    from . import _C
    if mesh is None:
        shards = dist.get_world_size()
    else:
        shards = mesh if isinstance(mesh, int) else mesh.size(mesh.ndim - 1)

    def placement(param: torch.Tensor):
        if param.dim() == 2 and min(param.shape) > 0 and param.shape[1] % shards == 0 and \
                _C.Projector("random", proj_type, 1, list(param.shape)).side == "left":
            return Shard(1)
        return Shard(0)
    return placement


def local_shape(layout: ShardLayout, shape: tuple, sharded: bool) -> tuple:
    """Local shape of a state tensor of global `shape`: split like the parameter along the
    same dim, of the same length (`sharded`), or whole (replicated)."""
    if not sharded:
        return tuple(shape)
    out = list(shape)
    out[layout.dim] = layout.local_shape[layout.dim]
    return tuple(out)


def as_dtensor(local_tensor: torch.Tensor, layout: ShardLayout, shape: tuple, sharded: bool):
    """A state DTensor on the parameter's mesh: placements of the parameter when `sharded`,
    Replicate on every mesh dim otherwise."""
    placements = layout.placements if sharded else tuple(Replicate() for _ in layout.placements)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, layout.mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def local_value(value, layout: ShardLayout, sharded: bool) -> torch.Tensor:
    """The local part of a loaded state value for this rank: a DTensor is redistributed to the
    state's placements, a full plain tensor (a single-process checkpoint) is sliced like the
    parameter."""
    if is_dtensor(value):
        target = layout.placements if sharded else tuple(Replicate() for _ in layout.placements)
        if tuple(value.placements) != target:
            value = value.redistribute(value.device_mesh, target)
        return value.to_local()
    if sharded and value.dim() > layout.dim:
        return value.narrow(layout.dim, layout.offset, layout.local_shape[layout.dim])
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
