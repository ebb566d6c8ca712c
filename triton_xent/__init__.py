"""triton_xent: fused cross-entropy for PyTorch (Triton kernels on GPUs, PyTorch on CPUs)."""

from .functional import (CrossEntropyOutput, cross_entropy, distillation_loss,
                         triton_available)
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .linear_distill import LinearDistillationLoss, linear_distillation_loss
from .modules import CrossEntropyLoss, DistillationLoss

__all__ = [
    "cross_entropy",
    "CrossEntropyOutput",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "distillation_loss",
    "DistillationLoss",
    "linear_distillation_loss",
    "LinearDistillationLoss",
    "triton_available",
]
# The version, in this one place (pyproject.toml reads it; CHANGELOG.md says what each brought).
__version__ = "0.2.0.dev0"
