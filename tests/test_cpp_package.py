"""The C++ package: find_package(memopt_core) from the installed wheel, the C++ core tests
(ctest), and examples/cpp_trainer (memopt::AdamMini, torch::save/torch::load, continue) checked
against the Python front end from the same initial weights and data."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import memopt_core
from cuda_util import requires_cuda

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


def test_installed_package_layout():
    prefix = Path(memopt_core.cmake_prefix_path)
    assert (prefix / "lib" / "cmake" / "memopt_core" / "memopt_coreConfig.cmake").exists()
    assert (prefix / "include" / "memopt" / "optimizers.h").exists()
    assert list((prefix / "lib").glob("libmemopt.so*"))


def test_cpp_core_tests_pass_under_ctest(cpp_builds):
    """cpp/tests is built once per run (conftest: cpp_builds), shared with optimizer_runner."""
    r = subprocess.run(["ctest", "--test-dir", str(cpp_builds["tests"]), "--output-on-failure"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.cuda
@requires_cuda
def test_cpp_classes_decide_the_skip_on_the_gpu(cpp_builds):
    """Every LibTorch class with nonfinite "skip" on CUDA parameters: the step's flag into the
    ops (found_inf), APOLLO's and FRUGAL's schedule steps on the host; equal to the class never
    asked to take the bad steps, before and after torch::save / torch::load
    (cpp/tests/test_front_ends.cpp --cuda; on the CPU, ctest runs the same with the CPU
    standing in)."""
    r = subprocess.run([str(cpp_builds["tests"] / "test_front_ends"), "--cuda"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cpp_trainer_matches_the_python_front_end(cpp_builds, tmp_path):
    r = subprocess.run([str(cpp_builds["trainer"] / "cpp_trainer"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    # torch::pickle_save writes c10::Dicts, which the weights-only unpickler does not know;
    # these files were written by our own program a moment ago.
    data, init, final = (torch.load(tmp_path / f, weights_only=False)
                         for f in ("data.pt", "init.pt", "final.pt"))

    net = torch.nn.Sequential()
    net.add_module("fc1", torch.nn.Linear(8, 32))
    net.add_module("fc2", torch.nn.Linear(32, 4))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(init[name])
    opt = memopt_core.AdamMini(net.named_parameters(), lr=1e-2, betas=(0.9, 0.95),
                               weight_decay=0.1)
    forward = lambda x: net.fc2(torch.tanh(net.fc1(x)))  # noqa: E731
    # LibTorch's StepLR(2, 0.5) decays on its 3rd step() call; the reload keeps 5e-3.
    for lr in (1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3):
        memopt_core.set_lr(opt, lr)
        opt.zero_grad()
        torch.nn.functional.mse_loss(forward(data["x"]), data["y"]).backward()
        opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), final[name], rtol=1e-6, atol=1e-7)
