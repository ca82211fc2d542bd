"""SNR analysis for SlimAdam: along which dims can each tensor's second moment be averaged?

Kalra et al. (arXiv 2503.01843, §3) measure, on the second moment V of a full-Adam run, for every
non-empty set K of a tensor's dims (K' the rest)

    SNR_K(V) = E_{K'} [ (E_K V)^2 / Var_K V ]       (population variance; a mean of ratios)

as the reference's utils/snr_utils.py does (slices whose ratio is not finite are left out), at a
schedule over the trajectory; averages it over the measurements; and compresses each tensor
along the set with the highest mean SNR among those above a cutoff (1.0), or not at all if none
passes (get_rules_slim_snr.py). Norm weights stay uncompressed (the reference forces GPT-2's
ln_* to null; here the role decides).

    tracker = SNRTracker(model)                     # or model.named_parameters()
    opt = memopt_core.AdamW(model.parameters(), lr=3e-4)   # or torch.optim.AdamW
    for batch in data:
        ...; opt.step(); tracker.update(opt)        # measures when the schedule says so
    tracker.save_json("rules.json")                 # -> SlimAdam(model, rules="rules.json")
    tracker.plot("snr.png")

`memopt snr` (memopt_core.app.snr_cli) runs such a probe on a built-in model and corpus.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import warnings
from collections import defaultdict
from typing import Mapping

import torch
from torch import nn

from . import _C
from .roles import infer_roles

__all__ = ["snr", "dim_subsets", "SNRTracker"]


def dim_subsets(ndim: int) -> list[tuple]:
    """All non-empty sets of dims, smallest first: (0,), (1,), (0, 1) for a matrix."""
    return [c for k in range(1, ndim + 1) for c in itertools.combinations(range(ndim), k)]


@torch.no_grad()
def snr(v: torch.Tensor, dims) -> float:
    """SNR_K(v) for K = dims, in float64: mean over the kept slices of mean_K(v)^2 / var_K(v),
    over the slices where that ratio is finite (nan if none is)."""
    v = v.detach().to("cpu", torch.float64)
    var, mean = torch.var_mean(v, dim=tuple(dims), correction=0)
    ratio = mean * mean / var
    finite = ratio[torch.isfinite(ratio)]
    return finite.mean().item() if finite.numel() else math.nan


def _second_moments(source, names: Mapping[int, str], shapes: Mapping[str, torch.Size]) -> dict:
    """{name: v shaped like its parameter} from an optimizer's state or a {name: v} mapping."""
    if isinstance(source, Mapping):
        out = {}
        for n, v in source.items():
            if n in shapes:
                if v.numel() != shapes[n].numel():
                    raise ValueError(f"{n}: v has {v.numel()} entries, the parameter {shapes[n].numel()}")
                out[n] = v.reshape(shapes[n])
        return out
    if not isinstance(source, torch.optim.Optimizer):
        raise TypeError(f"update() takes an optimizer or a {{name: v}} dict, got {type(source).__name__}")
    out = {}
    for group in source.param_groups:
        for p in group["params"]:
            name, state = names.get(id(p)), source.state.get(p, {})
            v = state.get("exp_avg_sq", state.get("nu"))  # torch/memopt AdamW, SlimAdam; reference
            if name is None or not isinstance(v, torch.Tensor):
                continue
            if v.numel() != p.numel():
                raise ValueError(
                    f"{name}: the optimizer's second moment has {v.numel()} entries for "
                    f"{p.numel()} parameters; the SNR probe needs full Adam (AdamW, "
                    "torch.optim.AdamW or SlimAdam(rules=None))")
            out[name] = v.reshape(p.shape)
    return out


