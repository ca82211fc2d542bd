"""Byte-level BPE for the built-in corpus, trained on the spot with Hugging Face `tokenizers` and
cached (tokenizer JSON and token ids) so the second run costs nothing. Nothing is downloaded."""
from __future__ import annotations

import torch

from .corpus import cache_dir, fingerprint


def bpe_tokens(train: bytes, val: bytes, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (int32) of the train and validation text, BPE trained on `train` only."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:
        raise ImportError("tokenizer='bpe' needs the `tokenizers` package "
                          "(pip install tokenizers); tokenizer='byte' needs nothing") from e
    if not 256 < vocab_size <= 65536:
        raise ValueError(f"BPE vocab_size must be in (256, 65536], got {vocab_size}")
    key = fingerprint(train, val, str(vocab_size).encode())
    folder = cache_dir() / f"bpe-{key}"
    ids_path = folder / "ids.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
        return ids["train"], ids["val"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = train.decode("utf-8", errors="replace")
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    encode = lambda b: torch.tensor(  # noqa: E731
        tok.encode(b.decode("utf-8", errors="replace")).ids, dtype=torch.int32)
    train_ids, val_ids = encode(train), encode(val)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tmp = folder / "ids.pt.tmp"
    torch.save({"train": train_ids, "val": val_ids}, tmp)
    tmp.replace(ids_path)  # atomic: a crash never leaves a half-written cache
    return train_ids, val_ids
