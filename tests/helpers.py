"""The one reference (PyTorch in float64) and the per-dtype tolerances of every test."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Loss and gradient tolerances against the float64 reference, per input dtype. Low-precision
# inputs are judged by the rounding of the input itself (bf16 keeps 8 bits of mantissa).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def reference(x, target, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, lse_square_scale=0.0, softcap=None, grad_output=None):
    """(loss, input gradient) in float64 from F.cross_entropy, plus our z-loss and softcap.

    The input is rounded to its own dtype first (it is what the kernel sees), then promoted.
    grad_output: the upstream gradient; 1 when None.
    """
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    z = softcap * torch.tanh(x64 / softcap) if softcap is not None else x64
    prob = target.is_floating_point()
    t = target.to(torch.float64) if prob else target.long()
    w = weight.to(torch.float64) if weight is not None else None
    loss = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if lse_square_scale:
        lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
        keep = torch.ones_like(lse) if prob else (target != ignore_index).to(torch.float64)
        zl = lse_square_scale * lse * lse * keep
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl.sum() / keep.sum()
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(torch.float64)
    (loss * go).sum().backward()
    return loss.detach(), x64.grad


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[dtype])
