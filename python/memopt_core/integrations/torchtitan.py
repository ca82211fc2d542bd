"""memopt optimizers in torchtitan 0.3.0.

torchtitan builds its optimizer from `Trainer.Config.optimizer` (an `OptimizersContainer.Config`)
with `config.optimizer.build(model_parts=...)` after parallelizing the model, steps it with
`optimizers.step()`, schedules its learning rate per optimizer (`LRSchedulersContainer`) and saves
it through its checkpointer as a DCP `Stateful` (a flat, FQN-keyed state dict).
`MemoptOptimizersContainer` is that component over any optimizer of `memopt_core.OPTIMIZERS`:
one optimizer per model part, built from the part itself, so roles come from the module tree
(torchtitan's fused `wqkv`, norms, embedding, `lm_head`), and its state goes through
torchtitan's own flat state dict, so the checkpointer saves, reshards and resumes it.

    from torchtitan.models.llama3.config_registry import llama3_8b
    from memopt_core.integrations.torchtitan import memopt_config

    def llama3_8b_adam_mini():          # in your module, launched with --module/--config
        return memopt_config(llama3_8b(), "adam_mini", lr=3e-4)

Importing this module imports torchtitan; `import memopt_core` does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

try:
    from torchtitan.components.checkpointer.utils import canonical_fqn
    from torchtitan.components.optimizer import OptimizersContainer
except ImportError as e:  # torchtitan absent, or its model code without triton
    raise ImportError(
        "memopt_core.integrations.torchtitan needs torchtitan 0.3.0: "
        "pip install torchtitan==0.3.0 triton (torchtitan's model code imports triton)") from e

from ..registry import OPTIMIZERS

__all__ = ["MemoptOptimizersContainer", "memopt_config", "llama3_debugmodel_memopt",
           "llama3_8b_memopt"]


class MemoptOptimizersContainer(OptimizersContainer):
    """torchtitan's `OptimizersContainer` over one memopt optimizer per model part.

    `config.name` is a key of `memopt_core.OPTIMIZERS`; `lr`, `betas`, `eps`, `weight_decay`
    (torchtitan's `default_adamw` values by default) and `options` (the optimizer's own keyword
    arguments: `rank`, `density`, `roles`, ...) are passed to it. Each optimizer is built from
    its whole model part, as the registry builds it from a model, so it sees the module tree:
    torchtitan's regex `param_groups` cannot be combined with that and must stay empty; for
    per-tensor choices use the optimizer's own options (`options={"roles": {...}}`).
    `implementation` does not apply (memopt optimizers always run their fused ops); its bf16-state
    mode raises. Everything else is torchtitan's:
    `step`, `zero_grad`, step hooks, the LR schedulers, and `state_dict()` / `load_state_dict()`
    (flat `state.{fqn}.{key}` / `param_groups.{fqn}.{key}` entries, FQNs without activation-
    checkpoint or compile wrappers), which the checkpointer saves and loads through DCP.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        name: str = "adam_mini"
        """Optimizer: a key of memopt_core.OPTIMIZERS (adamw, adam_mini, slim_adam, ...)."""
        lr: float = 8e-4
        betas: tuple[float, float] = (0.9, 0.95)
        eps: float = 1e-8
        weight_decay: float = 0.1
        options: dict[str, Any] = field(default_factory=dict)
        """The optimizer's own keyword arguments (e.g. {"rank": 128} for apollo)."""

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        _check_config(config)
        hparams = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                       weight_decay=config.weight_decay, **config.options)
        self.model_parts = model_parts
        self.optimizers = [OPTIMIZERS[config.name].make(part, **hparams) for part in model_parts]
        trainable = []
        for part, optimizer in zip(model_parts, self.optimizers):
            _canonical_names(part, optimizer)
            trainable += [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._validate_params(trainable)  # every trainable parameter in exactly one optimizer
        self._post_init(trainable)


def _check_config(config) -> None:
    """The torchtitan fields a memopt container cannot honour raise instead of being ignored."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {config.name!r} is not a memopt optimizer; choose from "
                         f"{sorted(OPTIMIZERS)}")
    if config.param_groups:
        raise ValueError(
            "MemoptOptimizersContainer builds one memopt optimizer per model part from the part "
            "itself (roles need the module tree), so optimizer.param_groups must be empty; set "
            "per-tensor roles with optimizer.options={'roles': {pattern: role}} or use "
            "torchtitan's OptimizersContainer for regex param groups")
    if config.optimizer_factory_kwargs_by_name:
        raise ValueError("optimizer.optimizer_factory_kwargs_by_name is for torchtitan's "
                         "factories; pass memopt options through optimizer.options")
    if config.implementation == "fused_opt_states_bf16":
        raise ValueError("implementation='fused_opt_states_bf16' is torchtitan's bf16-state hook "
                         "for torch.optim.Adam/AdamW; memopt optimizers always run their fused "
                         "ops, leave implementation at its default")


def _canonical_names(part: nn.Module, optimizer) -> None:
    """Name every group's parameters with torchtitan's canonical FQNs (activation-checkpoint and
    compile wrappers stripped), as its own containers do: its flat state dict is keyed by them,
    so a checkpoint loads whatever wrappers the resuming run applies. AdamW is built from bare
    parameters and gets its names here."""
    names = {id(p): canonical_fqn(n) for n, p in part.named_parameters()}
    for group in optimizer.param_groups:
        group["param_names"] = [names[id(p)] for p in group["params"]]


def memopt_config(trainer_config, name: str, **hparams):
    """`trainer_config` (a torchtitan `Trainer.Config`) with its optimizer replaced by memopt
    optimizer `name` (a key of memopt_core.OPTIMIZERS). `hparams`: lr, betas, eps, weight_decay
    (torchtitan's default_adamw values unless given; lr defaults to the config's current lr when
    it has a single param group) and the optimizer's own options (rank=, density=, roles=...)."""
    fields = set(MemoptOptimizersContainer.Config.__dataclass_fields__) - {"options"}
    groups = getattr(trainer_config.optimizer, "param_groups", [])
    if "lr" not in hparams and len(groups) == 1 and "lr" in groups[0].optimizer_kwargs:
        hparams["lr"] = groups[0].optimizer_kwargs["lr"]
    common = {k: v for k, v in hparams.items() if k in fields}
    options = {k: v for k, v in hparams.items() if k not in fields}
    trainer_config.optimizer = MemoptOptimizersContainer.Config(name=name, options=options,
                                                                **common)
    return trainer_config


# Config functions for torchtitan's launcher (`--module memopt_core.integrations.torchtitan
# --config llama3_debugmodel_memopt --optimizer.name apollo_mini`): its llama3 configs, same
# everything, with a memopt optimizer (Adam-mini unless --optimizer.name says otherwise).
def llama3_debugmodel_memopt():
    from torchtitan.models.llama3.config_registry import llama3_debugmodel
    return memopt_config(llama3_debugmodel(), "adam_mini")


def llama3_8b_memopt():
    from torchtitan.models.llama3.config_registry import llama3_8b
    return memopt_config(llama3_8b(), "adam_mini")
