"""state_bits: bfloat16 and 8-bit moments (cpp/include/memopt/state_codes.h) for AdamW, Adam-mini
and SlimAdam on the CPU, against the float64 references with the codes' rounding modelled
exactly (tests/reference/state_codes_ref.py)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import memopt_core
from adam_mini_util import gpt2_blocks, llama_blocks
from conftest import make_gpt2, make_grads, make_llama, set_grads
from reference import adam_mini_ref as AM
from reference import state_codes_ref as Q
from reference.adamw_ref import AdamWRef

STEPS = 7


def _coded(p) -> bool:
    return Q.low_bit(p.shape)


def _requantize(ref, i, p, square: bool):
    """After a reference step: what 8-bit storage keeps of tensor i's m (and v)."""
    if _coded(p):
        ref.m[i] = Q.requantize_moment(ref.m[i])
        if square:
            ref.v[i] = Q.requantize_square(ref.v[i])


def _assert_stepped_like(p, ref_p, ref_p0, what):
    """p against the reference's parameter: within 1e-3 of the reference's largest displacement
    but for the rare element whose m or v code rounded to the other side of a boundary (float32
    against float64), which may be off by a code step's share of its update."""
    moved = (ref_p - ref_p0).abs().max()
    err = (p.detach().double() - ref_p).abs()
    assert (err > 1e-3 * moved).float().mean() <= 1e-3, what
    assert err.max() <= 5e-2 * moved, what


def _decoded(state: dict, key: str) -> torch.Tensor:
    t = state[key]
    if t.dtype == torch.int8:
        return Q.decode_moment(t, state[key + "_scales"])
    if t.dtype == torch.uint8:
        return Q.decode_square(t, state[key + "_scales"])
    return t.float()


# ---- the codes ---------------------------------------------------------------------------------
def test_first_step_codes_equal_the_specification_exactly():
    """From zero state one AdamW step stores m = (1-b1) g and v = ((1-b2) g) g, both exact in
    float32 whatever the loop's form; their codes and scales must be the reference's bit for bit:
    a partial last block, a zero block, a block of tiny values beside a large one."""
    g = torch.randn(70, 100) * torch.logspace(-6, 0, 70).unsqueeze(1)
    g.view(-1)[256:512] = 0.0           # a zero block
    g.view(-1)[1024:1280] *= 1e-20      # a block of tiny values
    g.view(-1)[1300] = 5.0              # one large value among small ones
    p = nn.Parameter(torch.randn(70, 100))
    opt = memopt_core.AdamW([p], lr=1e-3, state_bits=8)
    p.grad = g.clone()
    opt.step()
    s = opt.state[p]
    m = torch.tensor(1 - 0.9, dtype=torch.float32) * g
    v = (torch.tensor(1 - 0.999, dtype=torch.float32) * g) * g
    codes, scales = Q.encode_moment(m)
    assert torch.equal(s["exp_avg"], codes) and torch.equal(s["exp_avg_scales"], scales)
    codes, scales = Q.encode_square(v)
    assert torch.equal(s["exp_avg_sq"], codes) and torch.equal(s["exp_avg_sq_scales"], scales)
    assert s["exp_avg_scales"][1] == 0 and s["exp_avg_sq_scales"][1] == 0
    # A positive v never decodes to zero (the update would be m / eps).
    assert bool((Q.decode_square(s["exp_avg_sq"], s["exp_avg_sq_scales"])[v > 0] > 0).all())


def test_codes_keep_relative_precision_of_small_values():
    """The power-law codes: within a block spanning 1e-4..1 every value decodes within 2/c of
    itself relatively (c its code), where a linear code would zero most of them."""
    x = torch.logspace(-4, 0, 256) * torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0)
    codes, scales = Q.encode_moment(x)
    back = Q.decode_moment(codes, scales)
    c = codes.float().abs()
    assert bool(((back - x).abs() <= 2.0 / c * x.abs() + 1e-12).all())
    assert int((codes == 0).sum()) == 0


