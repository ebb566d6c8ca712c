"""nn.Module forms of the public functions."""

from __future__ import annotations

import torch
from torch import nn

from .functional import cross_entropy, distillation_loss


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for nn.CrossEntropyLoss (same constructor and buffers), computed by
    triton_xent.cross_entropy; the extras are keyword-only (see cross_entropy)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,  # (C,)
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
        check_targets: bool = True,
        temperature: float = 1.0,
        return_entropy: bool = False,
        entropy_weight: float = 0.0,
        return_argmax: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.check_targets = check_targets
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.entropy_weight = entropy_weight
        self.return_argmax = return_argmax

    def forward(
        self,
        input: torch.Tensor,  # (C,), (N, C) or (N, C, d1, ..., dk)
        target: torch.Tensor,
        row_weight: torch.Tensor | None = None,  # the unreduced loss's shape
        entropy_weight: torch.Tensor | None = None,  # per row; None: the constructor's number
    ):
        """row_weight and a per-row entropy_weight change with every batch (an advantage, a
        mask), so they are forward's arguments; see cross_entropy."""
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward,
            backend=self.backend, check_targets=self.check_targets,
            temperature=self.temperature, return_entropy=self.return_entropy,
            entropy_weight=self.entropy_weight if entropy_weight is None else entropy_weight,
            row_weight=row_weight, return_argmax=self.return_argmax,
        )

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"backend={self.backend!r}"]
        if self.ignore_index != -100:
            extras.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            extras.append(f"label_smoothing={self.label_smoothing}")
        if self.lse_square_scale:
            extras.append(f"lse_square_scale={self.lse_square_scale}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.temperature != 1.0:
            extras.append(f"temperature={self.temperature}")
        if self.entropy_weight:
            extras.append(f"entropy_weight={self.entropy_weight}")
        return ", ".join(extras)


class DistillationLoss(nn.Module):
    """triton_xent.distillation_loss as a module: the options in the constructor, the
    logits (and the target marking ignored rows) in forward."""

    def __init__(
        self,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.process_group = process_group

    def forward(
        self,
        input: torch.Tensor,  # (..., V) student logits
        teacher: torch.Tensor,  # (..., V) teacher logits
        target: torch.Tensor | None = None,  # (...) class indices, or None
    ) -> torch.Tensor:
        return distillation_loss(
            input, teacher, target, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        extras = [f"divergence={self.divergence!r}", f"reduction={self.reduction!r}",
                  f"backend={self.backend!r}"]
        if self.divergence == "jsd":
            extras.append(f"beta={self.beta}")
        if self.temperature != 1.0:
            extras.append(f"temperature={self.temperature}")
        if self.ignore_index != -100:
            extras.append(f"ignore_index={self.ignore_index}")
        return ", ".join(extras)
