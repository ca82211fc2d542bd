"""The non-finite gradient policy of every memopt optimizer: nonfinite="skip" and
torch.amp.GradScaler's grad_scale / found_inf (the optimizers declare _step_supports_amp_scaling,
as torch's fused ones do, so GradScaler leaves unscaling and the skip to step())."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from .distributed import is_dtensor, local


def skips_step(opt, batches: list) -> bool:
    """Whether the step of `batches` ([(group, params)]) must change nothing, after
    unscaling their gradients in place by GradScaler's grad_scale if it set one: GradScaler
    found an inf/NaN (its found_inf), or nonfinite="skip" and a gradient is not finite. The
    check and the unscale are one fused pass per device (torch's own AMP kernel); the
    decision is read on the host (one synchronisation per step on a GPU, as GradScaler's
    own skip for other optimizers). With DTensor parameters every rank of their meshes
    decides alike. Counts skipped steps in `skipped_steps`."""
    scale, found = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    skip_bad = getattr(opt, "_skips_nonfinite", False)  # set with opt.nonfinite
    if scale is None and found is None and not skip_bad:
        return False
    if torch.compiler.is_compiling():
        raise TypeError("nonfinite='skip' and GradScaler decide on the host whether to "
                        "step; compile the model and call opt.step() outside compiled code")
    # Every flag is summed into one tensor on one device and read once, at the end: one host
    # synchronisation per step, however many devices and meshes.
    flags = [] if found is None else [found]
    if scale is not None or skip_bad:
        by_device = defaultdict(list)
        for _, params in batches:
            for p in params:
                by_device[p.grad.device].append(local(p.grad))
        for device, grads in by_device.items():
            flag = torch.zeros(1, device=device)
            inv = (torch.ones(1, device=device) if scale is None else
                   torch.as_tensor(scale, device=device).double().reciprocal().float().reshape(1))
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv)
            flags.append(flag)
    home = flags[0].device if flags else torch.device("cpu")
    skip = sum((f.to(home, torch.float64).sum() for f in flags),
               torch.zeros((), dtype=torch.float64, device=home))
    for mesh in {p.device_mesh for _, params in batches for p in params if is_dtensor(p)}:
        for dim in range(mesh.ndim):  # a shard with an inf anywhere skips every rank
            skip = skip.to(mesh.device_type)
            dist.all_reduce(skip, dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if skip.item() > 0:
        opt.skipped_steps = getattr(opt, "skipped_steps", 0) + 1
        return True
    return False


def saved_skipped_steps(state_dict: dict) -> int:
    """skipped_steps of a state_dict (0 for one saved before the counter existed)."""
    groups = state_dict.get("param_groups")
    values = [g.get("skipped_steps", 0) for g in groups if isinstance(g, dict)] \
        if isinstance(groups, list) else []
    value = values[0] if values else 0
    if any(type(v) is not int or v != value for v in values) or value < 0:
        raise ValueError(f"state_dict: skipped_steps must be one count >= 0 in every param "
                         f"group, got {values}")
    return value
