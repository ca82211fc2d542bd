"""The built-in corpus (stdlib sources, split by file) and the resumable token stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memopt_core.app import corpus
from memopt_core.app.corpus import Corpus, TokenStream, is_val_file, stdlib_files


def test_stdlib_corpus_is_split_by_file_and_disjoint():
    root, files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or f.startswith("test/") for f in files)
    val = [f for f in files if is_val_file(f)]
    assert 0.02 < len(val) / len(files) < 0.1
    c = corpus.load()
    assert c.vocab_size == 256 and c.train.dtype == torch.uint8
    # one validation file's text must not occur in the training bytes
    sample = (root / max(val, key=lambda f: (root / f).stat().st_size)).read_bytes()[:400]
    assert sample in bytes(c.val.numpy()) and sample not in bytes(c.train.numpy())


def test_stream_epochs_cover_every_window_once_and_resume_exactly():
    tokens = torch.arange(1001, dtype=torch.int32)
    s = TokenStream(tokens, seq_len=10, batch_size=4, seed=3)
    seen = []
    for _ in range(25):  # 100 windows = 25 batches: one full epoch
        x, y = next(s)
        assert torch.equal(y[:, :-1], x[:, 1:]) and x.shape == (4, 10)
        seen += (x[:, 0] // 10).tolist()
    assert sorted(seen) == list(range(100))
    state = s.state_dict()
    ahead = [next(s) for _ in range(30)]
    again = TokenStream(tokens, seq_len=10, batch_size=4, seed=3)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(ahead, (next(again) for _ in range(30))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_user_text_directory_and_bin(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    c = corpus.load(str(tmp_path))
    assert len(c.val) > 0 and len(c.train) > len(c.val)
    ids = np.arange(5000, dtype=np.uint16) % 700
    ids.tofile(tmp_path / "data.bin")
    b = corpus.load(str(tmp_path / "data.bin"))
    assert b.vocab_size == 700 and len(b.train) == 4500
    assert torch.equal(b.val, torch.from_numpy(ids[4500:].astype(np.int32)))


def test_bpe_is_trained_once_then_cached(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path / "cache"))
    from memopt_core.app.bpe import bpe_tokens
    text = b"\n\n".join(b"def function_%d(x):\n    return x * %d\n" % (i, i) for i in range(400))
    train, val = bpe_tokens(text, b"def function_7(x):\n    return x\n", 300)
    assert train.dtype == torch.int32 and int(train.max()) < 300 and len(train) < len(text) / 2
    again = bpe_tokens(text, b"def function_7(x):\n    return x\n", 300)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(list((tmp_path / "cache").glob("bpe-*/tokenizer.json"))) == 1


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="tokenizer"):
        corpus.load(tokenizer="words")
    small = Corpus(torch.zeros(50, dtype=torch.uint8), torch.zeros(50, dtype=torch.uint8), 256, "")
    with pytest.raises(ValueError, match="fewer than one batch"):
        small.stream(seq_len=10, batch_size=8)
