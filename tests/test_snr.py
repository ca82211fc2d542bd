"""memopt_core.snr: the SNR estimator against a direct numpy computation of the paper's
definition, the measurement schedule, the rule selection (cutoff 1.0, highest SNR among the
passing sets), probe runs with memopt/torch AdamW, the rules JSON into SlimAdam, the plot and
`memopt snr`."""
from __future__ import annotations

import argparse
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import memopt_core
from conftest import make_grads, make_llama, set_grads
from memopt_core.app.snr_cli import _probe_setup, add_snr_subcommand
from memopt_core.snr import SNRTracker, dim_subsets, snr


def numpy_snr(v: np.ndarray, axes) -> float:
    """SNR_K(V) = E_{K'}[(E_K V)^2 / Var_K V] (arXiv 2503.01843 §3), slice by slice in plain
    Python loops over the kept index K' (no vectorised reductions), non-finite slices dropped."""
    kept = [d for d in range(v.ndim) if d not in axes]
    ratios = []
    for idx in itertools.product(*(range(v.shape[d]) for d in kept)):
        sl = [slice(None)] * v.ndim
        for d, i in zip(kept, idx):
            sl[d] = i
        xs = [float(x) for x in np.asarray(v[tuple(sl)]).reshape(-1)]
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / len(xs)
        r = mean * mean / var if var > 0 else math.inf
        if math.isfinite(r):
            ratios.append(r)
    return sum(ratios) / len(ratios) if ratios else math.nan


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 2, 4)])
def test_estimator_matches_the_definition(shape):
    gen = torch.Generator().manual_seed(len(shape))
    v = torch.rand(shape, generator=gen) ** 3 + torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)
    v[0] = 0.5                                     # a constant slice: infinite ratio, dropped
    assert dim_subsets(len(shape)) == [c for k in range(1, len(shape) + 1)
                                       for c in itertools.combinations(range(len(shape)), k)]
    for dims in dim_subsets(len(shape)):
        assert snr(v, dims) == pytest.approx(numpy_snr(v.numpy(), dims), rel=1e-9), dims


def test_estimator_on_a_hand_example():
    v = torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    assert snr(v, (1,)) == 4.0                     # row 0 has no variance; row 1: 2^2 / 1
    assert snr(v, (0,)) == 4.0
    assert snr(v, (0, 1)) == pytest.approx(1.5 ** 2 / 0.75)
    assert math.isnan(snr(torch.ones(3, 3), (1,)))


def test_schedule_is_the_references():
    t = SNRTracker(nn.Linear(2, 2))
    due = [s for s in range(1, 3001) if t.due(s)]
    assert due == [1] + list(range(100, 1000, 100)) + [1000, 2000, 3000]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = nn.Linear(40, 30, bias=False)   # v nearly constant along dim 1
        self.cols = nn.Linear(40, 30, bias=False)   # v nearly constant along dim 0
        self.noise = nn.Linear(40, 30, bias=False)  # heavy-tailed: nothing passes
        self.norm = nn.LayerNorm(30)                # would pass, but norms stay uncompressed


def test_rules_pick_the_highest_snr_above_the_cutoff():
    model = Two()
    gen = torch.Generator().manual_seed(0)
    jitter = 1 + 0.01 * torch.rand(30, 40, generator=gen)
    v = {"rows.weight": (torch.rand(30, 1, generator=gen) + 1) * jitter,
         "cols.weight": (torch.rand(1, 40, generator=gen) + 1) * jitter,
         "noise.weight": torch.exp(4 * torch.randn(30, 40, generator=gen)),
         "norm.weight": torch.ones(30) + 0.01 * torch.rand(30, generator=gen)}
    t = SNRTracker(model)
    t.measure(v, step=1)
    t.measure({k: x * 2 for k, x in v.items()}, step=2)  # scale-invariant: same SNR
    means, rules = t.mean_snr(), t.rules()
    # every set passes for rows/cols; the highest SNR wins, not the largest compression
    assert min(means["rows.weight"].values()) > 1 and rules["rows.weight"] == [1]
    assert min(means["cols.weight"].values()) > 1 and rules["cols.weight"] == [0]
    assert rules["noise.weight"] is None and max(means["noise.weight"].values()) < 1
    assert means["norm.weight"][(0,)] > 1 and rules["norm.weight"] is None
    assert rules["norm.bias"] is None                   # never measured
    assert all(r is None for r in t.rules(cutoff=1e9).values())


def _probe(opt_factory, steps=3, every=1):
    model = make_llama(seed=3)
    opt = opt_factory(model)
    t = SNRTracker(model, early_every=every)
    params = list(model.parameters())
    for step in range(steps):
        set_grads(params, make_grads(params, step))
        opt.step()
        t.update(opt)
    return model, t


def test_probe_with_memopt_torch_and_uncompressed_slimadam_agree():
    runs = [_probe(lambda m: memopt_core.AdamW(m.parameters(), lr=1e-3)),
            _probe(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
            _probe(lambda m: memopt_core.SlimAdam(m, lr=1e-3, rules=None))]
    base = runs[0][1].records
    assert len(base) == 3 * sum(len(dim_subsets(p.dim())) for p in runs[0][0].parameters())
    for _, t in runs[1:]:
        assert [r[:3] for r in t.records] == [r[:3] for r in base]
        assert np.allclose([r[3] for r in t.records], [r[3] for r in base], rtol=1e-4)


def test_probe_rules_round_trip_through_json_into_slimadam(tmp_path):
    model, t = _probe(lambda m: memopt_core.AdamW(m.parameters(), lr=1e-3), steps=4)
    path = tmp_path / "rules.json"
    rules = t.save_json(path, cutoff=0.5)          # 4 noisy steps: SNRs near 1
    assert json.loads(path.read_text()) == rules
    assert set(rules) == {n for n, _ in model.named_parameters()}
    assert any(r is not None for r in rules.values())
    opt = memopt_core.SlimAdam(model, rules=str(path))
    for b in opt.blocks.values():
        dims = rules[b.name]
        p = dict(model.named_parameters())[b.name]
        expected = tuple(p.shape) if dims is None else tuple(
            1 if d in dims else s for d, s in enumerate(p.shape))
        assert b.v_shape == expected, b.name
    assert opt.rules() == rules
    t.save_csv(tmp_path / "snr.csv")
    assert len((tmp_path / "snr.csv").read_text().splitlines()) == len(t.records) + 1


def test_compressed_second_moments_are_refused():
    with pytest.raises(ValueError, match="full Adam"):
        _probe(lambda m: memopt_core.SlimAdam(m, lr=1e-3))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _, t = _probe(lambda m: memopt_core.AdamW(m.parameters(), lr=1e-3), steps=2)
    t.plot(tmp_path / "snr.png")
    assert (tmp_path / "snr.png").read_bytes()[:4] == b"\x89PNG"


def test_memopt_snr_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_snr_subcommand(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.json"
    args = parser.parse_args(["snr", "--steps", "3", "--every", "1", "--batch-size", "2",
                              "--seq-len", "16", "--out", str(out)])
    assert args.func(args) == 0
    rules = json.loads(out.read_text())
    model = _probe_setup(args)[0]
    assert set(rules) == {n for n, _ in model.named_parameters()}
    memopt_core.SlimAdam(model, rules=str(out))
    assert "% saved" in capsys.readouterr().err
