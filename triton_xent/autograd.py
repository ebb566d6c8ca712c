"""The autograd layer: the forward computes loss and gradient together, the backward only
scales the saved gradient by grad_output.

Two doors lead to core.forward:
- the custom op `torch.ops.triton_xent.cross_entropy` (torch.library, with a fake
  implementation and registered autograd): what cross_entropy calls, so that
  torch.compile(fullgraph=True) sees one opaque node instead of tracing Triton launches and
  host-side checks;
- CrossEntropyFunction, for inplace_backward (a custom op may not return a gradient that
  aliases its input) and for process_group (collectives): eager-mode features.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import core, distributed


# --- the custom op -----------------------------------------------------------------------


def _or_empty(t: torch.Tensor | None, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return t if t is not None else like.new_empty(0, dtype=dtype)


@torch.library.custom_op("triton_xent::cross_entropy", mutates_args=())
def cross_entropy_op(
    input: torch.Tensor,  # (C,), (N, C) or (N, C, d1, ..., dk)
    target: torch.Tensor,  # class indices (N, d1, ..., dk) or probabilities shaped like input
    weight: torch.Tensor | None,  # (C,)
    row_weight: torch.Tensor | None,  # the unreduced loss's shape: factor of each row's CE
    entropy_weight: torch.Tensor | None,  # () or the unreduced loss's shape
    prob_target: bool,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    check_targets: bool,
    use_triton: bool,
    temperature: float,
    entropy: bool,
    argmax: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, H, argmax, grad): grad is dloss/dinput already scaled by the reduction;
    H (float32), argmax (int64) and grad are empty tensors when not asked for."""
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton, temperature,
                           entropy, argmax)
    loss, lse, H, idx, grad = core.forward(problem, input, target, weight, row_weight,
                                           entropy_weight, compute_grad=compute_grad)
    return (loss, lse, _or_empty(H, lse), _or_empty(idx, lse, torch.int64),
            _or_empty(grad, input))


@cross_entropy_op.register_fake
def _(input, target, weight, row_weight, entropy_weight, prob_target, reduction,
      ignore_index, label_smoothing, lse_square_scale, softcap, check_targets, use_triton,
      temperature, entropy, argmax, compute_grad):
    rows = core.row_shape(input, target, prob_target)
    loss_shape = rows if reduction == "none" else ()
    out_dtype = torch.result_type(input, target) if prob_target else input.dtype
    loss = input.new_empty(loss_shape, dtype=out_dtype)
    lse = input.new_empty(rows, dtype=torch.float32)
    H = input.new_empty(rows if entropy else (0,), dtype=torch.float32)
    idx = input.new_empty(rows if argmax else (0,), dtype=torch.int64)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, lse, H, idx, grad


N_OP_ARGS = 17  # the op's arguments, for backward's tuple of gradients


def _setup_context(ctx, inputs, output):
    input, target, weight = inputs[:3]
    ctx.options = inputs[5:-1]  # prob_target .. argmax
    ctx.problem = core.Problem(*ctx.options)
    _, lse, H, idx, grad = output
    # The entropy's gradient for an arbitrary upstream gradient is recomputed from the input.
    ctx.save_for_backward(grad, *((input, target, weight) if ctx.problem.entropy else ()))
    ctx.mark_non_differentiable(lse, idx, grad)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, grad_entropy, grad_argmax, grad_grad):
    input_grad = None
    saved = ctx.saved_tensors  # all unpacked before the first is scaled in place
    if ctx.needs_input_grad[0] and grad_loss is not None:
        input_grad = core.scale_saved_grad(ctx.problem, saved[0], grad_loss)
    if ctx.needs_input_grad[0] and grad_entropy is not None:
        # d(sum_r g_r H_r)/dinput is the gradient of a "sum" loss with row weights 0 and
        # entropy weights g: one more pass over the logits.
        input, target, weight = saved[1:]
        options = list(ctx.options)
        options[1] = "sum"
        options[-1] = False  # no argmax
        *_, d_entropy = cross_entropy_op(input, target, weight,
                                         grad_entropy.new_zeros(grad_entropy.shape),
                                         grad_entropy, *options, True)
        input_grad = d_entropy if input_grad is None else input_grad + d_entropy
    return (input_grad,) + (None,) * (N_OP_ARGS - 1)


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --- eager-only paths: the in-place gradient, and vocab parallelism ----------------------


class CrossEntropyFunction(torch.autograd.Function):
    """(input, target, weight, row_weight, entropy_weight) -> (loss, lse, H, argmax); only
    `input` gets a gradient, through loss and H. With `group`, input is this rank's slice of
    the classes (distributed.py); otherwise the problem has inplace_backward and the
    gradient is written into input's storage (H is then not returned: see functional.py)."""

    @staticmethod
    def forward(ctx, input, target, weight, row_weight, entropy_weight, problem: core.Problem,
                group):
        args = (problem, input, target, weight)
        if group is None:
            loss, lse, H, idx, grad = core.forward(*args, row_weight, entropy_weight,
                                                   compute_grad=True)
        else:
            loss, lse, H, idx, grad = distributed.forward(*args, group, row_weight,
                                                          entropy_weight, compute_grad=True)
        ctx.problem = problem
        ctx.group = group
        ctx.save_for_backward(grad, *((input, target, weight) if problem.entropy
                                      and not problem.inplace_backward else ()))
        H, idx = _or_empty(H, lse), _or_empty(idx, lse, torch.int64)
        ctx.mark_non_differentiable(lse, idx)
        ctx.set_materialize_grads(False)
        return loss, lse, H, idx

    @staticmethod
    @once_differentiable  # the Hessian of the loss is not implemented: refuse, loudly
    def backward(ctx, grad_loss, grad_lse, grad_entropy, grad_argmax):
        input_grad = None
        saved = ctx.saved_tensors  # all unpacked before the first is scaled in place
        if grad_loss is not None:
            # With a group, grad_output is the same on every rank (the loss is): no collective.
            input_grad = core.scale_saved_grad(ctx.problem, saved[0], grad_loss)
        if grad_entropy is not None:  # recomputed, as in the custom op's backward above
            input, target, weight = saved[1:]
            problem = dataclasses.replace(ctx.problem, reduction="sum", argmax=False)
            args = (problem, input, target, weight)
            zeros = grad_entropy.new_zeros(grad_entropy.shape)
            if ctx.group is None:
                d_entropy = core.forward(*args, zeros, grad_entropy, compute_grad=True)[-1]
            else:  # every rank must pass the entropy a gradient alike: collectives again
                d_entropy = distributed.forward(*args, ctx.group, zeros, grad_entropy,
                                                compute_grad=True)[-1]
            input_grad = d_entropy if input_grad is None else input_grad + d_entropy
        return input_grad, None, None, None, None, None, None
