"""The library and the app stay apart: `import memopt_core` and an optimizer step load no module
of memopt_core.app and need none of the app's extras (numpy, tqdm, matplotlib), which this test
hides from the interpreter; the app itself says which extra it needs when one is missing."""
import subprocess
import sys

HIDE = ("import sys\n"
        "for name in ('numpy', 'tqdm', 'matplotlib'):\n"
        "    sys.modules[name] = None  # import of it raises ImportError\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True,
                          timeout=300)


def test_library_imports_and_steps_without_the_app():
    done = _run(
        "import torch, memopt_core\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))\n"
        "for name in sorted(memopt_core.OPTIMIZERS):\n"
        "    opt = memopt_core.make_optimizer(name, model, lr=1e-3)\n"
        "    model(torch.randn(4, 8)).sum().backward()\n"
        "    opt.step()\n"
        "app = sorted(m for m in sys.modules if m.startswith('memopt_core.app'))\n"
        "assert not app, app\n"
        "print('ok')\n")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_app_names_its_missing_extra():
    done = _run("import memopt_core.app.cli\n")
    assert done.returncode != 0 and "pip install 'memopt_core[app]'" in done.stderr, done.stderr
