"""bench/bench_step.py's CUDA option without a GPU: its arguments parse, it exits with a clear
message where CUDA is absent, the 7B-scale size is what its header says, and the byte floor
it divides by (bench_step_cuda.min_bytes) counts what AdamW and Adam-mini must move."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_step  # noqa: E402
import bench_step_cuda  # noqa: E402
from memopt_core.app.models import Llama, num_params  # noqa: E402


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
        model = Llama(bench_step.model_config("7b-layers"))
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size,
            cfg.num_hidden_layers) == (4096, 11008, 32, 32000, 4)
    assert num_params(model) == 4 * 202_383_360 + 2 * 32000 * 4096 + 4096  # 1.07B


@pytest.mark.parametrize("name,floor", [("memopt AdamW", 28), ("memopt AdamMini", 20),
                                        ("torch AdamW fused", 28)])
def test_min_bytes_is_the_optimizers_floor(name, floor):
    model = bench_step.build_model("50m", layers=1)
    opt = bench_step.CONTENDERS[name](model)
    opt.step()
    n = num_params(model)
    per_param = bench_step_cuda.min_bytes(opt) / n
    # Plus the small state (Adam-mini's v per block, step counters), under 1% here.
    assert floor <= per_param < floor * 1.01, per_param
    if name == "memopt AdamMini":  # its v: one value per block, read and written
        v = sum(s["exp_avg_sq"].numel() for s in opt.state.values())
        assert bench_step_cuda.min_bytes(opt) >= 20 * n + 8 * v
