"""`memopt compare`: each optimizer at its recommended lr unless overridden, --lr-sweep, the
study knobs, and the outputs (results.json, the PNG and its title). Tiny model, 2-3 steps."""
from __future__ import annotations

import json

import pytest

from memopt_core import OPTIMIZERS
from memopt_core.app import cli, compare, compare_cli

TINY = ["--model", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
        "--eval-batches", "1"]


@pytest.fixture
def captured(monkeypatch):
    """Runs nothing: records the TrainConfigs `memopt compare` would train."""
    seen = []
    monkeypatch.setattr(compare_cli, "compare", lambda configs: seen.extend(configs) or [])
    monkeypatch.setattr(compare_cli, "write_outputs", lambda *a: "")
    return seen


def test_every_optimizer_has_a_recommended_lr():
    for name, spec in OPTIMIZERS.items():
        assert spec.lr is not None and 1e-5 < spec.lr < 1, name
    assert OPTIMIZERS["apollo"].lr == OPTIMIZERS["apollo_mini"].lr == 1e-2  # APOLLO's scripts
    assert OPTIMIZERS["frugal"].lr == 1e-3  # FRUGAL's paper


def test_recommended_lr_is_used_and_overrides_win(captured, tmp_path):
    out = ["--out", str(tmp_path)]
    assert cli.main(["compare", "--optimizers", "adamw,frugal,apollo", *TINY, *out]) == 0
    assert {c.optimizer: c.lr for c in captured} == {
        n: OPTIMIZERS[n].lr for n in ("adamw", "frugal", "apollo")}
    captured.clear()
    # --lr sets every run's; a run's own lr= wins over it.
    assert cli.main(["compare", "--optimizers", "adamw frugal apollo:lr=3e-2,rank=4",
                     "--lr", "5e-3", *TINY, *out]) == 0
    assert [c.lr for c in captured] == [5e-3, 5e-3, 3e-2]
    assert captured[2].optimizer_kwargs == {"rank": 4}
    captured.clear()
    assert cli.main(["compare", "--optimizers", "adamw:lr=1e-4 apollo", *TINY, *out]) == 0
    assert [c.lr for c in captured] == [1e-4, OPTIMIZERS["apollo"].lr]


