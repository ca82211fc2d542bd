"""memopt::FrugalPlan (_C.FrugalPlan), the one implementation of FRUGAL's decisions that both
front ends apply, against an independent pure-Python model of the paper's Alg. 1 as the README
describes it: every step's modes, state changes, active blocks and redrawn subspaces for every
selection and block order; plus the projectable rule, option checks and saved-selection checks.
The front ends' wiring is tested by test_frugal.py (Python) and test_cpp_frugal.py (LibTorch)."""
from __future__ import annotations

import pytest
import torch

from memopt_core import _C

ADAM, ACTIVE, FREE, COLUMNS, ROWS, RANDK, RIGHT, LEFT = range(8)
NONE, KEEP, CARRY, START, DROP = range(5)
SHAPES = [(8, 6), (4, 10), (6, 6), (12, 4), (3, 5), (2, 3)]


def make_plan(shapes, selection="block", density=0.5, update_gap=2, block_order="descending",
              reset_statistics=True, seed=7, roles=None, **flags):
    roles = roles or ["mlp"] * len(shapes)
    specs = [(f"t{i}", list(s), r, False) for i, (s, r) in enumerate(zip(shapes, roles))]
    return _C.FrugalPlan(specs, density=density, update_gap=update_gap, selection=selection,
                         block_order=block_order, state_free="sign_sgd",
                         reset_statistics=reset_statistics, seed=seed,
                         **{k: flags.get(k, False) for k in ("proj_embeds", "proj_norms",
                                                             "proj_logits")})


