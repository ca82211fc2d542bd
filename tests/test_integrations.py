"""memopt optimizers in the training frameworks users bring (the README's recipes): the HF
Trainer through optimizers=(opt, None) and through optimizer_cls_and_kwargs
(memopt_core.integrations.hf), Accelerate's prepare / save_state / load_state, and Lightning's
configure_optimizers with checkpoint resume. Each keeps the optimizer's partition (APOLLO
projects, Adam-mini partitions by heads: no silent AdamW) and resumes exactly: an interrupted run
continued from its checkpoint ends where the straight run ends."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from conftest import make_llama

SEQ, BATCH, STEPS = 16, 2, 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, vocab=64):
        self.data = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _partitioned(opt) -> None:
    """The optimizer is ours and did what its paper does, not AdamW's fallback."""
    opt = getattr(opt, "optimizer", opt)  # Accelerate / Trainer wrappers
    assert isinstance(opt, memopt_core.AdamMini) or isinstance(opt, memopt_core.Apollo), type(opt)
    if isinstance(opt, memopt_core.Apollo):
        assert any(g.get("rank") for g in opt.param_groups)
    else:
        assert any(b.role in ("query", "key") for b in opt.blocks.values())


# ---- HF Trainer ------------------------------------------------------------------------------
def _stop_at(step):
    """A TrainerCallback that interrupts training after `step` (its checkpoint written)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                control.should_training_stop = True
            return control
    return Stop()


def _hf_trainer(tmp, path, name, max_steps=STEPS):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from memopt_core.integrations.hf import optimizer_cls_and_kwargs
    model = make_llama()
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=max_steps, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, weight_decay=0.1, save_strategy="steps", save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, lr_scheduler_type="cosine", warmup_steps=1)
    kw = dict(model=model, args=args, train_dataset=Tokens())
    if path == "instance":
        opt = memopt_core.make_optimizer(name, model, lr=1e-3, weight_decay=0.1)
        return transformers.Trainer(**kw, optimizers=(opt, None)), model
    return transformers.Trainer(
        **kw, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(name, model, args)), model


@pytest.mark.parametrize("path", ["instance", "cls_and_kwargs"])
@pytest.mark.parametrize("name", ["apollo", "adam_mini"])
def test_hf_trainer_partitions_and_resumes_exactly(tmp_path, path, name):
    trainer, model = _hf_trainer(tmp_path / "straight", path, name)
    trainer.train()
    _partitioned(trainer.optimizer)
    straight = [p.detach().clone() for p in model.parameters()]
    trainer, model = _hf_trainer(tmp_path / "resumed", path, name)
    trainer.add_callback(_stop_at(2))  # the interrupted run: same schedule, stops after step 2
    trainer.train()
    trainer, model = _hf_trainer(tmp_path / "resumed", path, name)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    _partitioned(trainer.optimizer)
    for a, b in zip(model.parameters(), straight):
        assert torch.equal(a, b)


def test_hf_cls_and_kwargs_takes_the_training_arguments():
    transformers = pytest.importorskip("transformers")
    from memopt_core.integrations.hf import optimizer_cls_and_kwargs
    model = make_llama()
    args = transformers.TrainingArguments(output_dir="unused", learning_rate=3e-4,
                                          adam_beta2=0.95, weight_decay=0.1, report_to=[])
    cls, kw = optimizer_cls_and_kwargs("apollo", model, args, rank=8)
    assert cls is memopt_core.Apollo and kw["model"] is model
    assert (kw["lr"], kw["betas"], kw["weight_decay"], kw["rank"]) == (3e-4, (0.9, 0.95), 0.1, 8)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_cls_and_kwargs("adamm", model)


# ---- Accelerate ------------------------------------------------------------------------------
def _accelerate_run(tmp, name, steps, load=None, save_at=None):
    accelerate = pytest.importorskip("accelerate")
    model = make_llama()
    opt = memopt_core.make_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    data = Tokens()
    start = 0
    if load:
        acc.load_state(load)
        start = save_at
    for step in range(start, steps):
        batch = data[step]
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if save_at is not None and step + 1 == save_at and load is None:
            acc.save_state(str(tmp))
    _partitioned(opt)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["apollo", "adam_mini"])
def test_accelerate_save_and_load_state_continue_exactly(tmp_path, name):
    straight = _accelerate_run(tmp_path / "s", name, STEPS, save_at=2)
    resumed = _accelerate_run(None, name, STEPS, load=str(tmp_path / "s"), save_at=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


# ---- Lightning -------------------------------------------------------------------------------
def _lightning_fit(tmp, name, max_steps, ckpt=None):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_llama()

        def training_step(self, batch, _):
            return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            opt = memopt_core.make_optimizer(name, self.net, lr=1e-3, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return [opt], [{"scheduler": sched, "interval": "step"}]

    module = Module()
    # one epoch = 2 steps: the step-2 checkpoint ends an epoch, where Lightning resumes
    # exactly (mid-epoch a plain DataLoader restarts the epoch's batches)
    data = torch.utils.data.DataLoader(Tokens(n=2 * BATCH), batch_size=BATCH, shuffle=False)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp), every_n_train_steps=2,
                                                save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[every])
    trainer.fit(module, data, ckpt_path=ckpt)
    _partitioned(trainer.optimizers[0])
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("name", ["apollo", "adam_mini"])
def test_lightning_resumes_from_its_checkpoint_exactly(tmp_path, name):
    """The straight run's own step-2 checkpoint (ModelCheckpoint), resumed to the end."""
    straight = _lightning_fit(tmp_path / "s", name, STEPS)
    resumed = _lightning_fit(tmp_path / "r", name, STEPS, ckpt=str(tmp_path / "s" / "step=2.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
