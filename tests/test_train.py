"""The training loop: exact resume from atomic checkpoints, layer-wise stepping equal to the
ordinary step (with gradient accumulation and a scheduler), settings validation."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from memopt_core.app.corpus import Corpus
from memopt_core.app.train import TrainConfig, Trainer, atomic_save

# A small synthetic corpus keeps these tests independent of the interpreter's stdlib size.
_GEN = torch.Generator().manual_seed(0)
CORPUS = Corpus(torch.randint(0, 256, (40_000,), generator=_GEN, dtype=torch.uint8),
                torch.randint(0, 256, (4_000,), generator=_GEN, dtype=torch.uint8), 256, "random")
SMALL = dict(model="tiny", batch_size=4, seq_len=32, eval_batches=2, steps=6)


def trainer(**kw) -> Trainer:
    return Trainer(TrainConfig(**{**SMALL, **kw}), corpus=CORPUS)


def params_of(t: Trainer):
    return [p.detach().clone() for p in t.model.parameters()]


def assert_same_params(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def optimizer_tensors(t: Trainer):
    sd = t.opt.state_dict()["state"]
    return {(k, name): v for k, s in sd.items() for name, v in s.items() if torch.is_tensor(v)}


INT8 = dict(optimizer="apollo_mini", dtype="int8", layerwise=True, grad_clip=0.0)


@pytest.mark.parametrize("kw", [dict(optimizer="adamw"),
                                dict(optimizer="adam_mini", grad_accum=2),
                                dict(optimizer="adamw", layerwise=True, grad_clip=0.0,
                                     grad_accum=2), INT8],
                         ids=["adamw", "adam_mini-accum2", "adamw-layerwise-accum2",
                              "apollo_mini-int8-layerwise"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(kw, tmp_path):
    straight = trainer(**kw)
    for _ in range(6):
        straight.run_step()

    first = trainer(**kw)
    for _ in range(3):
        first.run_step()
    first.save(tmp_path / "last.pt")
    del first
    resumed = trainer(**kw)
    resumed.load(tmp_path / "last.pt")
    assert resumed.step == 3
    for _ in range(3):
        resumed.run_step()
    assert_same_params(params_of(straight), params_of(resumed))
    a, b = straight.model.state_dict(), resumed.model.state_dict()  # int8 codes and scales too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = optimizer_tensors(straight), optimizer_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history["loss"] == resumed.history["loss"]
    assert straight.sched.get_last_lr() == resumed.sched.get_last_lr()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    t = trainer()
    t.run_step()
    t.save(tmp_path / "last.pt")
    other = trainer(lr=5e-3)
    with pytest.raises(ValueError, match="lr=0.001"):  # the checkpoint's: adamw's recommended
        other.load(tmp_path / "last.pt")


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


@pytest.mark.parametrize("opt_name", [n for n, s in memopt_core.OPTIMIZERS.items()
                                      if s.cls.steps_single_params])
def test_layerwise_gives_the_same_trajectory_as_step(opt_name):
    kw = dict(optimizer=opt_name, grad_clip=0.0, grad_accum=2, steps=5)
    ordinary, layerwise = trainer(**kw), trainer(layerwise=True, **kw)
    for _ in range(5):
        ordinary.run_step()
        layerwise.run_step()
        # every gradient was freed inside backward: none exists between steps
        assert all(p.grad is None for p in layerwise.model.parameters())
    for x, y in zip(params_of(ordinary), params_of(layerwise)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert ordinary.sched.get_last_lr() == layerwise.sched.get_last_lr()


def test_layerwise_steps_only_at_the_accumulation_boundary():
    model = torch.nn.Linear(4, 3)
    opt = memopt_core.AdamW(model.parameters(), lr=0.1)
    lw = memopt_core.LayerwiseStep(opt, grad_accum=3)
    before = model.weight.detach().clone()
    for i in range(2):
        model(torch.randn(2, 4)).sum().backward()
        assert torch.equal(model.weight, before) and not lw.at_boundary
    model(torch.randn(2, 4)).sum().backward()
    assert not torch.equal(model.weight, before) and lw.at_boundary
    assert model.weight.grad is None
    lw.remove()
    model(torch.randn(2, 4)).sum().backward()
    assert model.weight.grad is not None  # hooks gone: ordinary accumulation again


def test_layerwise_rejects_bad_settings():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match="memopt_core optimizer"):
        memopt_core.LayerwiseStep(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="grad_accum"):
        memopt_core.LayerwiseStep(memopt_core.AdamW(model.parameters()), grad_accum=0)
    with pytest.raises(TypeError, match="cannot step parameters one at a time"):
        memopt_core.LayerwiseStep(memopt_core.Frugal(torch.nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="clipping"):
        trainer(layerwise=True)  # grad_clip defaults to 1.0


def test_layerwise_lowers_peak_memory_by_about_the_gradients():
    """With few tokens per batch (activations well below the gradients), the ordinary peak is
    at step() with every gradient alive; layer-wise, no more than one gradient ever is."""
    peaks = {}
    for lw in (False, True):
        t = trainer(optimizer="adamw", layerwise=lw, grad_clip=0.0, model="small",
                    batch_size=1, seq_len=16)
        t.run_step()
        peaks[lw] = t.memory()
    grads = peaks[False]["weights"]  # fp32 gradients weigh what the weights do
    saved = peaks[False]["peak"] - peaks[True]["peak"]
    assert 0.75 * grads < saved <= 1.05 * grads, (saved, grads)


def _poison_step(t: Trainer, bad_step: int) -> None:
    """Makes the gradients of the trainer's `bad_step`-th backward NaN (one parameter's; global
    clipping spreads it)."""
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        return g * float("nan") if calls["n"] == bad_step else g
    next(t.model.parameters()).register_hook(hook)


@pytest.mark.parametrize("kw", [dict(), dict(optimizer="apollo_mini"),
                                dict(layerwise=True, grad_clip=0.0)])
def test_a_non_finite_gradient_skips_the_update_by_default(kw):
    """TrainConfig's nonfinite="skip": the step with a NaN gradient leaves the weights as they
    were and is recorded; training goes on."""
    t = trainer(**kw)
    _poison_step(t, 2)
    t.run_step()
    before = params_of(t)
    t.run_step()
    after = params_of(t)
    if kw.get("layerwise"):  # each parameter decided alone: only the poisoned one kept
        assert torch.equal(after[0], before[0])
        assert not all(torch.equal(a, b) for a, b in zip(after[1:], before[1:]))
    else:
        assert_same_params(before, after)
    assert t.history["skipped"] == [2] and t.opt.skipped_steps == 1
    t.run_step()
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(params_of(t), after))


def test_nonfinite_propagate_lets_the_nan_through():
    t = trainer(nonfinite="propagate")
    _poison_step(t, 1)
    t.run_step()
    assert t.history["skipped"] == [] and not torch.isfinite(next(t.model.parameters())).all()


def test_int8_weights_train():
    """--dtype int8: the attention/MLP weights train as int8 codes (they change; resume:
    test_resume_reproduces_the_uninterrupted_run_bit_for_bit), and FSDP2 is refused."""
    t = trainer(**INT8)
    codes0 = {k: v.clone() for k, v in t.model.state_dict().items() if k.endswith("weight_codes")}
    assert codes0 and t.precision == "int8, fp32 compute"
    for _ in range(3):
        t.run_step()
    codes = t.model.state_dict()
    assert any(not torch.equal(codes[k], codes0[k]) for k in codes0)
    with pytest.raises(ValueError, match="int8 weights are updated on the CPU and on CUDA, "
                                         "without FSDP2"):
        TrainConfig(**{**SMALL, **INT8}, fsdp=True).check()