# ---- AdamW against its float64 reference ----------------------------------------------------------
def _run_with_reference(opt, ref, params, after_step, steps=STEPS):
    """Steps `opt` and its float64 reference on the same gradients; after_step(ref, i, p) models
    what the state's storage keeps of tensor i."""
    for step in range(steps):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        for i, p in enumerate(params):
            after_step(ref, i, p)


def _adamw_run(model, lr=2e-3, wd=0.1):
    params = list(model.parameters())
    opt = memopt_core.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, state_bits=8)
    ref = AdamWRef(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    _run_with_reference(opt, ref, params, lambda r, i, p: _requantize(r, i, p, square=True))
    return params, opt, ref


def _check(params, opt, ref, keys):
    for i, p in enumerate(params):
        s = opt.state[p]
        for key, mine in zip(keys, (ref.m[i], ref.v[i])):
            got = _decoded(s, key)
            if _coded(p):
                assert s[key].dtype == (torch.int8 if key == "exp_avg" else torch.uint8)
                # The same codes but for the rare element at a rounding boundary, where float32
                # and float64 updates land on either side.
                codes = (Q.encode_moment if key == "exp_avg" else Q.encode_square)(mine.float())[0]
                assert (s[key] != codes).float().mean() <= 1e-3, f"{key} {i}"
            else:
                assert s[key].dtype == torch.float32
                torch.testing.assert_close(got.double(), mine, rtol=1e-5, atol=1e-9)
        _assert_stepped_like(p, ref.p[i], ref.p0[i], f"tensor {i}")


def test_adamw_8bit_matches_reference_with_quantized_moments():
    params, opt, ref = _adamw_run(make_llama(vocab_size=256, intermediate_size=128))
    assert sum(_coded(p) for p in params) >= 6
    _check(params, opt, ref, ("exp_avg", "exp_avg_sq"))


def test_adamw_16bit_matches_reference_in_bf16_storage():
    model = make_llama(vocab_size=256, intermediate_size=128)
    params = list(model.parameters())
    opt = memopt_core.AdamW(params, lr=2e-3, state_bits=16)
    ref = AdamWRef(params, lr=2e-3)

    def in_bf16(ref, i, p):
        if _coded(p):
            ref.m[i] = ref.m[i].to(torch.bfloat16).double()
            ref.v[i] = ref.v[i].to(torch.bfloat16).double()
    _run_with_reference(opt, ref, params, in_bf16)
    for i, p in enumerate(params):
        s = opt.state[p]
        assert s["exp_avg"].dtype == (torch.bfloat16 if _coded(p) else torch.float32)
        torch.testing.assert_close(s["exp_avg"].double(), ref.m[i], rtol=2e-2, atol=1e-6)
        moved = (ref.p[i] - ref.p0[i]).abs().max()
        assert (p.detach().double() - ref.p[i]).abs().max() <= 2e-2 * moved


# ---- Adam-mini: 8-bit m over every block geometry -------------------------------------------------
@pytest.mark.parametrize("make_model, blocks_of", [
    (lambda: make_llama(vocab_size=256, intermediate_size=128), llama_blocks),
    (lambda: make_gpt2(vocab_size=200), gpt2_blocks),  # per column (Conv1D), per token
], ids=["llama", "gpt2"])
def test_adam_mini_8bit_matches_reference_with_quantized_m(make_model, blocks_of):
    model = make_model()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = memopt_core.AdamMini(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, state_bits=8)
    ref = AM.AdamMiniRef([(p, *blocks_of(n, tuple(p.shape))) for n, p in named], lr=2e-3,
                         betas=(0.9, 0.95), weight_decay=0.1)
    _run_with_reference(opt, ref, params, lambda r, i, p: _requantize(r, i, p, square=False))
    assert sum(_coded(p) for p in params) >= 3
    for i, (name, p) in enumerate(named):
        s = opt.state[p]
        assert s["exp_avg_sq"].dtype == torch.float32, name  # v (per block) stays float
        torch.testing.assert_close(s["exp_avg_sq"].double(), ref.v[i], rtol=1e-4, atol=0)
        if _coded(p):
            codes = Q.encode_moment(ref.m[i].float())[0]
            assert (s["exp_avg"] != codes).float().mean() <= 1e-3, name
        _assert_stepped_like(p, ref.p[i], ref.p0[i], name)


def test_slim_adam_8bit_keeps_m_in_codes_and_v_per_block_float():
    """SlimAdam runs Adam-mini's op: 8-bit m, its compressed v in float; a tensor the table
    leaves uncompressed (v full-size) keeps that v in float too, and steps like state_bits=32
    but for m's codes."""
    model = make_llama(vocab_size=256, intermediate_size=128)
    opt = memopt_core.SlimAdam(model, lr=2e-3, state_bits=8)
    ref_model = make_llama(vocab_size=256, intermediate_size=128)
    ref_opt = memopt_core.SlimAdam(ref_model, lr=2e-3)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    start = [p.detach().clone() for p in params]
    for step in range(3):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref_opt.step()
    for p, q, p0 in zip(params, ref_params, start):
        s = opt.state[p]
        assert s["exp_avg"].dtype == (torch.int8 if _coded(p) else torch.float32)
        assert s["exp_avg_sq"].dtype == torch.float32
        assert s["exp_avg_sq"].numel() == ref_opt.state[q]["exp_avg_sq"].numel()
        moved = (q - p0).abs().max()
        assert (p - q).abs().max() <= 0.05 * moved  # quantized m: close, not equal


# ---- what a user relies on -----------------------------------------------------------------------
def _train(opt, model, steps, start=0):
    params = list(model.parameters())
    for step in range(start, start + steps):
        set_grads(params, make_grads(params, step))
        opt.step()


RESUME_MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=320, num_hidden_layers=1)


