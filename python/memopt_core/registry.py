"""The one list of optimizers: drives the contract tests, the benchmarks and the CLI.
Adding an algorithm is one entry here plus its files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
    # Recommended peak learning rate (warmup + cosine, as `memopt train` / `compare` schedule
    # it): `memopt compare` runs each optimizer at its own unless told otherwise. Not applied by
    # make(), which leaves lr to the caller. Each entry says where its value comes from.
    lr: Optional[float] = None

    def peak_lr(self, lr: Optional[float] = None) -> float:
        """`lr` if given, else the recommended one: where `memopt train` / `compare` (and
        TrainConfig) choose a run's lr."""
        if lr is None and self.lr is None:
            raise ValueError(f"{self.name} has no recommended lr; give one (--lr)")
        return float(self.lr if lr is None else lr)

    def make(self, model: nn.Module, **hparams):
        kwargs = {**self.defaults, **hparams}
        return self.cls(model if self.needs_names else model.parameters(), **kwargs)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    # adamw, adam_mini, slim_adam: measured here, the best validation loss of 5 lrs (5e-4 to
    # 8e-3, x2 apart) on `memopt compare --quick --lr-sweep 5 --lr 2e-3` (bench/RESULTS.md,
    # "Recommended learning rates"); all three are best at 1e-3 there.
    "adamw": OptimizerSpec("adamw", AdamW, needs_names=False, lr=1e-3),
    # Measured here (above); Adam-mini's authors advise AdamW's hyperparameters, as measured.
    "adam_mini": OptimizerSpec("adam_mini", AdamMini, needs_names=True, lr=1e-3),
    # Measured here (above).
    "slim_adam": OptimizerSpec("slim_adam", SlimAdam, needs_names=True, lr=1e-3),
    # FRUGAL's paper: lr 1e-3 for its LLaMA pre-training runs (60M-1B).
    "frugal": OptimizerSpec("frugal", Frugal, needs_names=True, lr=1e-3),
    # APOLLO's pre-training scripts (scripts/pretrain_c4/*.sh): lr 1e-2. Its rank defaults to
    # the model's (Apollo.default_rank: d/4 up to 256).
    "apollo": OptimizerSpec("apollo", Apollo, needs_names=True, lr=1e-2),
    # APOLLO-Mini: the same scripts, lr 1e-2 (with scale 128).
    "apollo_mini": OptimizerSpec("apollo_mini", ApolloMini, needs_names=True, lr=1e-2),
}


def make_optimizer(name: str, model: nn.Module, **hparams):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name].make(model, **hparams)
