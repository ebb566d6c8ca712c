"""The public functions: argument checks (clear errors before anything runs) and the choice
of backend."""

from __future__ import annotations

import functools
import numbers
import os
from typing import NamedTuple

import torch
from torch.nn import _reduction

from . import core, distill, distributed, dtensor
from .autograd import (CrossEntropyFuncFunction, CrossEntropyFunction, DistillationFunction,
                       cross_entropy_op, distillation_op, refuse_under_compile)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "torch")
_REDUCTIONS = ("mean", "sum", "none")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether triton imports (it is not installed on every platform)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(backend: str, input: torch.Tensor) -> bool:
    """backend "auto": kernels for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1)
    in fp32/fp16/bf16; the plain-PyTorch path otherwise (CPU tensors, float64)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = input.is_cuda or _interpreting()
    if backend == "auto":
        return runnable and input.dtype in _KERNEL_DTYPES and triton_available()
    if input.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 input, got "
                        f"{input.dtype}; use backend='torch' or 'auto'")
    if not runnable:
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "the kernels on CPU tensors); use backend='torch' or 'auto'")
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    return True


def _check_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> bool:
    """Checks target against input; returns True for class probabilities."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"float target holds class probabilities and must have input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}; class indices must be an "
                f"integer tensor")
        if ignore_index >= 0:  # as PyTorch: a negative one is accepted, and matches nothing
            raise ValueError(f"ignore_index is not supported for class-probability targets "
                             f"(got {ignore_index}; leave it negative, e.g. -100)")
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices or float class "
                        f"probabilities, got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected:
        if input.dim() == 2 and target.dim() == 1:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                             f"batch_size ({target.shape[0]}).")
        raise ValueError(f"target of class indices must have shape {tuple(expected)} for "
                         f"input of shape {tuple(input.shape)}, got {tuple(target.shape)}")
    return False


def _class_indices(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class indices as every path compares them: int64, or int32 where ignore_index fits in
    it (read as is). Comparing uint8/int8/int16 targets with ignore_index or C in their own
    dtype would wrap (-100 is class 156 in uint8; C = 300 is 44)."""
    if target.dtype == torch.int64 or (target.dtype == torch.int32
                                       and -2**31 <= ignore_index < 2**31):
        return target
    return target.long()


def _check_weight(input: torch.Tensor, weight: torch.Tensor | None) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor of one weight per class")
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight.shape != (n_classes,):
        raise ValueError(f"weight must have shape ({n_classes},), one per class, got "
                         f"{tuple(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")


def _reduction_name(reduction) -> str:
    """"mean", "sum" or "none"; PyTorch's deprecated "elementwise_mean" is "mean", with
    PyTorch's own warning."""
    if reduction == "elementwise_mean":
        _reduction.get_enum(reduction)  # PyTorch's deprecation warning
        return "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction "
                         f"(one of {_REDUCTIONS})")
    return reduction


