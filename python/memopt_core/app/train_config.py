"""TrainConfig: the settings of one `memopt train` / `memopt compare` run, checked."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist

from ..registry import OPTIMIZERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A run's weight formats (--dtype): one dtype for every weight, or "int8": the attention and MLP
# linears as int8 codes with a float32 scale per INT8_GROUP weights (memopt_core.
# quantize_weights_), every other weight in bf16 (the storage dtype WEIGHT_FORMATS gives).
WEIGHT_FORMATS = {**DTYPES, "int8": torch.bfloat16}
INT8_GROUP = 128


def rounding_kwargs(rounding: str, dtype: str, seed: int = 0) -> dict:
    """The optimizer options of a run's `rounding` ("stochastic" / "nearest") for its weights'
    dtype: stochastic rounding of low-precision weights, seeded by the run's seed (fp32 weights
    have nothing to round)."""
    if rounding != "stochastic" or dtype == "fp32":
        return {}
    return dict(stochastic_rounding=True, rounding_seed=seed & (2 ** 63 - 1))


def dtype_name(dtype: torch.dtype) -> str:
    """DTYPES' name of a dtype ("fp32", "bf16")."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    model: str = "tiny"
    arch: str = "llama"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: Optional[float] = None  # peak lr; None: the optimizer's recommended one (registry)
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.1        # fraction of steps with linear warmup
    min_lr: float = 0.1        # cosine decays to this fraction of lr
    grad_clip: float = 1.0     # global-norm clipping; 0 disables (must be 0 with layerwise)
    grad_accum: int = 1
    layerwise: bool = False
    checkpoint_activations: bool = False  # recompute each layer in backward (models.run_layers)
    dtype: str = "fp32"        # weight format (and state dtype): fp32, bf16 or int8
    compute_dtype: Optional[str] = None  # fp32 / bf16; None: by device (compute_dtype.py)
    rounding: str = "stochastic"  # of bf16 weights: "stochastic" (seeded by seed) or "nearest"
    eval_every: int = 0        # 0: validate at the end only
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    data: Optional[str] = None
    tokenizer: str = "byte"
    vocab_size: int = 8192     # BPE only
    optimizer_kwargs: dict = field(default_factory=dict)
    # "skip": a step whose gradients hold an inf/NaN changes nothing (history["skipped"]);
    # "propagate": torch's behaviour
    nonfinite: str = "skip"
    fsdp: bool = False         # FSDP2 over the initialised process group (see the module doc)

    @property
    def rounding_kwargs(self) -> dict:
        return rounding_kwargs(self.rounding, self.dtype, self.seed)

    def __post_init__(self):
        if self.lr is None and self.optimizer in OPTIMIZERS:  # an unknown name: check() says so
            self.lr = OPTIMIZERS[self.optimizer].peak_lr()

    @property
    def label(self) -> str:
        """The optimizer and its extra settings, as `memopt compare` names a run: its own
        options, then lr / weight_decay / betas where they differ from the defaults (the
        optimizer's recommended lr, TrainConfig's others)."""
        default = {f.name: f.default for f in fields(self)}
        if self.optimizer in OPTIMIZERS:
            default["lr"] = OPTIMIZERS[self.optimizer].lr
        run = {name: getattr(self, name) for name in ("lr", "weight_decay", "betas")
               if _as_tuple(getattr(self, name)) != _as_tuple(default[name])}
        extra = ",".join(f"{k}={v}" for k, v in {**self.optimizer_kwargs, **run}.items())
        return f"{self.optimizer}:{extra}" if extra else self.optimizer

    def check(self) -> None:
        if self.layerwise and self.grad_clip:
            raise ValueError("gradient clipping by global norm needs every gradient at once, "
                             "which layer-wise stepping never holds: set grad_clip=0 "
                             "(--grad-clip 0) with --layerwise")
        if self.dtype not in WEIGHT_FORMATS:
            raise ValueError(f"dtype must be one of {sorted(WEIGHT_FORMATS)}, got {self.dtype!r}")
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)} or None (by "
                             f"device), got {self.compute_dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None else
                   f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no GPU")
            raise ValueError(f"device {self.device!r}: no CUDA device ({why}); use --device cpu")
        if self.dtype == "int8" and (self.fsdp or device.type not in ("cpu", "cuda")):
            raise ValueError("int8 weights are updated on the CPU and on CUDA, without FSDP2, "
                             "in this version; use --dtype bf16 there")
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fsdp:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("fsdp needs an initialised process group: launch with torchrun "
                                 "(torchrun --nproc_per_node N -m memopt_core.app.cli train --fsdp)")
            if self.batch_size % dist.get_world_size():
                raise ValueError(f"batch_size {self.batch_size} must be a multiple of the "
                                 f"{dist.get_world_size()} ranks (each takes an equal slice)")
