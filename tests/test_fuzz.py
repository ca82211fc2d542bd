"""Property-based fuzzing of every optimizer against its float64 paper reference (issue 17).

Hypothesis draws, for AdamW, Adam-mini, SlimAdam, APOLLO, APOLLO-Mini and FRUGAL: tensor shapes
(0-D to 4-D where the optimizer takes them; sizes 0, 1, odd and larger), the dtype (float64 at a
tight tolerance; float32 and bfloat16 at the existing tests' tolerances), hyperparameters (lr,
betas, eps, weight decay, param groups), each optimizer's own options and block layouts (Adam-mini
roles and head counts, SlimAdam rules, APOLLO rank / side / scaling / limiter / refresh gap,
FRUGAL density / selection / block order / state-free rule), gradients for a few steps (some
missing, some in non-contiguous, offset or broadcast layouts whose unused memory is NaN), and
parameters that are contiguous views at a storage offset. Parameters and the state the reference
exposes are compared after every run. Non-contiguous *parameters* (transposed or with gaps) are
stepped like contiguous ones: that branch compares them, and every state tensor, bit for bit with
the same optimizer on contiguous copies (itself checked against the references above).
Mismatches it found are kept at the end as regression tests with their minimal @example (beta1 =
0, APOLLO's beta2 near 1, SlimAdam's v of an empty tensor, FRUGAL's randk on a scalar).

Where no reference can decide, the fuzzer does not ask: APOLLO's beta2 = 0 is left out (M / |R|
of a nearly cancelling projection is ill-conditioned); a broadcast (rank-1) gradient is not given to
SVD projections, nor signSGD to a projection that keeps the whole gradient (their residual is
rounding noise). APOLLO's float32 / float64 tolerance grows with the condition number of its
projections (a channel whose R = P G nearly cancels), and FRUGAL's bf16 reference stores the
projection subspace in bf16, as Frugal does.

Examples: a fixed seed (derandomize=True, no example database, Hypothesis' cache outside the
repository) and MEMOPT_FUZZ_EXAMPLES per test (default 40: about 15 s for the file on 2 cores);
fuzz harder with e.g.

    MEMOPT_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/test_fuzz.py
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field, replace

import pytest
import torch
from torch import nn

# Hypothesis caches what it learns from the source under .hypothesis/ (even with database=None):
# keep that out of the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "memopt-fuzz-hypothesis"))
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import memopt_core  # noqa: E402
from conftest import assert_close, make_grads, rounding_atol  # noqa: E402
from reference import adam_mini_ref as MR  # noqa: E402
from reference.adamw_ref import AdamWRef  # noqa: E402
from reference.apollo_ref import ApolloRef  # noqa: E402
from reference.frugal_ref import FrugalRef  # noqa: E402
from reference.slim_adam_ref import SlimAdamRef  # noqa: E402

EXAMPLES = int(os.environ.get("MEMOPT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                suppress_health_check=list(HealthCheck), print_blob=False)
KNOWN = settings(FUZZ, phases=[Phase.explicit])  # only the @example cases (none are drawn)

# Tolerances of the existing reference tests: float64 tight, float32 1e-5 relative to what the
# optimizer changed (plus the rounding of the stored weights), bfloat16 by the DESIGN's rule
# (error at most twice that of the same reference math stored in bfloat16).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FRUGAL_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16])

# Matrix roles (memopt_core.roles) and the ones a 0-D / 1-D tensor can have.
MATRIX_ROLES = ("embedding", "output", "query", "key", "value", "attn_out", "qkv", "mlp", "norm",
                "bias", "conv", "linear", "scalar", "adam")
FLAT_ROLES = ("norm", "bias", "scalar", "adam")
HEAD_ROLES = ("query", "key", "qkv")

# ---- strategies ------------------------------------------------------------------------------
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 31, 33, 40])
SMALL = st.sampled_from([1, 2, 3, 4, 5, 7])            # sides of 3-D / 4-D tensors


@st.composite
def shapes(draw, min_dims=0, max_dims=4):
    """A shape of min_dims to max_dims sides; about one in eight has a side of 0."""
    n = draw(st.integers(min_dims, max_dims))
    shape = [draw(SIZES if n <= 2 else SMALL) for _ in range(n)]
    if n and draw(st.integers(0, 7)) == 0:
        shape[draw(st.integers(0, n - 1))] = 0
    return tuple(shape)


GRAD_LAYOUTS = st.sampled_from(["contiguous", "contiguous", "strided", "transposed", "offset",
                                "expanded"])
LR = st.sampled_from([1e-4, 1e-3, 3e-3, 1e-2, 5e-2, 0.1])
BETA1 = st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
BETA2 = st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999])
# APOLLO: not 0, where Rt = M / |R| elementwise is ill-conditioned wherever a projected element
# nearly cancels (float32 GEMM rounding of R then moves the update arbitrarily).
APOLLO_BETA2 = st.sampled_from([0.5, 0.9, 0.95, 0.99, 0.999, 0.9999])
EPS = st.sampled_from([0.0, 1e-12, 1e-8, 1e-6, 1e-3])
WD = st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3])


@dataclass
class Case:
    """One fuzz case: tensors, how their gradients arrive, hyperparameters and options."""
    shapes: list
    dtype: torch.dtype = torch.float32
    roles: list = field(default_factory=list)          # one per tensor (named optimizers)
    seed: int = 0
    steps: int = 3
    grad_scale: float = 1e-2
    init_scale: float = 1.0
    grad_layouts: list = field(default_factory=list)   # one per tensor; default contiguous
    param_offsets: list = field(default_factory=list)  # one bool per tensor
    skips: list = field(default_factory=list)          # per step: indices without a gradient
    hp: dict = field(default_factory=lambda: dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                                  weight_decay=0.1))
    opts: dict = field(default_factory=dict)
    grads: list = None  # explicit gradient values, [step][tensor] (minimal @example cases)

    def layout(self, i):
        return self.grad_layouts[i] if i < len(self.grad_layouts) else "contiguous"

    def skipped(self, step, i):
        return step < len(self.skips) and i in self.skips[step]


@st.composite
def cases(draw, tensors, max_steps=4, beta2=None):
    """A Case around `tensors` (a strategy of [(shape, role)])."""
    entries = draw(tensors)
    n = len(entries)
    steps = draw(st.integers(1, max_steps))
    skip = st.one_of(st.just(frozenset()), st.frozensets(st.integers(0, n - 1), max_size=n))
    return Case(
        shapes=[s for s, _ in entries], roles=[r for _, r in entries], dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)), steps=steps,
        grad_scale=draw(st.sampled_from([1e-4, 1e-2, 1.0, 30.0])),
        init_scale=draw(st.sampled_from([0.02, 1.0, 10.0])),
        grad_layouts=draw(st.lists(GRAD_LAYOUTS, min_size=n, max_size=n)),
        param_offsets=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        skips=draw(st.lists(skip, min_size=steps, max_size=steps)),
        hp=dict(lr=draw(LR), betas=(draw(BETA1), draw(BETA2 if beta2 is None else beta2)), eps=draw(EPS),
                weight_decay=draw(WD)))


# ---- tensors, gradients --------------------------------------------------------------------
NAN = float("nan")


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t in another memory layout; the memory a kernel must not read is NaN. 'expanded'
    broadcasts t's first row (other values: both sides get the same tensor)."""
    if layout == "strided" and t.numel() > 1:  # every other element of a buffer
        return torch.stack([t, torch.full_like(t, NAN)], -1)[..., 0]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "offset":  # contiguous, at a storage offset
        return torch.cat([torch.full((3,), NAN, dtype=t.dtype), t.reshape(-1)])[3:].view(t.shape)
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def make_params(case: Case) -> list:
    gen = torch.Generator().manual_seed(case.seed)
    out = []
    for i, shape in enumerate(case.shapes):
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * case.init_scale).to(case.dtype)
        if i < len(case.param_offsets) and case.param_offsets[i]:
            t = lay_out(t, "offset")
        out.append(nn.Parameter(t))
    return out


