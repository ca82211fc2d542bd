"""memopt optimizers in the Hugging Face Trainer.

The Trainer takes an optimizer two ways, and both keep each optimizer's partition:

    opt = memopt_core.AdamMini(model, lr=3e-4, weight_decay=0.1)
    trainer = Trainer(model=model, args=args, optimizers=(opt, None))

    trainer = Trainer(model=model, args=args,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("apollo", model, args))

With `optimizer_cls_and_kwargs` the Trainer calls the class itself, with its own two param groups
(decay / no decay) of bare tensors. Those carry no names, so the kwargs built here hold
`model=model` (memopt_core.sources: the model gives the names and roles; the Trainer passes it as
the parameters when it finds a "model" key). The learning rate, betas, eps and weight decay come
from the TrainingArguments when `args` is given; keyword arguments override them.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import OPTIMIZERS

__all__ = ["optimizer_cls_and_kwargs"]


def optimizer_cls_and_kwargs(name: str, model: nn.Module, args: Any = None,
                             **hparams) -> tuple[type, dict]:
    """(optimizer class, kwargs) for Trainer(optimizer_cls_and_kwargs=...): memopt optimizer
    `name` (a key of memopt_core.OPTIMIZERS) over `model`, hyperparameters from `args` (a
    TrainingArguments) overridden by `hparams`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    from_args = {}
    if args is not None:
        from_args = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         eps=args.adam_epsilon, weight_decay=args.weight_decay)
    return spec.cls, {**spec.defaults, **from_args, **hparams, "model": model}
