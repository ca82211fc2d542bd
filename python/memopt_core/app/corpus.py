"""A real training corpus that needs no download, and the token streams the trainer reads.

Built-in corpus: the Python standard library's own source files, found at run time from the
running interpreter (`sysconfig.get_paths()["stdlib"]`; ~670 files, ~11 MB of code, docstrings
and comments once test suites, idlelib and site-packages are left out). It is split into train and
validation BY FILE, with a stable hash of the relative path (5% of files to validation), so no
validation text ever appears in a training window.

Tokenizers: "byte" (UTF-8 bytes, vocabulary 256, nothing to train) or "bpe" (a byte-level BPE
trained on the spot on the training files with Hugging Face `tokenizers`, then cached with the
token ids under ~/.cache/memopt_core, keyed by the corpus content and vocabulary size).
`load(data=PATH)` takes a user's text file or directory of text files instead (a single file
is split by lines: its last 10% to validation), or a pre-tokenized `.bin` (nanoGPT's format:
uint16 token ids; last 10% is validation). Empty data is a ValueError.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

VOCAB_SIZE = 256  # byte-level
VAL_FILE_MODULUS = 20  # 1 file in 20 goes to validation
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ""}


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of its .py sources, tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise RuntimeError(f"no Python sources under {root}: this interpreter ships without its "
                           "standard library sources; pass --data PATH")
    return root, files


def is_val_file(relpath: str) -> bool:
    """Stable across runs and machines (crc32 of the path, not Python's salted hash())."""
    return zlib.crc32(relpath.encode()) % VAL_FILE_MODULUS == 0


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # 1-D token ids (uint8 for bytes, int32 for BPE/.bin)
    val: torch.Tensor
    vocab_size: int
    source: str          # what it was built from, for the logs

    def stream(self, seq_len: int, batch_size: int, seed: int = 0) -> "TokenStream":
        return TokenStream(self.train, seq_len, batch_size, seed)

    def val_batches(self, seq_len: int, batch_size: int, max_batches: Optional[int] = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping validation windows in order (no randomness)."""
        _check(self.val, seq_len, "validation")
        n = (len(self.val) - 1) // seq_len
        starts, offsets = torch.arange(n) * seq_len, torch.arange(seq_len + 1)
        for i, b in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            w = self.val[starts[b:b + batch_size, None] + offsets].long()
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()

    # Kept for code written against the first corpus API.
    def batches(self, seq_len: int, batch_size: int, seed: int = 0):
        return iter(self.stream(seq_len, batch_size, seed))


class TokenStream:
    """Fixed-length (x, y) batches over the training tokens: the tokens are cut into
    non-overlapping windows of seq_len+1, visited in a fresh random order each epoch (the order
    depends only on seed and epoch). Its whole state is (epoch, index), so a checkpoint
    restores the exact data position."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        _check(tokens, seq_len, "training")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(f"the training split has {self.n_windows} windows of {seq_len} "
                             f"tokens, fewer than one batch of {batch_size}")
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_windows, generator=gen)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index + self.batch_size > self.n_windows:  # drop the ragged tail of an epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        starts = self._order[self.index:self.index + self.batch_size] * self.seq_len
        self.index += self.batch_size
        w = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data stream state is for seed {state['seed']}, not {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def _check(data: torch.Tensor, seq_len: int, split: str) -> None:
    if not 0 < seq_len < len(data) - 1:
        raise ValueError(f"seq_len must be in [1, {len(data) - 2}] for the {split} split, "
                         f"got {seq_len}")


# ---- building a corpus ------------------------------------------------------------------------
def _read_files(root: Path, files: list[str]) -> tuple[bytes, bytes]:
    texts = [(rel, (root / rel).read_bytes()) for rel in files]
    if not any(text for _, text in texts):
        where = root / files[0] if len(files) == 1 else root
        raise ValueError(f"{where}: no text (empty file{'s' if len(files) > 1 else ''}); "
                         "nothing to train on")
    if len(texts) == 1:  # one file: split it by lines
        return _split_lines(texts[0][1])
    train = [text for rel, text in texts if not is_val_file(rel)]
    val = [text for rel, text in texts if is_val_file(rel)]
    if not val or not train:  # too few files for a by-file split: hold out the last one
        train, val = train + val, []
        val.append(train.pop())
    return b"\n\n".join(train), b"\n\n".join(val)


def _split_lines(text: bytes) -> tuple[bytes, bytes]:
    """One text: its last 10% of lines (at least one) to validation, cut at a line boundary, so
    no validation text is in a training window; a single line is cut by bytes (90/10)."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        cut = max(1, int(len(text) * 0.9))
        return text[:cut], text[cut:]
    cut = len(lines) - max(1, len(lines) // 10)
    return b"".join(lines[:cut]), b"".join(lines[cut:])


def _text_files(path: Path) -> tuple[Path, list[str]]:
    if path.is_file():
        return path.parent, [path.name]
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no text files under {path}")
    return path, files


@functools.lru_cache(maxsize=4)
def load(data: Optional[str] = None, tokenizer: str = "byte", vocab_size: int = 8192) -> Corpus:
    """The corpus (built once per process per argument set): the stdlib sources by default,
    else the text file/directory or `.bin` at `data`."""
    if data is not None and str(data).endswith(".bin"):
        import numpy as np
        ids = torch.from_numpy(np.fromfile(data, dtype=np.uint16).astype(np.int32))
        if len(ids) == 0:
            raise ValueError(f"{data}: no tokens (empty file); nothing to train on")
        cut = int(len(ids) * 0.9)
        return Corpus(ids[:cut], ids[cut:], int(ids.max()) + 1, f"{data} (pre-tokenized)")
    if data is None:
        root, files = stdlib_files()
        source = f"Python {sysconfig.get_python_version()} stdlib sources ({len(files)} files)"
    else:
        root, files = _text_files(Path(data))
        source = f"{data} ({len(files)} files)"
    train, val = _read_files(root, files)
    if tokenizer == "byte":
        as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
        return Corpus(as_tensor(train), as_tensor(val), VOCAB_SIZE, f"{source}, bytes")
    if tokenizer == "bpe":
        from .bpe import bpe_tokens
        train_ids, val_ids = bpe_tokens(train, val, vocab_size)
        return Corpus(train_ids, val_ids, vocab_size, f"{source}, BPE {vocab_size}")
    raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")


def cache_dir() -> Path:
    base = os.environ.get("MEMOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memopt_core")
    return Path(base)


def fingerprint(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def batches(seq_len: int, batch_size: int, seed: int = 0):
    """Endless training batches of the built-in corpus (see TokenStream)."""
    return load().stream(seq_len, batch_size, seed)


def val_batches(seq_len: int, batch_size: int, max_batches: Optional[int] = None):
    """Deterministic validation batches of the built-in corpus."""
    return load().val_batches(seq_len, batch_size, max_batches)
