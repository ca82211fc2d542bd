"""Stochastic rounding of bf16 parameters, the front end's part: the group options
`stochastic_rounding` and `rounding_seed` and the ops' `rounding` argument they make
(cpp/include/memopt/rounding.h has the rounding itself; README, "Low-precision weights")."""
from __future__ import annotations

from .distributed import is_dtensor


class StochasticRounding:
    """Mixin of MemoptOptimizer (it reads self.param_groups and _shard_layout)."""

    def __setstate__(self, state: dict) -> None:
        """torch's load_state_dict and unpickling end here: a group saved before stochastic
        rounding existed was rounded to nearest, and goes on so."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("stochastic_rounding", False)
            group.setdefault("rounding_seed", 0)

    @staticmethod
    def _check_rounding(group: dict) -> None:
        if not isinstance(group["stochastic_rounding"], bool):
            raise TypeError(f"stochastic_rounding must be True or False, got "
                            f"{group['stochastic_rounding']!r}")
        seed = group["rounding_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"rounding_seed must be an int in [0, 2**63), got {seed!r}")

    def _rounding(self, group: dict, params: list, counter: int = 0) -> list:
        """The ops' `rounding` argument (cpp/include/memopt/rounding.h): [] rounds to nearest;
        under the group's stochastic_rounding, [seed, counter, one id per parameter]. The id
        is the parameter's position in the optimizer (what state_dict numbers it by), so a
        resumed run draws the bits it would have drawn; a DTensor shard mixes in its offset,
        so each shard draws its own (reproducible, not the single-process bits)."""
        if not group.get("stochastic_rounding", False):
            return []
        if self.__dict__.get("_positions_of") is not self.param_groups or \
                len(self._positions) != sum(len(g["params"]) for g in self.param_groups):
            self._positions = {p: k for k, p in enumerate(
                p for g in self.param_groups for p in g["params"])}
            self._positions_of = self.param_groups
        ids = []
        for p in params:
            k = self._positions[p]
            if is_dtensor(p):
                layout = self._shard_layout(p)
                k += (1 + layout.offset * 2 + layout.dim) << 32
            ids.append(k)
        return [int(group["rounding_seed"]), int(counter), *ids]