def _number(name: str, value):
    """A real-number option (core.NUMBER_RULES names it): a Python number (a SymFloat when
    torch.compile makes it symbolic) or, as F.cross_entropy takes it, a 0-dim real tensor.
    Returns the number; TypeError for anything else, ValueError for a value out of range.

    Under torch.compile a tensor's value is unknown while tracing, and reading it would break
    the graph: the tensor itself is returned, for the custom op to read and check when it
    runs (core.resolve_options)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        if torch.compiler.is_compiling():
            return value
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat,
                                                           torch.SymInt)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return core.check_number(name, value)


def _check_options(reduction, label_smoothing, lse_square_scale, softcap):
    """(reduction's name, label_smoothing, lse_square_scale, softcap) after the checks: the
    numbers as Python numbers, or (under torch.compile) 0-dim tensors, see _number."""
    label_smoothing = _number("label_smoothing", label_smoothing)
    lse_square_scale = _number("lse_square_scale", lse_square_scale)
    if softcap is not None:
        softcap = _number("softcap", softcap)
    return _reduction_name(reduction), label_smoothing, lse_square_scale, softcap


def op_options(label_smoothing, lse_square_scale, softcap, temperature) -> tuple:
    """The FLOAT_OPTIONS as the custom ops take them: (label_smoothing, lse_square_scale,
    softcap, temperature, tensors), where an option given as a tensor (under torch.compile,
    see _number) is 0.0 among the numbers and the tensor in `tensors` (None for each number
    given)."""
    values = (label_smoothing, lse_square_scale, softcap, temperature)
    tensors = [v if isinstance(v, torch.Tensor) else None for v in values]
    numbers_ = (0.0 if t is not None else None if v is None else float(v)
                for v, t in zip(values, tensors))
    return (*numbers_, tensors)


def loss_dtype(input: torch.Tensor, prob_target: torch.Tensor | None = None) -> torch.dtype:
    """F.cross_entropy's result dtype: input's, promoted with a probability target's. Under
    torch.autocast, where cross-entropy is on the float32 list, float16 and bfloat16 count as
    float32: the loss is float32 as PyTorch's, without autocast's float32 copy of the logits
    (the kernels and the fallback accumulate in float32 anyway)."""
    autocast = torch.is_autocast_enabled(input.device.type)
    dtypes = [input.dtype] + ([prob_target.dtype] if prob_target is not None else [])
    if autocast:
        dtypes = [torch.float32 if d in (torch.float16, torch.bfloat16) else d for d in dtypes]
    return functools.reduce(torch.promote_types, dtypes)


def _transformed(input: torch.Tensor) -> bool:
    """Whether input is seen through a torch.func transform (grad, vjp, vmap, ...); never
    while torch.compile traces (Dynamo cannot call the test, and runs transforms itself)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.is_functorch_wrapped_tensor(input))


def _func_op(op):
    """The custom op as cross_entropy calls it under a torch.func transform: through
    `op`, a Function that torch.func accepts. Nested reverse mode (grad of grad, jacrev of
    grad, hessian) is refused: the backward is not differentiable, and a transform would
    otherwise see a zero second derivative."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grads = sum(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())
    if grads > 1:
        raise NotImplementedError(
            "triton_xent has no second-order gradients (nested torch.func.grad, jacrev of "
            "grad, hessian): its backward is not differentiable; use F.cross_entropy")
    return op.apply


def _refuse_eager_only(*, process_group: bool, inplace_backward: bool, input) -> None:
    """A clear error, rather than a graph break, for an eager-only feature under
    torch.compile or a torch.func transform."""
    features = [name for name, used in (("process_group", process_group),
                                        ("inplace_backward", inplace_backward)) if used]
    if not features:
        return
    compiling = torch.compiler.is_compiling()
    if compiling:
        why = ("under torch.compile the loss is a custom op, which may neither write into "
               "its input nor run collectives")
    elif isinstance(input, torch.Tensor) and _transformed(input):
        why = "a torch.func transform cannot see through it"
    else:
        return
    message = (f"{' and '.join(features)} is an eager-mode feature: {why}; leave it out of "
               f"the compiled or transformed function")
    if compiling and isinstance(input, torch.Tensor):
        refuse_under_compile(input, message)  # raises while tracing, fullgraph or not
    raise ValueError(message)


class CrossEntropyOutput(NamedTuple):
    """What cross_entropy and linear_cross_entropy return when return_entropy or
    return_argmax is asked for: the loss, then each extra (None where not asked for).

    loss: reduced as `reduction` says, with the row weights and the entropy term.
    lse: (rows) float32, the logsumexp of the tempered logits (return_lse); not reduced, no
        gradient.
    entropy: (rows) float32, H of the tempered distribution, 0 on ignored rows
        (return_entropy); not reduced, and differentiable.
    argmax: (rows) int64, the first index of the largest tempered logit, -1 on ignored rows
        (return_argmax; unspecified on a row holding a NaN); not reduced, no gradient.
    """

    loss: torch.Tensor
    lse: torch.Tensor | None
    entropy: torch.Tensor | None
    argmax: torch.Tensor | None


def _results(loss, lse, entropy, argmax, return_lse: bool, return_entropy: bool,
             return_argmax: bool):
    """loss; (loss, lse) with return_lse alone; a CrossEntropyOutput with the others."""
    if return_entropy or return_argmax:
        return CrossEntropyOutput(loss, lse if return_lse else None,
                                  entropy if return_entropy else None,
                                  argmax if return_argmax else None)
    return (loss, lse) if return_lse else loss


def _check_temperature(temperature):
    """The temperature, a real number > 0 (or a 0-dim tensor under torch.compile, see
    _number)."""
    return _number("temperature", temperature)


def _check_row_tensor(name: str, t, rows: torch.Size, device: torch.device) -> None:
    """A per-row float tensor: the unreduced loss's shape, input's device, no gradient."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != rows:
        raise ValueError(f"{name} must have the unreduced loss's shape {tuple(rows)}, one "
                         f"value per row, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")
    if torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(f"triton_xent gives {name} no gradient; detach it")


