"""memopt_core: memory-efficient optimizers for LLM training on a fused C++/LibTorch core."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.memopt.*)