@pytest.mark.parametrize("name, flat_scales", [
    ("adamw", False), ("adam_mini", False), ("frugal", False),
    ("adamw", True), ("adam_mini", True)])  # (FRUGAL had no 8-bit state at stop 27)
def test_state_dict_resume_is_exact(name, flat_scales):
    """Codes and scales are saved and loaded as they are: a run resumed from a checkpoint
    equals the uninterrupted run bit for bit. flat_scales: a checkpoint of stop 27, whose block
    scales were flat (now [rows, blocks per row]), loads too."""
    # rows of whole 256-element blocks (scales [rows, 1]) and tensors that are not (flat scales)
    def make(model):
        return memopt_core.make_optimizer(name, model, lr=2e-3, state_bits=8)

    whole = make_llama(**RESUME_MODEL)
    opt = make(whole)
    _train(opt, whole, 6)
    first = make_llama(**RESUME_MODEL)
    opt1 = make(first)
    _train(opt1, first, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    if flat_scales:
        flattened = [(state, key) for state in saved["opt"]["state"].values() for key in state
                     if key.endswith("_scales") and state[key].dim() == 2]
        assert flattened
        for state, key in flattened:
            state[key] = state[key].flatten()
    resumed = make_llama(**RESUME_MODEL)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, 3, start=3)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_loading_a_checkpoint_of_other_state_bits_says_what_differs():
    model = make_llama(vocab_size=256, intermediate_size=128)
    fp32 = memopt_core.AdamW(model.parameters(), lr=1e-3)
    _train(fp32, model, 1)
    eight = memopt_core.AdamW(model.parameters(), lr=1e-3, state_bits=8)
    before = eight.state_dict()
    with pytest.raises((ValueError, TypeError), match="exp_avg"):
        eight.load_state_dict(fp32.state_dict())
    assert eight.state_dict()["state"] == before["state"]  # nothing loaded


@pytest.mark.parametrize("bad, error", [(7, ValueError), (64, ValueError), ("8", TypeError),
                                        (8.0, TypeError), (True, TypeError)])
