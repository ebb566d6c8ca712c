"""nn.Module forms of the public functions."""

from __future__ import annotations

import torch
from torch import nn

from .functional import cross_entropy


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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.check_targets = check_targets

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward,
            backend=self.backend, check_targets=self.check_targets,
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
        return ", ".join(extras)
