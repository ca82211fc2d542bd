"""bench/bench_step.py's CUDA option without a GPU: its arguments parse, it exits with a clear
message where CUDA is absent, the 7B-scale size is what its header says, and the byte floor
it divides by (bench_step_cuda.min_bytes) counts what AdamW and Adam-mini must move. And the
structure of bench/: the scripts share code only through bench/harness.py (no script imports
another but bench_step -> bench_step_cuda, none patches another module), so a script's state
bytes are the same whether it runs as __main__ or is imported."""
from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import bench_step_cuda  # noqa: E402
import harness  # noqa: E402
from memopt_core.app.models import Llama, llama_config, num_params  # noqa: E402


def test_cuda_arguments_parse_and_cpu_keeps_its_sizes():
    args = bench_step.parse_args(["--device", "cuda", "--size", "7b-layers", "--dtype", "bf16",
                                  "--layers", "2", "--rounds", "30"])
    assert (args.device, args.size, args.dtype, args.layers, args.rounds) == (
        "cuda", "7b-layers", "bf16", 2, 30)
    assert bench_step.parse_args([]).device == "cpu"
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--size", "7b-layers"])  # CUDA-only sizes are refused on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_run_without_a_gpu_exits_with_a_message():
    with pytest.raises(SystemExit) as exc:
        bench_step.main(["--device", "cuda", "--size", "50m"])
    assert "no CUDA device" in str(exc.value.code)


def test_7b_layers_are_full_size_llama_7b_layers():
    with torch.device("meta"):
        model = Llama(harness.model_config("7b-layers"))
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size,
            cfg.num_hidden_layers) == (4096, 11008, 32, 32000, 4)
    assert num_params(model) == 4 * 202_383_360 + 2 * 32000 * 4096 + 4096  # 1.07B


@pytest.mark.parametrize("name,floor", [("memopt AdamW", 28), ("memopt AdamMini", 20),
                                        ("torch AdamW fused", 28)])
def test_min_bytes_is_the_optimizers_floor(name, floor):
    model = harness.build_model("50m", layers=1)
    opt = bench_step.CONTENDERS[name](model)
    opt.step()
    n = num_params(model)
    per_param = bench_step_cuda.min_bytes(opt) / n
    # Plus the small state (Adam-mini's v per block, step counters), under 1% here.
    assert floor <= per_param < floor * 1.01, per_param
    if name == "memopt AdamMini":  # its v: one value per block, read and written
        v = sum(s["exp_avg_sq"].numel() for s in opt.state.values())
        assert bench_step_cuda.min_bytes(opt) >= 20 * n + 8 * v


def _cuda_contenders(monkeypatch, as_main: bool) -> dict:
    """The contenders `bench_step.py --device cuda` hands its CUDA half (stood in for here, so
    no GPU is needed), the script run as __main__ or its main() called from an import."""
    handed = []
    monkeypatch.setattr(bench_step_cuda, "main",
                        lambda args, contenders, script: handed.append(contenders))
    argv = ["--device", "cuda", "--size", "50m"]
    if as_main:
        monkeypatch.setattr(sys, "argv", [str(BENCH / "bench_step.py"), *argv])
        runpy.run_path(str(BENCH / "bench_step.py"), run_name="__main__")
    else:
        bench_step.main(argv)
    (contenders,) = handed
    return contenders


@pytest.mark.parametrize("as_main", [True, False], ids=["as-__main__", "imported"])
def test_cuda_table_counts_apollo_torchs_projection_matrices(monkeypatch, as_main):
    # The old bench_step.py, run as __main__, imported bench_apollo, which imported a second copy
    # of bench_step and replaced *that copy's* state_bytes with the one that sees apollo-torch's
    # projection matrices; the CUDA half got the __main__ copy and undercounted them.
    pytest.importorskip("apollo_torch")
    contenders = _cuda_contenders(monkeypatch, as_main)
    assert {f"apollo-torch 1.0.3 r={harness.APOLLO_RANK}", "apollo-torch 1.0.3 Mini",
            "memopt ApolloMini", harness.BASELINE} <= set(contenders)
    torch.manual_seed(0)
    model = Llama(llama_config("tiny"))
    for p in model.parameters():
        p.grad = torch.randn_like(p).mul_(1e-3)
    opt = contenders[f"apollo-torch 1.0.3 r={harness.APOLLO_RANK}"](model)
    opt.step()
    projections = [s["projector"].ortho_matrix for s in opt.state.values() if "projector" in s]
    assert len(projections) == len(harness.projected(model))
    tensors = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert harness.state_bytes(opt) == tensors + sum(m.nbytes for m in projections)
    weights = harness.projected(model)  # the projected weights alone: their moments and P
    assert harness.state_bytes(opt, weights) == sum(
        t.nbytes for p in weights for t in opt.state[p].values() if torch.is_tensor(t)
    ) + sum(m.nbytes for m in projections)


def _local_imports(tree: ast.Module, local: set[str]) -> dict[str, str]:
    """{name bound in the module: bench module it refers to} for imports of bench/ modules."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in local:
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in local:
            bound.update({a.asname or a.name: node.module for a in node.names})
    return bound


def _base_name(target):
    while isinstance(target, (ast.Attribute, ast.Subscript)):
        target = target.value
    return target.id if isinstance(target, ast.Name) else None


def test_bench_scripts_share_code_only_through_the_harness():
    modules = {p.stem: ast.parse(p.read_text(), str(p)) for p in BENCH.glob("*.py")}
    assert "harness" in modules
    for name, tree in modules.items():
        bound = _local_imports(tree, set(modules))
        allowed = {"harness"} | ({"bench_step_cuda"} if name == "bench_step" else set())
        if name == "harness":
            allowed = set()
        assert set(bound.values()) <= allowed, (name, bound)
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:  # no `X.CONTENDERS = ...`, `X.state_bytes = ...`, `X.D[k] = ...`
                assert isinstance(t, (ast.Name, ast.Tuple)) or _base_name(t) not in bound, (
                    name, ast.unparse(t))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and _base_name(node.func.value) in bound
                    and node.func.attr in ("update", "setdefault", "pop", "clear", "append")):
                raise AssertionError(f"{name} mutates {ast.unparse(node.func)}")  # X.D.update()
        assert "sys.modules[__name__]" not in ast.unparse(tree), name
    assert "__main__" not in ast.unparse(modules["harness"])