def grads_at(case: Case, params: list, step: int):
    """(what the optimizer gets, the same values contiguous for the reference); None: no grad."""
    dummies = [torch.empty(p.shape, dtype=torch.float64) for p in params]
    drawn = [g * (case.grad_scale / 1e-2) for g in make_grads(dummies, step, seed=case.seed + 1)] \
        if case.grads is None else [torch.tensor(g, dtype=torch.float64) for g in case.grads[step]]
    given, plain = [], []
    for i, g in enumerate(drawn):
        if case.skipped(step, i):
            given.append(None)
            plain.append(None)
            continue
        g = lay_out(g.to(case.dtype), case.layout(i))
        given.append(g)
        plain.append(g.contiguous())
    return given, plain


def run(case: Case, opt, params, *refs):
    for step in range(case.steps):
        given, plain = grads_at(case, params, step)
        for p, g in zip(params, given):
            p.grad = g
        opt.step()
        for ref in refs:
            ref(plain)


def steps_taken(case: Case, i: int) -> int:
    return sum(not case.skipped(s, i) for s in range(case.steps))


def check(case: Case, ours, expected, what, origin=None, rtol=None, atol=0.0):
    """float64 / float32: elementwise (conftest.assert_close; `atol` added to the rounding of
    the weight); bfloat16 is checked by budget (only non-finite values here)."""
    if expected.numel() == 0:
        return
    finite = torch.isfinite(expected.detach().double())
    assert torch.equal(torch.isfinite(ours.detach().double()), finite), \
        f"{what}: non-finite values where the reference has none, or the reverse"
    assert bool(finite.all()), f"{what}: the reference itself is not finite"  # no vacuous NaN checks
    if case.dtype == torch.bfloat16:
        return
    rtol = RTOL[case.dtype] if rtol is None else rtol
    # the weight is rounded up to 3 times a step (decay, update, FRUGAL's state-free part)
    if origin is not None:
        atol = atol + rounding_atol(ours, case.steps, 3)
    assert_close(ours, expected, rtol, what, origin=origin, atol=atol)


