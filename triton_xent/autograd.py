"""The autograd layer: the forward computes loss and gradient together, the backward only
scales the saved gradient by grad_output.

Two doors lead to core.forward:
- the custom op `torch.ops.triton_xent.cross_entropy` (torch.library, with a fake
  implementation and registered autograd): what cross_entropy calls, so that
  torch.compile(fullgraph=True) sees one opaque node instead of tracing Triton launches and
  host-side checks;
- CrossEntropyFunction, for inplace_backward (a custom op may not return a gradient that
  aliases its input) and for process_group (collectives): eager-mode features.

Distillation (distill.forward) has the same two doors: the custom op
`torch.ops.triton_xent.distillation_loss`, and DistillationFunction for process_group.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import core, distill, distributed


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
    option_tensors: list[torch.Tensor | None],  # core.FLOAT_OPTIONS given as 0-dim tensors
    check_targets: bool,
    use_triton: bool,
    temperature: float,
    entropy: bool,
    argmax: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, H, argmax, grad): the loss in core.acc_dtype (float32 for half-precision
    input: the caller casts it, to float32 under autocast), grad dloss/dinput already scaled
    by the reduction; H (float32), argmax (int64) and grad are empty tensors when not asked
    for."""
    label_smoothing, lse_square_scale, softcap, temperature = core.resolve_options(
        (label_smoothing, lse_square_scale, softcap, temperature), option_tensors)
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton, temperature,
                           entropy, argmax)
    loss, lse, H, idx, grad = core.forward(problem, input, target, weight, row_weight,
                                           entropy_weight, compute_grad=compute_grad)
    return (loss, lse, _or_empty(H, lse), _or_empty(idx, lse, torch.int64),
            _or_empty(grad, input))


@cross_entropy_op.register_fake
def _(input, target, weight, row_weight, entropy_weight, prob_target, reduction,
      ignore_index, label_smoothing, lse_square_scale, softcap, option_tensors, check_targets,
      use_triton, temperature, entropy, argmax, compute_grad):
    rows = core.row_shape(input, target, prob_target)
    loss_shape = rows if reduction == "none" else ()
    loss = input.new_empty(loss_shape, dtype=core.acc_dtype(input.dtype))
    lse = input.new_empty(rows, dtype=torch.float32)
    H = input.new_empty(rows if entropy else (0,), dtype=torch.float32)
    idx = input.new_empty(rows if argmax else (0,), dtype=torch.int64)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, lse, H, idx, grad


N_OP_ARGS = 18  # the op's arguments, for backward's tuple of gradients
_OPTION_TENSORS = 11  # the position of option_tensors among them


def _setup_context(ctx, inputs, output):
    # Backward needs the reduction and the backend (a tensor option's number is a
    # placeholder here), and the options again where it recomputes the entropy's gradient.
    input, target, weight = inputs[:3]
    ctx.options = inputs[5:-1]  # prob_target .. argmax
    (prob_target, reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
     option_tensors, check_targets, use_triton, temperature, entropy, argmax) = ctx.options
    ctx.option_tensors_grad = option_list_grad(option_tensors)
    ctx.problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                               lse_square_scale, softcap, check_targets, use_triton,
                               temperature, entropy, argmax)
    _, lse, H, idx, grad = output
    # The entropy's gradient for an arbitrary upstream gradient is recomputed from the input.
    ctx.save_for_backward(grad, *((input, target, weight) if entropy else ()))
    ctx.mark_non_differentiable(lse, idx, grad)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, grad_entropy, grad_argmax, grad_grad):
    input_grad = None
    saved = ctx.saved_tensors  # all unpacked before the first is scaled in place
    if ctx.needs_input_grad[0] and grad_loss is not None:
        input_grad = core.scale_saved_grad(ctx.problem, saved[0], grad_loss)
    if ctx.needs_input_grad[0] and grad_entropy is not None and ctx.problem.entropy:
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
    grads = [input_grad] + [None] * (N_OP_ARGS - 1)
    grads[_OPTION_TENSORS] = ctx.option_tensors_grad
    return tuple(grads)


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def register_vmap_by_samples(op) -> None:
    """torch.vmap of `op` as a loop: the op runs once per sample and the results are stacked
    (one launch per sample, as torch's generic fallback would, which an op with a list of
    optional tensors does not get). A batched rule proper (the samples' rows as one problem,
    per-sample reductions) is not written."""

    def pick(arg, dim, b):
        if isinstance(arg, (list, tuple)):
            dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
            return [pick(a, d, b) for a, d in zip(arg, dims)]
        return arg if dim is None or arg is None else arg.select(dim, b)

    def rule(info, in_dims, *args):
        results = [op(*(pick(a, d, b) for a, d in zip(args, in_dims)))
                   for b in range(info.batch_size)]
        outputs = tuple(torch.stack(outs) for outs in zip(*results))
        return outputs, (0,) * len(outputs)

    op.register_vmap(rule)


register_vmap_by_samples(cross_entropy_op)


