"""int8 weights (cpp/include/memopt/int8_weights.h, memopt_core.quantize_weights_) in every
optimizer. Oracles: a float32 twin model holding the decoded weights, stepped by the same
optimizer with the same gradients, whose float32 result is encoded again by
tests/reference/int8_ref.py (written from the header's specification); an uninterrupted run
(resume); the whole step (layer-wise); a float model (forward and backward)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memopt_core
from memopt_core.int8_weights import Int8Linear, int8_layer
from reference import int8_ref, rounding_ref

GROUP, SEED = 32, 99
OPTIMIZERS = {
    "adamw": lambda m, **kw: memopt_core.AdamW(m.parameters(), lr=1e-2, **kw),
    "adam_mini": lambda m, **kw: memopt_core.AdamMini(m, lr=1e-2, dim=64, n_heads=4, **kw),
    "slim_adam": lambda m, **kw: memopt_core.SlimAdam(m, lr=1e-2, dim=64, n_heads=4, **kw),
    "apollo": lambda m, **kw: memopt_core.Apollo(m, lr=1e-2, rank=4, update_proj_gap=2, **kw),
    "apollo_mini": lambda m, **kw: memopt_core.ApolloMini(m, lr=1e-2, update_proj_gap=2, **kw),
    "frugal": lambda m, **kw: memopt_core.Frugal(m, lr=1e-2, density=0.5, update_gap=2, seed=0,
                                                 **kw),
}
FRUGAL_SELECTIONS = ["block", "columns", "rows", "randk", "svd", "random"]


class Tiny(nn.Module):
    """Attention and MLP linears (made int8), embedding, norm and head (kept float)."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(40, 64)
        self.wq, self.wk = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        self.wv, self.wo = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        self.w1, self.w2 = nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=True)
        self.norm = nn.LayerNorm(64)
        self.output = nn.Linear(64, 40, bias=False)

    def forward(self, idx):
        x = self.tok_embeddings(idx)
        h = self.wo(self.wv(x) + self.wq(x) * self.wk(x).tanh())
        x = self.norm(x + h)
        x = x + self.w2(torch.relu(self.w1(x)))
        return self.output(x)


def pair(grad_dtype=torch.float32):
    """(int8 model, float32 twin holding its decoded weights)."""
    torch.manual_seed(0)
    model = Tiny()
    names = memopt_core.quantize_weights_(model, group_size=GROUP, dtype=grad_dtype)
    assert names == ["wq", "wk", "wv", "wo", "w1", "w2"]
    twin = Tiny()
    twin.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.endswith(("weight_codes", "weight_scales"))}, strict=False)
    sync(model, twin)
    return model, twin


def int8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def sync(model, twin):
    """twin's linear weights := model's decoded int8 weights."""
    with torch.no_grad():
        for name, q in int8_layers(model).items():
            getattr(twin, name).weight.copy_(q.dequantized_weight())


def set_grads(model, twin, step):
    gen = torch.Generator().manual_seed(100 + step)
    for (name, p), (tname, t) in zip(model.named_parameters(), twin.named_parameters()):
        assert name == tname
        g = torch.randn(p.shape, generator=gen) * 1e-2
        p.grad, t.grad = g.to(p.dtype), g.to(p.dtype).to(t.dtype)


