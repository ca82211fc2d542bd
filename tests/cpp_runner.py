"""memopt's LibTorch optimizers, driven from pytest through cpp/tests/optimizer_runner: a test-only
C++ program, so that the production extension binds none of them. Here: the one cmake build of
cpp/tests (its ctest programs and the runner) and of the example trainer, jobs written with
torch.save (optimizer, named parameters, options, actions: see the runner's header), results
read back, and the runner's errors raised again as the Python exceptions _C would raise."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import memopt_core
from conftest import make_grads

ROOT = Path(__file__).resolve().parents[1]
RAISES = (RuntimeError, ValueError, TypeError)  # c10::Error and its typed subclasses
_EXCEPTIONS = {e.__name__: e for e in (ValueError, TypeError, IndexError, NotImplementedError,
                                       RuntimeError)}


class JobError(Exception):
    """The runner could not run the job as written: a test's mistake, never an optimizer's error
    (so no pytest.raises(RAISES) can take it for one)."""


def cmake_build(source: Path, build: Path) -> None:
    """Configures and builds a CMake project against the installed memopt_core and torch;
    pytest.fail with cmake's output if that fails. Unoptimized (no build type): the programs
    are thin drivers of the installed, optimized library, and optimizing the LibTorch header
    code they include is a third of their compile time (measured: 31 s -> 22 s of CPU for
    test_core.cpp), which the suite would pay for nothing."""
    prefix = ";".join([memopt_core.cmake_prefix_path, torch.utils.cmake_prefix_path])
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    try:
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *gen,
                        f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE="],
                       check=True, capture_output=True, text=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"{e.cmd}\n{e.stdout}\n{e.stderr}")


def build_cpp(build: Path) -> dict:
    """{"tests": cpp/tests (the ctest programs and optimizer_runner), "trainer":
    examples/cpp_trainer}, built under `build` (conftest's session fixture: once per run) side
    by side: built one after the other, the trainer's single program would leave a core idle.
    Skips without cmake."""
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    sources = {"tests": ROOT / "cpp" / "tests", "trainer": ROOT / "examples" / "cpp_trainer"}
    with ThreadPoolExecutor(len(sources)) as pool:
        builds = [pool.submit(cmake_build, src, build / name) for name, src in sources.items()]
    for b in builds:
        b.result()  # raises a build's pytest.fail here
    return {name: build / name for name in sources}


def reraise(error: str | None) -> None:
    """Raises an error the runner recorded ("ValueError: message"); nothing for None."""
    if error is not None:
        name, _, message = error.partition(": ")
        raise (_EXCEPTIONS[name](message) if name in _EXCEPTIONS else JobError(error))


def assert_raises(error: str | None, match: str, types=RAISES) -> None:
    """An error the runner recorded is one of `types` and its message matches `match`."""
    with pytest.raises(types, match=match):
        reraise(error)


def assert_failed_and_changed_nothing(tried, never, failed: int, match: str, types=RAISES,
                                      before=None) -> None:
    """Action `failed` of `tried` raised and changed nothing: the parameters (and groups) after
    it are those before it (`before`: the job's own parameters, where it is the first action),
    and the job then went on exactly as `never`, the same job without it, so nothing hidden
    (state, selection, generator) changed either."""
    assert_raises(tried[failed]["error"], match, types)
    if before is None:
        before = tried[failed - 1]["params"]
        assert tried[failed]["groups"] == tried[failed - 1]["groups"]
    assert all(torch.equal(a, b) for a, b in zip(tried[failed]["params"], before))
    assert all(torch.equal(a, b) for a, b in zip(tried[-1]["params"], never[-1]["params"]))


# Actions (the runner's header lists what each does).
def step(grads=None, *, sparse=(), closure: bool = False, may_fail: bool = False) -> dict:
    """grads None: keep the gradients; sparse: indices of gradients the runner makes sparse."""
    action = {"do": "step", "sparse": list(sparse), "closure": closure, "may_fail": may_fail}
    if grads is not None:
        action["grads"] = list(grads)
    return action


def steps(params, start: int, count: int, skip=lambda i, t: False) -> list:
    """Steps start .. start + count - 1 on conftest's make_grads; no gradient where skip(i, t)."""
    return [step([None if skip(i, t) else g for i, g in enumerate(make_grads(params, t))])
            for t in range(start, start + count)]


def save(path) -> dict:
    return {"do": "save", "path": str(path)}


def load(path, *, may_fail: bool = False) -> dict:
    return {"do": "load", "path": str(path), "may_fail": may_fail}


def add_param_group(params, *, may_fail: bool = False, **options) -> dict:
    return {"do": "add_param_group", "params": list(params), "options": options,
            "may_fail": may_fail}


def job(optimizer: str, named, options: dict, actions, *, roles=None, groups=None) -> dict:
    """named: [(name, tensor)]: the runner works on copies (the same tensor twice stays one);
    groups: [(indices, options)]."""
    out = {"optimizer": optimizer, "params": [(n, p) for n, p in named], "options": options,
           "actions": list(actions)}
    if roles is not None:
        out["roles"] = list(roles)
    if groups is not None:
        out["groups"] = [{"params": list(i), "options": o} for i, o in groups]
    return out


class Runner:
    """runner(job, ...) -> for each job, one result per action (a dict: "error", "params" after
    the action, "groups" [(lr, weight_decay, [param index])], "loss", ...), a
    list of those for several jobs; raises what construction or an action not marked may_fail
    raised. runner.raw(job, ...) -> {"error", "actions"} per job, raising nothing. One runner
    process serves every call (started on the first, ended by close()): starting LibTorch
    costs more than most jobs."""

    def __init__(self, exe: Path, tmp: Path):
        self.exe, self.tmp, self.count, self.proc = exe, tmp, 0, None

    def raw(self, *jobs) -> list:
        self.count += 1
        job_file, result_file = (self.tmp / f"runner{self.count}.{s}" for s in ("job", "result"))
        # Copied one by one: a tensor given twice stays one within a job (the pickle keeps
        # that), and jobs built from the same tensors do not share them.
        torch.save([copy.deepcopy(j) for j in jobs], job_file)
        if self.proc is None:
            with open(self.tmp / "stderr", "w") as err:
                self.proc = subprocess.Popen([str(self.exe)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=err, text=True)
        self.proc.stdin.write(f"{job_file}\t{result_file}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline() != "done\n":
            code, self.proc = self.proc.wait(), None  # the next call starts another
            raise AssertionError(f"optimizer_runner failed ({code}) on {job_file}: "
                                 f"{(self.tmp / 'stderr').read_text()}")
        # torch::pickle_save writes c10::Dicts, which the weights-only unpickler does not know;
        # the file was written by our own program a moment ago.
        return torch.load(result_file, weights_only=False)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None

    def __call__(self, *jobs):
        results = self.raw(*jobs)
        for j, result in zip(jobs, results):
            reraise(result["error"])
            for action, done in zip(j["actions"], result["actions"]):
                if not action.get("may_fail"):
                    reraise(done["error"])
        actions = [r["actions"] for r in results]
        return actions[0] if len(jobs) == 1 else actions

    def construction_errors(self, *jobs) -> list:
        """Each job's construction error (None where it was built), from one process."""
        return [r["error"] for r in self.raw(*jobs)]


def run_variants(runner, make, params, variants, count: int) -> dict:
    """{variant: results} of `count` steps of make(params, variant, actions) for each variant,
    all in one runner process."""
    return dict(zip(variants, runner(*[make(params, v, steps(params, 0, count))
                                       for v in variants])))


def trajectory(opt, params, count: int, start: int = 0, skip=lambda i, t: False) -> list:
    """A Python optimizer stepped as `steps(...)` steps the runner's: the parameters after each
    step (copies)."""
    out = []
    for t in range(start, start + count):
        for i, (p, g) in enumerate(zip(params, make_grads(params, t))):
            p.grad = None if skip(i, t) else g
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def assert_same_trajectory(results, expected, names, what="") -> None:
    """Bit for bit: the runner's parameters after each step against `expected` (trajectory())."""
    assert len(results) == len(expected)
    for t, (done, want) in enumerate(zip(results, expected)):
        for name, a, b in zip(names, done["params"], want):
            assert torch.equal(a, b), f"{what} step {t}: {name}"
