"""`memopt train` on bad input says what is wrong and what to do, never a traceback: a damaged
or foreign checkpoint with --resume, empty data, a device the build does not have. A single
text file trains (split by lines, not by file)."""
from __future__ import annotations

import pytest
import torch

from memopt_core.app import cli
from memopt_core.app.corpus import load

TRAIN = ["train", "--optimizer", "adamw", "--model", "tiny", "--steps", "2", "--batch-size", "2",
         "--seq-len", "16", "--eval-batches", "1", "--device", "cpu"]


def _text(path, lines=200):
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                            for i in range(lines)))
    return path


def test_a_single_text_file_trains_split_by_lines(tmp_path):
    data = _text(tmp_path / "one.txt")
    corpus = load(str(data))
    train, val = bytes(corpus.train.tolist()), bytes(corpus.val.tolist())
    assert train + val == data.read_bytes() and val.startswith(b"line 180:")  # last 10% of lines
    assert cli.main(TRAIN + ["--data", str(data)]) == 0


@pytest.mark.parametrize("name", ["empty.txt", "empty.bin"])
def test_empty_data_is_a_clear_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit, match="nothing to train on"):
        cli.main(TRAIN + ["--data", str(tmp_path / name)])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_resume_from_a_damaged_checkpoint_says_what_to_do(tmp_path, damage):
    data = _text(tmp_path / "d.txt")
    run = TRAIN + ["--data", str(data), "--ckpt-dir", str(tmp_path / "ck")]
    assert cli.main(run) == 0
    last = tmp_path / "ck" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    expected = "not a `memopt train` checkpoint" if damage == "foreign" else "cannot read checkpoint"
    with pytest.raises(SystemExit, match=expected) as e:
        cli.main(run + ["--resume"])
    assert "without --resume" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device.*--device cpu"):
        cli.main(TRAIN[:-1] + ["cuda"])
    with pytest.raises(SystemExit, match="is not a device"):
        cli.main(TRAIN[:-1] + ["gpu"])


def test_train_logs_a_skipped_step(monkeypatch, tmp_path, capsys):
    """memopt train skips a step with a non-finite gradient by default and says so, in the
    terminal and in log.jsonl."""
    real = cli.Trainer

    class Poisoned(real):
        def run_step(self):
            if self.step == 1:  # the 2nd step's gradients hold a NaN
                p = next(self.model.parameters())
                handle = p.register_hook(lambda g: g * float("nan"))
                try:
                    return super().run_step()
                finally:
                    handle.remove()
            return super().run_step()
    monkeypatch.setattr(cli, "Trainer", Poisoned)
    data = _text(tmp_path / "one.txt")
    assert cli.main(TRAIN + ["--data", str(data), "--ckpt-dir", str(tmp_path / "run")]) == 0
    assert "step 2: a gradient is not finite; the update was skipped (1 so far)" in \
        capsys.readouterr().err
    assert '"skipped": true' in (tmp_path / "run" / "log.jsonl").read_text()