def bf16_rule(rows):
    """The DESIGN's bf16 rule of conftest.assert_within_low_precision_budget, per quantity over
    all tensors: our error against the float64 reference is at most twice that of the same
    reference math stored in bfloat16. rows: (quantity, ours, exact, bf16 reference). Where the
    bf16 reference is exact (m = g with beta1 = 0, a 1-element tensor) ours must be exact too;
    conftest's helper refuses such a zero budget, which small fuzzed cases reach. Plus one ulp
    of the largest value: where a single element dominates the norm, ours landing on the other
    bf16 neighbour of the exact value than the bf16 reference did is not twice its error."""
    by_key = {}
    for key, ours, exact, low in rows:
        if ours.numel():
            by_key.setdefault(key, []).append((ours, exact, low))
    for key, items in by_key.items():
        ours, e, lw = (torch.cat([t[k].detach().double().reshape(-1) for t in items]) for k in range(3))
        err, budget = (ours - e).norm().item(), (lw - e).norm().item()
        ulp = torch.finfo(items[0][0].dtype).eps * e.abs().max().item()
        assert err <= 2 * budget + ulp, \
            f"{key}: error {err:.3e} > 2 x bf16 reference error {budget:.3e} + one ulp {ulp:.3e}"


def adam_rows(opt, p, exact, low, j) -> list:
    """bf16_rule rows of p, m and v for a tensor at index j of references with p, m, v lists."""
    s = opt.state[p]
    return [("param", p, exact.p[j], low.p[j]), ("exp_avg", s["exp_avg"], exact.m[j], low.m[j]),
            ("exp_avg_sq", s["exp_avg_sq"], exact.v[j], low.v[j])]


def bf16_check(case: Case, opt, params, exact, low):
    if case.dtype == torch.bfloat16:
        bf16_rule([row for i, p in enumerate(params) if p in opt.state
                   for row in adam_rows(opt, p, exact, low, i)])


def compare(case: Case, opt, params, exact, low, label=lambda i: f"tensor {i}"):
    """Every tensor against the references (p, m, v lists): no state without a gradient, the
    step count, p, m and (where the tensor has elements) v; bf16 by the DESIGN's rule."""
    for i, p in enumerate(params):
        n, what = steps_taken(case, i), label(i)
        if not n:
            assert p not in opt.state and torch.equal(p.double(), exact.p0[i]), what
            continue
        s = opt.state[p]
        assert s["step"].item() == n, what
        check(case, p, exact.p[i], f"{what} param", origin=exact.p0[i])
        check(case, s["exp_avg"], exact.m[i], f"{what} exp_avg")
        if p.numel():  # an empty tensor's v means nothing (SlimAdam's reference: a NaN mean)
            check(case, s["exp_avg_sq"], exact.v[i], f"{what} exp_avg_sq")
    bf16_check(case, opt, params, exact, low)


def hparams(case: Case, **extra) -> dict:
    return {**case.hp, **extra}


def named(case: Case, params) -> list:
    return [(f"t{i}", p) for i, p in enumerate(params)]


def role_overrides(case: Case) -> dict:
    return {f"^t{i}$": r for i, r in enumerate(case.roles)}


def quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


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
@st.composite
def heads(draw):
    """(dim, n_heads, n_kv_heads, head_dim) drawn consistently, and what the optimizer is told."""
    hd, kv = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    q = kv * draw(st.integers(1, 3))
    dim = q * hd if draw(st.integers(0, 3)) else draw(st.integers(1, 24))
    told = draw(st.sampled_from(["none", "n_heads", "dim", "dim_kv"]))
    kwargs = {"none": {}, "n_heads": dict(n_heads=q), "dim": dict(dim=dim, n_heads=q),
              "dim_kv": dict(dim=dim, n_heads=q, n_kv_heads=kv)}[told]
    return dict(dim=dim, q=q, kv=kv, hd=hd, kwargs=kwargs)


