"""`memopt compare`: the same model, seed and batches trained with each optimizer, in lockstep
(step i of every run, then step i+1, the starting run rotated) so that a busy machine slows all
runs alike and their times stay comparable. Each optimizer runs at its own learning rate (the
registry's recommended one unless told otherwise), or at each of a small geometric sweep around
it, reported at its best validation loss. Outputs a table, results.json and a PNG."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .train import TrainConfig, Trainer
from .memory import MiB

MEMORY_PROBE_STEP = 2  # peak measured on this iteration: the state exists, allocations settled


def lr_points(lr: float, k: int, factor: float = 2.0) -> list[float]:
    """`k` learning rates around `lr`, geometric: lr * factor**j for j from -((k-1)//2) to
    k//2, so `lr` itself is always one of them and an even k adds one more above it
    (k=3, factor 2: lr/2, lr, 2lr; k=4: lr/2, lr, 2lr, 4lr; k=5: lr/4 ... 4lr)."""
    if k < 1 or factor <= 1:
        raise ValueError(f"an lr sweep needs k >= 1 points and a factor > 1, got {k}, {factor}")
    lo = -((k - 1) // 2)
    return [float(f"{lr * factor ** j:.6g}") for j in range(lo, lo + k)]


def _progress(total: int):
    """A tqdm bar on a terminal; None (periodic log lines instead) in logs and CI."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return None


def compare(configs: list[TrainConfig]) -> list[dict]:
    """Train every config (same model/data/seed, any optimizer and lr); one result dict each, in
    the order of `configs`."""
    trainers = [Trainer(cfg) for cfg in configs]
    first = trainers[0]
    print(f"model: {first.cfg.model} ({sum(p.numel() for p in first.model.parameters()) / 1e6:.2f}M "
          f"params, {first.precision}), data: {first.corpus.source}; {first.cfg.steps} steps of "
          f"{first.cfg.batch_size}x{first.cfg.seq_len} tokens; runs: "
          f"{', '.join(f'{c.optimizer} lr {c.lr:g}' for c in configs)}", file=sys.stderr,
          flush=True)
    steps, memory = first.cfg.steps, {}
    bar = _progress(steps * len(trainers))
    order = list(range(len(trainers)))
    for i in range(steps):
        for k in order[i % len(order):] + order[:i % len(order)]:
            t = trainers[k]
            if t.step == MEMORY_PROBE_STEP:
                memory[k] = t.memory()  # runs this iteration under the profiler
            else:
                t.run_step()
            if bar is not None:
                bar.set_postfix_str(f"{t.cfg.label} loss {t.history['loss'][-1]:.3f}")
                bar.update()
        if bar is None and (i + 1) % max(1, steps // 10) == 0:
            print(f"  step {i + 1}/{steps}: " + ", ".join(
                f"{t.cfg.label} {t.history['loss'][-1]:.3f}" for t in trainers),
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    results = []
    for k, t in enumerate(trainers):
        r = t.summary()
        mem = memory.get(k, {})
        r.update(lr=t.cfg.lr, val_loss=t.evaluate(), weights_bytes=mem.get("weights"),
                 grads_bytes=mem.get("grads"), peak_bytes=mem.get("peak"),
                 data=t.corpus.source, loss_curve=t.history["loss"])
        results.append(r)
    return results


def best_of_sweep(points: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm (in first-seen order): its point with the lowest validation loss, named
    by the arm, with `sweep` listing every point's lr and losses. `arms[i]` names points[i]."""
    groups: dict[str, list[dict]] = {}
    for arm, p in zip(arms, points):
        groups.setdefault(arm, []).append(p)
    rows = []
    for arm, group in groups.items():
        finite = [p for p in group if math.isfinite(p["val_loss"])] or group
        best = min(finite, key=lambda p: p["val_loss"])
        rows.append({**best, "optimizer": arm, "sweep": [
            dict(lr=p["lr"], val_loss=p["val_loss"], train_loss=p["train_loss"]) for p in group]})
    return rows


def format_table(results: list[dict], baseline: str = "adamw") -> str:
    base = next((r["state_bytes"] for r in results if r["optimizer"] == baseline), None)
    rows = ["| optimizer | lr | state MB | bytes/param | state vs AdamW | peak MB | step ms "
            "| iter ms | train loss | val loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['state_bytes'] / base:.3f}" if base else "n/a"
        peak = f"{r['peak_bytes'] / MiB:.1f}" if r.get("peak_bytes") else "n/a"
        rows.append(f"| {r['optimizer']} | {r['lr']:g} | {r['state_bytes'] / MiB:.2f} | "
                    f"{r['bytes_per_param']:.2f} | {ratio} | {peak} | {r['step_ms']:.2f} | "
                    f"{r['iter_ms']:.1f} | {r['train_loss']:.4f} | {r['val_loss']:.4f} |")
    return "\n".join(rows)


def format_sweep(results: list[dict]) -> str:
    """Validation loss at every lr of each arm's sweep, the best in bold."""
    rows = ["| optimizer | val loss at each lr (best in bold) |", "|---|---|"]
    for r in results:
        cells = [f"**{p['lr']:g}: {p['val_loss']:.4f}**" if p["lr"] == r["lr"] else
                 f"{p['lr']:g}: {p['val_loss']:.4f}" for p in r.get("sweep", [])]
        rows.append(f"| {r['optimizer']} | {', '.join(cells)} |")
    return "\n".join(rows)


NOTES = ("MB = 2^20 bytes. lr: the peak learning rate the row ran at (warmup, then cosine "
         "decay); state: optimizer state bytes (opt.state_bytes()); peak: tensor memory at the "
         "peak of one training iteration (weights + state + gradients + activations), measured "
         "from the allocator; step ms: optimizer.step() alone, mean after the first step; iter "
         "ms: data + forward + backward + step; train loss: mean of the last 10 steps; val loss: "
         "held-out files, nats/token.")


def title(setup: dict) -> str:
    """The plot's title: model, size, steps, tokens and how the lrs were chosen."""
    params = setup.get("params")
    size = f" ({params / 1e6:.2f}M params)" if params else ""
    tokens = setup["steps"] * setup["batch_size"] * setup["seq_len"]
    lrs = setup.get("lr_choice", "")
    return (f"memopt compare: {setup['model']}{size}, {setup['steps']} steps x "
            f"{setup['batch_size']}x{setup['seq_len']} = {tokens / 1e6:.2f}M tokens"
            + (f"\n{lrs}" if lrs else ""))


def write_outputs(results: list[dict], out: Path, machine: dict, setup: dict | None = None,
                  points: list[dict] | None = None) -> str:
    """results.json (every number: the table's rows, the run's settings and title, and every
    point of an lr sweep), results.md (the table) and compare.png (when matplotlib is
    installed); returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    setup = dict(setup or {})
    if "model" in setup:
        setup["title"] = title(setup)
    table = format_table(results)
    if any(len(r.get("sweep", ())) > 1 for r in results):
        table += "\n\n" + format_sweep(results)
    (out / "results.json").write_text(json.dumps(
        dict(machine=machine, setup=setup, results=results,
             points=points if points is not None else results), indent=1))
    (out / "results.md").write_text(table + "\n\n" + NOTES + "\n")
    try:
        _plot(results, out / "compare.png", setup.get("title"))
    except ImportError:
        pass
    return table + "\n\n" + NOTES


def _smooth(curve: list[float]) -> list[float]:
    w = max(1, len(curve) // 12)  # moving average: single batches are noisy
    return [sum(curve[max(0, i - w + 1):i + 1]) / len(curve[max(0, i - w + 1):i + 1])
            for i in range(len(curve))]


def _plot(results: list[dict], path: Path, heading: str | None = None) -> None:
    """Four panels: train loss curves (legend: optimizer, its lr and validation loss),
    validation loss against lr (every sweep point, the reported one filled), optimizer state
    alone, and weights + gradients + state stacked at the peak of an iteration with the
    activations as a number over each bar (stacked, they would flatten the state differences
    into slivers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not results:
        return
    colors = plt.get_cmap("tab10").colors
    color = {r["optimizer"]: colors[i % len(colors)] for i, r in enumerate(results)}
    names = [r["optimizer"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (ax_loss, ax_val), (ax_state, ax_mem) = axes

    tail = []
    for r in results:
        curve = _smooth(r["loss_curve"])
        ax_loss.plot(range(1, len(curve) + 1), curve, color=color[r["optimizer"]],
                     label=f"{r['optimizer']} (lr {r['lr']:g}): val {r['val_loss']:.3f}")
        tail += curve[len(curve) // 3:]
    if tail and all(map(math.isfinite, tail)):  # the first steps' loss would flatten the rest
        lo, hi = min(tail), max(tail)
        ax_loss.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax_loss.set(xlabel="step", ylabel="train loss (moving average)", title="training loss")

    for r in results:
        sweep = sorted(r.get("sweep") or [dict(lr=r["lr"], val_loss=r["val_loss"])],
                       key=lambda p: p["lr"])
        c = color[r["optimizer"]]
        ax_val.plot([p["lr"] for p in sweep], [p["val_loss"] for p in sweep], "o-", color=c,
                    mfc="white")
        ax_val.plot([r["lr"]], [r["val_loss"]], "o", color=c, ms=8)
    ax_val.set_xscale("log")
    ax_val.set(xlabel="peak learning rate", ylabel="validation loss (nats/token)",
               title="validation loss vs lr (filled: the reported run)")

    state = [r["state_bytes"] / MiB for r in results]
    bars = ax_state.bar(names, state, color=[color[n] for n in names])
    base = next((r["state_bytes"] for r in results if r["optimizer"] == "adamw"), None)
    ax_state.bar_label(bars, [f"{s:.2f}" + (f"\n{r['state_bytes'] / base:.2f}x" if base else "")
                              for s, r in zip(state, results)], fontsize=8, padding=2)
    ax_state.set_ylim(0, 1.25 * max(state + [1e-9]))
    ax_state.set(ylabel="MB", title="optimizer state (x AdamW's)")
    ax_state.tick_params(axis="x", rotation=30)

    parts = {"weights": [r.get("weights_bytes") or 0 for r in results],
             "gradients": [r.get("grads_bytes") or 0 for r in results],
             "optimizer state": [r["state_bytes"] for r in results]}
    bottom = [0.0] * len(results)
    for (label, values), shade in zip(parts.items(), ("#4c72b0", "#8da0cb", "#dd8452")):
        mb = [v / MiB for v in values]
        bars = ax_mem.bar(names, mb, bottom=bottom, label=label, color=shade)
        bottom = [b + v for b, v in zip(bottom, mb)]
    # Activations are kept apart, as a number over each bar: on a small model they are most of
    # the peak, and stacked they would flatten the state differences into slivers.
    activations = [max(0.0, (r.get("peak_bytes") or 0) / MiB - b) for r, b in zip(results, bottom)]
    ax_mem.bar_label(bars, [f"{b:.1f}" + (f"\n+{a:.0f} act." if a else "")
                            for b, a in zip(bottom, activations)], fontsize=8, padding=2)
    ax_mem.set_ylim(0, 1.45 * max(bottom + [1e-9]))  # headroom: the legend sits above every bar
    ax_mem.set(ylabel="MB", title="weights + gradients + state at the peak of an iteration\n"
                                  "(activations and other transients apart, over the bars)")
    ax_mem.tick_params(axis="x", rotation=30)
    ax_mem.legend(loc="upper right", ncol=3, fontsize=8)
    for ax in (ax_state, ax_mem):
        for lab in ax.get_xticklabels():
            lab.set_ha("right")
    # One legend for the whole figure, below the panels, where it covers no curve and no bar.
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", fontsize=9,
               ncol=min(3, len(results)), title="optimizer (peak lr): final validation loss")
    if heading:
        fig.suptitle(heading)
    rows = -(-len(results) // 3)
    fig.tight_layout(rect=(0, 0.035 + 0.03 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not math.isfinite(sum(bottom)):
        raise ValueError("non-finite memory numbers")
