"""What each parameter is in the network (its role), which decides its Adam-mini blocks.

Adam-mini keeps one second-moment value per block: per head for Q/K, per output neuron for
V/O/MLP, per token for embedding and output, one per norm, elementwise for biases. Name substrings
alone get this wrong (fused QKV, GPT-2's Conv1D stored (in, out), BERT's 1-D
`attention.output.LayerNorm.weight`, conv weights, head_dim * n_heads != hidden), so when a model
is given the role comes from the module tree: the type of the module owning each tensor, the
output head, and the head counts of the enclosing attention module. This module only READS those
facts; the decision (and the name heuristic for tensors the tree does not explain) is C++
`infer_role` (cpp/include/memopt/roles.h), which the LibTorch front end uses too, and the blocks
are cut in C++ (`_C.adam_mini_blocks`):
`infer_roles(model.named_parameters(), model)["lm_head.weight"].blocks(shape)`.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn

from . import _C

__all__ = ["TensorRole", "infer_roles", "model_dims", "role_has"]

# What the algorithms decide from a role alone, the one table (C++ memopt/roles.h): e.g.
# role_has("mlp", "hidden_matrix") -> True (APOLLO projects it).
_TRAITS = _C.role_traits()


def role_has(role: str, trait: str) -> bool:
    return _TRAITS[role][trait]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
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

    @property
    def info(self) -> tuple:
        """The role as _C.BlockPlan takes it (memopt::RoleInfo)."""
        return (self.role, self.transposed, self.head_dim, self.q_heads, self.kv_heads,
                self.kv_interleaved)

    def blocks(self, shape) -> tuple:
        """(segments, note) from the C++ partitioner for a tensor of this role and `shape`."""
        return _C.adam_mini_blocks(self.role, list(shape), self.transposed, self.head_dim,
                                   self.q_heads, self.kv_heads, self.kv_interleaved)


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


def refuse_flattened(name: str, p, role: str, weight_of: list) -> None:
    """Wrappers that flatten parameters (FSDP1 without use_orig_params, DeepSpeed ZeRO) hide the
    shapes every role but elementwise Adam needs: say so, instead of partitioning a flat buffer
    as if it were a bias. `weight_of`: the modules whose `weight` p is."""
    kind = ("an FSDP1 FlatParameter" if type(p).__name__ == "FlatParameter" else
            "a DeepSpeed ZeRO parameter" if hasattr(p, "ds_id") else None)
    if kind:
        raise ValueError(f"{name} is {kind}: memopt optimizers other than AdamW need each "
                         "parameter's own shape. Use FSDP2 (fully_shard) or FSDP1 with "
                         "use_orig_params=True; DeepSpeed ZeRO is not supported")
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)
    if p.dim() < 2 and (role_has(role, "needs_shape") or
                        any(isinstance(m, layers) for m in weight_of)):
        raise ValueError(f"{name} is a {role} weight of shape {tuple(p.shape)}: flattened (by "
                         "DeepSpeed ZeRO or FSDP1), which hides the shape memopt needs; use FSDP2 "
                         "(fully_shard), which keeps it")


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

    def heads(self, owners: list, explicit: dict) -> list:
        """(dim, n_heads, n_kv_heads, head_dim), 0 where unknown: the enclosing attention
        module's, else the model config's, overridden by the user's."""
        raw = {**self.raw, **self.dims_near(owners[0][0] if owners else "")}
        return [v or 0 for v in _derive({**raw, **explicit}).values()]


def _kind(m: nn.Module) -> str:
    """The module kind memopt's role inference (C++ infer_role) reads."""
    if isinstance(m, _EMBEDDINGS):
        return "embedding"
    if _is_norm(m):
        return "norm"
    if isinstance(m, _CONVS):
        return "conv"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if _is_conv1d(m):
        return "conv1d"
    return "linear" if isinstance(m, nn.Linear) else "other"


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


def infer_roles(named_params: Iterable, model: Optional[nn.Module] = None, *, dim=None,
                n_heads=None, n_kv_heads=None, head_dim=None,
                roles: Optional[Mapping[str, str]] = None,
                qk_need_heads: bool = True) -> dict[str, TensorRole]:
    """Role of every (name, tensor) in `named_params` (pairs or a dict), keyed by name.

    With `model`, roles come from the module tree: nn.Embedding -> 'embedding' (also when tied to
    the head), the output head -> 'output', *Norm modules -> 'norm', biases -> 'bias', conv ->
    'conv', nn.MultiheadAttention in_proj -> 'qkv', HF Conv1D -> transposed, torchtitan's
    FusedQKVLinear.wqkv -> 'qkv' interleaved per kv head (kv_interleaved); which linear a
    nn.Linear is (q/k/v/o/mlp/fused qkv) and everything else comes from `_C.role_from_name`.
    Head sizes: explicit dim / n_heads / n_kv_heads / head_dim, else the enclosing attention
    module, else the model config (head_dim defaults to dim // n_heads). `roles` maps a regex
    (re.search) or glob (if it has * or ?) to a role; the first matching pattern wins over
    inference. An unknown role raises ValueError. qk_need_heads=False (SlimAdam's table, which
    averages Q/K over fan-in whatever the heads): a Q/K without usable heads keeps its role.
    """
    rules = _compile_overrides(roles)
    explicit = {k: v for k, v in zip(_DIM_KEYS, (dim, n_heads, n_kv_heads, head_dim))
                if v is not None}
    tree = _Tree(model) if model is not None else None
    items = named_params.items() if isinstance(named_params, Mapping) else named_params
    out: dict[str, TensorRole] = {}
    for name, p in items:
        owners = tree.owners_of(name, p) if tree else []
        forced = next((rl for match, rl in rules if match(name)), None)
        heads = tree.heads(owners, explicit) if tree else \
            [v or 0 for v in _derive(explicit).values()]
        role, transposed, hd, q, kv, interleaved, source, note = _C.infer_role(
            name, list(p.shape), [(_kind(m), attr) for _, m, attr in owners],
            tree is not None and id(p) == tree.output_id,
            tree is not None and _kv_interleaved(tree, owners), heads, forced, qk_need_heads)
        refuse_flattened(name, p, role, [mod for _, mod, attr in owners if attr == "weight"])
        out[name] = TensorRole(name, role, transposed, hd, q, kv, source, note, interleaved)
    fell_back = [r.name for r in out.values() if r.note and r.role == "linear"]
    if fell_back:
        warnings.warn(f"{len(fell_back)} query/key/qkv tensor(s) get one block per output neuron, "
                      f"not per head ({fell_back[0]}: {out[fell_back[0]].note})", stacklevel=2)
    return out