@st.composite
def role_tensor(draw, h, roles=MATRIX_ROLES, flat_roles=FLAT_ROLES, max_dims=4):
    """(shape, role): matrices get any role; head roles often get head-shaped matrices."""
    role = draw(st.sampled_from(roles + flat_roles))
    if role in flat_roles:  # 0-D / 1-D, or any shape where the role also names matrices
        return draw(shapes(0, max_dims if role in roles else 1)), role
    if role in HEAD_ROLES and draw(st.integers(0, 3)):
        q, kv, hd, dim = h["q"], h["kv"], h["hd"], h["dim"]
        rows = {"query": q, "key": kv, "qkv": q + 2 * kv}[role] * hd
        shape = (dim, rows) if role == "qkv" and draw(st.booleans()) else (rows, dim)
        return shape, role
    return draw(shapes(2, 2 if role == "qkv" else max_dims)), role


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
def named_cases(draw, roles=MATRIX_ROLES, flat_roles=FLAT_ROLES, max_tensors=4, max_dims=4,
                max_steps=4, beta2=None):
    h = draw(heads())
    tensors = st.lists(role_tensor(h, roles, flat_roles, max_dims), min_size=1, max_size=max_tensors)
    case = draw(cases(tensors, max_steps=max_steps, beta2=beta2))
    case.opts = dict(heads=h)
    return case


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


# ---- APOLLO / APOLLO-Mini ------------------------------------------------------------------
PROJECTED_ROLES = ("query", "key", "value", "attn_out", "qkv", "mlp", "linear")


@st.composite
def apollo_options(draw):
    proj = draw(st.sampled_from(["random", "random", "svd"]))
    return dict(
        rank=draw(st.integers(1, 6)), proj=proj,
        proj_type=draw(st.sampled_from(["std", "reverse_std", "left", "right"])),
        scale_type=draw(st.sampled_from(["channel", "tensor"])),
        update_proj_gap=draw(st.integers(1, 3)),
        scale=draw(st.sampled_from([1.0, 0.25, 128.0])),
        norm_growth_limit=draw(st.sampled_from([None, 1.01, 1.5])),
        scale_front=draw(st.booleans()),
        store_projection=proj == "svd" or draw(st.booleans()),
        adamw_rule=draw(st.sampled_from(["apollo", "torch"])))


@st.composite
def apollo_group_cases(draw):
    """apollo-torch-style groups: projected matrices (a group with 'rank'), the rest AdamW."""
    projected = st.lists(st.tuples(st.tuples(SIZES, SIZES), st.just("apollo")), min_size=1, max_size=3)
    others = st.lists(st.tuples(shapes(0, 4), st.just("adam")), max_size=2)
    tensors = st.tuples(projected, others).map(lambda t: t[0] + t[1])
    case = draw(cases(tensors, max_steps=5, beta2=APOLLO_BETA2))
    case.opts = dict(apollo=draw(apollo_options()), adamw_first=draw(st.booleans()))
    return no_broadcast_grads(case) if case.opts["apollo"]["proj"] == "svd" else case


def no_broadcast_grads(case: Case) -> Case:
    """A broadcast (rank-1) gradient leaves SVD basis vectors orthogonal to it: their projected
    gradient is rounding noise (or exactly 0: 0/0 with eps = 0), and Adam's M / sqrt(V) of
    noise is O(1) and arbitrary. No reference can pin that down, so SVD cases get other
    layouts."""
    case.grad_layouts = ["strided" if x == "expanded" else x for x in case.grad_layouts]
    return case


