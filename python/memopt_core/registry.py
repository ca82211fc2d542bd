"""The one list of optimizers: drives the contract tests, the benchmarks and the CLI.
Adding an algorithm is one entry here plus its files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .adam_mini import AdamMini
from .apollo import Apollo, ApolloMini
from .adamw import AdamW
from .slim_adam import SlimAdam
from .frugal import Frugal


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    needs_names: bool            # constructed from the model (roles) rather than bare parameters
    defaults: dict = field(default_factory=dict)

    def make(self, model: nn.Module, **hparams):
        kwargs = {**self.defaults, **hparams}
        return self.cls(model if self.needs_names else model.parameters(), **kwargs)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", AdamW, needs_names=False),
    "adam_mini": OptimizerSpec("adam_mini", AdamMini, needs_names=True),
    "slim_adam": OptimizerSpec("slim_adam", SlimAdam, needs_names=True),
    "frugal": OptimizerSpec("frugal", Frugal, needs_names=True),
    "apollo": OptimizerSpec("apollo", Apollo, needs_names=True),
    "apollo_mini": OptimizerSpec("apollo_mini", ApolloMini, needs_names=True),
}


def make_optimizer(name: str, model: nn.Module, **hparams):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name].make(model, **hparams)