@pytest.mark.parametrize("cls", [memopt_core.AdamW, memopt_core.AdamMini, memopt_core.SlimAdam])
def test_bad_state_bits_raise_at_construction(cls, bad, error):
    with pytest.raises(error, match="state_bits"):
        cls(make_llama(), lr=1e-3, state_bits=bad)


def test_op_refuses_inconsistent_codes_and_writes_nothing():
    p = torch.randn(64, 128)
    g = torch.randn(64, 128)
    m, v = torch.zeros(64, 128, dtype=torch.int8), torch.zeros(64, 128, dtype=torch.uint8)
    ms, vs = torch.zeros(32), torch.zeros(32)
    step = torch.zeros(())
    lr = torch.tensor(1e-3, dtype=torch.float64)
    before = p.clone()
    for scales, match in [([ms], "state_scales must be"), ([ms, torch.zeros(31)], "32 entries"),
                          ([ms, torch.empty(0)], "together"),
                          ([ms.double(), vs], "float32 tensor"), ([ms[:31], vs], "32 entries")]:
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.memopt.adamw_([p], [g], [m], [v], [step], lr, 0.9, 0.999, 1e-8, 0.0,
                                    "torch", [], None, scales)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.memopt.adamw_([p], [g], [m], [m], [step], lr, 0.9, 0.999, 1e-8, 0.0, "torch",
                                [], None, [ms, vs])
    assert torch.equal(p, before) and step.item() == 0 and not m.any()


def test_nan_gradient_poisons_only_its_block():
    p = nn.Parameter(torch.randn(64, 128))
    opt = memopt_core.AdamW([p], lr=1e-3, state_bits=8)
    g = torch.randn(64, 128)
    g.view(-1)[300] = float("nan")  # block 1
    p.grad = g
    opt.step()
    s = opt.state[p]
    scales = s["exp_avg_scales"]
    assert torch.isnan(scales[1]) and not torch.isnan(scales[torch.arange(32) != 1]).any()
    assert not torch.isnan(p.view(-1)[:256]).any() and not torch.isnan(p.view(-1)[512:]).any()


def test_channels_last_conv_steps_in_memory_order_without_a_copy():
    """A channels_last weight is stepped in its memory order, blocks of 256 in that order: the
    same as a contiguous tensor holding the memory order."""
    w = torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last)
    p = nn.Parameter(w.clone())
    flat = nn.Parameter(w.permute(0, 2, 3, 1).reshape(32, -1).clone())
    opt, ref = (memopt_core.AdamW([t], lr=1e-2, state_bits=8) for t in (p, flat))
    for step in range(4):
        g = make_grads([p], step)[0].contiguous(memory_format=torch.channels_last)
        p.grad, flat.grad = g, g.permute(0, 2, 3, 1).reshape(32, -1)
        opt.step()
        ref.step()
    assert opt.state[p]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(p.detach().permute(0, 2, 3, 1).reshape(-1), flat.detach().reshape(-1))
    assert torch.equal(opt.state[p]["exp_avg_scales"], ref.state[flat]["exp_avg_scales"])


@pytest.mark.parametrize("name, bits, most", [("adamw", 8, 2.05), ("adam_mini", 8, 1.05),
                                              ("adamw", 16, 4.01), ("adam_mini", 16, 2.01)])
def test_state_bytes_per_param_meet_the_targets_and_the_plan(name, bits, most):
    """On a LLaMA-style model whose tensors are nearly all large: AdamW 8-bit <= 2.05 bytes/param,
    Adam-mini 8-bit <= 1.05; planned_state_bytes is the allocated state exactly."""
    model = make_llama(vocab_size=1024, hidden_size=256, intermediate_size=688,
                       num_attention_heads=8, num_key_value_heads=4)
    opt = memopt_core.make_optimizer(name, model, lr=1e-3, state_bits=bits)
    planned = opt.planned_state_bytes()
    _train(opt, model, 1)
    n = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() == planned
    steps = 4 * len(list(model.parameters()))  # the float32 step counters
    assert (opt.state_bytes() - steps) / n <= most, (opt.state_bytes() - steps) / n