class Oracle:
    """FRUGAL's selection from the README: round(rho*N) active blocks re-chosen every update_gap
    steps in block_order; or per tensor, at its first gradient of each cycle, int(rho*n)
    columns / rows / coordinates (randperm(n)[:k], sorted) or a rank round(rho*min side)
    projection on the smaller side; a tensor keeps state while it is state-full, starts from
    zero when it becomes so or (reset_statistics) when its subspace is redrawn."""

    def __init__(self, shapes, selection, density, gap, order, reset, seed):
        self.shapes, self.sel, self.d, self.gap, self.order, self.reset = (
            shapes, selection, density, gap, order, reset)
        self.n = len(shapes)
        self.g = torch.Generator().manual_seed(seed)
        self.k = round(self.n * density)
        self.t, self.cursor, self.block_cycle = 0, None, 0
        self.drawn_in = [None] * self.n
        self.holding = set()
        self.active = self.next_blocks() if selection == "block" else []

    def next_blocks(self):
        n, k = self.n, self.k
        if self.order == "random":
            return sorted(torch.randperm(n, generator=self.g)[:k].tolist())
        if self.order == "ascending":
            start = 0 if self.cursor is None else self.cursor
            self.cursor = (start + k) % n
            return sorted({(start + i) % n for i in range(k)})
        if self.order == "descending":
            start = n - 1 if self.cursor is None else self.cursor
            self.cursor = (start - k) % n
            return sorted({(start - i) % n for i in range(k)})
        half, start = n // 2, self.cursor or 0  # mirror: pairs from both ends
        self.cursor = (start + k // 2) % half
        return sorted({f(i % half) for i in range(start, start + k // 2)
                       for f in (lambda x: x, lambda x: n - 1 - x)})

    def mode_and_k(self, j):
        shape = self.shapes[j]
        if self.sel == "block":
            return (ACTIVE if j in self.active else FREE), 0
        if self.sel == "randk":
            k = int(torch.Size(shape).numel() * self.d)
            return (RANDK if k else FREE), k
        rows, cols = shape
        if self.sel in ("columns", "rows"):
            k = int((cols if self.sel == "columns" else rows) * self.d)
            return ((COLUMNS if self.sel == "columns" else ROWS) if k else FREE), k
        r = round((cols if rows >= cols else rows) * self.d)
        return ((RIGHT if rows >= cols else LEFT) if r else FREE), r

    def draw(self, j, k, grad):
        rows, cols = self.shapes[j] if len(self.shapes[j]) == 2 else (None, None)
        if self.sel in ("columns", "rows", "randk"):
            total = {"columns": cols, "rows": rows,
                     "randk": torch.Size(self.shapes[j]).numel()}[self.sel]
            return torch.randperm(total, generator=self.g)[:k].sort().values.int()
        right = rows >= cols
        if self.sel == "svd":
            U, _, Vh = torch.linalg.svd(grad, full_matrices=False)
            return Vh[:k] if right else U[:, :k]
        if self.sel == "randperm":
            perm = torch.randperm(cols if right else rows, generator=self.g)
            P = torch.zeros((k, cols) if right else (rows, k), dtype=grad.dtype)
            for i in range(k if right else rows):  # rows (right) / columns (left) of it
                if right or perm[i] < k:
                    P[i, perm[i]] = 1.0
            return P
        r0, c0 = (k, cols) if right else (rows, k)  # random: torch.nn.init.orthogonal_
        flat = torch.empty(r0, c0).normal_(generator=self.g)
        q, r = torch.linalg.qr(flat.t() if r0 < c0 else flat)
        q = q * r.diagonal().sign()
        return (q.t() if r0 < c0 else q).to(grad.dtype)

    def step(self, with_grad, gradient):
        cycle = self.t // self.gap
        if self.sel == "block" and cycle != self.block_cycle:
            self.active, self.block_cycle = self.next_blocks(), cycle
        subs = [None] * self.n
        for j in range(self.n):
            if self.sel != "block" and j in with_grad and self.drawn_in[j] != cycle:
                self.drawn_in[j] = cycle
                mode, k = self.mode_and_k(j)
                if mode != FREE:
                    subs[j] = self.draw(j, k, gradient(j))
        modes, changes = [], []
        for j in range(self.n):
            mode, _ = self.mode_and_k(j)
            held = j in self.holding
            if mode == FREE:
                change = DROP if held else NONE
            elif not held:
                change = START if j in with_grad else NONE
            elif subs[j] is not None:
                change = START if self.reset else CARRY
            else:
                change = KEEP
            modes.append(mode)
            changes.append(change)
            self.holding = (self.holding - {j}) if change in (DROP, NONE) else self.holding | {j}
        self.t += 1
        return modes, changes, subs


CASES = [("block", o, r) for o in ("descending", "ascending", "mirror", "random")
         for r in (True,)] + [(s, None, r) for s in ("columns", "rows", "randk", "svd",
                                                      "random", "randperm") for r in (True, False)]


@pytest.mark.parametrize("selection,order,reset", CASES)
def test_every_decision_matches_the_model_of_the_algorithm(selection, order, reset):
    density = 1 / 3 if order == "mirror" else 0.5  # mirror needs an even number of blocks
    kw = dict(selection=selection, density=density, update_gap=2, block_order=order or "descending",
              reset_statistics=reset, seed=7)
    plan = make_plan(SHAPES, **kw)
    oracle = Oracle(SHAPES, selection, density, 2, order, reset, 7)
    assert list(plan.selection.active) == oracle.active
    holding = []
    for step in range(11):
        with_grad = [j for j in range(len(SHAPES)) if (step + j) % 4 != 3 and step != 5]
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
        before = plan.selection
        d = plan.begin_step(with_grad, holding, lambda j: grads[j])
        again = plan.begin_step(with_grad, holding, lambda j: grads[j])  # nothing changed
        assert list(again.changes) == list(d.changes) and plan.selection.t == before.t
        modes, changes, subs = oracle.step(set(with_grad), lambda j: grads[j])
        assert list(d.modes) == modes, f"step {step}"
        assert list(d.changes) == changes, f"step {step}"
        assert d.repack == any(c in (CARRY, START, DROP) for c in changes)
        assert list(d.selection.active) == oracle.active, f"step {step}"
        for j, (ours, theirs) in enumerate(zip(d.subspaces, subs)):
            assert (ours is None) == (theirs is None), f"step {step}: tensor {j} redrawn"
            if ours is not None:
                if selection == "svd":  # singular vectors up to sign
                    ours, theirs = ours.abs(), theirs.abs()
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 if selection in (
                    "svd", "random") else 0)
                assert tuple(ours.shape) == tuple(plan.subspace_shape(j, modes[j]))
        plan.commit(d)
        holding = sorted(oracle.holding)
        assert plan.selection.t == step + 1


def test_projectable_rule_roles_flags_and_shapes():
    specs = [("emb", [10, 4], "embedding", False), ("q", [4, 4], "query", False),
             ("q_headless", [4, 4], "linear", True), ("lin", [4, 4], "linear", False),
             ("norm", [4], "norm", False), ("head", [10, 4], "output", False),
             ("mlp3d", [2, 2, 2], "mlp", False), ("bias", [4], "bias", False)]

    def projectable(**flags):
        kw = dict(density=0.5, update_gap=1, selection="block", block_order="descending",
                  state_free="sgd", reset_statistics=True, seed=0, proj_embeds=False,
                  proj_norms=False, proj_logits=False)
        return list(_C.FrugalPlan(specs, **{**kw, **flags}).projectable)

    assert projectable() == [1, 2]
    assert projectable(proj_embeds=True, proj_norms=True, proj_logits=True) == [0, 1, 2, 4, 5]


def test_shapes_and_geometry():
    plan = make_plan([(8, 6), (4, 10), (3, 1)], selection="svd", density=0.5)
    assert [plan.mode(j) for j in range(3)] == [RIGHT, LEFT, FREE]  # round(0.5) == 0
    assert plan.moment_shape(0, RIGHT) == [8, 3] and plan.subspace_shape(0, RIGHT) == [3, 6]
    assert plan.moment_shape(1, LEFT) == [2, 10] and plan.subspace_shape(1, LEFT) == [4, 2]
    assert plan.moment_shape(2, FREE) is None and not plan.subspace_is_index(0)
    cols = make_plan([(8, 6)], selection="columns", density=0.5)
    assert cols.moment_shape(0, COLUMNS) == [8, 3] and cols.subspace_is_index(0)


@pytest.mark.parametrize("kw,match", [
    (dict(density=1.5), "density"), (dict(update_gap=0), "update_gap"),
    (dict(selection="topk"), "selection"), (dict(block_order="sideways"), "block_order"),
    (dict(block_order="mirror", density=0.5), "mirror"),
    (dict(selection="rows", roles=["mlp", "norm"], proj_norms=True), "t1 has shape"),
])
def test_bad_options_raise(kw, match):
    shapes = [(4, 4), (4,)] if "roles" in kw else [(4, 4)] * 6
    with pytest.raises(ValueError, match=match):
        make_plan(shapes, **kw)


def saved_after(plan, steps=3):
    holding = []
    for _ in range(steps):
        d = plan.begin_step(list(range(6)), holding, lambda j: None)
        plan.commit(d)
        holding = [j for j, c in enumerate(d.changes) if c in (KEEP, CARRY, START)]
    return plan.save([0, 2])


def test_save_read_adopt_round_trip_and_old_formats():
    plan = make_plan(SHAPES, block_order="random")
    saved = saved_after(plan)
    assert list(saved) == ["t", "rng", "cursor", "active", "block_cycle", "cycle", "selection",
                           "num_projectable", "density", "held"]  # the keys checkpoints hold
    other = make_plan(SHAPES, block_order="random", seed=99)
    sel = other.read(saved)
    assert sel.held == [0, 2]
    other.adopt(sel)
    assert other.selection.held is None and torch.equal(other.selection.rng, saved["rng"])
    for _ in range(4):  # the same generator state: the same next re-selections
        da, db = (x.begin_step(list(range(6)), [], lambda j: None) for x in (plan, other))
        assert list(da.selection.active) == list(db.selection.active)
        plan.commit(da)
        other.commit(db)
    legacy = {k: v for k, v in saved.items() if k not in ("density", "held")}
    legacy["active"] = tuple(legacy["active"])  # tuples read as lists
    assert make_plan(SHAPES, block_order="random").read(legacy).held is None


@pytest.mark.parametrize("key,value,match", [
    ("t", True, "t must be an int"), ("t", 1.0, "t must be an int"),
    ("block_cycle", -1, "block_cycle must be"),
    ("cursor", 6, r"cursor must be an int in \[-1, 6\)"),
    ("active", [0, 1.0, 2], "active holds"), ("active", "012", "active must be a list"),
    ("active", [0, 1], "active has 2 entries, this optimizer needs 3"),
    ("cycle", [0] * 5 + [-2], "cycle holds"), ("held", [6], "held holds"),
    ("held", [1, 1], "held names a tensor twice"), ("density", 0.25, "density=0.25"),
    ("rng", torch.zeros(3, dtype=torch.uint8), "rng is not a torch generator state"),
    ("rng", {"a": 1}, "rng is not a torch generator state"),
    ("selection", "columns", "selection='block' and 6 projectable"),
    ("num_projectable", 5, "selection='block' and 6 projectable"),
])
def test_damaged_fields_raise_naming_them(key, value, match):
    plan = make_plan(SHAPES)
    saved = saved_after(plan)
    before = plan.selection
    with pytest.raises(ValueError, match=match):
        plan.read({**saved, key: value})
    with pytest.raises(ValueError, match=r"lacks t"):
        plan.read({k: v for k, v in saved.items() if k != "t"})
    assert plan.selection.t == before.t  # read changes nothing


def test_check_loaded_and_holders():
    plan = make_plan(SHAPES)
    sel = plan.read(saved_after(plan))
    free = next(j for j in range(6) if j not in sel.active)
    with pytest.raises(ValueError, match="state-free now"):
        plan.check_loaded(free, sel, True, None)
    act = sel.active[0]
    if act not in sel.held:
        with pytest.raises(ValueError, match="has the moments"):
            plan.check_loaded(act, sel, True, None)
    assert plan.holders(sel, []) == [j for j in sel.active if j in sel.held]
    cols = make_plan(SHAPES, selection="columns")
    csel = cols.read(saved_after(cols))
    assert cols.holders(csel, [1]) is None  # the layout does not depend on the selection
    with pytest.raises(ValueError, match="must have shape"):
        cols.check_loaded(0, csel, True, [2])
