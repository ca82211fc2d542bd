"""What each parameter is in the network (its role), which decides its Adam-mini blocks.

Adam-mini keeps one second-moment value per block: per head for Q/K, per output neuron for
V/O/MLP, per token for embedding and output, one per norm, elementwise for biases. Name substrings
alone get this wrong (fused QKV, GPT-2's Conv1D stored (in, out), BERT's 1-D
`attention.output.LayerNorm.weight`, conv weights, head_dim * n_heads != hidden), so when a model
is given the role comes from the module tree: the type of the module owning each tensor, the
output head, and the head counts of the enclosing attention module. Only tensors the tree does not
explain fall back to the C++ name heuristic `_C.role_from_name`. The blocks themselves are cut in
C++ (`_C.adam_mini_blocks`); this module only decides the role and head sizes it is given:
`infer_roles(model.named_parameters(), model)["lm_head.weight"].blocks(shape)`.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn

from . import _C
from .distributed import refuse_flattened

__all__ = ["TensorRole", "infer_roles", "model_dims"]

_HEAD_ROLES = ("query", "key", "qkv")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
_MHA_ROLES = {"in_proj_weight": "qkv", "q_proj_weight": "query", "k_proj_weight": "key",
              "v_proj_weight": "value"}
# One quantity, many spellings: HF configs (hidden_size, num_attention_heads, ...), GPT-2 and
# nanoGPT (n_embd, n_head), torchtitan ModelArgs (dim, n_heads, n_kv_heads), T5 (d_model, d_kv),
# and attention modules (GPT2Attention.num_heads, nn.MultiheadAttention.head_dim,
# BertSelfAttention.attention_head_size). The first spelling found wins.
_ALIASES = {
    "dim": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head", "n_kv"),
    "head_dim": ("head_dim", "d_kv", "attention_head_size", "head_size"),
    "vocab": ("vocab_size", "n_vocab", "padded_vocab_size"),
}
_DIM_KEYS = ("dim", "n_heads", "n_kv_heads", "head_dim")
_CONFIG_ATTRS = ("config", "model_args", "args", "params")  # HF / nanoGPT, then torchtitan


@dataclass(frozen=True)
class TensorRole:
    """The role of one tensor and the layout facts `_C.adam_mini_blocks` needs to cut it."""
    name: str
    role: str                  # one of _C.role_names()
    transposed: bool = False   # weight stored (in, out) like HF GPT-2 Conv1D
    head_dim: int = 0          # query / key / qkv: rows (columns if transposed) per head
    q_heads: int = 0           # for role 'qkv'
    kv_heads: int = 0          # for role 'qkv'
    source: str = "name"       # "module" | "name" | "override"
    note: str = ""             # why the paper's blocks could not be used, if they could not
    # qkv whose rows are kv_heads repeats of [q_heads/kv_heads query heads | key | value]
    # (torchtitan's FusedQKVLinear) rather than q | k | v
    kv_interleaved: bool = False

    def blocks(self, shape) -> tuple:
        """(segments, note) from the C++ partitioner for a tensor of this role and `shape`."""
        shape = list(shape)
        if not (self.kv_interleaved and self.role == "qkv"):
            return _C.adam_mini_blocks(self.role, shape, self.transposed, self.head_dim,
                                       self.q_heads, self.kv_heads)
        g = self.kv_groups(shape)
        if not g:
            segments, _ = _C.adam_mini_blocks("linear", shape, False, 0, 0, 0)
            return segments, (f"qkv interleaved per kv head: {shape} does not split into "
                              f"{self.kv_heads} groups of query heads + key + value; "
                              "one block per output neuron")
        segments, note = _C.adam_mini_blocks("qkv", [shape[0] // g, shape[1]], False,
                                             self.head_dim, self.q_heads // g, 1)
        return per_kv_group(segments, shape, g), note

    def kv_groups(self, shape) -> int:
        """How many kv groups a torchtitan interleaved qkv weight of `shape` splits into (each a
        small fused q|k|v with one kv head), or 0 when it is not one or does not split."""
        g = self.kv_heads if self.kv_interleaved and self.role == "qkv" else 0
        ok = g and not self.transposed and len(shape) == 2 and not shape[0] % g and not self.q_heads % g
        return g if ok else 0


def per_kv_group(segments, shape, g: int) -> list:
    """The segments of one kv group of an interleaved qkv weight, repeated down its rows."""
    step = shape[0] // g * shape[1]
    return [(s[0] + i * step,) + tuple(s[1:]) for i in range(g) for s in segments]


def _read(obj) -> dict:
    """Positive int attributes of a config or module, under our key names."""
    out = {}
    for key, names in _ALIASES.items():
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                out[key] = v
                break
    return out


def _dims_of(obj) -> dict:
    """Raw dims of a model or module: its config objects, overridden by its own attributes."""
    out = {}
    for attr in _CONFIG_ATTRS:
        cfg = getattr(obj, attr, None)
        if cfg is None or isinstance(cfg, (nn.Module, torch.Tensor)) or callable(cfg):
            continue
        get_text = getattr(cfg, "get_text_config", None)
        if callable(get_text):  # HF multimodal configs keep the LM's sizes in a sub-config
            try:
                out = {**_read(get_text()), **out}
            except ValueError:  # several text configs: no single answer, use the top level
                pass
        out = {**_read(cfg), **out}
    return {**out, **_read(obj)}  # a module's own head counts beat the config it was built from


def _has_heads(raw: dict) -> bool:
    return "n_heads" in raw or "head_dim" in raw


def _raw_model_dims(model) -> dict:
    raw = _dims_of(model)
    if not _has_heads(raw):  # wrappers (DDP, torch.compile, PEFT) or config-less models
        for m in model.modules():
            found = _dims_of(m)
            if _has_heads(found):
                return {**found, **raw}
    return raw


def _derive(raw: dict) -> dict:
    """The four dims, with head_dim = dim // n_heads and n_kv_heads = n_heads when unstated."""
    d = {k: raw.get(k) for k in _DIM_KEYS}
    if d["head_dim"] is None and d["dim"] and d["n_heads"]:
        d["head_dim"] = d["dim"] // d["n_heads"]
    if d["n_kv_heads"] is None:
        d["n_kv_heads"] = d["n_heads"]
    return d


