"""What the `memopt` subcommands share: the help formatter, bounded-number argument types, the
training arguments of train and compare, the TrainConfig they build, and the machine record."""
from __future__ import annotations

import argparse
import ast
import inspect
import platform
import subprocess
from pathlib import Path

import torch

from .. import __version__
from ..registry import OPTIMIZERS
from .models import LLAMA_PRESETS
from .train import TrainConfig


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (argparse's own formatter skips options
    without a help text and those whose help names none)."""

    def add_argument(self, action):
        if action.help is None and action.default is not None and action.default is not False \
                and action.default is not argparse.SUPPRESS:
            action.help = "default: %(default)s"  # argparse prints no help line for None
        super().add_argument(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default is None or \
                action.default is False or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def ranged(cast, lo, hi=None, what="a number"):
    """An argparse type: `cast` of the text, within [lo, hi] (no upper bound without hi)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int = ranged(int, 1, what="an integer")
fraction = ranged(float, 0, 1)
nonnegative = ranged(float, 0)


def add_data_args(p):
    p.add_argument("--data", help="text file, directory of text files, or nanoGPT-style uint16 "
                                  ".bin (default: the Python stdlib sources, no download)")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                   help="byte-level (default) or a BPE trained on the spot and cached")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")


def add_train_args(p, steps, model):
    p.add_argument("--model", choices=LLAMA_PRESETS, default=model)
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr (default: the optimizer's recommended one: " + ", ".join(
                       f"{n} {s.lr:g}" for n, s in OPTIMIZERS.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weight storage (and optimizer state dtype): fp32, bf16, or int8 "
                        "(attention and MLP weights as int8 codes with a float32 scale per 128, "
                        "everything else bf16); bf16 and int8 weights are updated with "
                        "stochastic rounding (see --rounding)")
    p.add_argument("--rounding", choices=["stochastic", "nearest"], default="stochastic",
                   help="how low-precision weights store each update: stochastic (unbiased, "
                        "seeded by --seed; updates far below a bf16 step still count) or "
                        "nearest (round to nearest even, which stalls small updates)")
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype of activations and arithmetic (default: the weights' dtype, but "
                        "fp32 for bf16 weights on a CPU without bf16 instructions, where bf16 "
                        "matmuls are far slower)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each layer in backward: keeps only the layers' inputs "
                        "(same gradients, about one more forward of compute per step)")
    p.add_argument("--nonfinite", choices=["skip", "propagate"], default="skip",
                   help="skip (and log) a step whose gradients hold an inf or NaN, or let it "
                        "reach the weights as torch.optim does")
    add_data_args(p)


def train_config(args, optimizer: str, **extra) -> TrainConfig:
    """The run's TrainConfig; `extra` adds fields and overrides lr / weight_decay / betas."""
    base = dict(lr=args.lr, weight_decay=args.weight_decay)
    return TrainConfig(optimizer=optimizer, model=args.model, steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_batches=args.eval_batches, seed=args.seed, device=args.device,
                       dtype=args.dtype, data=args.data, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, nonfinite=args.nonfinite,
                       checkpoint_activations=args.checkpoint_activations,
                       compute_dtype=args.compute_dtype, rounding=args.rounding,
                       **{**base, **extra})


def train_default(name: str):
    """TrainConfig's default for a field: the one source of compare's knob defaults."""
    return TrainConfig.__dataclass_fields__[name].default


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(memopt_core=__version__, commit=commit or None, torch=torch.__version__,
                python=platform.python_version(), machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


# ---- optimizer settings on the command line ("apollo:rank=64,state_bits=8") -----------------
def split_specs(text: str) -> list:
    """"adamw,adam_mini apollo:rank=64,state_bits=8" -> ["adamw", "adam_mini",
    "apollo:rank=64,state_bits=8"]: runs separated by spaces, or by commas where no run has
    settings."""
    return [x for spec in text.split() for x in (spec.split(",") if ":" not in spec else [spec])]


def parse_settings(text: str, command: str) -> dict:
    """"density=0,update_gap=100" -> {"density": 0, "update_gap": 100} (Python literals; a
    comma inside brackets, as in betas=(0.9,0.99), belongs to its value)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    out = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"memopt {command}: setting {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word: a string option
    return out


def check_settings(name: str, kwargs: dict, command: str) -> None:
    """Raises SystemExit naming the valid keys when a setting is not one `name` takes."""
    signature = inspect.signature(OPTIMIZERS[name].cls.__init__)
    valid = sorted(k for k, p in signature.parameters.items()
                   if k not in ("self", "params", "named_params_or_model", "source")
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise SystemExit(f"memopt {command}: {name} has no setting {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid)}")
