"""`memopt compare`: the same model, seed and batches trained with each optimizer, in lockstep
(step i of every run, then step i+1, the starting run rotated) so that a busy machine slows all
runs alike and their times stay comparable. Outputs a table, results.json and a PNG."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .train import TrainConfig, Trainer
from .memory import MiB

MEMORY_PROBE_STEP = 2  # peak measured on this iteration: the state exists, allocations settled


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
    """Train every config (one per optimizer, same model/data/seed); one result dict each."""
    trainers = [Trainer(cfg) for cfg in configs]
    first = trainers[0]
    print(f"model: {first.cfg.model} ({sum(p.numel() for p in first.model.parameters()) / 1e6:.2f}M "
          f"params, {first.cfg.dtype}), data: {first.corpus.source}; {first.cfg.steps} steps of "
          f"{first.cfg.batch_size}x{first.cfg.seq_len} tokens; optimizers: "
          f"{', '.join(c.label for c in configs)}", file=sys.stderr, flush=True)
    steps, memory = first.cfg.steps, {}
    bar = _progress(steps * len(trainers))
    for i in range(steps):
        for t in trainers[i % len(trainers):] + trainers[:i % len(trainers)]:
            if t.step == MEMORY_PROBE_STEP:
                memory[t.cfg.label] = t.memory()  # runs this iteration under the profiler
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
    for t in trainers:
        r = t.summary()
        mem = memory.get(t.cfg.label, {})
        r.update(val_loss=t.evaluate(), weights_bytes=mem.get("weights"),
                 grads_bytes=mem.get("grads"), peak_bytes=mem.get("peak"),
                 loss_curve=t.history["loss"])
        results.append(r)
    return results


def format_table(results: list[dict], baseline: str = "adamw") -> str:
    base = next((r["state_bytes"] for r in results if r["optimizer"] == baseline), None)
    rows = ["| optimizer | state MB | bytes/param | state vs AdamW | peak MB | step ms | iter ms "
            "| train loss | val loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['state_bytes'] / base:.3f}" if base else "n/a"
        peak = f"{r['peak_bytes'] / MiB:.1f}" if r.get("peak_bytes") else "n/a"
        rows.append(f"| {r['optimizer']} | {r['state_bytes'] / MiB:.2f} | "
                    f"{r['bytes_per_param']:.2f} | {ratio} | {peak} | {r['step_ms']:.2f} | "
                    f"{r['iter_ms']:.1f} | {r['train_loss']:.4f} | {r['val_loss']:.4f} |")
    return "\n".join(rows)


NOTES = ("MB = 2^20 bytes. state: optimizer state bytes (opt.state_bytes()); peak: tensor memory "
         "at the peak of one training iteration (weights + state + gradients + activations), "
         "measured from the allocator; step ms: optimizer.step() alone, mean after the first "
         "step; iter ms: data + forward + backward + step; train loss: mean of the last 10 "
         "steps; val loss: held-out files, nats/token.")


def write_outputs(results: list[dict], out: Path, machine: dict) -> str:
    """results.json (every number), results.md (the table) and compare.png (when matplotlib
    is installed); returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(dict(machine=machine, results=results), indent=1))
    (out / "results.md").write_text(table + "\n\n" + NOTES + "\n")
    try:
        _plot(results, out / "compare.png")
    except ImportError:
        pass
    return table + "\n\n" + NOTES


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        curve = r["loss_curve"]
        w = max(1, len(curve) // 30)  # moving average: single batches are noisy
        smooth = [sum(curve[max(0, i - w + 1):i + 1]) / len(curve[max(0, i - w + 1):i + 1])
                  for i in range(len(curve))]
        ax_loss.plot(range(1, len(curve) + 1), smooth, label=r["optimizer"])
    ax_loss.set(xlabel="step", ylabel="train loss (moving average)", title="loss")
    ax_loss.legend()
    names = [r["optimizer"] for r in results]
    parts = {"weights": [r.get("weights_bytes") or 0 for r in results],
             "gradients": [r.get("grads_bytes") or 0 for r in results],
             "optimizer state": [r["state_bytes"] for r in results]}
    parts["activations + other"] = [max(0, (r.get("peak_bytes") or 0) - sum(p[i] for p in parts.values()))
                                    for i, r in enumerate(results)]
    bottom = [0.0] * len(results)
    for label, values in parts.items():
        mb = [v / MiB for v in values]
        ax_mem.bar(names, mb, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, mb)]
    ax_mem.set(ylabel="MB", title="memory at the peak of an iteration")
    ax_mem.tick_params(axis="x", rotation=30)
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not math.isfinite(sum(bottom)):
        raise ValueError("non-finite memory numbers")
