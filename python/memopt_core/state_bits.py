"""state_bits: how many bits every full-size moment keeps (32: the parameter's dtype; 16:
bfloat16; 8: block codes with one float32 scale per 256 elements). The plan decides each tensor's
state layout from it (memopt/plan.h moment_specs, cpp/include/memopt/state_codes.h); this module
holds the two things the front end adds: the refusal of what is not supported yet, and the ops'
`state_scales` argument."""
from __future__ import annotations

import torch

from .distributed import is_dtensor


def check_state_bits(opt, bits, params) -> int:
    """`bits` as an int after the front end's checks (the plan checks the value itself):
    8-bit state is not sharded yet, so DTensor (FSDP2) parameters refuse it."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"state_bits must be an int (32, 16 or 8), got {bits!r}")
    if bits == 8 and any(is_dtensor(p) for p in params):
        raise NotImplementedError(
            f"{type(opt).__name__}(state_bits=8) over DTensor (FSDP2) parameters: 8-bit state "
            "is not sharded yet; use state_bits=16 (bfloat16 moments shard like the parameters)")
    return bits


def state_scale_args(states: list, keys: tuple):
    """The ops' `state_scales` for tensors with `states`: None when no moment of `keys` is 8-bit,
    else for each key in order one tensor per tensor: its "<key>_scales", or an empty tensor
    for a float moment."""
    if not any(k + "_scales" in s for s in states for k in keys):
        return None
    empty = torch.empty(0)
    return [s.get(k + "_scales", empty) for k in keys for s in states]