def model_dims(model) -> dict:
    """{dim, n_heads, n_kv_heads, head_dim} of a model (None where unknown), read from its config
    (HF, GPT-2, nanoGPT GPTConfig, torchtitan ModelArgs on model_args/args/params), else from the
    first submodule that states its heads (an attention module's num_heads / head_dim ...)."""
    return _derive(_raw_model_dims(model))


def _is_conv1d(m: nn.Module) -> bool:
    """HF transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    w = getattr(m, "weight", None)
    return (type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(m, "nf", None) == w.shape[1])


def _is_norm(m: nn.Module) -> bool:
    return "Norm" in type(m).__name__  # LayerNorm, RMSNorm, GroupNorm, BatchNorm2d, LlamaRMSNorm


def _weight_id(m) -> Optional[int]:
    w = getattr(m, "weight", None)
    return id(w) if isinstance(w, torch.Tensor) else None


def _is_bias(attr: str) -> bool:
    return attr == "bias" or attr.startswith("bias_") or attr.endswith("_bias")


class _Tree:
    """A model indexed once: the owners of each tensor, the output head, dims per attention."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.owners: dict[int, list] = {}  # id(tensor) -> [(module name, module, attr)]; tied: many
        for mname, mod in self.modules.items():
            for attr, t in mod.named_parameters(recurse=False, remove_duplicate=False):
                self.owners.setdefault(id(t), []).append((mname, mod, attr))
        self.raw = _raw_model_dims(model)
        self.output_id = self._output_id(model)
        self._local: dict[str, dict] = {}

    def _output_id(self, model) -> Optional[int]:
        """The output head's weight: HF's get_output_embeddings() (which may say there is none),
        else the last nn.Linear onto the vocabulary (config vocab_size or largest nn.Embedding)."""
        get, head = getattr(model, "get_output_embeddings", None), None
        try:
            if callable(get):
                return _weight_id(get())
        except (NotImplementedError, AttributeError):  # HF classes that do not implement it
            pass
        vocabs = {self.raw.get("vocab"), max((m.num_embeddings for m in model.modules()
                                              if isinstance(m, _EMBEDDINGS)), default=None)}
        for m in self.modules.values():
            if isinstance(m, nn.Linear) and m.out_features in vocabs:
                head = m
        return _weight_id(head)

    def owners_of(self, name: str, p: torch.Tensor) -> list:
        if id(p) in self.owners:
            return self.owners[id(p)]
        mname, _, attr = name.rpartition(".")  # a copy of the model's tensors: go by name
        mod = self.modules.get(mname)
        return [(mname, mod, attr)] if mod is not None else []

    def dims_near(self, mname: str) -> dict:
        """Raw dims of the nearest enclosing module that states head counts (its own or its
        config's), over the model's: an encoder-decoder or vision tower may differ from the LM."""
        if mname not in self._local:
            found, parts = {}, mname.split(".") if mname else []
            for i in range(len(parts), 0, -1):
                mod = self.modules.get(".".join(parts[:i]))
                found = _dims_of(mod) if mod is not None else {}
                if _has_heads(found):
                    break
            self._local[mname] = found if _has_heads(found) else {}
        return self._local[mname]

    def role(self, name: str, p: torch.Tensor, owners: list):
        """(role, transposed, source) from the owning module's type, or None if it does not say."""
        if not owners:
            return None
        _, mod, attr = owners[0]
        if any(_is_bias(a) for _, _, a in owners):
            return "bias", False, "module"
        if p.dim() <= 1:  # a 1-D tensor is never cut per row: norm, or the name decides
            return ("norm", False, "module") if _is_norm(mod) else None
        if any(isinstance(m, _EMBEDDINGS) for _, m, _ in owners):  # tied head: per token anyway
            return "embedding", False, "module"
        if id(p) == self.output_id:
            return "output", False, "module"
        if _is_norm(mod):
            return "norm", False, "module"
        if isinstance(mod, _CONVS):
            return "conv", False, "module"
        if isinstance(mod, nn.MultiheadAttention) and attr in _MHA_ROLES:
            return _MHA_ROLES[attr], False, "module"
        transposed = _is_conv1d(mod)
        if isinstance(mod, nn.Linear) or transposed:  # which linear (q, k, mlp ...): the name says
            return _C.role_from_name(name, list(p.shape)), transposed, "name"
        return None


