"""`memopt train --fsdp` on 2 gloo ranks (the CLI run as torchrun would run it, in run_workers'
process group): an interrupted run resumed from its DCP checkpoint ends bit for bit where the
uninterrupted run ends (model, optimizer state, losses, learning rates), only rank 0 prints and
writes the log, and the run equals one process training on the same global batch."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from dist_util import run_workers
from memopt_core.app import cli
from memopt_core.app.train import Trainer

STEPS = 4


def common(data, ckpt_dir, *extra):
    return ["train", "--optimizer", "adamw", "--model", "tiny", "--steps", str(STEPS),
            "--batch-size", "4", "--seq-len", "32", "--grad-accum", "2", "--eval-batches", "1",
            "--eval-every", "1000", "--log-every", "1", "--device", "cpu", "--data", str(data),
            "--ckpt-dir", str(ckpt_dir), "--ckpt-every", "2", *extra]


class Interrupted(Exception):
    pass


def _worker(rank, world, data, root):
    printed, banner = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(banner):
        assert cli.main(common(data, root / "straight", "--fsdp")) == 0
        # The interrupted run: stops right after writing its step-2 checkpoint.
        save = Trainer.save

        def save_then_stop(self, path):
            save(self, path)
            if self.step == 2:
                raise Interrupted
        Trainer.save = save_then_stop
        try:
            with pytest.raises(Interrupted):
                cli.main(common(data, root / "resumed", "--fsdp"))
        finally:
            Trainer.save = save
        assert cli.main(common(data, root / "resumed", "--fsdp", "--resume")) == 0
    return printed.getvalue(), banner.getvalue()


def full_checkpoint(path):
    """A DCP checkpoint as one plain state dict (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(path.resolve(), out)
    return torch.load(out, weights_only=False)


def flat(sd, prefix=""):
    """{dotted key: tensor} of a nested state dict."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def losses(ckpt_dir):
    return [(r["step"], r["loss"], r["lr"])
            for r in map(json.loads, (ckpt_dir / "log.jsonl").read_text().splitlines())]


def test_fsdp_training_resumes_exactly_and_equals_one_process(tmp_path):
    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16).tofile(data)
    (out0, err0), (out1, err1) = run_workers(_worker, 2, data, tmp_path)
    assert "step 4 loss" in out0 and "FSDP2 on 2 ranks" in err0 and "resumed from" in err0
    # only rank 0 logs (rank 1's stderr may hold library warnings, never our lines)
    assert out1 == "" and "FSDP2" not in err1 and "resumed" not in err1, (out1, err1)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert losses(straight) == losses(resumed) and len(losses(straight)) == STEPS
    # the published checkpoint is the last one; the step-2 directory was replaced
    assert (straight / "last.dcp").resolve().name == f"step-{STEPS}.dcp"
    assert sorted(p.name for p in straight.glob("step-*.dcp")) == [f"step-{STEPS}.dcp"]
    a = flat(full_checkpoint(straight / "last.dcp"))
    b = flat(full_checkpoint(resumed / "last.dcp"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.state.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"

    # One process on the same global batch: the same run up to float32 reduction order. Adam
    # amplifies that for elements whose gradient is near zero (their normalized update can turn
    # over), so the check is on each tensor's norm of differences, not elementwise.
    assert cli.main(common(data, tmp_path / "single")) == 0
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    for name, value in single["model"].items():
        err = (a[f"model.{name}"].double() - value.double()).norm() / value.double().norm()
        assert err < 1e-5, f"{name}: FSDP2 vs one process, relative error {err:.2e}"
    for (_, la, _), (_, lb, _) in zip(losses(straight), losses(tmp_path / "single")):
        assert abs(la - lb) <= 1e-5 * abs(lb)


def _apollo_worker(rank, world, data, root):
    """`memopt train --fsdp --optimizer apollo`: returns the dims each weight was sharded on."""
    from memopt_core.app import train
    dims, shard = {}, train.shard_model

    def recording(model, placement=None):
        shard(model, placement)
        dims.update({n: p.placements[-1].dim for n, p in model.named_parameters()})
    train.shard_model = recording
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(common(data, root / "apollo", "--fsdp", "--optimizer", "apollo")) == 0
    finally:
        train.shard_model = shard
    return dims


def test_fsdp_apollo_shards_left_weights_by_columns_and_equals_one_process(tmp_path):
    """APOLLO's Left weights (fewer rows than columns: the MLP's down projection) go to FSDP2
    as column shards (Apollo.fsdp_placement), and the run still equals one process."""
    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16).tofile(data)
    dims = run_workers(_apollo_worker, 2, data, tmp_path)[0]
    assert cli.main(common(data, tmp_path / "single", "--optimizer", "apollo")) == 0
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    wide = {n for n, v in single["model"].items()  # Left under "std": rows < columns (even)
            if v.dim() == 2 and v.shape[0] < v.shape[1] and v.shape[1] % 2 == 0}
    assert wide and {n for n, d in dims.items() if d == 1} == wide, dims
    a = flat(full_checkpoint(tmp_path / "apollo" / "last.dcp"))
    for name, value in single["model"].items():
        err = (a[f"model.{name}"].double() - value.double()).norm() / value.double().norm()
        assert err < 1e-5, f"{name}: FSDP2 vs one process, relative error {err:.2e}"
