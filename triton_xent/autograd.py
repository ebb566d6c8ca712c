"""The autograd layer: the forward computes loss and gradient together, the backward only
scales the saved gradient by grad_output."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import core


def _graph_is_kept() -> bool:
    """True while the running backward was asked to keep the graph (retain_graph=True)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


class CrossEntropyFunction(torch.autograd.Function):
    """(input, target, weight) -> (loss, lse); only `input` gets a gradient, lse has none."""

    @staticmethod
    def forward(ctx, input, target, weight, problem: core.Problem):
        loss, lse, grad = core.forward(problem, input, target, weight, compute_grad=True)
        ctx.problem = problem
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    @once_differentiable  # the Hessian of the loss is not implemented: refuse, loudly
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None:
            return None, None, None, None
        (grad,) = ctx.saved_tensors
        # Without retain_graph the saved gradient is used once: scale it in place (the kernel
        # leaves rows whose factor is 1 untouched). With retain_graph it must stay as it is.
        input_grad = core.scale_grad(ctx.problem, grad, grad_loss, in_place=not _graph_is_kept())
        return input_grad, None, None, None
