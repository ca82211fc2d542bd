"""bf16 weights computed in fp32 (app/compute_dtype.py), against the oracle of an fp32 model
holding the same (upcast) weights: the same loss, and its gradients rounded once to bf16;
no fp32 copy of a weight kept for backward; the compute dtype chosen by device."""
from __future__ import annotations

import pytest
import torch

from memopt_core.app import compute_dtype as cd
from memopt_core.app.memory import peak_during
from memopt_core.app.models import Llama, build, llama_config, materialize
from test_train import trainer


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    loss = model(idx, idx)[1]
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_bf16_weights_in_fp32_compute_equal_an_fp32_model_of_the_same_weights(arch):
    torch.manual_seed(0)
    low = build("tiny", arch).to(torch.bfloat16)
    low.compute_dtype = torch.float32
    oracle = build("tiny", arch)
    oracle.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(low, idx)
    want_loss, want = _loss_and_grads(oracle, idx)
    assert loss.dtype == torch.float32 and torch.equal(loss, want_loss)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16, name
        if "wte" in name or "embed_tokens" in name:
            # the lookup's backward (and GPT's tied head) sum in bf16, the oracle in fp32:
            # within a bf16 ulp of the tensor's scale
            scale = want[name].abs().max().item()
            torch.testing.assert_close(g.float(), want[name], rtol=0, atol=2 ** -7 * scale)
        else:  # fp32 arithmetic (summed in another order) rounded once to bf16: 1 ulp
            torch.testing.assert_close(g.float(), want[name], rtol=2 ** -8, atol=1e-9)


def test_no_fp32_copy_of_a_weight_is_kept_for_backward():
    torch.manual_seed(0)
    model = build("tiny").to(torch.bfloat16)
    model.compute_dtype = torch.float32
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    kept = []

    def pack(t):
        if tuple(t.shape) in weight_shapes:
            kept.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 256, (1, 8)))
    assert kept and set(kept) == {torch.bfloat16}


def test_compute_dtype_by_device(monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert cd.resolve_compute_dtype(fp32, "cpu") is fp32
    assert cd.resolve_compute_dtype(bf16, "cuda") is bf16
    monkeypatch.setattr(cd, "cpu_has_fast_bf16", lambda: False)
    assert cd.resolve_compute_dtype(bf16, "cpu") is fp32
    monkeypatch.setattr(cd, "cpu_has_fast_bf16", lambda: True)
    assert cd.resolve_compute_dtype(bf16, "cpu") is bf16
    assert cd.resolve_compute_dtype(bf16, "cpu", "fp32") is fp32  # an explicit choice wins
    with pytest.raises(ValueError, match="compute dtype"):
        cd.resolve_compute_dtype(bf16, "cpu", "fp16")


def test_trainer_with_bf16_weights(monkeypatch):
    monkeypatch.setattr(cd, "cpu_has_fast_bf16", lambda: False)
    t = trainer(optimizer="adam_mini", dtype="bf16", steps=2)
    assert t.model.compute_dtype is torch.float32 and t.precision == "bf16, fp32 compute"
    t.run_step()
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    assert trainer(dtype="bf16", compute_dtype="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="compute_dtype"):
        trainer(compute_dtype="fp16")


def test_materialize_allocates_only_the_storage_dtype():
    """A meta-built model allocated and initialised in bf16: no other copy exists meanwhile."""
    with torch.device("meta"):
        model = Llama(llama_config("small"))
    weights = sum(p.numel() for p in model.parameters()) * 2  # bf16
    rope = 2 * model.rope_cos.numel() * 4                     # two fp32 tables
    peak = peak_during(lambda: materialize(model, torch.device("cpu"), torch.bfloat16),
                       torch.device("cpu"))
    # the bf16 weights, and the RoPE tables with their temporaries; an fp32 copy of the
    # weights would add twice the weights
    assert weights <= peak <= weights + 3 * rope, (peak, weights, rope)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fresh = build("small")
    assert torch.equal(model.rope_cos, fresh.rope_cos) and model.rope_cos.dtype == torch.float32
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # N(0, 0.02), as the constructor initialises
            assert abs(p.float().std().item() - 0.02) < 2e-3 and q.shape == p.shape, name
