"""Property-based fuzzing of every optimizer against its float64 paper reference (issue 17): the
settings, strategies and checks shared by tests/test_fuzz*.py (one file per optimizer family).

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

    MEMOPT_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/test_fuzz*.py
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

# Hypothesis caches what it learns from the source under .hypothesis/ (even with database=None):
# keep that out of the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "memopt-fuzz-hypothesis"))
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import assert_close, make_grads, rounding_atol  # noqa: E402

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


@st.composite
def named_cases(draw, roles=MATRIX_ROLES, flat_roles=FLAT_ROLES, max_tensors=4, max_dims=4,
                max_steps=4, beta2=None):
    h = draw(heads())
    tensors = st.lists(role_tensor(h, roles, flat_roles, max_dims), min_size=1, max_size=max_tensors)
    case = draw(cases(tensors, max_steps=max_steps, beta2=beta2))
    case.opts = dict(heads=h)
    return case