def test_knobs_reach_train_config(captured, tmp_path):
    assert cli.main(["compare", "--optimizers", "adamw apollo:betas=(0.8,0.9)", *TINY,
                     "--betas", "0.85,0.99", "--warmup", "0.25", "--min-lr", "0.05",
                     "--grad-clip", "0.5", "--seed", "7", "--weight-decay", "0.01",
                     "--out", str(tmp_path)]) == 0
    adamw, apollo = captured
    for c in captured:
        assert (c.warmup, c.min_lr, c.grad_clip, c.seed, c.weight_decay) == \
            (0.25, 0.05, 0.5, 7, 0.01)
    assert adamw.betas == (0.85, 0.99) and apollo.betas == (0.8, 0.9)  # the run's own wins
    captured.clear()
    assert cli.main(["compare", "--optimizers", "adamw", *TINY, "--out", str(tmp_path)]) == 0
    (c,) = captured  # defaults: TrainConfig's
    assert (c.betas, c.warmup, c.min_lr, c.grad_clip, c.seed) == ((0.9, 0.95), 0.1, 0.1, 1.0, 0)
    for bad in (["--betas", "0.9"], ["--betas", "0.9,1.5"], ["--warmup", "2"],
                ["--grad-clip", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(["compare", *TINY, *bad])


def test_lr_points():
    assert compare.lr_points(2e-3, 1) == [2e-3]
    assert compare.lr_points(2e-3, 3) == [1e-3, 2e-3, 4e-3]
    assert compare.lr_points(1e-2, 4, 3) == pytest.approx([1e-2 / 3, 1e-2, 3e-2, 9e-2], rel=1e-5)
    assert compare.lr_points(1e-3, 5) == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    with pytest.raises(ValueError):
        compare.lr_points(1e-3, 3, 1.0)


def test_lr_sweep_runs_k_points_and_reports_the_best(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    plotted = {}
    real_plot = compare._plot

    def spy(results, path, heading=None):
        plotted.update(heading=heading, rows=[r["optimizer"] for r in results])
        real_plot(results, path, heading)
    monkeypatch.setattr(compare, "_plot", spy)
    assert cli.main(["compare", "--optimizers", "adamw apollo:rank=4", "--lr-sweep", "3",
                     *TINY, "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    points, rows = data["points"], data["results"]
    assert len(points) == 6 and [p["arm"] for p in points] == ["adamw"] * 3 + ["apollo:rank=4"] * 3
    base = OPTIMIZERS["adamw"].lr
    assert [p["lr"] for p in points[:3]] == [base / 2, base, base * 2]
    assert [r["optimizer"] for r in rows] == ["adamw", "apollo:rank=4"]
    for r, group in zip(rows, (points[:3], points[3:])):
        assert len(r["sweep"]) == 3
        assert [s["lr"] for s in r["sweep"]] == [p["lr"] for p in group]
        assert r["val_loss"] == min(p["val_loss"] for p in group)
        assert r["lr"] == min(group, key=lambda p: p["val_loss"])["lr"]
        assert len(r["loss_curve"]) == 3
    setup = data["setup"]
    assert setup["lr_sweep"] == 3 and setup["model"] == "tiny" and setup["steps"] == 3
    assert setup["tokens"] == 3 * 2 * 16
    assert setup["title"].startswith("memopt compare: tiny (") and "3 steps" in setup["title"]
    assert "best validation loss of 3 lrs" in setup["title"]
    assert plotted == dict(heading=setup["title"], rows=["adamw", "apollo:rank=4"])
    text = capsys.readouterr().out
    assert "| adamw | " in text and "val loss at each lr" in text
    try:
        import matplotlib  # noqa: F401
        assert (out / "compare.png").stat().st_size > 10_000
    except ImportError:
        pass


def test_one_point_per_arm_without_a_sweep(tmp_path):
    """Without --lr-sweep: one run per arm, at its recommended lr (the table's lr column)."""
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--optimizers", "adamw adam_mini", *TINY, "--steps", "2",
                     "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [p["lr"] for p in data["points"]] == [OPTIMIZERS["adamw"].lr,
                                                 OPTIMIZERS["adam_mini"].lr]
    assert [len(r["sweep"]) for r in data["results"]] == [1, 1]
    assert "each optimizer at its recommended lr" in data["setup"]["title"]
    assert "| lr |" in (out / "results.md").read_text()


def test_plot_title_and_legend_labels(tmp_path, monkeypatch):
    """The PNG gets the title and one legend entry per optimizer naming its lr (checked on the
    figure, not the pixels)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    saved = {}
    monkeypatch.setattr(plt.Figure, "savefig",
                        lambda fig, path, **kw: saved.update(fig=fig, path=path))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    row = dict(optimizer="adamw", lr=2e-3, val_loss=2.5, train_loss=2.6, loss_curve=[3.0, 2.8, 2.6],
               state_bytes=8000, weights_bytes=4000, grads_bytes=4000, peak_bytes=30000,
               bytes_per_param=8.0, step_ms=1.0, iter_ms=2.0,
               sweep=[dict(lr=1e-3, val_loss=2.7, train_loss=2.8),
                      dict(lr=2e-3, val_loss=2.5, train_loss=2.6)])
    mini = {**row, "optimizer": "apollo", "lr": 1e-2, "state_bytes": 1000, "sweep": []}
    compare._plot([row, mini], tmp_path / "x.png", "memopt compare: tiny, 3 steps")
    fig = saved["fig"]
    assert fig._suptitle.get_text() == "memopt compare: tiny, 3 steps"
    (legend,) = fig.legends  # one legend, below the panels
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["adamw (lr 0.002): val 2.500", "apollo (lr 0.01): val 2.500"]