def apollo_refs(case: Case, opt, params):
    """Per tensor: its reference (ApolloRef or AdamWRef, exact and bf16-stored) and the index in
    it. Seeds are apollo-torch's: the parameter's 1-based position across the groups."""
    position = {id(p): k + 1 for k, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    hp = hparams(case)
    exact, low, where = [], [], {}
    for group in opt.param_groups:
        ps = group["params"]
        kw = dict(lr=group["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=group["weight_decay"])
        if group.get("rank") is None:  # AdamW under the group's rule (apollo-torch's or torch's)
            make = lambda dt: AdamWRef(ps, **kw, storage_dtype=dt, rule=group["adamw_rule"])  # noqa: E731
        else:
            opts = {k: group[k] for k in ("rank", "proj", "proj_type", "scale_type", "update_proj_gap",
                                          "scale", "norm_growth_limit", "scale_front")}
            seeds = [position[id(p)] for p in ps]
            make = lambda dt: ApolloRef(ps, seeds, **kw, **opts, storage_dtype=dt)  # noqa: E731
        exact.append(make(torch.float64))
        low.append(make(case.dtype))
        for j, p in enumerate(ps):
            where[p] = (len(exact) - 1, j)
    index = {id(p): i for i, p in enumerate(params)}

    def step(refs):
        def go(plain):
            for r, ref in enumerate(refs):
                ref.step([plain[index[id(p)]] for p in opt.param_groups[r]["params"]])
        return go
    return exact, low, where, step


def projection_condition(ref: ApolloRef, j: int, g: torch.Tensor) -> torch.Tensor:
    """Per element of the weight: K * kappa of its channel, where R = P G is a sum of K products
    and kappa = || |P| |G| || / ||R|| over the channel (the whole tensor for tensor-wise
    scaling). Floating point forms R with a relative error up to about K * u * kappa (Higham's
    dot-product bound), and APOLLO's s_c = ||Rt_c|| / ||R_c|| passes it on: a channel whose
    projection nearly cancels is ill-conditioned in any precision (float32 GEMM, as in
    apollo-torch)."""
    P = ref.P[j]
    if ref.right[j]:
        R, bound, dim, k = g @ P.t(), g.abs() @ P.abs().t(), 1, g.shape[1]
    else:
        R, bound, dim, k = P.t() @ g, P.abs().t() @ g.abs(), 0, g.shape[0]
    if ref.scale_type == "channel":
        kappa = bound.norm(dim=dim, keepdim=True) / R.norm(dim=dim, keepdim=True).clamp_min(1e-300)
    else:
        kappa = (bound.norm() / R.norm().clamp_min(1e-300)).reshape(1, 1)
    return (k * kappa).expand(g.shape)


def run_apollo(case: Case, opt, params):
    """Steps `opt` and the references, then compares every tensor (P, seed and limiter norm
    too); bf16 by the DESIGN's rule. A projected weight's tolerance grows with the condition
    of its projections (projection_condition) along the path it moved."""
    exact, low, where, step = apollo_refs(case, opt, params)
    cond = {p: torch.zeros(p.shape, dtype=torch.float64) for p in params}
    path = {p: torch.zeros(p.shape, dtype=torch.float64) for p in params}

    def exact_step(plain):
        before = {p: exact[where[p][0]].p[where[p][1]] for p in params}
        step(exact)(plain)
        for p, g in zip(params, plain):
            ref, j = exact[where[p][0]], where[p][1]
            if g is not None and isinstance(ref, ApolloRef):
                cond[p] = torch.maximum(cond[p], projection_condition(ref, j, g.double()))
            path[p] += (ref.p[j] - before[p]).abs()

    run(case, opt, params, exact_step, step(low))
    unit = torch.finfo(case.dtype).eps / 2
    rows = []
    for i, p in enumerate(params):
        r, j = where[p]
        ref, n = exact[r], steps_taken(case, i)
        what = f"tensor {i} {tuple(p.shape)} {type(ref).__name__}"
        if not n:
            assert p not in opt.state, what
            continue
        s = opt.state[p]
        assert s["step"].item() == n, what
        check(case, p, ref.p[j], f"{what} param", origin=ref.p0[j], atol=4 * unit * cond[p] * path[p])
        check(case, s["exp_avg"], ref.m[j], f"{what} exp_avg")
        check(case, s["exp_avg_sq"], ref.v[j], f"{what} exp_avg_sq")
        if isinstance(ref, ApolloRef):
            group = opt._group_of(p)
            if "proj" in s and case.dtype != torch.bfloat16:
                check(case, s["proj"], ref.P[j], f"{what} P", rtol=0 if group["proj"] == "random" else None)
            if "seed" in s:
                assert int(s["seed"]) == ref.seeds[j], what
            if ref.gamma and case.dtype != torch.bfloat16:
                norm = ref.norm[j].reshape(())  # ||U||: as ill-conditioned as its worst channel
                check(case, s["limiter_norm"], norm, f"{what} limiter norm",
                      atol=4 * unit * cond[p].max() * norm.abs())
        rows += adam_rows(opt, p, ref, low[r], j)
    if case.dtype == torch.bfloat16:
        bf16_rule(rows)


def fuzz_apollo_groups(case: Case):
    params = make_params(case)
    k = sum(r == "apollo" for r in case.roles)
    settings = dict(case.opts["apollo"])
    rule = settings.pop("adamw_rule")
    projected = {"params": params[:k], **settings}
    groups = [projected] + ([{"params": params[k:]}] if params[k:] else [])
    if case.opts["adamw_first"]:
        groups.reverse()
    opt = memopt_core.Apollo(groups, **hparams(case), adamw_rule=rule)
    run_apollo(case, opt, params)


@FUZZ
@given(case=apollo_group_cases())
def test_apollo_groups_match_reference(case):
    fuzz_apollo_groups(case)


@st.composite
def apollo_named_cases(draw):
    case = draw(named_cases(max_steps=5, beta2=APOLLO_BETA2))
    case.opts.update(mini=draw(st.booleans()), rank=draw(st.sampled_from([None, 1, 2, 3, 8])),
                     apollo=draw(apollo_options()))
    return no_broadcast_grads(case) if case.opts["apollo"]["proj"] == "svd" else case


def fuzz_apollo_named(case: Case):
    """Apollo / ApolloMini built from names: attention and MLP matrices projected (rank
    clamped to the smaller side), everything else AdamW; an empty projected matrix raises."""
    params = make_params(case)
    cls = memopt_core.ApolloMini if case.opts["mini"] else memopt_core.Apollo
    a = case.opts["apollo"]
    kw = {k: a[k] for k in ("proj", "proj_type", "update_proj_gap", "norm_growth_limit", "scale_front",
                            "adamw_rule")}
    projected = [p.dim() == 2 and r in PROJECTED_ROLES for p, r in zip(params, case.roles)]
    build = lambda: cls(named(case, params), **hparams(case), rank=case.opts["rank"], **kw,  # noqa: E731
                        roles=role_overrides(case))
    if any(f and p.numel() == 0 for f, p in zip(projected, params)):
        with pytest.raises(ValueError, match="empty"):
            quiet(build)
        return
    opt = quiet(build)
    default_rank = 1 if case.opts["mini"] else 256
    for p, f in zip(params, projected):
        group = opt._group_of(p)
        assert (group.get("rank") is not None) == f, tuple(p.shape)
        if f:
            assert group["rank"] == max(1, min(case.opts["rank"] or default_rank, *p.shape))
            assert group["scale_type"] == ("tensor" if case.opts["mini"] else "channel")
    run_apollo(case, opt, params)


@FUZZ
@given(case=apollo_named_cases())
def test_apollo_and_mini_from_named_parameters_match_reference(case):
    fuzz_apollo_named(case)


# ---- FRUGAL --------------------------------------------------------------------------------
FRUGAL_PROJECTABLE = ("query", "key", "value", "attn_out", "qkv", "mlp")


FRUGAL_OPTS = ("density", "update_gap", "selection", "block_order", "state_free",
               "state_free_lr_scale", "proj_params_lr_scale", "reset_statistics", "seed")


def frugal_projectable(case: Case) -> list:
    """FRUGAL's split tensors (paper §4): attention and MLP matrices, plus embeddings, norms and
    the output layer when asked."""
    o = case.opts
    extra = {"embedding": o["proj_embeds"], "norm": o["proj_norms"], "output": o["proj_logits"]}
    return [(r in FRUGAL_PROJECTABLE and len(s) == 2) or extra.get(r, False)
            for s, r in zip(case.shapes, case.roles)]


def frugal_residual_is_rounding(case: Case) -> bool:
    """Whether a projection keeps all of some gradient (rank round(rho * smaller side) equal to
    that side): its residual G - up(down(G)) is then rounding noise, whose sign (signSGD) no
    reference can pin down."""
    o = case.opts
    if o["selection"] not in ("svd", "random"):
        return False
    return any(f and len(shape) == 2 and min(shape) and round(min(shape) * o["density"]) == min(shape)
               for shape, f in zip(case.shapes, frugal_projectable(case)))


@st.composite
def frugal_cases(draw):
    case = draw(named_cases(roles=FRUGAL_PROJECTABLE + ("embedding", "output", "norm", "linear", "conv"),
                            flat_roles=("norm", "bias", "scalar"), max_tensors=5, max_steps=5))
    case.opts.update(
        density=draw(st.sampled_from([0.0, 0.25, 0.5, 1 / 3, 0.75, 1.0])),
        update_gap=draw(st.integers(1, 3)),
        selection=draw(st.sampled_from(["block", "block", "columns", "rows", "randk", "svd",
                                        "random", "randperm"])),
        block_order=draw(st.sampled_from(["descending", "ascending", "mirror", "random"])),
        state_free=draw(st.sampled_from(["sign_sgd", "sgd", None])),
        state_free_lr_scale=draw(st.sampled_from([1.0, 0.5])),
        proj_params_lr_scale=draw(st.sampled_from([1.0, 0.7])),
        reset_statistics=draw(st.booleans()),
        proj_embeds=draw(st.booleans()), proj_norms=draw(st.booleans()),
        proj_logits=draw(st.booleans()), seed=draw(st.integers(0, 1000)))
    if case.opts["state_free"] == "sign_sgd" and frugal_residual_is_rounding(case):
        case.opts["state_free"] = draw(st.sampled_from(["sgd", None]))
    if case.opts["selection"] == "randk":  # a projectable 0-D tensor crashes (test_known_frugal_...)
        proj = frugal_projectable(case)
        case.shapes = [(1,) if s == () and f else s for s, f in zip(case.shapes, proj)]
    if case.opts["selection"] in ("svd", "random"):  # the projected gradient is a GEMM's output
        if case.hp["betas"][1] == 0:  # m / |g_low|: ill-conditioned where g_low nearly cancels
            case.hp["betas"] = (case.hp["betas"][0], draw(st.sampled_from([0.5, 0.9, 0.99, 0.999])))
        if case.opts["selection"] == "svd":
            no_broadcast_grads(case)
    return case


class FrugalStoredRef(FrugalRef):
    """FrugalRef whose low-precision run also stores a projection subspace in that dtype, as
    Frugal keeps it (in the parameter dtype): the bf16 budget then includes the sign flips of
    small state-free residuals that a bf16 P causes (FrugalRef rounds only p, m and v). And a
    0-D projectable tensor (proj_norms with selection='randk'), where FrugalRef raises."""

    def _new_subspace(self, i, g):
        if g.dim() == 0:  # FrugalRef reads g.shape[0] first; for randk a 0-D tensor is 1 element
            g = g.reshape(1)
        sub = super()._new_subspace(i, g)
        return self._round(sub) if sub is not None and sub.is_floating_point() else sub


def fuzz_frugal(case: Case):
    params = make_params(case)
    o, hp = case.opts, hparams(case)
    proj = frugal_projectable(case)
    kw = {k: o[k] for k in FRUGAL_OPTS}
    flags = {k: o[k] for k in ("proj_embeds", "proj_norms", "proj_logits")}
    build = lambda: memopt_core.Frugal(named(case, params), **hp, **kw, **flags,  # noqa: E731
                                       roles=role_overrides(case))
    if o["selection"] not in ("block", "randk") and any(f and p.dim() != 2 for f, p in zip(proj, params)):
        with pytest.raises(ValueError, match="2-D"):
            quiet(build)
        return
    if o["selection"] == "block" and o["block_order"] == "mirror" and round(sum(proj) * o["density"]) % 2:
        with pytest.raises(ValueError, match="mirror"):
            quiet(build)
        return
    opt = quiet(build)
    assert [p in opt._index for p in params] == proj
    exact = FrugalStoredRef(params, proj, **hp, **kw)
    low = FrugalStoredRef(params, proj, **hp, **kw, storage_dtype=case.dtype)
    run(case, opt, params, exact.step, low.step)
    rtol = FRUGAL_RTOL.get(case.dtype)
    for i, p in enumerate(params):
        what = f"tensor {i} ({case.roles[i]} {tuple(p.shape)}{' projectable' if proj[i] else ''})"
        st_ref = exact.state[i]
        if case.dtype != torch.bfloat16:
            check(case, p, exact.p[i], f"{what} param", origin=exact.p0[i], rtol=rtol)
        if st_ref is None:
            assert p not in opt.state, f"{what} holds state while its reference does not"
            continue
        ours = opt.state[p]
        assert set(ours) == set(st_ref), (what, sorted(ours), sorted(st_ref))
        assert ours["step"].item() == st_ref["step"], what
        for key in ("exp_avg", "exp_avg_sq"):
            check(case, ours[key], st_ref[key], f"{what} {key}", rtol=rtol)
        if "subspace" in st_ref and case.dtype != torch.bfloat16:
            check(case, ours["subspace"].double(), st_ref["subspace"].double(), f"{what} subspace",
                  rtol=rtol)
    if case.dtype == torch.bfloat16:  # test_frugal's rule: the parameters (state layouts vary)
        bf16_rule([("param", p, exact.p[i], low.p[i]) for i, p in enumerate(params)])


@FUZZ
@given(case=frugal_cases())
def test_frugal_matches_reference(case):
    fuzz_frugal(case)


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


# ---- mismatches the fuzzer found (all fixed): minimal cases as regression tests -------------
FUZZERS = dict(adamw=fuzz_adamw, adam_mini=fuzz_adam_mini, slim_adam=fuzz_slim_adam,
               frugal=fuzz_frugal)
ONE_HEAD = dict(dim=1, q=1, kv=1, hd=1, kwargs={})


def with_defaults(name: str, case: Case) -> Case:
    """`case` completed with neutral options of optimizer `name`."""
    n = len(case.shapes)
    opts = dict(
        adamw=dict(groups=[0] * n, lr2=case.hp["lr"], wd2=0.0, tensor_lr=False),
        adam_mini=dict(heads=ONE_HEAD, groups=[0] * n, lr2=case.hp["lr"]),
        slim_adam=dict(heads=ONE_HEAD, rules="table"),
        frugal=dict(heads=ONE_HEAD, density=0.0, update_gap=1, selection="block",
                    block_order="descending", state_free="sign_sgd", state_free_lr_scale=1.0,
                    proj_params_lr_scale=1.0, reset_statistics=True, proj_embeds=False,
                    proj_norms=False, proj_logits=False, seed=0))[name]
    return replace(case, opts={**opts, **case.opts})


# m = b1 m + (1 - b1) g is g exactly when beta1 = 0, but the kernels computed
# m += (1 - b1)(g - m), which keeps the rounding of the previous m: after g = 1 then g = 1e-6,
# m = 1.0133e-6 in float32 and, with beta2 = 0 (update lr * m / |g|), the step was 1.3% too
# long. They now use torch.lerp's formula (cpu::lerp), which switches to g - (g - m) * b1 for
# weights >= 0.5, as torch.optim.AdamW does.
BETA1_ZERO = Case(shapes=[(1,)], roles=["norm"], dtype=torch.float32, init_scale=0.0, steps=2,
                  grads=[[[1.0]], [[1e-6]]],
                  hp=dict(lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0))


@pytest.mark.parametrize("name", sorted(FUZZERS))
@KNOWN
@given(case=st.none())
@example(case=BETA1_ZERO)
def test_beta1_zero_keeps_m_equal_to_the_gradient(name, case):
    FUZZERS[name](with_defaults(name, case))


# APOLLO's moments (apollo_tiles.h adam_element) computed 1 - beta2 in float32 from beta2
# rounded to float32 for float32 / bfloat16 parameters: 1 - 0.9999f = 1.000166e-4, so V was
# 1.7e-4 too large and the first update 8.3e-5 too small. Now 1 - beta2 is formed in double
# (MomentCoefs), as apollo-torch and the reference do.
APOLLO_BETA2_NEAR_ONE = Case(
    shapes=[(1, 1)], roles=["apollo"], dtype=torch.float32, init_scale=0.0, steps=1,
    grads=[[[[1.0]]]], hp=dict(lr=1.0, betas=(0.9, 0.9999), eps=0.0, weight_decay=0.0),
    opts=dict(apollo=dict(rank=1, proj="random", proj_type="std", scale_type="tensor",
                          update_proj_gap=1, scale=1.0, norm_growth_limit=None, scale_front=False,
                          store_projection=True, adamw_rule="apollo"), adamw_first=False))


@KNOWN
@given(case=st.none())
@example(case=APOLLO_BETA2_NEAR_ONE)
def test_apollo_beta2_near_one(case):
    fuzz_apollo_groups(case)


@KNOWN
@given(shape=st.none(), dims=st.none())
@example(shape=(0, 5), dims=[0])
def test_slim_adam_second_moment_of_an_empty_tensor(shape, dims):
    """Was a RuntimeError: v_shape (1, 5), the keepdim shape, for 0 entries of exp_avg_sq. An
    empty tensor has no v entries; v_shape is now its own shape."""
    p = nn.Parameter(torch.zeros(shape))
    opt = memopt_core.SlimAdam([("w", p)], rules={"w": dims})
    p.grad = torch.zeros(shape)
    opt.step()
    assert opt.second_moment(p).numel() == opt.state[p]["exp_avg_sq"].numel()


# Frugal._plan builds {COLUMNS: p.shape[-1], ROWS: p.shape[0], RANDK: p.numel()} for every
# coordinate selection, so a 0-D projectable tensor (a scalar norm gain with proj_norms=True)
# under selection="randk" and k = int(density) >= 1 raises IndexError from step() (nothing is
# changed). Construction accepts it: randk is documented for tensors of any shape.
FRUGAL_RANDK_SCALAR = Case(shapes=[()], roles=["norm"], dtype=torch.float32, steps=1,
                           grads=[[0.5]], opts=dict(selection="randk", density=1.0, proj_norms=True))


@KNOWN
@given(case=st.none())
@example(case=FRUGAL_RANDK_SCALAR)
def test_frugal_randk_on_a_scalar(case):
    """Was an IndexError in the re-selection (p.shape[0] of a 0-D tensor); found by this fuzzer."""
    fuzz_frugal(with_defaults("frugal", case))
