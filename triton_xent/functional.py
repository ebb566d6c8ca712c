"""The public functions: argument checks (clear errors before anything runs) and the choice
of backend."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import NamedTuple

import torch
from torch.nn import _reduction

from . import core, distributed, dtensor
from .autograd import CrossEntropyFunction, cross_entropy_op

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


def _check_number(name: str, value) -> None:
    """A real number; like PyTorch, also a 0-dim real tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
            return
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def _check_options(reduction, label_smoothing, lse_square_scale, softcap) -> str:
    """Checks the options; returns the reduction's name."""
    _check_number("label_smoothing", label_smoothing)
    _check_number("lse_square_scale", lse_square_scale)
    if softcap is not None:
        _check_number("softcap", softcap)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0.0):
        raise ValueError(f"lse_square_scale must be finite and >= 0, got {lse_square_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return _reduction_name(reduction)


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


def _check_temperature(temperature) -> float:
    _check_number("temperature", temperature)
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


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
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, numbers.Real):
        raise TypeError(f"entropy_weight must be a number or a per-row float tensor, got "
                        f"{type(entropy_weight).__name__}")
    if not math.isfinite(entropy_weight):
        raise ValueError(f"entropy_weight must be finite, got {entropy_weight}")
    if entropy_weight == 0.0:
        return row_weight, None
    return row_weight, torch.full((), float(entropy_weight), dtype=torch.float64,
                                  device=device)


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
    """
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
        reduction = _check_options(reduction, label_smoothing, lse_square_scale, softcap)
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
        softcap = None if softcap is None else float(softcap)
    extras = (bool(return_lse), bool(return_entropy), bool(return_argmax))
    problem = core.Problem(
        prob_target=prob_target, reduction=reduction, ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing), lse_square_scale=float(lse_square_scale),
        softcap=softcap, check_targets=bool(check_targets), use_triton=use_triton,
        temperature=temperature, entropy=extras[1], argmax=extras[2])
    rows = (row_weight, entropy_weight)
    if process_group is not None:
        if needs_grad:
            out = CrossEntropyFunction.apply(input, target, weight, *rows, problem,
                                             process_group)
        else:
            out = distributed.forward(problem, input, target, weight, process_group, *rows,
                                      compute_grad=False)[:4]
    elif inplace_backward and needs_grad:
        if torch.compiler.is_compiling():
            raise ValueError("inplace_backward is an eager-mode feature: under torch.compile "
                             "the loss is a custom op, which may not write into its input")
        problem = dataclasses.replace(problem, inplace_backward=True)
        out = CrossEntropyFunction.apply(input, target, weight, *rows, problem, None)
    else:
        out = cross_entropy_op(
            input, target, weight, *rows, prob_target, reduction, int(ignore_index),
            float(label_smoothing), float(lse_square_scale), softcap, bool(check_targets),
            use_triton, temperature, extras[1], extras[2], needs_grad)[:4]
    return _results(*out, *extras)
