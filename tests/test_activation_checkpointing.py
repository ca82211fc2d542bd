"""Activation checkpointing in the reference models (models.run_layers) and `memopt train
--checkpoint-activations`: the same gradients and trajectory as without it (the oracle: the
model run without checkpointing), far fewer activations kept from the forward."""
from __future__ import annotations

import pytest
import torch

from memopt_core.app.cli import main
from memopt_core.app.models import build
from test_train import assert_same_params, params_of, trainer


def _grads_and_saved_bytes(arch: str, recompute: bool):
    """The gradients of one loss, and the bytes autograd saved during the forward."""
    torch.manual_seed(0)
    model = build("tiny", arch)
    model.checkpoint_activations = recompute
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)[1]
    saved_in_forward = sum(saved)
    loss.backward()
    return [p.grad for p in model.parameters()], saved_in_forward


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_checkpointed_layers_give_the_same_gradients_and_keep_less(arch):
    plain, plain_bytes = _grads_and_saved_bytes(arch, recompute=False)
    ckpt, ckpt_bytes = _grads_and_saved_bytes(arch, recompute=True)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    # what the forward keeps: each layer's inputs instead of everything inside the layers
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_no_recompute_without_grad():
    model = build("tiny")
    model.checkpoint_activations = True
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():  # evaluation: nothing to recompute, no checkpoint warnings
        logits, _ = model(idx)
    assert logits.shape == (1, 16, 256)


@pytest.mark.parametrize("kw", [dict(optimizer="adam_mini"),
                                dict(optimizer="apollo_mini", layerwise=True, grad_clip=0.0,
                                     grad_accum=2)])
def test_training_with_checkpointing_follows_the_same_trajectory(kw):
    """Layer-wise stepping included: its hooks fire once per parameter, after the recompute."""
    plain, ckpt = trainer(steps=3, **kw), trainer(steps=3, checkpoint_activations=True, **kw)
    for _ in range(3):
        plain.run_step()
        ckpt.run_step()
    assert_same_params(params_of(plain), params_of(ckpt))


def test_cli_train_takes_checkpoint_activations(tmp_path, capsys):
    run = ["train", "--optimizer", "adamw", "--batch-size", "2", "--seq-len", "16",
           "--eval-every", "0", "--eval-batches", "1", "--ckpt-dir", str(tmp_path)]
    main(run + ["--steps", "3", "--ckpt-every", "2", "--checkpoint-activations"])
    assert torch.load(tmp_path / "last.pt", weights_only=False)["config"]["checkpoint_activations"]
    # it does not change the trajectory, so a run may resume without it
    main(run + ["--steps", "3", "--resume"])
    assert "--checkpoint-activations" in _help(capsys)


def _help(capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out