def check_codes(opt, model, twin, stochastic, counter=0):
    """Every int8 layer's codes and scales are the twin's float32 result encoded."""
    ids = {p: k for k, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for name, q in int8_layers(model).items():
        key = None
        if stochastic:
            step = int(opt.state[q.weight]["step"]) if q.weight in opt.state else 0
            key = rounding_ref.key(SEED, counter, ids[q.weight], step)
        codes, scales = int8_ref.encode(getattr(twin, name).weight.detach(), GROUP, key)
        assert torch.equal(q.weight_scales, scales), name
        assert torch.equal(q.weight_codes, codes), name


def run_against_twin(make, steps=4, stochastic=False, counter=lambda opt: 0):
    model, twin = pair()
    kw = dict(stochastic_rounding=True, rounding_seed=SEED) if stochastic else {}
    opt, topt = make(model, **kw), make(twin)
    for step in range(steps):
        set_grads(model, twin, step)
        opt.step()
        topt.step()
        check_codes(opt, model, twin, stochastic, counter(opt))
        for (n, p), (_, t) in zip(model.named_parameters(), twin.named_parameters()):
            if int8_layer(p) is None:  # float tensors: the same update
                assert torch.equal(p, t), n
        sync(model, twin)
    return model, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_encodes_its_float32_update(name):
    model, opt = run_against_twin(OPTIMIZERS[name])
    codes = int8_layers(model)["w1"].weight_codes
    assert codes.abs().max() == 127 and codes.float().std() > 10  # a real code range


@pytest.mark.parametrize("selection", FRUGAL_SELECTIONS)
def test_frugal_every_selection(selection):
    run_against_twin(lambda m, **kw: memopt_core.Frugal(
        m, lr=1e-2, density=0.5, update_gap=2, selection=selection, weight_decay=0.1, seed=0, **kw))


@pytest.mark.parametrize("name", ["adamw", "adam_mini", "apollo_mini", "apollo"])
def test_stochastic_rounding_draws_the_specified_bits(name):
    run_against_twin(OPTIMIZERS[name], stochastic=True)


def test_frugal_stochastic_rounding():
    # state-free blocks key at step 0 with the optimizer's step as the counter (rounding.h)
    def make(m, **kw):
        return memopt_core.Frugal(m, lr=1e-2, density=0.5, update_gap=2, selection="rows", seed=0,
                                  **kw)
    # (the counter is the selection's step count when the op ran, one less than after it)
    run_against_twin(make, stochastic=True, counter=lambda opt: opt.plan.selection.t - 1)


@pytest.mark.parametrize("op", ["adamw", "adam_mini"])
def test_ops_take_bf16_gradients(op):
    """bf16 gradients (the default carrier) are read as their float32 values: the op on the
    int8 weight equals the op on a float32 twin given those values. (APOLLO is left out: with
    bf16 values its random projection is rounded to bf16, as for a bf16 weight, so a float32
    twin is no oracle; the front-end tests cover it with float32 carriers.)"""
    torch.manual_seed(1)
    rows, cols = 48, 128
    codes, scales = int8_ref.encode(torch.randn(rows, cols) * 0.05, GROUP)
    twin = int8_ref.decode(codes, scales)
    grad = (torch.randn(rows, cols) * 1e-2).bfloat16()
    lr = torch.tensor(1e-2, dtype=torch.float64)

    def call(p, g, scales_arg, m, v, st):
        if op == "adamw":
            torch.ops.memopt.adamw_([p], [g], [m], [v], [st], lr, 0.9, 0.99, 1e-8, 0.1, "torch",
                                    [], scales_arg)
        else:  # Adam-mini, one block per row
            blocks = [0, rows, cols, cols, 1, cols]
            torch.ops.memopt.adam_mini_([p], [g], [m], [v], [st], [1, *blocks], lr, 0.9, 0.99,
                                        1e-8, 0.1, [], scales_arg)

    def state():
        v = torch.zeros(rows, cols) if op == "adamw" else torch.zeros(rows)  # per-row blocks
        return torch.zeros(rows, cols), v
    m, v = state()
    tm, tv = state()
    st, tst = torch.zeros(()), torch.zeros(())
    for _ in range(3):
        call(codes, grad, [scales], m, v, st)
        call(twin, grad.float(), None, tm, tv, tst)
        ref_codes, ref_scales = int8_ref.encode(twin, GROUP)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        assert torch.equal(m, tm) and torch.equal(v, tv)
        twin = int8_ref.decode(codes, scales)


def test_layerwise_equals_whole_step_and_forward_matches_float_model():
    model, twin = pair()
    twin_copy = copy.deepcopy(model)
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    out, tout = model(idx), twin(idx)
    torch.testing.assert_close(out, tout, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    tout.square().mean().backward()
    for name, q in int8_layers(model).items():  # the carrier's gradient is the weight's
        torch.testing.assert_close(q.weight.grad, getattr(twin, name).weight.grad,
                                   rtol=1e-5, atol=1e-7)
    opt = memopt_core.ApolloMini(model, lr=1e-2, stochastic_rounding=True, rounding_seed=SEED)
    opt.step()
    layer_opt = memopt_core.ApolloMini(twin_copy, lr=1e-2, stochastic_rounding=True,
                                       rounding_seed=SEED)
    layerwise = memopt_core.LayerwiseStep(layer_opt)
    twin_copy(idx).square().mean().backward()  # each carrier stepped inside backward
    layerwise.remove()
    for name, q in int8_layers(model).items():
        other = int8_layers(twin_copy)[name]
        assert torch.equal(q.weight_codes, other.weight_codes), name
        assert torch.equal(q.weight_scales, other.weight_scales), name


def test_forward_backward_keep_no_float_weight():
    """Saved for backward: inputs, codes and scales; never a decoded (float) weight."""
    model, _ = pair()
    idx = torch.randint(0, 40, (2, 8))
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx).sum().backward()
    for name, q in int8_layers(model).items():
        assert (torch.float32, (q.out_features, q.in_features)) not in saved, name
        assert q.weight.untyped_storage().nbytes() <= 4  # the carrier holds no memory


def test_resume_is_exact():
    def run(split):
        model, _ = pair()
        opt = OPTIMIZERS["apollo_mini"](model, stochastic_rounding=True, rounding_seed=SEED)
        for step in range(4):
            if step == split:
                sd_model = copy.deepcopy(model.state_dict())
                sd_opt = copy.deepcopy(opt.state_dict())
                model, _ = pair()
                model.load_state_dict(sd_model)
                opt = OPTIMIZERS["apollo_mini"](model, stochastic_rounding=True,
                                                rounding_seed=SEED)
                opt.load_state_dict(sd_opt)
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)
            opt.step()
        return model.state_dict()
    whole, resumed = run(None), run(2)
    assert whole.keys() == resumed.keys() and not any(k.endswith(".weight") and k[:2] in
                                                      ("wq", "w1") for k in whole)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_module_conversions_keep_the_format():
    model, _ = pair(torch.bfloat16)
    model.to(torch.float32)  # the carrier follows; codes and scales keep their dtypes
    q = int8_layers(model)["w1"]
    assert q.weight.dtype == torch.float32 and q.weight_scales.dtype == torch.float32
    assert q.weight_codes.dtype == torch.int8 and q.weight.untyped_storage().nbytes() <= 4
    clone = copy.deepcopy(model)  # a copy's carrier knows its own layer and holds no memory
    cq = int8_layers(clone)["w1"]
    assert int8_layer(cq.weight) is cq and cq.weight.untyped_storage().nbytes() <= 4
    assert torch.equal(cq.weight_codes, q.weight_codes) and cq.weight_codes is not q.weight_codes
    meta = Tiny().to("meta")
    memopt_core.quantize_weights_(meta, group_size=GROUP)
    meta.to_empty(device="cpu")
    assert int8_layers(meta)["w1"].weight_codes.device.type == "cpu"