def _check_row_extras(row_weight, entropy_weight, rows: torch.Size, device: torch.device):
    """(row_weight, entropy_weight as a tensor, or None for no entropy term), checked."""
    if row_weight is not None:
        _check_row_tensor("row_weight", row_weight, rows, device)
    if isinstance(entropy_weight, torch.Tensor):
        # a 0-dim float tensor is a number (kept on the device: no host sync)
        _check_row_tensor("entropy_weight", entropy_weight,
                          torch.Size([]) if entropy_weight.dim() == 0 else rows, device)
        return row_weight, entropy_weight
    if isinstance(entropy_weight, bool) or not isinstance(
            entropy_weight, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"entropy_weight must be a number or a per-row float tensor, got "
                        f"{type(entropy_weight).__name__}")
    core.check_number("entropy_weight", entropy_weight)
    if entropy_weight == 0.0:
        return row_weight, None
    return row_weight, torch.full((), entropy_weight, dtype=torch.float64, device=device)


@dtensor.routes_dtensors(dtensor.cross_entropy_arguments)  # DTensor arguments: dtensor.py
def cross_entropy(
    input: torch.Tensor,  # (C,), (N, C) or (N, C, d1, ..., dk) logits
    target: torch.Tensor,  # class indices (), (N,), (N, d1, ..., dk); or probabilities like input
    weight: torch.Tensor | None = None,  # (C,)
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    check_targets: bool = True,
    process_group=None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_weight: float | torch.Tensor = 0.0,  # a number, or the unreduced loss's shape
    row_weight: torch.Tensor | None = None,  # the unreduced loss's shape
    return_argmax: bool = False,
):
    """Drop-in for torch.nn.functional.cross_entropy, computed by fused Triton kernels.

    The first eight parameters are F.cross_entropy's, with its results. Extras:

    lse_square_scale: z-loss; adds lse_square_scale * lse**2 for every row that is not
        ignored ("mean" divides this term by the number of such rows, whatever the weights).
    softcap: logits become softcap * tanh(logits / softcap) before anything else.
    return_lse: also return the per-row logsumexp of z (after softcap and temperature),
        float32, shaped like the unreduced loss. It carries no gradient.
    inplace_backward: the input gradient is written into input's storage, so a large logits
        tensor costs no second buffer. The input is spent: after the call it holds the
        gradient (scaled by grad_output at backward), and anything else that reads it in
        backward fails with autograd's in-place error.
    backend: "auto" (kernels for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1;
        the plain-PyTorch path for other CPU tensors and for float64), "triton" or "torch".
    check_targets: on the kernel path, a class index outside [0, C) that is not ignore_index
        raises IndexError, as PyTorch does on CPU; this costs one host synchronisation. With
        False there is no sync (CUDA graphs, torch.compile) and such a row's loss and gradient
        are NaN; the kernel never reads out of bounds. The CPU fallback always checks.

    process_group: vocab parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs).
        `input` is then this rank's contiguous slice of the class dimension, slices in
        group-rank order, sizes possibly unequal; `target` holds global class indices, the
        same on every rank; `weight`, if given, holds all C classes' weights on every rank.
        Every rank gets the loss of the full problem, and its input gradient is its own slice
        of the full gradient. Label smoothing uses the global C. Class-index targets only.
        A DTensor input sharded on the classes needs no process_group: its mesh gives it
        (triton_xent/dtensor.py; the loss is then a replicated DTensor).

    For reinforcement learning and monitoring, in the same pass (see the README):
    temperature: z = softcap(logits) / temperature before anything else (loss, lse, entropy,
        argmax and gradient all see the tempered distribution); finite and > 0.
    return_entropy: also return the per-row entropy H = lse - sum_c p_c z_c, float32, shaped
        like the unreduced loss, 0 on ignored rows. It carries a gradient (its backward
        recomputes from the input, so it is refused with inplace_backward).
    entropy_weight: a number or a per-row float tensor: adds entropy_weight * H to each row
        that counts, before the reduction ("mean" divides this term by the number of such
        rows); its gradient is computed in the same pass.
    row_weight: a per-row float tensor that multiplies each row's cross-entropy (with its
        smoothing and z-loss), not the entropy term; "mean" keeps the usual denominators.
    return_argmax: also return the per-row argmax class (int64) of the tempered logits,
        first index on ties, -1 on ignored rows.
    With return_entropy or return_argmax the result is a CrossEntropyOutput named tuple
    (loss, lse, entropy, argmax), None where not asked for; return_lse alone keeps (loss, lse).

    Only `input` receives a gradient; a weight, probability target, row_weight or
    entropy_weight that requires grad is refused.

    Under torch.autocast the loss is float32, as F.cross_entropy's, without its float32 copy
    of input. torch.compile (fullgraph, dynamic shapes) and torch.func (grad, vjp, vmap) see
    a custom op; inplace_backward and process_group are eager-only and refused there.
    """
    _refuse_eager_only(process_group=process_group is not None,
                       inplace_backward=inplace_backward, input=input)
    # Every check before anything is computed; with a group, a rank that fails them still
    # joins the first collective, so the others fail too (distributed.refusing_together).
    with distributed.refusing_together(process_group, target):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"input must hold floating-point logits, got {input.dtype}")
        if input.dim() == 0:
            raise ValueError("input must have a class dimension: shape (C,), (N, C) or "
                             "(N, C, d1, ..., dk), got a 0-dim tensor")
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        reduction, label_smoothing, lse_square_scale, softcap = _check_options(
            reduction, label_smoothing, lse_square_scale, softcap)
        if (input.dim() == 1 and isinstance(target, torch.Tensor) and target.shape == (1,)
                and not target.is_floating_point()):
            target = target[0]  # one sample as (1,), which F.cross_entropy takes like ()
        prob_target = _check_target(input, target, ignore_index)
        if not prob_target:
            target = _class_indices(target, ignore_index)
        if process_group is None:
            _check_weight(input, weight)
        elif prob_target or inplace_backward:
            raise ValueError("process_group takes class-index targets and no inplace_backward")
        elif weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1
                                     or not weight.is_floating_point()):
            raise ValueError("with a process_group, weight is a 1-D float tensor of all classes")
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        if torch.is_grad_enabled() and (target.requires_grad or
                                        (weight is not None and weight.requires_grad)):
            raise ValueError("triton_xent computes the gradient of input only; detach the "
                             "target and weight (or use F.cross_entropy for their gradients)")
        temperature = _check_temperature(temperature)
        row_weight, entropy_weight = _check_row_extras(
            row_weight, entropy_weight, core.row_shape(input, target, prob_target),
            input.device)
        if inplace_backward and return_entropy:
            raise ValueError("return_entropy's gradient is recomputed from the input, which "
                             "inplace_backward spends; use entropy_weight for an entropy "
                             "term in the loss")
        use_triton = _use_triton(backend, input)
    extras = (bool(return_lse), bool(return_entropy), bool(return_argmax))
    rows = (row_weight, entropy_weight)
    if process_group is not None or (inplace_backward and needs_grad):  # eager: numbers
        problem = core.Problem(
            prob_target=prob_target, reduction=reduction, ignore_index=int(ignore_index),
            label_smoothing=float(label_smoothing), lse_square_scale=float(lse_square_scale),
            softcap=None if softcap is None else float(softcap),
            check_targets=bool(check_targets), use_triton=use_triton,
            temperature=float(temperature), entropy=extras[1], argmax=extras[2],
            inplace_backward=process_group is None)
    if process_group is not None:
        if needs_grad:
            out = CrossEntropyFunction.apply(input, target, weight, *rows, problem,
                                             process_group)
        else:
            out = distributed.forward(problem, input, target, weight, process_group, *rows,
                                      compute_grad=False)[:4]
    elif inplace_backward and needs_grad:
        out = CrossEntropyFunction.apply(input, target, weight, *rows, problem, None)
    else:
        op = _func_op(CrossEntropyFuncFunction) if _transformed(input) else cross_entropy_op
        ls, lss, cap, temp, tensors = op_options(label_smoothing, lse_square_scale, softcap,
                                                 temperature)
        out = op(input, target, weight, *rows, prob_target, reduction, int(ignore_index),
                 ls, lss, cap, tensors, bool(check_targets), use_triton, temp, extras[1],
                 extras[2], needs_grad)[:4]
    loss, lse, entropy, argmax = out
    loss = loss.to(loss_dtype(input, target if prob_target else None))
    return _results(loss, lse, entropy, argmax, *extras)