def _kv_interleaved(tree: _Tree, owners: list) -> bool:
    """Whether a fused qkv weight belongs to torchtitan's FusedQKVLinear, whose forward views
    the output as (n_kv_heads, heads_per_kv + 2, head_dim): per kv head, its query heads, then
    its key head, then its value head. Its `heads_per_kv` and `r_dim` attributes say so."""
    for mname, _, _ in owners:
        parent = tree.modules.get(mname.rpartition(".")[0])
        hpk, r = getattr(parent, "heads_per_kv", None), getattr(parent, "r_dim", None)
        if isinstance(hpk, int) and isinstance(r, int) and r == hpk + 2:
            return True
    return False


def _compile_overrides(roles: Optional[Mapping[str, str]]) -> list:
    """[(match(name) -> bool, role)]: a glob if the pattern has * or ?, else a regex searched."""
    if not roles:
        return []
    valid = _C.role_names()
    rules = []
    for pattern, role in roles.items():
        if role not in valid:
            raise ValueError(f"roles: unknown role {role!r} for pattern {pattern!r}; "
                             f"valid roles: {', '.join(valid)}")
        if "*" in pattern or "?" in pattern:
            rules.append((lambda n, g=pattern: fnmatch.fnmatchcase(n, g), role))
            continue
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"roles: pattern {pattern!r} is not a valid regex: {e}") from None
        rules.append((lambda n, rx=rx: rx.search(n) is not None, role))
    return rules


