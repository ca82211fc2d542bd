"""state_bits: how many bits every full-size moment keeps (32: the parameter's dtype; 16:
bfloat16; 8: block codes with one float32 scale per 256 elements). The plan decides each tensor's
state layout from it (memopt/plan.h moment_specs, cpp/include/memopt/state_codes.h); this module
holds the two things the front end adds: the refusal of 8-bit state that a DTensor's shards would
cut, and the ops' `state_scales` argument."""
from __future__ import annotations

import torch

from .distributed import is_dtensor


def check_state_bits(opt, bits) -> int:
    """`bits` as an int (the plan checks the value itself)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"state_bits must be an int (32, 16 or 8), got {bits!r}")
    return bits


def check_sharded_codes(opt, params: list, layouts: list) -> None:
    """Raises NotImplementedError unless every 8-bit moment of a DTensor parameter among
    `params` (its state layout in `layouts`: a plan's StateSpec tuples) can be split like it:
    its code blocks must not cross a shard, so the plan shards their scales by rows, and only
    where rows are whole blocks (memopt/plan.h moment_specs)."""
    for p, specs in zip(params, layouts):
        if not is_dtensor(p):
            continue
        layout = opt._shard_layout(p)
        for key, _, _, _, along, _ in specs:
            if key.endswith("_scales") and layout.group is not None and layout.dim not in along:
                raise NotImplementedError(
                    f"{type(opt).__name__}(state_bits=8): the 8-bit {key[:-7]} of a DTensor "
                    f"parameter of shape {tuple(p.shape)} sharded as {tuple(layout.placements)} "
                    f"cannot be split: its blocks of 256 elements would cross shards. 8-bit "
                    f"state shards by rows (Shard(0)) where a row is whole blocks (a multiple "
                    f"of 256 elements); use state_bits=16 for this tensor's model, or shard it "
                    f"by rows")


def state_scale_args(states: list, keys: tuple):
    """The ops' `state_scales` for tensors with `states`: None when no moment of `keys` is 8-bit,
    else for each key in order one tensor per tensor: its "<key>_scales", or an empty tensor
    for a float moment."""
    if not any(k + "_scales" in s for s in states for k in keys):
        return None
    empty = torch.empty(0)
    return [s.get(k + "_scales", empty) for k in keys for s in states]
