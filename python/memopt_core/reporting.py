"""What every memopt optimizer reports about its state: exact bytes now, planned bytes before the
first step (works on the meta device: `memopt plan`), and describe()'s table of what it decided."""
from __future__ import annotations

import math

import torch

from .distributed import local


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of this rank's shard of a DTensor."""
    t = local(t)
    return t.numel() * t.element_size()


class Reporting:
    """Mixin of MemoptOptimizer (it reads self.state, self.param_groups and the state hooks)."""

    def state_bytes(self) -> int:
        """Exact bytes of all optimizer state tensors (moments and step counters)."""
        return sum(tensor_bytes(t) for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def planned_state_bytes(self) -> int:
        """The state bytes this optimizer will hold after its first step, computed without
        stepping; works for parameters on the meta device (`memopt plan`). Optimizers whose
        state is not one fixed shape set per parameter override `_planned_bytes`."""
        return sum(self._planned_bytes(p) for g in self.param_groups for p in g["params"])

    def _planned_bytes(self, p: torch.Tensor) -> int:
        """State bytes of one parameter once initialised (its step counter included)."""
        return sum(self._state_dtype(p, k).itemsize * math.prod(s)
                   for k, s in self._state_shapes(p).items()) + 4

    def _describe_row(self, p: torch.Tensor) -> tuple[str, object]:
        """(role, its second-moment blocks: a count, or "elementwise" for Adam's own v)."""
        return "adam", "elementwise"

    def describe(self) -> str:
        """A table of what the optimizer decided per tensor: role, blocks, state bytes (as it
        will be once initialised), with totals against AdamW (m and v in the parameter dtype)."""
        rows, total, adamw, index = [], 0, 0, 0
        for group in self.param_groups:
            # unnamed parameters are numbered across groups, as state_dict() numbers them
            names = group.get("param_names") or [f"param{index + i}"
                                                 for i in range(len(group["params"]))]
            index += len(group["params"])
            for name, p in zip(names, group["params"]):
                role, blocks = self._describe_row(p)
                nbytes = self._planned_bytes(p)
                total += nbytes
                adamw += 2 * tensor_bytes(p) + 4
                rows.append((name, "x".join(map(str, p.shape)) or "scalar", role, blocks, nbytes))
        width = max([len(r[0]) for r in rows] + [6])
        lines = [f"{'tensor':<{width}}  {'shape':>14}  {'role':<9} {'blocks':>11} {'state bytes':>13}"]
        lines += [f"{n:<{width}}  {s:>14}  {r:<9} {b:>11} {nb:>13,}" for n, s, r, b, nb in rows]
        ratio = total / adamw if adamw else 0.0
        lines.append(f"total state {total:,} bytes = {ratio:.4f} x AdamW's {adamw:,} bytes")
        return "\n".join(lines)