def _with_heads(r: TensorRole, shape: tuple, dims: dict, layout_known: bool) -> TensorRole:
    """Attach head sizes to a query / key / qkv role; without usable heads an inferred role
    falls back to per-output-neuron blocks ('linear'), an override keeps its role."""
    hd, q = dims["head_dim"] or 0, dims["n_heads"] or 0
    if not hd and q and len(shape) == 2:  # n_heads alone: the hidden size is the input width
        width = shape[0] if r.transposed else shape[1]
        hd = width // q if width % q == 0 else 0

    def kv_split(out: int) -> int:  # kv heads if `out` features split as q | k | v heads, else 0
        rest = out // hd - q if hd and out % hd == 0 else 0
        return rest // 2 if rest > 0 and rest % 2 == 0 else 0

    if r.role == "qkv" and len(shape) == 2:
        if not layout_known and not kv_split(shape[0]) and kv_split(shape[1]):
            r = replace(r, transposed=True)  # names only: only the columns split, so Conv1D
        # kv heads from the shape: configs often omit n_kv_heads when it equals n_heads
        kv = kv_split(shape[1] if r.transposed else shape[0]) or dims["n_kv_heads"] or 0
        r = replace(r, head_dim=hd, q_heads=q, kv_heads=kv)
    else:
        r = replace(r, head_dim=hd)
    if not hd or (r.role == "qkv" and not q):
        note = (f"{r.role}: no head count known (pass n_heads= or a model whose config has it); "
                "one block per output neuron")
    else:
        note = r.blocks(shape)[1]
    if not note:
        return r
    if r.source == "override":
        return replace(r, note=note)
    return TensorRole(r.name, "linear", r.transposed, source=r.source, note=note)


def infer_roles(named_params: Iterable, model: Optional[nn.Module] = None, *, dim=None,
                n_heads=None, n_kv_heads=None, head_dim=None,
                roles: Optional[Mapping[str, str]] = None) -> dict[str, TensorRole]:
    """Role of every (name, tensor) in `named_params` (pairs or a dict), keyed by name.

    With `model`, roles come from the module tree: nn.Embedding -> 'embedding' (also when tied to
    the head), the output head -> 'output', *Norm modules -> 'norm', biases -> 'bias', conv ->
    'conv', nn.MultiheadAttention in_proj -> 'qkv', HF Conv1D -> transposed, torchtitan's
    FusedQKVLinear.wqkv -> 'qkv' interleaved per kv head (kv_interleaved); which linear a
    nn.Linear is (q/k/v/o/mlp/fused qkv) and everything else comes from `_C.role_from_name`.
    Head sizes: explicit dim / n_heads / n_kv_heads / head_dim, else the enclosing attention
    module, else the model config (head_dim defaults to dim // n_heads). `roles` maps a regex
    (re.search) or glob (if it has * or ?) to a role; the first matching pattern wins over
    inference. An unknown role raises ValueError.
    """
    rules = _compile_overrides(roles)
    explicit = {k: v for k, v in zip(_DIM_KEYS, (dim, n_heads, n_kv_heads, head_dim))
                if v is not None}
    tree = _Tree(model) if model is not None else None
    items = named_params.items() if isinstance(named_params, Mapping) else named_params
    out: dict[str, TensorRole] = {}
    for name, p in items:
        owners = tree.owners_of(name, p) if tree else []
        found = tree.role(name, p, owners) if tree else None
        layout_known = found is not None
        role, transposed, source = found or (_C.role_from_name(name, list(p.shape)), False, "name")
        forced = next((rl for match, rl in rules if match(name)), None)
        if forced is not None:
            role, source = forced, "override"
        r = TensorRole(name, role, transposed, source=source,
                       kv_interleaved=role == "qkv" and tree is not None
                       and _kv_interleaved(tree, owners))
        refuse_flattened(name, p, role, [mod for _, mod, attr in owners if attr == "weight"])
        if role in _HEAD_ROLES:
            raw = {**tree.raw, **tree.dims_near(owners[0][0] if owners else "")} if tree else {}
            r = _with_heads(r, tuple(p.shape), _derive({**raw, **explicit}), layout_known)
        out[name] = r
    fell_back = [r.name for r in out.values() if r.note and r.role == "linear"]
    if fell_back:
        warnings.warn(f"{len(fell_back)} query/key/qkv tensor(s) get one block per output neuron, "
                      f"not per head ({fell_back[0]}: {out[fell_back[0]].note})", stacklevel=2)
    return out
