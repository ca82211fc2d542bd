"""`memopt plan` against the papers' published figures, and the `memopt` commands end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

import memopt_core
from memopt_core.app import cli, cli_args, compare_cli
from memopt_core.app.models import Llama, build, llama_config, materialize, to_weight_format
from memopt_core.app.plan import activation_bytes, plan
from memopt_core.app.train import TrainConfig
from memopt_core.app.train_config import WEIGHT_FORMATS, rounding_kwargs
from memopt_core.app.memory import peak_during, train_peak


def test_llama7b_state_matches_adam_mini_paper():
    """Adam-mini (arXiv 2406.16793) Table: Llama-2-7B optimizer state 53.92 GB with AdamW,
    26.96 GB with Adam-mini (fp32 m and v)."""
    adamw, mini = plan("llama-7b", "adamw"), plan("llama-7b", "adam_mini")
    assert mini.params == 6_738_415_616
    assert adamw.state / 1e9 == pytest.approx(53.92, abs=0.02)
    assert mini.state / 1e9 == pytest.approx(26.96, abs=0.01)


@pytest.mark.parametrize("name", list(memopt_core.OPTIMIZERS))
def test_plan_uses_the_optimizers_own_accounting(name):
    """On a small config the planned state equals the bytes held after a real step."""
    p = plan("tiny", name)
    torch.manual_seed(0)
    model = build("tiny")
    opt = memopt_core.make_optimizer(name, model, lr=1e-3)
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    opt.step()
    assert p.state == opt.state_bytes()


def test_layerwise_plan_keeps_one_gradient():
    full, lw = plan("llama-1b", "adamw", dtype="bf16"), plan("llama-1b", "adamw", dtype="bf16",
                                                            layerwise=True)
    assert full.grads == full.weights and lw.grads == 2 * 32000 * 2048  # the embedding, bf16
    assert lw.total < full.total


def test_activation_estimate_is_near_the_measured_forward():
    """The estimate against the allocator's peak of a real forward on CPU (fused SDPA)."""
    torch.manual_seed(0)
    model = build("small")
    x = torch.randint(0, 256, (4, 128))
    measured = peak_during(lambda: model(x, x), torch.device("cpu"))
    estimate = activation_bytes(model.config, 4, 128, 4)
    assert 0.6 < estimate / measured < 1.5, (estimate, measured)


