"""memopt_core: memory-efficient optimizers for LLM training on a fused C++/LibTorch core.

    import memopt_core
    opt = memopt_core.AdamMini(model, lr=3e-4)      # or model.named_parameters()
    opt = memopt_core.AdamW(model.parameters(), lr=3e-4)
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.memopt.*)
from .adam_mini import AdamMini
from ._base import set_lr
from .adamw import AdamW
from .apollo import Apollo, ApolloMini
from .frugal import Frugal
from .int8_weights import Int8Linear, quantize_weights_
from .layerwise import LayerwiseStep
from .slim_adam import SlimAdam
from . import snr  # noqa: F401  (SNRTracker: the analysis behind SlimAdam's rules)
from .registry import OPTIMIZERS, make_optimizer

__all__ = ["AdamW", "AdamMini", "SlimAdam", "Apollo", "ApolloMini", "Frugal", "LayerwiseStep", "OPTIMIZERS",
           "make_optimizer", "set_lr", "Int8Linear", "quantize_weights_"]
__version__ = "0.1.0"

# The C++ package for LibTorch trainers lives next to the extension (lib/, include/,
# lib/cmake/memopt_core): cmake -DCMAKE_PREFIX_PATH="$(python -c 'import memopt_core;
# print(memopt_core.cmake_prefix_path)')" finds it with find_package(memopt_core).
import os as _os

cmake_prefix_path = _os.path.dirname(_os.path.abspath(_C.__file__))
