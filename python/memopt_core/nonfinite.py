"""The non-finite gradient policy of every memopt optimizer: nonfinite="skip" and
torch.amp.GradScaler's grad_scale / found_inf (the optimizers declare _step_supports_amp_scaling,
as torch's fused ones do, so GradScaler leaves unscaling and the skip to step()). The decision
is made on the device where the ops can take it (device_found_inf), else on the host
(skips_step)."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from .distributed import is_dtensor, local


# Device types on which the decision stays on the device, for optimizers whose every op takes
# found_inf (their `_device_skip`: all of them): the flag goes into the ops, whose kernels return
# at once on it, and nothing is read back; DTensor (FSDP2) batches all-reduce it on the device
# first. Elsewhere it is read on the host once per step: on the CPU that costs nothing; so is
# each APOLLO step where a projection refresh may be due and each FRUGAL step where a new cycle
# may begin, or with stochastic rounding (opt._decides_on_device says).
DEVICE_TYPES = ("cuda",)


def _flags(opt, batches: list):
    """The non-finite flags of the step of `batches` ([(group, params)]), after unscaling their
    gradients in place by GradScaler's grad_scale if it set one: GradScaler's found_inf, and
    one flag per device from torch's fused AMP check when grad_scale or nonfinite="skip" asks
    for it (a non-zero sum: skip). None when no policy is in force."""
    scale, found = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    skip_bad = getattr(opt, "_skips_nonfinite", False)  # set with opt.nonfinite
    if scale is None and found is None and not skip_bad:
        return None
    if torch.compiler.is_compiling():
        raise TypeError("nonfinite='skip' and GradScaler decide on the host whether to "
                        "step; compile the model and call opt.step() outside compiled code")
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
    return flags


def skips_step(opt, batches: list) -> bool:
    """Whether the step of `batches` must change nothing, decided on the host: _flags' sum,
    read once (one synchronisation per step on a GPU, as GradScaler's own skip for other
    optimizers). With DTensor parameters every rank of their meshes decides alike. Counts
    skipped steps in `skipped_steps`."""
    flags = _flags(opt, batches)
    if flags is None:
        return False
    # Every flag is summed into one tensor on one device and read once, at the end: one host
    # synchronisation per step, however many devices and meshes.
    home = flags[0].device if flags else torch.device("cpu")
    skip = sum((f.to(home, torch.float64).sum() for f in flags),
               torch.zeros((), dtype=torch.float64, device=home))
    if _reduce_over_meshes(skip, batches).item() > 0:
        opt.skipped_steps += 1
        return True
    return False


def _reduce_over_meshes(flag: torch.Tensor, batches: list) -> torch.Tensor:
    """`flag` (a tensor on the step's device) reduced by MAX over every shard and replica group
    of the DTensor parameters of `batches`, so that a shard with an inf on any rank skips every
    rank alike (unchanged without DTensors). On a GPU the all-reduce runs on the device: nothing
    is read back."""
    for mesh in {p.device_mesh for _, params in batches for p in params if is_dtensor(p)}:
        for dim in range(mesh.ndim):
            flag = flag.to(mesh.device_type)
            dist.all_reduce(flag, dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return flag


def device_found_inf(opt, batches: list):
    """{device: found_inf} for the op calls of `batches` when the step's skip is decided on the
    devices (DEVICE_TYPES, above): each a one-element float32 tensor, non-zero where any flag
    of the step is (with DTensor parameters: on any rank of their meshes), which the ops read
    on the device (their found_inf; count_device_skip counts it once they ran). None: no
    policy in force, or decide on the host (skips_step)."""
    params = [p for _, ps in batches for p in ps]
    devices = list(dict.fromkeys(local(p.grad).device for p in params))
    if (not getattr(type(opt), "_device_skip", False) or not params
            or torch.compiler.is_compiling()
            or any(d.type not in DEVICE_TYPES for d in devices)
            or (len(devices) > 1 and any(is_dtensor(p) for p in params))
            or not opt._decides_on_device(batches)):
        return None  # (DTensors beside tensors of another device: one reduced flag, host)
    flags = _flags(opt, batches)
    if flags is None:
        return None
    found = {}
    for device in devices:
        total = sum(f.to(device, torch.float32, non_blocking=True).reshape(()) for f in flags)
        found[device] = _reduce_over_meshes(total.reshape(1), batches)
    return found


def count_device_skip(opt, found: dict) -> None:
    """Adds the step whose ops took `found` (device_found_inf's) to skipped_steps if it was
    skipped, on the device: skipped_steps reads the count when asked."""
    home = next(iter(found.values()))
    counted = opt.__dict__.get("_device_skips")
    opt._device_skips = (home > 0).long() + (0 if counted is None else counted)


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
