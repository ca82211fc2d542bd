"""SlimAdam on the fused memopt core: Adam-mini's update op with SlimAdam's second-moment layouts,
which memopt::BlockPlan decides (cpp/include/memopt/block_plan.h) from the roles and rules read here."""
from __future__ import annotations

import json
import os
import warnings

import torch

from ._base import MemoptOptimizer
from .adam_mini import AdamMini, adopt
from .state_bits import check_state_bits
from .roles import infer_roles
from .sources import need_names, resolve


class SlimAdam(MemoptOptimizer):
    r"""SlimAdam (Kalra et al., arXiv 2503.01843): Adam whose second moment is averaged along the
    dims where its SNR is high, on Adam-mini's op. ``rules``: "table" (the paper's Table 1 on the
    inferred roles), a dict or JSON file {name: dims | None | "table"} (``memopt snr`` writes
    one), or None (AdamW). Decay only on tensors with >= 2 dims, as the reference. README,
    "SlimAdam and the SNR probe".

    Example::

        opt = memopt_core.SlimAdam(model, lr=3e-4, rules="table")
        print(opt.describe())                     # v shape per tensor, % of v saved
    """

    _device_skip = True  # memopt::adam_mini_ takes found_inf (nonfinite.py)

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, rules="table", roles=None, dim=None, n_heads=None,
                 n_kv_heads=None, model=None, nonfinite="propagate", stochastic_rounding=False,
                 rounding_seed=0, state_bits=32):
        src = resolve(named_params_or_model, model)
        self.state_bits = check_state_bits(self, state_bits)
        need_names(src, type(self).__name__, "the layout of each second moment (its rule "
                   "keys are tensor names and roles) and which tensors decay")
        # Q/K keep their role without heads (the table's fan-in mean needs none); the warning
        # about heads is Adam-mini's (per-head blocks), not the table's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = infer_roles(src.named, src.model, roles=roles, qk_need_heads=False, dim=dim,
                                n_heads=n_heads, n_kv_heads=n_kv_heads)
        if isinstance(rules, os.PathLike) or isinstance(rules, str) and rules != "table":
            with open(rules) as f:
                rules = json.load(f)
        groups = adopt(self, src, table, weight_decay, "slim_adam", rules=rules,
                       state_bits=self.state_bits)
        if self.plan.rules_warning:  # names the rules miss, rule names matching nothing
            warnings.warn(self.plan.rules_warning, stacklevel=2)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite, stochastic_rounding, rounding_seed)

    # The same op as Adam-mini (v: one entry per block): shared, not rewritten.
    _op_call = AdamMini._op_call
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