def test_bad_input_raises_before_any_write():
    model, _ = pair()
    opt = memopt_core.AdamW(model.parameters(), lr=1e-2)
    set_grads(model, model, 0)
    q = int8_layers(model)["w1"]
    before = q.weight_codes.clone()
    q.weight_scales.data = torch.ones(q.out_features, 3)  # 3 groups do not divide 64 columns
    with pytest.raises(ValueError, match="scales of int8 parameter"):
        opt.step()
    assert torch.equal(q.weight_codes, before)
    with pytest.raises(ValueError, match="group_size"):
        memopt_core.quantize_weights_(Tiny(), group_size=48)
    with pytest.raises(ValueError, match="8-bit"):
        memopt_core.quantize_weights_(Tiny(), bits=4)
    codes = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 codes need their weight_scales"):
        torch.ops.memopt.check_adamw_([codes], [torch.zeros(4, 32)], [torch.zeros(4, 32)],
                                      [torch.zeros(4, 32)], [torch.zeros(())],
                                      torch.tensor(1e-3), 0.9, 0.99, 1e-8, 0.0)


def test_a_non_finite_update_poisons_its_group_only():
    """As a NaN gradient poisons its element of a float weight (nonfinite="propagate"), it
    poisons its group of an int8 weight: scale NaN, codes 0; the other groups step normally."""
    torch.manual_seed(2)
    codes, scales = int8_ref.encode(torch.randn(4, 64) * 0.05, GROUP)
    grad = torch.randn(4, 64) * 1e-2
    grad[1, 40] = float("nan")
    twin = int8_ref.decode(codes, scales)
    lr = torch.tensor(1e-2, dtype=torch.float64)
    for p, sc in ((codes, [scales]), (twin, None)):
        torch.ops.memopt.adamw_([p], [grad], [torch.zeros(4, 64)], [torch.zeros(4, 64)],
                                [torch.zeros(())], lr, 0.9, 0.99, 1e-8, 0.0, "torch", [], sc)
    ref_codes, ref_scales = int8_ref.encode(twin, GROUP)
    assert torch.isnan(scales[1, 1]) and (codes[1, 32:] == 0).all()
    assert torch.isnan(scales).sum() == 1
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales.nan_to_num(), ref_scales.nan_to_num())