def _check_distill_options(divergence, beta, temperature, reduction):
    """(divergence, beta, temperature, reduction) after the checks (ValueError or TypeError
    naming the problem)."""
    if divergence not in distill.DIVERGENCES:
        raise ValueError(f"divergence must be one of {distill.DIVERGENCES}, got {divergence!r}")
    if reduction == "mean":
        raise ValueError('reduction="mean" is refused: F.kl_div\'s "mean" averages over '
                         'elements (rows times classes), which is not the distillation loss; '
                         'use reduction="batchmean" for the mean over rows')
    if reduction not in distill.REDUCTIONS:
        raise ValueError(f"reduction must be one of {distill.REDUCTIONS}, got {reduction!r}")
    for name, value in (("beta", beta), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat,
                                                              torch.SymInt)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    temperature = core.check_number("temperature", temperature)
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1 for divergence='jsd', got "
                         f"{beta}")
    return divergence, beta, temperature, reduction


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point logits, got {x.dtype}")


@dtensor.routes_dtensors(dtensor.distillation_arguments)  # DTensor logits: dtensor.py
def distillation_loss(
    input: torch.Tensor,  # (..., V) student logits
    teacher: torch.Tensor,  # (..., V) teacher logits, input's shape
    target: torch.Tensor | None = None,  # (...) class indices: marks ignored rows, or None
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    backend: str = "auto",
    process_group=None,
):
    """The divergence between the teacher's and the student's distributions over the last
    dimension, p_s = softmax(input / T) and p_t = softmax(teacher / T), computed in float32
    (float64 for float64 input) by fused kernels (one read of both logits for rows of up to
    config.ROW_SLICE_MAX_V classes; longer rows read them twice, three times for JSD).

    divergence: "forward_kl" sum p_t (log p_t - log p_s), i.e. KL(teacher || student);
        "reverse_kl" sum p_s (log p_s - log p_t); "jsd" beta KL(p_t || M) + (1 - beta)
        KL(p_s || M) with M = beta p_t + (1 - beta) p_s and 0 < beta < 1 (beta is used by
        "jsd" only). No T^2 factor: multiply the loss by temperature**2 for the usual one.
        Terms where a probability is 0 are 0: a -inf teacher logit is allowed (reverse KL is
        then +inf if the student puts mass on that class).
    target: (...) class indices or None; only marks rows: a row whose target is ignore_index
        counts nothing and gets a zero gradient. None: every row counts.
    reduction: "batchmean" (the sum over counted rows divided by their number; 0 with a zero
        gradient when no row counts), "sum", or "none" (per row, shape input.shape[:-1], 0
        on ignored rows). "mean" is refused (F.kl_div's "mean" averages over elements).
    backend: "auto" (kernels for CUDA tensors and, under TRITON_INTERPRET=1, CPU tensors;
        the plain-PyTorch path otherwise and for float64), "triton" or "torch".
    process_group: vocab parallelism: input and teacher are this rank's (same) contiguous
        slice of the classes. Eager mode only.

    Only `input` gets a gradient, computed in the forward pass (backward is a scale); a
    teacher that requires grad is refused (detach it). The loss has F.kl_div's
    dtype: input's promoted with teacher's (float32 under autocast); the gradient has
    input's dtype. torch.compile(fullgraph=True) sees one custom op.
    """
    if process_group is not None:
        _refuse_eager_only(process_group=True, inplace_backward=False, input=input)
    # With a group, a rank that fails a check still joins the first collective, so the
    # others fail too instead of waiting (distributed.refusing_together).
    with distributed.refusing_together(process_group, input):
        _check_logits("input", input)
        _check_logits("teacher", teacher)
        if input.dim() == 0:
            raise ValueError("input must have a class dimension (the last): shape (..., V), "
                             "got a 0-dim tensor")
        if teacher.shape != input.shape:
            raise ValueError(f"teacher must have input's shape {tuple(input.shape)}, got "
                             f"{tuple(teacher.shape)}")
        if teacher.device != input.device:
            raise ValueError(f"teacher is on {teacher.device} but input is on {input.device}")
        if input.shape[-1] == 0 and process_group is None:  # a rank's slice may be empty
            raise ValueError("input must have at least one class (its last dimension is 0)")
        if target is not None:
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"target must be a tensor or None, got "
                                f"{type(target).__name__}")
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(f"target must hold integer class indices (it marks ignored "
                                f"rows), got {target.dtype}")
            if target.shape != input.shape[:-1]:
                raise ValueError(f"target must have shape {tuple(input.shape[:-1])}, one per "
                                 f"row of input {tuple(input.shape)}, got "
                                 f"{tuple(target.shape)}")
            if target.device != input.device:
                raise ValueError(f"target is on {target.device} but input is on "
                                 f"{input.device}")
        if torch.is_grad_enabled() and teacher.requires_grad:
            raise ValueError("distillation_loss gives the teacher no gradient; detach it "
                             "(teacher.detach())")
        divergence, beta, temperature, reduction = _check_distill_options(
            divergence, beta, temperature, reduction)
        use_triton = _use_triton(backend, input)
        if use_triton and teacher.dtype not in _KERNEL_DTYPES:
            if backend == "triton":
                raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 "
                                f"teacher logits, got {teacher.dtype}; use backend='torch' "
                                f"or 'auto'")
            use_triton = False
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if process_group is not None:
        problem = distill.DistillProblem(divergence, float(beta), float(temperature),
                                         int(ignore_index), reduction, use_triton)
        if needs_grad:
            loss = DistillationFunction.apply(input, teacher, target, problem, process_group)
        else:
            loss = distill.forward(problem, input, teacher, target, compute_grad=False,
                                   process_group=process_group)[0]
    else:
        loss = distillation_op(input, teacher, target, divergence, float(beta),
                               float(temperature), int(ignore_index), reduction, use_triton,
                               needs_grad)[0]
    return loss.to(loss_dtype(input, teacher))