def option_list_grad(option_tensors: list) -> list | None:
    """The gradient a custom op's backward returns for its option_tensors argument, shaped as
    torch.library compares it with the argument: a list of None for a list of tensors, None
    for a list holding a None (which it takes as one non-tensor argument)."""
    if any(t is None for t in option_tensors):
        return None
    return [None] * len(option_tensors)


def func_grads(grads: tuple) -> tuple:
    """A custom op's backward result as an autograd.Function returns it: None for the list
    of option tensors, which the Function sees as one non-tensor argument."""
    return tuple(None if isinstance(g, list) else g for g in grads)


def func_function(op, setup_context, backward) -> type:
    """A custom op with its registered autograd as a torch.autograd.Function, for torch.func
    transforms (grad, vjp, vmap, jacrev).

    On this torch (2.13) the autograd that register_autograd generates has no separate
    setup_context, which torch.func requires (pytorch/pytorch#170834), so under a transform
    the public functions call the op through this Function: the same setup_context and
    backward, vmap rule generated (the op itself runs per sample, as register_vmap_by_samples
    says). Forward-mode AD (jvp, jacfwd, hessian) is not implemented."""

    class FuncFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return op(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            return setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return func_grads(backward(ctx, *grads))

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(
                "triton_xent has no forward-mode AD (torch.func.jvp, jacfwd, hessian): use "
                "reverse mode (torch.func.grad, vjp, jacrev) or F.cross_entropy")

    FuncFunction.__name__ = FuncFunction.__qualname__ = f"{op._name.split('::')[-1]}_func"
    return FuncFunction


CrossEntropyFuncFunction = func_function(cross_entropy_op, _setup_context, _backward)


@torch.library.custom_op("triton_xent::refuse_under_compile", mutates_args=())
def refuse_under_compile(like: torch.Tensor, message: str) -> torch.Tensor:
    """Raises ValueError(message): how an eager-only feature is refused under torch.compile.
    The compiler runs the fake implementation while it traces, and an error raised there
    stops the compile, with or without fullgraph. The same error raised by traced code would
    only send the frame back to eager mode, where the feature would run uncompiled: a silent
    graph break."""
    raise ValueError(message)


@refuse_under_compile.register_fake
def _(like, message):
    raise ValueError(message)


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
            with torch.autocast(input.device.type, enabled=False):
                loss, lse, H, idx, grad = distributed.forward(*args, group, row_weight,
                                                              entropy_weight,
                                                              compute_grad=True)
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


# --- distillation ------------------------------------------------------------------------


@torch.library.custom_op("triton_xent::distillation_loss", mutates_args=())
def distillation_op(
    input: torch.Tensor,  # (..., V) student logits
    teacher: torch.Tensor,  # (..., V) teacher logits, input's shape
    target: torch.Tensor | None,  # (...) class indices: only ignore_index matters
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    use_triton: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): the loss in core.acc_dtype (the caller casts it), grad = dloss/dinput
    already scaled by the reduction (an empty tensor unless compute_grad)."""
    problem = distill.DistillProblem(divergence, beta, temperature, ignore_index, reduction,
                                     use_triton)
    loss, grad = distill.forward(problem, input, teacher, target, compute_grad=compute_grad)
    return loss, _or_empty(grad, input)


@distillation_op.register_fake
def _(input, teacher, target, divergence, beta, temperature, ignore_index, reduction,
      use_triton, compute_grad):
    loss_shape = input.shape[:-1] if reduction == "none" else ()
    loss = input.new_empty(loss_shape, dtype=core.acc_dtype(input.dtype))
    return loss, input.new_empty(input.shape if compute_grad else (0,))


_DISTILL_OP_ARGS = 10  # the op's arguments, for backward's tuple of gradients


def _distill_setup_context(ctx, inputs, output):
    (_, _, _, divergence, beta, temperature, ignore_index, reduction, use_triton,
     _) = inputs
    ctx.problem = distill.DistillProblem(divergence, beta, temperature, ignore_index,
                                         reduction, use_triton)
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)


def _distill_backward(ctx, grad_loss, grad_grad):
    input_grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        input_grad = distill.scale_saved_grad(ctx.problem, ctx.saved_tensors[0], grad_loss)
    return (input_grad,) + (None,) * (_DISTILL_OP_ARGS - 1)


distillation_op.register_autograd(_distill_backward, setup_context=_distill_setup_context)


class DistillationFunction(torch.autograd.Function):
    """(input, teacher, target) -> loss over a process group (vocab parallelism, eager
    only: collectives); only `input` gets a gradient, computed in forward."""

    @staticmethod
    def forward(ctx, input, teacher, target, problem: distill.DistillProblem, group):
        loss, grad = distill.forward(problem, input, teacher, target, compute_grad=True,
                                     process_group=group)
        ctx.problem = problem
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # grad_output is the same on every rank (the loss is): no collective.
        grad = distill.scale_saved_grad(ctx.problem, ctx.saved_tensors[0], grad_loss)
        return grad, None, None, None, None
