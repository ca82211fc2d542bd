"""SlimAdam on the fused memopt core: Adam-mini's update op with SlimAdam's second-moment layouts."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from . import _C
from ._base import MemoptOptimizer
from .adam_mini import AdamMini, Blocks
from .roles import infer_roles
from .sources import need_names, resolve

_COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper; the reference strips it from names


@dataclass(frozen=True)
class Layout(Blocks):
    """One tensor's second moment: Adam-mini blocks (`segments`) plus what SlimAdam calls it."""
    v_shape: tuple = ()
    dims: object = None   # averaged dims (tuple), None (uncompressed) or "table" (fused QKV split)
    rule: str = ""


class SlimAdam(MemoptOptimizer):
    r"""SlimAdam (Kalra et al., "When Can You Get Away with Low Memory Adam?", arXiv 2503.01843):
    Adam whose second moment of a tensor is averaged along the dims where its signal-to-noise
    ratio is high, and kept whole where averaging would hurt.

    Update (reference ``utils/slimadam.py``; K = the tensor's averaged dims, v keeps them as 1)::

        t += 1;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*mean_K(g*g)
        p *= 1 - lr*wd                       (only tensors with >= 2 dims, as the reference)
        p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)      (v broadcast over K)

    This is Adam-mini's update with other blocks, so it runs on the same fused op
    (``torch.ops.memopt.adam_mini_``), computed in fp32 for fp32/bf16/fp16 storage.

    ``rules``:
      * ``"table"`` (default): the paper's static table (Table 1) on the roles of
        :func:`memopt_core.roles.infer_roles`: embedding, output, Q and K averaged over fan-in
        (one value per token / output row); V, attention output and MLP over fan-out (one value
        per input column); a fused QKV split the same way; norms, biases, convs and unknown
        tensors uncompressed. GPT-2's transposed Conv1D weights and torchtitan names are handled.
      * a dict, or the path of a JSON file (as :class:`memopt_core.snr.SNRTracker` writes), from
        parameter name to the dims to average (``null``: uncompressed; ``"table"``: the table's
        choice). Names not in it stay uncompressed (with a warning).
      * ``None``: nothing compressed, i.e. AdamW; used for the SNR probe run.

    State: m in the parameter dtype plus v, about 0.01-0.1% of the parameters with the table:
    ~4 bytes/param in fp32, 0.5x AdamW. ``describe()`` lists every tensor's v shape and the share
    of second-moment entries saved; ``rules()`` returns the decisions as a rules dict.

    When not to use it: large learning rates or heavy-tailed data lower the SNR that the table
    assumes (paper §5): derive rules with ``memopt snr`` on a short run of your own setup if the
    loss lags AdamW's. Hyperparameters: AdamW's.

    Example::

        opt = memopt_core.SlimAdam(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        print(opt.describe())                     # v shape per tensor, % of v saved
        opt = memopt_core.SlimAdam(model, lr=3e-4, rules="slimadam_rules.json")
    """

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, rules="table", roles=None, dim=None, n_heads=None,
                 n_kv_heads=None, model=None, nonfinite="propagate"):
        src = resolve(named_params_or_model, model)
        need_names(src, type(self).__name__, "the layout of each second moment (its rule "
                   "keys are tensor names and roles) and which tensors decay")
        model, groups, named = src.model, src.groups, src.named
        self.blocks = plan_layouts(named, model, rules, roles=roles, dim=dim, n_heads=n_heads,
                                   n_kv_heads=n_kv_heads)
        torch_groups = []
        for g in groups:
            opts = {k: v for k, v in g.items() if k != "params"}
            for decay in (True, False):
                members = [(n, p) for n, p in g["params"] if self.blocks[p].decay == decay]
                if members:
                    wd = opts.get("weight_decay", weight_decay) if decay else 0.0
                    torch_groups.append({**opts, "params": [p for _, p in members],
                                         "param_names": [n for n, _ in members], "weight_decay": wd})
        self._encoded: dict[tuple, list] = {}
        super().__init__(torch_groups, dict(lr=lr, betas=tuple(betas), eps=eps,
                                            weight_decay=weight_decay), nonfinite)

    # The same state and op as Adam-mini (v: one entry per block): shared, not rewritten.
    _state_shapes = AdamMini._state_shapes
    _op_call = AdamMini._op_call
    _state_sharded = AdamMini._state_sharded
    _sharded_call = AdamMini._sharded_call

    def _describe_row(self, p):
        b = self.blocks[p]
        v = "full" if b.dims is None or b.count == p.numel() else "x".join(map(str, b.v_shape))
        return f"{b.role:<9} v:{v:<9}", b.count

    def describe(self) -> str:
        """Base table, with the share of second-moment entries saved on its totals line."""
        text = super().describe()
        return text + (f"; second moment: {self.v_entries():,} of {self._numel():,} entries, "
                       f"{100 * self.v_saved():.2f}% saved")

    # ---- what was decided -------------------------------------------------------------------
    def _params(self, only_2d=False):
        return [p for g in self.param_groups for p in g["params"] if not only_2d or p.dim() == 2]

    def _numel(self, only_2d=False) -> int:
        return sum(p.numel() for p in self._params(only_2d))

    def v_entries(self, only_2d: bool = False) -> int:
        """Second-moment entries kept (all tensors, or the 2-D ones only)."""
        return sum(self.blocks[p].count for p in self._params(only_2d))

    def v_saved(self, only_2d: bool = False) -> float:
        """Fraction of Adam's second-moment entries removed (the number the paper reports)."""
        n = self._numel(only_2d)
        return 1.0 - self.v_entries(only_2d) / n if n else 0.0

    def rules(self) -> dict:
        """{parameter name: averaged dims (list), None, or "table"}: loadable as ``rules=``."""
        return {b.name: (list(b.dims) if isinstance(b.dims, tuple) else b.dims)
                for b in (self.blocks[p] for p in self._params())}

    def second_moment(self, p: torch.Tensor) -> torch.Tensor:
        """p's v in the reference's keepdim shape (a view of the state; 1-D for a split QKV)."""
        return self.state[p]["exp_avg_sq"].view(self.blocks[p].v_shape)