def test_cli_plan_prints_every_optimizer(capsys):
    assert cli.main(["plan", "--model", "llama-60m", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    for name in memopt_core.OPTIMIZERS:
        assert f"| {name} |" in out
    assert cli.main(["plan", "--model", "llama-60m", "--layerwise"]) == 0
    out = capsys.readouterr().out
    assert "left out: frugal" in out and "| frugal |" not in out and "| apollo_mini |" in out


def test_cli_compare_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--optimizers", "adamw,adam_mini", "--model", "tiny", "--steps",
                     "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                     "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["optimizer"]: r for r in data["results"]}
    assert set(rows) == {"adamw", "adam_mini"}
    assert rows["adam_mini"]["state_bytes"] < 0.51 * rows["adamw"]["state_bytes"]
    assert rows["adamw"]["peak_bytes"] > rows["adamw"]["weights_bytes"] + rows["adamw"]["state_bytes"]
    assert len(rows["adamw"]["loss_curve"]) == 4
    assert "| adam_mini |" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
        assert (out / "compare.png").stat().st_size > 10_000
    except ImportError:
        pass


def test_cli_train_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch):
    def args(d):
        return ["train", "--optimizer", "adam_mini", "--model", "tiny", "--steps", "4",
                "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--eval-every",
                "2", "--ckpt-dir", str(d), "--ckpt-every", "2"]
    assert cli.main(args(tmp_path / "straight")) == 0

    from memopt_core.app.train import Trainer
    original = Trainer.run_step

    def crash_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return original(self)

    monkeypatch.setattr(Trainer, "run_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args(tmp_path / "resumed"))
    monkeypatch.undo()
    assert cli.main(args(tmp_path / "resumed") + ["--resume"]) == 0

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val" in log[1]
    with pytest.raises(SystemExit, match="grad-clip 0"):
        cli.main(["train", "--optimizer", "adamw", "--layerwise"])


def test_cli_compare_runs_one_optimizer_with_two_settings(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--optimizers", "adamw frugal:density=0.25 frugal:density=0",
                     "--model", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                     "--eval-batches", "1", "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(rows) == {"adamw", "frugal:density=0.25", "frugal:density=0"}
    assert rows["frugal:density=0"]["state_bytes"] < rows["frugal:density=0.25"]["state_bytes"]
    with pytest.raises(SystemExit, match="not key=value"):
        cli.main(["compare", "--optimizers", "frugal:density", "--steps", "2"])


def test_cli_plan_rows_counts_and_bad_sizes(capsys):
    """adamw (the baseline row) appears once however it is asked for; a tiny model's size reads
    in K/M, not "0.00B"; non-positive sizes and unknown optimizers are clear errors."""
    assert cli.main(["plan", "--model", "tiny", "--optimizer", "adamw,adam_mini,adam_mini"]) == 0
    out = capsys.readouterr().out
    assert out.count("| adamw |") == 1 and out.count("| adam_mini |") == 1
    assert "0.00B" not in out and "K) |" in out
    for bad in (["--seq-len", "-5"], ["--batch-size", "0"], ["--seq-len", "x"]):
        with pytest.raises(SystemExit):
            cli.main(["plan", "--model", "tiny", *bad])
        err = capsys.readouterr().err
        assert "must be at least 1" in err or "is not an integer" in err, err
    with pytest.raises(SystemExit, match="unknown optimizer 'adamm'"):
        cli.main(["plan", "--model", "tiny", "--optimizer", "adamw,adamm"])


def test_cli_help_shows_defaults(capsys):
    for command, shown in (("train", ["default: tiny", "default: 1000", "default: 0\n"]),
                           ("plan", ["default: llama-7b", "default: 2048"]),
                           ("compare", ["default: 16", "default: 128"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert all(s in out for s in shown), (command, out)


def test_cli_compare_settings_checked_before_any_run_and_lr_per_run(monkeypatch):
    """A typo in any arm stops compare before the first run, naming the valid keys; lr,
    weight_decay and betas set the run's own values (and its label), the rest go to the
    optimizer."""
    seen = []
    monkeypatch.setattr(compare_cli, "compare", lambda configs: seen.extend(configs) or [])
    monkeypatch.setattr(compare_cli, "write_outputs", lambda *a: "")
    with pytest.raises(SystemExit, match=r"apollo has no setting 'rnak'; valid: .*rank"):
        cli.main(["compare", "--optimizers", "adamw apollo:rnak=4", "--steps", "2"])
    assert seen == []
    assert cli.main(["compare", "--optimizers", "adamw apollo:lr=1e-2,rank=4,betas=(0.9,0.99)",
                     "--steps", "2", "--out", "/tmp/memopt-cli-test"]) == 0
    adamw, apollo = seen
    assert adamw.lr == memopt_core.OPTIMIZERS["adamw"].lr  # its recommended lr
    assert apollo.lr == 1e-2 and apollo.betas == (0.9, 0.99)
    assert apollo.optimizer_kwargs == {"rank": 4}
    assert apollo.label == "apollo:rank=4,betas=(0.9, 0.99)"  # lr 1e-2 is its recommended one


def test_train_runs_at_the_optimizers_recommended_lr_unless_told():
    """`memopt train` and TrainConfig take the registry's lr for the optimizer, as compare does;
    --lr overrides it."""
    parser = cli.build_parser()
    for name, spec in memopt_core.OPTIMIZERS.items():
        args = parser.parse_args(["train", "--optimizer", name])
        assert cli_args.train_config(args, name).lr == spec.lr
    args = parser.parse_args(["train", "--optimizer", "apollo", "--lr", "3e-4"])
    assert cli_args.train_config(args, "apollo").lr == 3e-4
    assert TrainConfig(optimizer="apollo_mini").lr == memopt_core.OPTIMIZERS["apollo_mini"].lr
    assert "apollo 0.01" in parser._subparsers._group_actions[0].choices["train"].format_help()


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_plan_of_a_layerwise_run_is_within_10_percent_of_its_measured_peak(checkpointed, dtype):
    """bench_7b.py's recipe at llama-60m: bf16 or int8 weights built in place, fp32 compute,
    layer-wise ApolloMini with stochastic rounding, with and without activation checkpointing;
    the plan's total against the allocator's peak over two steps (the first creates the
    state)."""
    with torch.device("meta"):
        model = to_weight_format(Llama(llama_config("llama-60m")), dtype)
    materialize(model, torch.device("cpu"), WEIGHT_FORMATS[dtype])
    model.checkpoint_activations, model.compute_dtype = checkpointed, torch.float32
    opt = memopt_core.make_optimizer("apollo_mini", model, lr=1e-3,
                                     **rounding_kwargs("stochastic", dtype))
    memopt_core.LayerwiseStep(opt)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32000, (1, 257), generator=gen) for _ in range(2)]
    peak, _, losses = train_peak(model, opt, batches, torch.device("cpu"))
    predicted = plan("llama-60m", "apollo_mini", dtype=dtype, layerwise=True, batch_size=1,
                     seq_len=256, compute_dtype="fp32", checkpoint_activations=checkpointed)
    assert all(math.isfinite(x) for x in losses)
    assert abs(predicted.total / peak - 1) < 0.10, (predicted.total, peak)


def test_cli_plan_prints_a_recipe_that_train_accepts(capsys):
    assert cli.main(["plan", "--model", "llama-7b", "--layerwise", "--dtype", "bf16",
                     "--seq-len", "256", "--checkpoint-activations", "--compute-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    recipe = out.split("Smallest run here: ")[1]
    smallest = plan("llama-7b", "apollo_mini", dtype="bf16", layerwise=True, batch_size=1,
                    seq_len=256, compute_dtype="fp32", checkpoint_activations=True)
    assert recipe.startswith(f"apollo_mini, {smallest.total / 1e9:.2f} GB")
    command = recipe.splitlines()[1].split()
    args = cli.build_parser().parse_args(command[1:])  # "memopt train ..."
    assert (args.optimizer, args.layerwise, args.grad_clip, args.dtype) == \
        ("apollo_mini", True, 0.0, "bf16")
    assert args.checkpoint_activations and args.compute_dtype == "fp32"


def test_cli_plan_takes_settings_and_meets_the_7b_state_target(capsys):
    """`memopt plan --optimizer "name:settings"` plans the optimizer as constructed with them:
    APOLLO-Mini with 8-bit states and the low-memory embedding mode keeps at most 0.3 GB of
    state at Llama-2-7B; the recipe it prints trains with the same spec."""
    spec = "apollo_mini:state_bits=8,embeddings=adam_mini"
    assert cli.main(["plan", "--model", "llama-7b", "--layerwise", "--dtype", "bf16",
                     "--optimizer", f"apollo_mini {spec}"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if f"| {spec} |" in line)
    state_gb = float(row.split("|")[7])
    assert state_gb <= 0.3
    assert state_gb == pytest.approx(plan("llama-7b", "apollo_mini", dtype="bf16", layerwise=True,
                                          state_bits=8, embeddings="adam_mini").state / 1e9,
                                     abs=0.005)
    command = out.split("Smallest run here: ")[1].splitlines()[1]
    assert f'--optimizer "{spec}"' in command
    with pytest.raises(SystemExit, match="has no setting 'bits'"):
        cli.main(["plan", "--optimizer", "adamw:bits=8"])


def test_cli_train_takes_optimizer_settings(tmp_path, capsys):
    assert cli.main(["train", "--optimizer", "adam_mini:state_bits=8", "--steps", "3",
                     "--eval-every", "3", "--batch-size", "2", "--seq-len", "16",
                     "--ckpt-dir", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    codes = [s for s in saved["optimizer"]["state"].values() if "exp_avg_scales" in s]
    assert codes and all(s["exp_avg"].dtype == torch.int8 for s in codes)
    with pytest.raises(SystemExit, match="unknown optimizer 'adam'"):
        cli.main(["train", "--optimizer", "adam:state_bits=8", "--steps", "1"])