def test_layerwise_stepping_with_8bit_state_matches_step():
    """step_params (layer-wise stepping's primitive) on 8-bit state is step() for those params."""
    a, b = (make_llama(vocab_size=256, intermediate_size=128) for _ in range(2))
    opt_a = memopt_core.AdamMini(a, lr=2e-3, state_bits=8)
    opt_b = memopt_core.AdamMini(b, lr=2e-3, state_bits=8)
    pa, pb = list(a.parameters()), list(b.parameters())
    for step in range(3):
        grads = make_grads(pa, step)
        set_grads(pa, grads)
        set_grads(pb, grads)
        opt_a.step()
        for p in pb:
            opt_b.step_params([p])
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


# ---- against torchao's AdamW8bit (CPU; eager: its compiled step needs a C++ toolchain and time) ----
def _loss_after(make_opt, steps=40):
    model = make_llama(vocab_size=256, intermediate_size=128)
    opt = make_opt(model)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), opt, model


def test_adamw_8bit_against_torchao_adamw8bit_same_bytes_comparable_loss(monkeypatch):
    torchao_optim = pytest.importorskip("torchao.optim")
    # torchao's step, eagerly: it wraps its per-tensor step in torch.compile(fullgraph=True)
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn if fn else (lambda f: f))
    hp = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    ours, opt, model = _loss_after(lambda m: memopt_core.AdamW(m.parameters(), **hp, state_bits=8))
    theirs, ao, ao_model = _loss_after(lambda m: torchao_optim.AdamW8bit(m.parameters(), **hp))
    fp32, _, _ = _loss_after(lambda m: memopt_core.AdamW(m.parameters(), **hp))
    assert abs(ours - fp32) <= 0.01 * fp32, (ours, fp32)
    assert abs(ours - theirs) <= 0.01 * fp32, (ours, theirs)

    def held(t):  # torchao's state: the codes and scales inside its tensor subclass (its
        if type(t) is torch.Tensor:  # 256-entry code table is one tensor shared by all)
            return t.numel() * t.element_size()
        return sum(held(getattr(t, k)) for k in t.__tensor_flatten__()[0] if k != "qmap")
    both = 0
    for p, q in zip(model.parameters(), ao_model.parameters()):
        s, a = opt.state[p], ao.state[q]
        mine = sum(held(v) for k, v in s.items() if k != "step")
        if Q.low_bit(p.shape) and p.numel() % Q.BLOCK == 0:  # both quantize it
            assert mine == sum(held(v) for k, v in a.items() if k in ("exp_avg", "exp_avg_sq"))
            both += 1
    assert both >= 6