def load_rules(rules) -> dict:
    """A rules dict from a dict or a JSON file path, checked: values are lists of ints, null or
    "table"; a torch.compile prefix is stripped from names."""
    if isinstance(rules, (str, os.PathLike)):
        with open(rules) as f:
            rules = json.load(f)
    if not isinstance(rules, dict):
        raise TypeError(f"rules must be 'table', None, a dict or a JSON path, got {type(rules).__name__}")
    out = {}
    for name, dims in rules.items():
        ok = dims is None or dims == "table" or (
            isinstance(dims, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool)
                                                    for d in dims))
        if not ok:
            raise ValueError(f"rules[{name!r}] must be a list of dims, null or 'table', got {dims!r}")
        out[name.removeprefix(_COMPILE_PREFIX)] = dims if dims is None or dims == "table" else tuple(dims)
    return out


def _table_roles(named, model, roles, dims):
    """infer_roles for the table: Q/K keep their role without heads (the fan-in mean needs
    none); a fused QKV whose heads are unknown is left whole, quietly (the warning is about
    Adam-mini's per-head blocks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return infer_roles(named, model, roles=roles, qk_need_heads=False, **dims)


def _table_layout(name, p, r) -> Layout:
    segs, v_shape, dims, rule = _C.slim_adam_table_layout(
        r.role, list(p.shape), r.transposed, r.head_dim, r.q_heads, r.kv_heads, r.kv_interleaved)
    dims = "table" if dims is None else (tuple(dims) or None)
    return Layout(name, r.role, tuple(segs), p.dim() >= 2, r.note, tuple(v_shape), dims, rule)


def plan_layouts(named, model=None, rules="table", *, roles=None, dim=None, n_heads=None,
                 n_kv_heads=None) -> dict:
    """{param: Layout} for (name, tensor) pairs under `rules` (see SlimAdam)."""
    table = _table_roles(named, model, roles, dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads))
    explicit = None if rules is None or (isinstance(rules, str) and rules == "table") else load_rules(rules)
    out, missing = {}, []
    for name, p in named:
        r = table[name]
        key = name.removeprefix(_COMPILE_PREFIX)
        choice = "table" if isinstance(rules, str) and rules == "table" else None
        if explicit is not None:
            choice = explicit.get(key)
            if key not in explicit:
                missing.append(name)
        if choice == "table":
            out[p] = _table_layout(name, p, r)
            continue
        try:
            segs, v_shape, dims, rule = _C.slim_adam_dims_layout(list(p.shape), list(choice or ()))
        except ValueError as e:
            raise ValueError(f"rules[{name!r}]: {e}") from None
        out[p] = Layout(name, r.role, tuple(segs), p.dim() >= 2, "", tuple(v_shape),
                        tuple(dims) or None, rule)
    if explicit is not None:
        unknown = set(explicit) - {n.removeprefix(_COMPILE_PREFIX) for n, _ in named}
        if missing or unknown:
            warnings.warn(f"SlimAdam rules: {len(missing)} parameter(s) not in the rules stay "
                          f"uncompressed{' (' + missing[0] + ', ...)' if missing else ''}; "
                          f"{len(unknown)} rule name(s) match no parameter"
                          f"{' (' + sorted(unknown)[0] + ', ...)' if unknown else ''}", stacklevel=3)
    return out
