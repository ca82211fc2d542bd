"""Fuzzing AdamW, Adam-mini and SlimAdam against their float64 references, and every optimizer on
non-contiguous parameters against its own contiguous run (settings and strategies: fuzz_common)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fuzz_common import (Case, DTYPES, FUZZ, LR, WD, cases, compare, hparams, make_params, named,
                         named_cases, quiet, role_overrides, run, shapes)
from hypothesis import given  # noqa: E402  (fuzz_common skips the module without hypothesis)
from hypothesis import strategies as st  # noqa: E402

import memopt_core  # noqa: E402
from reference import adam_mini_ref as MR  # noqa: E402
from reference.adamw_ref import AdamWRef  # noqa: E402
from reference.slim_adam_ref import SlimAdamRef  # noqa: E402


# ---- AdamW -------------------------------------------------------------------------------------
@st.composite
def adamw_cases(draw):
    tensors = st.lists(st.tuples(shapes(0, 4), st.just("adam")), min_size=1, max_size=4)
    case = draw(cases(tensors))
    n = len(case.shapes)
    case.opts = dict(groups=draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)),
                     lr2=draw(LR), wd2=draw(WD), tensor_lr=draw(st.booleans()))
    return case


def fuzz_adamw(case: Case):
    params = make_params(case)
    hp, o = hparams(case), case.opts
    lr = torch.tensor(hp["lr"], dtype=torch.float64) if o["tensor_lr"] else hp["lr"]
    groups = [dict(params=[p for p, g in zip(params, o["groups"]) if g == 0])]
    second = [p for p, g in zip(params, o["groups"]) if g == 1]
    if second:
        groups.append(dict(params=second, lr=o["lr2"], weight_decay=o["wd2"]))
    opt = memopt_core.AdamW([g for g in groups if g["params"]], **{**hp, "lr": lr})
    lrs = [hp["lr"] if g == 0 else o["lr2"] for g in o["groups"]]
    wds = [hp["weight_decay"] if g == 0 else o["wd2"] for g in o["groups"]]
    kw = dict(betas=hp["betas"], eps=hp["eps"], lrs=lrs, weight_decays=wds)
    exact = AdamWRef(params, **kw)
    low = AdamWRef(params, **kw, storage_dtype=case.dtype)
    run(case, opt, params, exact.step, low.step)
    compare(case, opt, params, exact, low)


@FUZZ
@given(case=adamw_cases())
def test_adamw_matches_reference(case):
    fuzz_adamw(case)


# ---- Adam-mini -----------------------------------------------------------------------------
def head_dim(h: dict, shape) -> int:
    """The head size the optimizer was told (or can infer from a 2-D shape and n_heads)."""
    kw = h["kwargs"]
    hd = kw["dim"] // kw["n_heads"] if "dim" in kw else 0
    if not hd and "n_heads" in kw and len(shape) == 2 and shape[1] % kw["n_heads"] == 0:
        hd = shape[1] // kw["n_heads"]  # n_heads alone: the input width is the hidden size
    return hd


def qkv_split(h: dict, shape):
    """(q_heads, kv_heads, head_dim, transposed) when a 2-D fused QKV weight splits into
    q | k | v heads along its rows (else its columns), or None."""
    hd, q = head_dim(h, shape), h["kwargs"].get("n_heads", 0)
    if len(shape) != 2 or not hd or not q:
        return None

    def kv(out):
        rest = out // hd - q if out % hd == 0 else 0
        return rest // 2 if rest > 0 and rest % 2 == 0 else 0

    if kv(shape[0]):
        return q, kv(shape[0]), hd, False
    if kv(shape[1]):
        return q, kv(shape[1]), hd, True
    return None


def mini_blocks(role: str, shape, h: dict) -> list:
    """The paper's Adam-mini blocks (arXiv 2406.16793 §3) as flat index sets."""
    numel = math.prod(shape)
    if numel == 0:
        return []
    if role in ("norm", "scalar") or len(shape) == 0:
        return MR.whole(shape)
    if role in ("bias", "adam"):
        return MR.elementwise(shape)
    if role in ("embedding", "output"):                   # one block per token (last dim: features)
        return MR.per_row((numel // shape[-1], shape[-1]))
    if len(shape) == 1:
        return MR.whole(shape)
    if role == "qkv":
        split = qkv_split(h, shape)
        if split:
            return MR.fused_qkv(shape, split[0], split[1], split[2], transposed=split[3])
    if role in ("query", "key"):
        hd = head_dim(h, shape)
        if hd and shape[0] % hd == 0:
            return MR.per_head(shape, shape[0] // hd)     # one block per head
    return MR.per_row(shape)                              # one block per output neuron


@st.composite
def adam_mini_cases(draw):
    case = draw(named_cases())
    n = len(case.shapes)
    case.opts.update(groups=draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), lr2=draw(LR))
    return case


def fuzz_adam_mini(case: Case):
    params = make_params(case)
    h, o, hp = case.opts["heads"], case.opts, hparams(case)
    nm = named(case, params)
    groups = [{"params": [x for x, g in zip(nm, o["groups"]) if g == k], **({"lr": o["lr2"]} if k else {})}
              for k in (0, 1)]
    opt = quiet(lambda: memopt_core.AdamMini([g for g in groups if g["params"]], **hp,
                                             roles=role_overrides(case), **h["kwargs"]))
    entries = [(p, mini_blocks(r, p.shape, h), r not in ("norm", "bias", "scalar") and p.dim() > 1)
               for p, r in zip(params, case.roles)]
    lrs = [hp["lr"] if g == 0 else o["lr2"] for g in o["groups"]]
    kw = dict(betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"], lrs=lrs)
    exact = MR.AdamMiniRef(entries, **kw)
    low = MR.AdamMiniRef(entries, **kw, storage_dtype=case.dtype)
    for i, p in enumerate(params):
        assert opt.blocks[p].count == exact.nblocks[i], (
            f"tensor {i} {case.roles[i]} {tuple(p.shape)}: {opt.blocks[p].count} blocks, "
            f"the paper's {exact.nblocks[i]}")
    run(case, opt, params, exact.step, low.step)
    compare(case, opt, params, exact, low, lambda i: f"tensor {i} ({case.roles[i]} {case.shapes[i]})")


@FUZZ
@given(case=adam_mini_cases())
def test_adam_mini_matches_reference(case):
    fuzz_adam_mini(case)


# ---- SlimAdam ------------------------------------------------------------------------------
def slim_table_rule(role: str, shape, h: dict):
    """The paper's Table 1 (arXiv 2503.01843) for a tensor of `role`: the dims averaged."""
    if len(shape) < 2:
        return None
    if role in ("embedding", "output"):
        return (len(shape) - 1,)                          # per token
    if len(shape) != 2:
        return None
    if role in ("query", "key"):
        return (1,)                                       # fan-in: one value per output row
    if role in ("value", "attn_out", "mlp"):
        return (0,)                                       # fan-out: one value per input column
    if role == "qkv":
        split = qkv_split(h, shape)
        if split:
            q, kv, hd, tr = split
            qk, out = (q + kv) * hd, shape[1] if tr else shape[0]
            axis = 1 if tr else 0                          # q, k fan-in; v fan-out
            return [(axis, 0, qk, (1 - axis,)), (axis, qk, out, (axis,))]
    return None


@st.composite
def slim_cases(draw):
    case = draw(named_cases())
    mode = draw(st.sampled_from(["table", "dict", "none"]))
    rules = None
    if mode == "dict":
        rules = {}
        for i, shape in enumerate(case.shapes):
            kind = draw(st.sampled_from(["dims", "dims", "table", "null", "absent"]))
            if kind == "dims":
                dims = draw(st.lists(st.integers(0, len(shape) - 1), unique=True)) if shape else []
                rules[f"t{i}"] = [d - len(shape) if draw(st.booleans()) else d for d in dims]
            elif kind != "absent":
                rules[f"t{i}"] = "table" if kind == "table" else None
    case.opts["rules"] = rules if mode == "dict" else ("table" if mode == "table" else None)
    return case


def slim_rule(case: Case, i: int):
    rules, shape = case.opts["rules"], case.shapes[i]
    choice = rules if rules in ("table", None) else rules.get(f"t{i}")
    if choice == "table":
        return slim_table_rule(case.roles[i], shape, case.opts["heads"])
    if not choice:
        return None
    return tuple(sorted(d % len(shape) for d in choice))


def fuzz_slim_adam(case: Case):
    params = make_params(case)
    h, hp = case.opts["heads"], hparams(case)
    opt = quiet(lambda: memopt_core.SlimAdam(named(case, params), **hp, rules=case.opts["rules"],
                                             roles=role_overrides(case), **h["kwargs"]))
    entries = [(p, slim_rule(case, i)) for i, p in enumerate(params)]
    kw = dict(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    exact = SlimAdamRef(entries, **kw)
    low = SlimAdamRef(entries, **kw, storage_dtype=case.dtype)
    run(case, opt, params, exact.step, low.step)
    label = lambda i: f"tensor {i} ({case.roles[i]} {case.shapes[i]} rule {entries[i][1]})"  # noqa: E731
    compare(case, opt, params, exact, low, label)
    for i, p in enumerate(params):  # v in the reference's keepdim shape (an empty tensor: none)
        if p in opt.state and p.numel() and not isinstance(entries[i][1], list):
            assert opt.second_moment(p).shape == exact.nu[i][0].shape, label(i)


@FUZZ
@given(case=slim_cases())
def test_slim_adam_matches_reference(case):
    fuzz_slim_adam(case)


# ---- non-contiguous parameters ----------------------------------------------------------
def _optimizer_over(name: str, pairs: list):
    """`name` over named tensors (every matrix an MLP weight, so that each optimizer uses its
    own update on it, not an AdamW fallback)."""
    roles = {f"^{n}$": "mlp" for n, _ in pairs}
    if name == "adamw":
        return memopt_core.AdamW([p for _, p in pairs], lr=1e-2, weight_decay=0.1)
    if name == "apollo":
        return memopt_core.Apollo([{"params": [p for _, p in pairs], "rank": 2}], lr=1e-2)
    cls = dict(adam_mini=memopt_core.AdamMini, slim_adam=memopt_core.SlimAdam,
               apollo_mini=memopt_core.ApolloMini, frugal=memopt_core.Frugal)[name]
    kw = dict(density=0.5, seed=0) if name == "frugal" else {}
    return quiet(lambda: cls(pairs, lr=1e-2, roles=roles, **kw))


@FUZZ
@given(name=st.sampled_from(sorted(memopt_core.OPTIMIZERS)), rows=st.integers(2, 9),
       cols=st.integers(2, 9), layout=st.sampled_from(["transposed", "strided"]),
       dtype=DTYPES, first=st.booleans())
def test_noncontiguous_parameter_matches_contiguous_run(name, rows, cols, layout, dtype, first):
    """A transposed (dense, column-major) or gapped parameter beside a contiguous one steps
    exactly as the same optimizer steps contiguous copies of both: every such layout here takes
    the staged path (memopt/layout.h: these optimizers' blocks, projections and subspaces index
    logical rows or columns; AdamW in memory order), so the arithmetic is the same element for
    element and parameters and state agree bit for bit."""
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    base = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    odd = nn.Parameter(base.t().contiguous().t() if layout == "transposed"
                       else torch.stack([base, torch.full_like(base, float("nan"))], -1)[..., 0])
    good = nn.Parameter(torch.randn(cols, rows, generator=gen, dtype=torch.float64).to(dtype))
    assert not odd.is_contiguous()
    names = ["b", "g"] if first else ["g", "b"]
    ours = dict(b=odd, g=good)
    plain = {n: nn.Parameter(p.detach().contiguous()) for n, p in ours.items()}
    opts = [_optimizer_over(name, [(n, d[n]) for n in names]) for d in (ours, plain)]
    for _ in range(3):
        for n in names:
            g = torch.randn(ours[n].shape, generator=gen, dtype=torch.float64).to(dtype)
            ours[n].grad, plain[n].grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    for n in names:
        assert torch.equal(ours[n], plain[n]), (name, layout, n)
        mine, theirs = opts[0].state.get(ours[n], {}), opts[1].state.get(plain[n], {})
        assert set(mine) == set(theirs)
        for key, ref in theirs.items():
            if torch.is_tensor(ref):
                assert torch.equal(mine[key], ref), (name, layout, n, key)


@FUZZ
@given(shape=st.sampled_from([(0, 1), (0, 5), (3, 0), (0, 0)]), mini=st.booleans(),
       grouped=st.booleans())
def test_empty_projected_matrix_raises_a_clear_error(shape, mini, grouped):
    """APOLLO cannot project an empty weight: a ValueError at construction that says so, from a
    rank group (apollo-torch style) as from a model's names (an empty MLP weight)."""
    p = nn.Parameter(torch.zeros(shape))
    cls = memopt_core.ApolloMini if mini else memopt_core.Apollo
    with pytest.raises(ValueError, match="empty weight"):
        if grouped:
            cls([{"params": [p], "rank": 1}])
        else:
            quiet(lambda: cls([("mlp.w", p)], roles={"^mlp.w$": "mlp"}))