# ---- APOLLO: 8-bit AdamW groups and the low-memory embedding mode ---------------------------------
@pytest.mark.parametrize("embeddings", ["adamw", "adam_mini"])
def test_apollo_mini_8bit_groups_against_references(embeddings):
    """APOLLO-Mini with state_bits=8: the projected weights step exactly as with float state
    (their rank-1 moments stay float); the AdamW group's large tensors match apollo-torch's
    AdamW rule with quantized m and v; embeddings="adam_mini" steps the embedding and output
    head with Adam-mini's per-token v (a float per row) and 8-bit m instead."""
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, embeddings=embeddings)
    model = make_llama(vocab_size=256, intermediate_size=128, hidden_size=64)
    base = make_llama(vocab_size=256, intermediate_size=128, hidden_size=64)
    opt = memopt_core.ApolloMini(model, **kw, state_bits=8)
    opt32 = memopt_core.ApolloMini(base, **kw)
    named = list(model.named_parameters())
    params, base_params = [p for _, p in named], list(base.parameters())
    per_row = [i for i, (n, _) in enumerate(named) if "embed_tokens" in n or "lm_head" in n]
    adamw = [i for i, (n, p) in enumerate(named) if not opt.plan.projected(opt._index[p])
             and (embeddings == "adamw" or i not in per_row)]
    ref_w = AdamWRef([params[i] for i in adamw], lr=3e-3, betas=(0.9, 0.95), eps=1e-6,
                     weight_decay=0.1, rule="apollo")  # (APOLLO's eps)
    ref_m = AM.AdamMiniRef([(params[i], AM.per_row(tuple(params[i].shape)), True)
                            for i in per_row], lr=3e-3, betas=(0.9, 0.95), eps=1e-6,
                           weight_decay=0.1)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(base_params, grads)
        opt.step()
        opt32.step()
        ref_w.step([grads[i] for i in adamw])
        for k, i in enumerate(adamw):
            _requantize(ref_w, k, params[i], square=True)
        if embeddings == "adam_mini":
            ref_m.step([grads[i] for i in per_row])
            for k, i in enumerate(per_row):
                _requantize(ref_m, k, params[i], square=False)
    for i, (name, p) in enumerate(named):
        if opt.plan.projected(opt._index[p]):
            assert torch.equal(p, base_params[i]), name
    for ref, idx in ((ref_w, adamw), (ref_m, per_row if embeddings == "adam_mini" else [])):
        for k, i in enumerate(idx):
            _assert_stepped_like(params[i], ref.p[k], ref.p0[k], named[i][0])
    if embeddings == "adam_mini":
        s = opt.state[params[per_row[0]]]
        assert s["exp_avg"].dtype == torch.int8 and s["exp_avg_sq"].shape == (256,)
        assert sum(_coded(params[i]) for i in adamw) == 0  # only norms left in AdamW: float
    else:
        assert sum(_coded(params[i]) for i in adamw) == 2


def test_apollo_embedding_mode_needs_roles_and_is_saved_with_the_groups():
    with pytest.raises(ValueError, match="no embedding or output"):
        memopt_core.ApolloMini([nn.Parameter(torch.randn(64, 64))], lr=1e-3, rank=1,
                               embeddings="adam_mini")
    with pytest.raises(ValueError, match="embeddings must be"):
        memopt_core.ApolloMini(make_llama(), lr=1e-3, embeddings="per_token")
    model = make_llama(vocab_size=256, intermediate_size=128)
    opt = memopt_core.ApolloMini(model, lr=1e-3, state_bits=8, embeddings="adam_mini")
    _train(opt, model, 2)
    again = memopt_core.ApolloMini(model, lr=1e-3, state_bits=8, embeddings="adam_mini")
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(value, again.state[p][key]), key
    plain = memopt_core.ApolloMini(model, lr=1e-3)
    with pytest.raises(ValueError):  # another group structure and state layout
        plain.load_state_dict(opt.state_dict())


# ---- FRUGAL: bfloat16 states, and 8-bit ones of the block selection --------------------------------------------------------
def test_frugal_16bit_within_twice_the_bf16_reference_error():
    """FRUGAL with state_bits=16 (bf16 moments of float32 weights) stays within twice the error
    of the float64 reference run with everything stored in bf16 (the DESIGN's bf16 rule)."""
    from reference.frugal_ref import FrugalRef
    hp = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, density=0.5, update_gap=3, seed=5)
    model = make_llama(vocab_size=256, intermediate_size=128)
    opt = memopt_core.Frugal(model, **hp, state_bits=16)
    params = [p for g in opt.param_groups for p in g["params"]]
    proj = [p in opt._index for p in params]
    exact, low = FrugalRef(params, proj, **hp), FrugalRef(params, proj, **hp,
                                                          storage_dtype=torch.bfloat16)
    for step in range(8):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        exact.step(grads)
        low.step(grads)
    kept = [s["exp_avg"].dtype for s in opt.state.values() if s]
    assert torch.bfloat16 in kept
    ours = torch.cat([(p.double() - p0).reshape(-1) for p, p0 in zip(params, exact.p0)])
    e = torch.cat([(t - p0).reshape(-1) for t, p0 in zip(exact.p, exact.p0)])
    lw = torch.cat([(t - p0).reshape(-1) for t, p0 in zip(low.p, exact.p0)])
    assert 0 < (ours - e).norm() <= 2 * (lw - e).norm()


