"""memopt_core: memory-efficient optimizers for LLM training on a fused C++/LibTorch core.

    import memopt_core
    opt = memopt_core.AdamMini(model, lr=3e-4)      # or model.named_parameters()
    opt = memopt_core.AdamW(model.parameters(), lr=3e-4)
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.memopt.*)
from .adam_mini import AdamMini
from .adamw import AdamW
from .apollo import Apollo, ApolloMini
from .registry import OPTIMIZERS, make_optimizer

__all__ = ["AdamW", "AdamMini", "Apollo", "ApolloMini", "OPTIMIZERS", "make_optimizer"]
__version__ = "0.1.0"
