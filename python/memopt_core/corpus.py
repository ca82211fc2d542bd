"""A real-text training corpus that needs no download.

The text is CPython's own language-reference topics (`pydoc_data.topics`, the pages `help("if")`
shows; about 0.5-0.8 MB of English prose and grammar, shipped with every CPython). Where a
distribution strips it out, the docstrings of a fixed list of stdlib modules stand in. Tokens are
UTF-8 bytes (vocab 256), so no tokenizer is needed either.

The split is deterministic: topics sorted by name, concatenated, last 10% of the bytes held out.
A contiguous tail (rather than random windows) keeps val text disjoint from every train window.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch

VOCAB_SIZE = 256
VAL_FRACTION = 0.1

# Modules with long, stable docstrings; used only when pydoc_data is missing.
_FALLBACK_MODULES = ("argparse", "asyncio", "collections", "dataclasses", "datetime", "decimal",
                     "email", "functools", "inspect", "itertools", "json", "logging", "os",
                     "pathlib", "re", "socket", "string", "subprocess", "threading", "typing",
                     "unittest", "urllib.parse", "zipfile")


def _stdlib_docstrings() -> str:
    parts = []
    for name in _FALLBACK_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def load_text() -> tuple[str, str]:
    """(text, source name)."""
    try:
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    except ImportError:
        return _stdlib_docstrings(), "stdlib docstrings"


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 byte tokens
    val: torch.Tensor
    source: str

    def batches(self, seq_len: int, batch_size: int, seed: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (x, y) int64 batches of random train windows; y is x shifted by one.
        The same seed gives the same sequence, so two optimizers see identical data."""
        _check(self.train, seq_len)
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len + 1)
        while True:
            starts = torch.randint(len(self.train) - seq_len, (batch_size,), generator=gen)
            w = self.train[starts[:, None] + offsets].long()
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping val windows in order (no randomness), at most
        `max_batches` batches; the last batch may be smaller."""
        _check(self.val, seq_len)
        n = (len(self.val) - 1) // seq_len
        starts = torch.arange(n) * seq_len
        offsets = torch.arange(seq_len + 1)
        for i, b in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            w = self.val[starts[b:b + batch_size, None] + offsets].long()
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _check(data: torch.Tensor, seq_len: int) -> None:
    if not 0 < seq_len < len(data) - 1:
        raise ValueError(f"seq_len must be in [1, {len(data) - 2}] for this split, got {seq_len}")


@functools.lru_cache(maxsize=1)
def load() -> Corpus:
    """The corpus, built once per process."""
    text, source = load_text()
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    cut = int(len(data) * (1 - VAL_FRACTION))
    return Corpus(train=data[:cut], val=data[cut:], source=source)


def batches(seq_len: int, batch_size: int, seed: int = 0):
    """Endless random train batches of the built-in corpus; see Corpus.batches."""
    return load().batches(seq_len, batch_size, seed)


def val_batches(seq_len: int, batch_size: int, max_batches: int | None = None):
    """Deterministic val batches of the built-in corpus; see Corpus.val_batches."""
    return load().val_batches(seq_len, batch_size, max_batches)
