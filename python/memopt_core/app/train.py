"""The training loop behind `memopt train` and `memopt compare`: LLaMA-style model, built-in or
user corpus, warmup + cosine schedule, gradient clipping, gradient accumulation, optional
layer-wise stepping and bf16 weights, periodic validation, and atomic checkpoints from which a
resumed run reproduces the uninterrupted one bit for bit (model, optimizer, scheduler, RNG and
data position are all saved).

With fsdp=True (`torchrun ... -m memopt_core.app.cli train --fsdp`) every decoder block and the root
are sharded with FSDP2 over the initialised process group; each rank trains on its slice of the
same global batch, so the run equals one process on that batch. Checkpoints are then DCP
directories (torch.distributed.checkpoint: each rank writes its shards of model and optimizer),
plus the trainer's own state and each rank's RNG, published atomically through a symlink."""
from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .compute_dtype import resolve_compute_dtype
from .corpus import Corpus, load
from ..layerwise import LayerwiseStep
from .memory import distinct_bytes, optimizer_state_bytes, peak_during, weight_bytes
from .models import build, num_params, to_weight_format
from ..registry import OPTIMIZERS, make_optimizer
from .train_config import WEIGHT_FORMATS, TrainConfig, dtype_name

CHECKPOINT = "last.pt"
DCP_CHECKPOINT = "last.dcp"  # with fsdp: a symlink to the newest complete DCP directory


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 to `floor`."""

    def __init__(self, steps: int, warmup: int, floor: float):
        self.steps, self.warmup, self.floor = steps, warmup, floor

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.steps - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One model + optimizer + data stream. `run_step()` does one optimizer step (grad_accum
    micro-batches); `save`/`load` checkpoint everything the trajectory depends on."""

    def __init__(self, cfg: TrainConfig, corpus: Optional[Corpus] = None):
        cfg.check()
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.corpus = corpus or load(cfg.data, cfg.tokenizer, cfg.vocab_size)
        torch.manual_seed(cfg.seed)  # same seed -> same initial weights for every optimizer
        self.model = build(cfg.model, cfg.arch, vocab_size=self.corpus.vocab_size)
        to_weight_format(self.model, cfg.dtype, self.device)
        self.model.compute_dtype = resolve_compute_dtype(WEIGHT_FORMATS[cfg.dtype], self.device,
                                                         cfg.compute_dtype)
        self.model.checkpoint_activations = cfg.checkpoint_activations
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if cfg.fsdp else (0, 1)
        if cfg.fsdp:
            spec = OPTIMIZERS.get(cfg.optimizer)
            shard_model(self.model, spec and spec.cls.fsdp_placement(**cfg.optimizer_kwargs))
        self.opt = make_optimizer(cfg.optimizer, self.model, lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay, nonfinite=cfg.nonfinite,
                                  **cfg.rounding_kwargs, **cfg.optimizer_kwargs)
        warmup = max(1, int(cfg.steps * cfg.warmup))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(cfg.steps, warmup, cfg.min_lr))
        self.layerwise = LayerwiseStep(self.opt, cfg.grad_accum) if cfg.layerwise else None
        self.stream = self.corpus.stream(cfg.seq_len, cfg.batch_size, cfg.seed)
        self.step = 0
        self.history: dict[str, list] = {"loss": [], "val": [], "step_ms": [], "iter_ms": [],
                                         "skipped": []}  # steps left out (nonfinite="skip")

    # ---- training ------------------------------------------------------------------------
    def run_step(self) -> float:
        cfg, t0 = self.cfg, time.perf_counter()
        total, skipped = 0.0, self.opt.skipped_steps
        for _ in range(cfg.grad_accum):
            # Every rank reads the same global batch and takes its slice (equal token counts, so
            # the mean of the ranks' losses and gradients is the global batch's).
            x, y = (t.chunk(self.world)[self.rank].to(self.device) for t in next(self.stream))
            _, loss = self.model(x, y)
            (loss / cfg.grad_accum).backward()  # layer-wise: parameters are stepped in here
            total += loss.item() / cfg.grad_accum
        if cfg.fsdp:  # the global batch's loss, the same on every rank
            total_t = torch.tensor([total], dtype=torch.float64, device=self.device)
            dist.all_reduce(total_t)
            total = total_t.item() / self.world
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self._sync()
        t1 = time.perf_counter()
        self.opt.step()  # with layer-wise stepping a no-op: no gradient is left
        self._sync()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        if self.opt.skipped_steps != skipped:  # (layer-wise: some parameters' updates)
            self.history["skipped"].append(self.step)
        self.history["loss"].append(total)
        self.history["step_ms"].append(1e3 * (t2 - t1))
        self.history["iter_ms"].append(1e3 * (t2 - t0))
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
            self.history["val"].append((self.step, self.evaluate()))
        return total

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy (nats/token) over the fixed validation windows."""
        self.model.eval()
        losses = [self.model(x.to(self.device), y.to(self.device))[1].item()
                  for x, y in self.corpus.val_batches(self.cfg.seq_len, self.cfg.batch_size,
                                                      self.cfg.eval_batches)]
        self.model.train()
        return statistics.fmean(losses)

    def memory(self) -> dict:
        """Bytes of weights, optimizer state and the gradients alive at the peak, and the peak
        tensor memory of one iteration (measured on the next iteration, which this call runs)."""
        params = list(self.model.parameters())
        weights, state = weight_bytes(params), optimizer_state_bytes(self.opt)
        extra = peak_during(self.run_step, self.device)
        # Gradients alive at the peak: all of them before step(), one at a time layer-wise.
        trained = [p for p in params if p.requires_grad]
        grads = (max(distinct_bytes([p]) for p in trained) if self.cfg.layerwise
                 else distinct_bytes(trained))
        return dict(weights=weights, state=state, grads=grads, peak=weights + state + extra,
                    transient=extra)

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                    **self._rest_state())

    @property
    def precision(self) -> str:
        """The weights' dtype, and the compute dtype where it differs: "bf16, fp32 compute"."""
        compute = dtype_name(self.model.compute_dtype)
        return self.cfg.dtype + ("" if compute == self.cfg.dtype else f", {compute} compute")

    def _rest_state(self) -> dict:
        return dict(version=1, config=asdict(self.cfg), step=self.step,
                    scheduler=self.sched.state_dict(), data=self.stream.state_dict(),
                    layerwise=self.layerwise.state_dict() if self.layerwise else None,
                    rng=torch.get_rng_state(), history=self.history,
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def save(self, path) -> None:
        if self.cfg.fsdp:
            return self._save_dcp(Path(path))
        atomic_save(self.state_dict(), path)

    def load(self, path) -> None:
        if self.cfg.fsdp:
            return self._load_dcp(Path(path))
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, garbage, not a torch file: say so, and what to do
            raise ValueError(
                f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"It is truncated or not a `memopt train` checkpoint; saves replace it atomically, "
                f"so it was damaged outside a save. Resume from a copy you kept, or start over "
                f"without --resume") from None
        missing = {"config", "model", "optimizer", "scheduler", "data", "rng"} - \
            (set(ckpt) if isinstance(ckpt, dict) else set())
        if missing:
            raise ValueError(f"{path} is not a `memopt train` checkpoint (no {sorted(missing)}); "
                             "start over without --resume, or point --ckpt-dir at the run's own "
                             "directory")
        self._check_config(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self._load_rest(ckpt)

    def _check_config(self, ckpt: dict, path) -> None:
        mine = asdict(self.cfg)
        # a setting added after the checkpoint was written: it ran at that setting's default
        saved = {**{f.name: f.default for f in fields(TrainConfig)}, **ckpt["config"]}
        # settings that do not change the trajectory may differ on resume
        free = ("eval_every", "device", "checkpoint_activations")
        differ = [k for k in mine if k not in free and mine[k] != saved.get(k)]
        if differ:
            raise ValueError(f"checkpoint {path} was written with other settings: " + ", ".join(
                f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in differ))

    def _load_rest(self, ckpt: dict) -> None:
        """Everything but model and optimizer: scheduler, data position, layer-wise counters,
        RNG, step and history."""
        self.sched.load_state_dict(ckpt["scheduler"])
        self.stream.load_state_dict(ckpt["data"])
        if self.layerwise:
            self.layerwise.load_state_dict(ckpt["layerwise"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.step = ckpt["step"]
        self.history = {**{k: [] for k in self.history}, **ckpt["history"]}

    # ---- FSDP2 checkpoints (DCP) -----------------------------------------------------------
    # `path` (e.g. ckpt_dir/last.dcp) is a symlink to the directory of the newest complete
    # checkpoint, step-<N>.dcp beside it: a new one is written whole first and the link is then
    # replaced in one rename, so a crash leaves the previous checkpoint in place.
    def _save_dcp(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        target = path.with_name(f"step-{self.step}.dcp")
        if self.rank == 0:
            shutil.rmtree(target, ignore_errors=True)  # a torn write of this step
        dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(target))
        rest = self._rest_state()
        # RNG is per rank; the rest is the same on every rank and written once.
        atomic_save({"rng": rest.pop("rng"), "cuda_rng": rest.pop("cuda_rng")},
                    target / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            atomic_save(rest, target / "trainer.pt")
        dist.barrier()
        if self.rank == 0:
            link = path.with_name(f".{path.name}.tmp")
            link.unlink(missing_ok=True)
            link.symlink_to(target.name)
            old = path.resolve() if path.is_symlink() else None
            os.replace(link, path)
            if old is not None and old != target.resolve():
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _load_dcp(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        path = path.resolve()
        rest = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self._check_config(rest, path)
        rng = path / f"rng-rank{self.rank}.pt"
        if not rng.exists():
            raise ValueError(f"checkpoint {path} has no RNG state of rank {self.rank}: it was "
                             f"written by fewer ranks; resume with the same number of ranks")
        # get_state_dict gives this run's sharded tensors (creating the optimizer state if it
        # has none yet) for DCP to load into, each rank reading only its own shards.
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self._load_rest({**rest, **torch.load(rng, map_location="cpu", weights_only=False)})

    def summary(self) -> dict:
        h, n = self.history, num_params(self.model)
        state = optimizer_state_bytes(self.opt)
        steady = h["step_ms"][1:] or h["step_ms"]  # the first step allocates the state
        return dict(optimizer=self.cfg.label, params=n, state_bytes=state,
                    bytes_per_param=state / n, step_ms=statistics.fmean(steady),
                    iter_ms=statistics.fmean(h["iter_ms"][1:] or h["iter_ms"]),
                    train_loss=statistics.fmean(h["loss"][-10:]))


def shard_model(model: nn.Module, placement=None) -> None:
    """FSDP2: each block of the model's block list (LLaMA's model.layers, GPT's h) its own
    unit, so one block's full weights exist at a time, then the root (embedding, output).
    placement: the optimizer's shard_placement_fn (None: rows)."""
    from torch.distributed.fsdp import fully_shard
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`:
    a crash at any point leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