@pytest.mark.parametrize("bits, embeddings", [(8, "adamw"), (8, "adam_mini"), (32, "adam_mini")])
def test_frugal_block_selection_against_references(bits, embeddings):
    """The block selection's whole-tensor moments (AdamW tensors, active blocks) in 8-bit codes,
    stepped by AdamW's 8-bit loop inside frugal_: against the float64 reference whose moments
    are requantized after every step, over re-selections that drop and start blocks' state.
    embeddings="adam_mini": the embedding and head step with Adam-mini's per-token v (the
    Adam-mini reference, per-row blocks) instead of AdamW."""
    from reference.frugal_ref import FrugalRef
    hp = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, density=0.5, update_gap=3, seed=5)
    model = make_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    opt = memopt_core.Frugal(model, **hp, state_bits=bits, embeddings=embeddings)
    named = [(n, p) for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])]
    params = [p for _, p in named]
    rows = [i for i, (n, _) in enumerate(named)
            if embeddings == "adam_mini" and ("embed_tokens" in n or "lm_head" in n)]
    ref = FrugalRef(params, [p in opt._index for p in params], **hp)
    ref_rows = AM.AdamMiniRef([(params[i], AM.per_row(tuple(params[i].shape)), True)
                               for i in rows], lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(8):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        ref_rows.step([grads[i] for i in rows])
        for st in ref.state:
            if bits == 8 and st is not None and Q.low_bit(st["exp_avg"].shape):
                st["exp_avg"] = Q.requantize_moment(st["exp_avg"])
                st["exp_avg_sq"] = Q.requantize_square(st["exp_avg_sq"])
        for k, i in enumerate(rows):
            if bits == 8:
                _requantize(ref_rows, k, params[i], square=False)
    coded = {id(p) for p in params
             if opt.state.get(p) and opt.state[p]["exp_avg"].dtype == torch.int8}
    assert len(coded) >= (4 if bits == 8 else 0)  # the embedding, the head and active blocks
    for i, p in enumerate(params):
        if i in rows:
            k = rows.index(i)
            _assert_stepped_like(p, ref_rows.p[k], ref_rows.p0[k], named[i][0])
            assert opt.state[p]["exp_avg_sq"].shape == (p.shape[0],)
            continue
        _assert_stepped_like(p, ref.p[i], ref.p0[i], named[i][0])
        if id(p) in coded:
            assert (opt.state[p]["exp_avg"] != Q.encode_moment(ref.state[i]["exp_avg"].float())[0]
                    ).float().mean() <= 1e-3
    assert len(rows) == (2 if embeddings == "adam_mini" else 0)
    # every tensor's keys in the plan's order, whatever order state was made in (FSDP2 ranks
    # list state in this order: all-gathers of it must agree)
    for p in params:
        if opt.state.get(p):
            plan_keys = [k for k, *_ in opt.plan.state(opt._position[p]) if k != "subspace"]
            assert [k for k in opt.state[p] if k != "subspace"] == [*plan_keys, "step"]


def test_frugal_refusals_of_8bit_subspaces_and_a_model_without_embeddings():
    model = make_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    with pytest.raises(NotImplementedError, match="selection='block'"):
        memopt_core.Frugal(model, lr=1e-3, selection="columns", state_bits=8)
    with pytest.raises(ValueError, match="no embedding or output"):
        memopt_core.Frugal(model, lr=1e-3, embeddings="adam_mini", proj_embeds=True,
                           proj_logits=True)
    with pytest.raises(ValueError, match="embeddings must be"):
        memopt_core.Frugal(model, lr=1e-3, embeddings="rows")