class SNRTracker:
    """Measures SNR_K of every tracked tensor's second moment, for every dim set K, at a
    schedule (the reference's: step `start_step`, then every `early_every` steps before
    `early_until`, then every `late_every`); `rules()` turns the trajectory average into
    SlimAdam rules."""

    def __init__(self, model_or_named_params, *, start_step: int = 1, early_every: int = 100,
                 late_every: int = 1000, early_until: int = 1000):
        model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
        named = list(model.named_parameters() if model is not None else model_or_named_params)
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named or not all(isinstance(n, str) and isinstance(p, torch.Tensor) for n, p in named):
            raise TypeError("SNRTracker needs a model or (name, tensor) pairs")
        self.names = {id(p): n for n, p in named}
        self.shapes = {n: p.shape for n, p in named}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # head-count notes concern Adam-mini's blocks only
            self.roles = {n: r.role for n, r in infer_roles(named, model).items()}
        self.start_step, self.early_every = start_step, early_every
        self.late_every, self.early_until = late_every, early_until
        self.step = 0
        self.records: list[tuple[int, str, tuple, float]] = []  # (step, name, dims, snr)

    def due(self, step: int) -> bool:
        every = self.early_every if step < self.early_until else self.late_every
        return step == self.start_step or (step > self.start_step and step % every == 0)

    def update(self, optimizer_or_v) -> bool:
        """Call once per optimizer step; measures (and returns True) when the schedule is due."""
        self.step += 1
        if not self.due(self.step):
            return False
        self.measure(optimizer_or_v)
        return True

    def measure(self, optimizer_or_v, step: int | None = None) -> None:
        """Measures now, whatever the schedule."""
        step = self.step if step is None else step
        found = _second_moments(optimizer_or_v, self.names, self.shapes)
        for name, v in ((n, found[n]) for n in self.shapes if n in found):  # model order
            for dims in dim_subsets(v.dim()):
                self.records.append((step, name, dims, snr(v, dims)))

    def mean_snr(self) -> dict[str, dict[tuple, float]]:
        """{name: {dims: SNR averaged over the measured steps}} (non-finite measurements left out)."""
        acc = defaultdict(lambda: defaultdict(list))
        for _, name, dims, value in self.records:
            if math.isfinite(value):
                acc[name][dims].append(value)
        return {n: {d: statistics.fmean(vs) for d, vs in by.items()} for n, by in acc.items()}

    def rules(self, cutoff: float = 1.0) -> dict:
        """{name: dims with the highest mean SNR among those > cutoff, or None}. Norms stay None;
        dim sets the kernel cannot average over (some of 4-D+ tensors) are not candidates."""
        if not self.records:
            raise ValueError("no SNR measured yet: call update(optimizer) after optimizer steps")
        means, out = self.mean_snr(), {}
        for name, shape in self.shapes.items():
            passing = {d: s for d, s in means.get(name, {}).items()
                       if s > cutoff and _C.slim_adam_dims_supported(list(shape), list(d))}
            best = max(passing, key=passing.get) if passing else None  # first of equal maxima
            out[name] = None if best is None or self.roles.get(name) == "norm" else list(best)
        return out

    def save_json(self, path, cutoff: float = 1.0) -> dict:
        """Writes rules(cutoff) as JSON (SlimAdam(model, rules=path) reads it); returns them."""
        rules = self.rules(cutoff)
        with open(path, "w") as f:
            json.dump(rules, f, indent=1)
        return rules

    def save_csv(self, path) -> None:
        """Every measurement, one row each: step, name, dims, snr (the reference's snr_data)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "key", "compress_dims", "snr"])
            for step, name, dims, value in self.records:
                w.writerow([step, name, list(dims), value])

    def plot(self, path, cutoff: float = 1.0) -> None:
        """Mean SNR per tensor (x) for each dim set (one series each), log scale, cutoff line.
        Needs matplotlib (pip install 'memopt_core[plot]')."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("SNRTracker.plot needs matplotlib: pip install 'memopt_core[plot]'") from e
        means = self.mean_snr()
        names = [n for n in self.shapes if n in means]
        series = sorted({d for n in names for d in means[n]}, key=lambda d: (len(d), d))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.5))
        for dims in series:
            xs = [i for i, n in enumerate(names) if means[n].get(dims, 0) > 0]
            ax.scatter(xs, [means[names[i]][dims] for i in xs], s=14, label=f"K={dims}")
        ax.axhline(cutoff, color="k", ls="--", lw=0.8, label=f"cutoff {cutoff:g}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("mean SNR_K of v over the run")
        ax.set_title(f"SNR of Adam's second moment, {len({r[0] for r in self.records})} measurements")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("model.layers.", "L").replace("transformer.h.", "h")
