"""Fused linear + cross-entropy: cross_entropy(input @ linear_weight.T + linear_bias, target)
for large vocabularies, computed chunk by chunk so the (N, V) logits are never stored.

Layers: kernels/linear_xent.py (the chunked driver over the row kernel) ->
LinearCrossEntropyFunction (autograd) -> linear_cross_entropy and LinearCrossEntropyLoss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import core
from .autograd import _graph_is_kept
from .functional import _check_options, _check_target, _check_weight, _use_triton
from .kernels.linear_xent import linear_xent_chunks, plan_chunk_rows


@dataclass(frozen=True)
class _Plan:
    """What one call fixed before any work: options, the rows to compute, the chunking and
    the reduction's denominators (device tensors: no host sync)."""

    problem: core.Problem
    rows: torch.Tensor | None  # (M,) int64 rows that are not ignored; None: all rows
    chunk_rows: int
    accum_dtype: torch.dtype
    active: torch.Tensor | None  # (N,) bool: rows that count (None: all, probability targets)
    weight_sum: torch.Tensor  # () "mean" divisor of the cross-entropy
    count: torch.Tensor  # () "mean" divisor of the z-loss
    scale: torch.Tensor | None  # (2,) [1 / weight_sum, 1 / count] for "mean", else None
    row_shape: torch.Size  # the unreduced loss's shape (input's leading dims)
    out_dtype: torch.dtype


def _run(plan: _Plan, x, linear_weight, linear_bias, target, weight, *, scale=None,
         grad_output=None, need_input=False, need_weight=False, need_bias=False):
    return linear_xent_chunks(
        x, linear_weight, linear_bias, target, weight, plan.problem, rows=plan.rows,
        chunk_rows=plan.chunk_rows, scale=scale, grad_output=grad_output,
        need_input=need_input, need_weight=need_weight, need_bias=need_bias,
        accum_dtype=plan.accum_dtype)


def _reduce(plan: _Plan, ce: torch.Tensor, lse: torch.Tensor):
    """(loss, lse) from the per-row (N,) results, assembled as core.forward does."""
    if plan.active is not None:
        lse = torch.where(plan.active, lse, 0.0)  # ignored rows were never computed: 0
    loss = core.reduce_rows(plan.problem, ce, lse, plan.active, plan.weight_sum, plan.count,
                            plan.row_shape)
    return loss.to(plan.out_dtype), lse.to(torch.float32).view(plan.row_shape)


def _scaled(grad: torch.Tensor | None, factor: torch.Tensor, dtype: torch.dtype,
            in_place: bool) -> torch.Tensor | None:
    if grad is None:
        return None
    return (grad.mul_(factor) if in_place else grad * factor).to(dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(input, linear_weight, linear_bias, target, weight) -> (loss, lse); gradients for the
    first three, lse carries none.

    When are the gradients computed? d_logits times a scalar g gives g * (d_input, d_W, d_b),
    so for "mean" and "sum" (scalar grad_output) forward computes all three in the same pass
    as the loss and backward only multiplies them by g. A per-row g ("none") commutes with
    d_input = d_logits @ W row by row, but not with the sum over rows in d_W = d_logits.T @ x
    and d_b = sum_rows d_logits: there, forward computes only the loss and backward recomputes
    the chunks with d_logits scaled row by row (one more GEMM per chunk; with a frozen head,
    d_input is still precomputed). Nothing (N, V)-sized is allocated beyond one chunk.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, plan: _Plan):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.precompute = plan.problem.reduction != "none" or not (need_w or need_b)
        ce, lse, d_x, d_w, d_b = _run(
            plan, input, linear_weight, linear_bias, target, weight, scale=plan.scale,
            need_input=need_x and ctx.precompute, need_weight=need_w and ctx.precompute,
            need_bias=need_b and ctx.precompute)
        if ctx.precompute:
            ctx.save_for_backward(d_x, d_w, d_b)
        else:
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        ctx.plan = plan
        ctx.dtypes = (input.dtype, linear_weight.dtype,
                      linear_bias.dtype if linear_bias is not None else None)
        loss, lse = _reduce(plan, ce, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no Hessian: refuse loudly
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None:
            return None, None, None, None, None, None
        plan = ctx.plan
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.precompute:
            d_x, d_w, d_b = ctx.saved_tensors
            # Scale the saved gradients in place unless the graph is kept (retain_graph=True):
            # a second backward must find them as forward left them.
            in_place = not _graph_is_kept()
            per_row = grad_loss.reshape(-1, 1) if plan.problem.reduction == "none" else None
            d_x = _scaled(d_x, per_row if per_row is not None else grad_loss, x_dtype, in_place)
            d_w = _scaled(d_w, grad_loss, w_dtype, in_place)
            d_b = _scaled(d_b, grad_loss, b_dtype, in_place)
        else:
            input, linear_weight, linear_bias, target, weight = ctx.saved_tensors
            _, _, d_x, d_w, d_b = _run(
                plan, input, linear_weight, linear_bias, target, weight,
                grad_output=grad_loss.reshape(-1), need_input=need_x, need_weight=need_w,
                need_bias=need_b)
            d_w = d_w.to(w_dtype) if d_w is not None else None
            d_b = d_b.to(b_dtype) if d_b is not None else None
        return d_x, d_w, d_b, None, None, None


def linear_cross_entropy(
    input: torch.Tensor,  # (..., D) activations, or (D,) for one sample
    linear_weight: torch.Tensor,  # (V, D): the classifier head, as nn.Linear stores it
    target: torch.Tensor,  # (...) class indices, or (..., V) class probabilities
    *,
    linear_bias: torch.Tensor | None = None,  # (V,)
    weight: torch.Tensor | None = None,  # (V,) class weights
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_targets: bool = True,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without storing the
    (N, V) logits: rows go through the head `chunk_size` at a time, and each chunk's logits are
    turned into loss and gradient in place (see kernels/linear_xent.py).

    The first arguments are those of torch.nn.functional.linear_cross_entropy (torch >= 2.13),
    whose `ignore_index=None` also means -100. Unlike it, `input` may have any number of
    leading dimensions: every leading position is one row, whose classes are the head's V
    outputs, so input (B, T, D) takes target (B, T) (or probabilities (B, T, V)), and
    reduction "none" returns target's (B, T) shape.

    Options as triton_xent.cross_entropy: weight, reduction, ignore_index, label_smoothing,
    lse_square_scale (z-loss), softcap, return_lse (the per-row logsumexp after softcap,
    float32, shaped like the unreduced loss; 0 at ignored positions, which are never
    computed), backend ("auto", "triton", "torch": "torch" is the same chunked algorithm with
    the plain-PyTorch row function) and check_targets. With check_targets=True (and always on
    the "torch" backend) an out-of-range class index raises IndexError and ignored rows are
    dropped before the GEMMs, for one host synchronisation; with False nothing syncs, ignored
    rows are computed (and zeroed) like the others, and an out-of-range target gives NaN.

    Tuning (keyword-only):
    chunk_size: rows per chunk; None picks it from the memory budget.
    memory_budget_bytes: bytes for one chunk of logits, chunk_size = budget / (V * itemsize)
        rounded down to a multiple of 64 rows; None means 256 MiB (1024 rows of bf16 logits
        for V = 128256). The gradient accumulators (d_W, d_b, d_input) come on top.
    accum_dtype: dtype in which d_W and d_b are summed over chunks (default float32; never
        narrower than input's dtype). They are kept in it until backward, then cast to the
        parameters' dtypes: a bf16 head with accum_dtype=torch.bfloat16 halves that memory.

    Gradients go to input, linear_weight and linear_bias, each only if it requires grad;
    nothing gradient-related runs when none does. For "mean" and "sum" they are computed in
    forward (backward multiplies by grad_output); for "none" with a trainable head, backward
    recomputes the chunks (see LinearCrossEntropyFunction). Double backward is not supported.
    """
    # --- checks: every one before anything is computed or written ---
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point activations, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a feature dimension: shape (D,) or (..., D), got a "
                         "0-dim tensor")
    if not isinstance(linear_weight, torch.Tensor):
        raise TypeError(f"linear_weight must be a tensor, got {type(linear_weight).__name__}")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must have shape (V, D) as nn.Linear stores it, got "
                         f"{tuple(linear_weight.shape)}")
    V, D = linear_weight.shape
    if input.shape[-1] != D:
        raise ValueError(f"input's last dimension ({input.shape[-1]}) must match linear_weight's "
                         f"in_features (shape (V, D) = {tuple(linear_weight.shape)})")
    if V == 0:
        raise ValueError("linear_weight has no rows: there must be at least one class")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name} must have input's dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if linear_bias is not None and linear_bias.shape != (V,):
        raise ValueError(f"linear_bias must have shape ({V},), one per output of "
                         f"linear_weight, got {tuple(linear_bias.shape)}")
    ignore_index = -100 if ignore_index is None else ignore_index
    _check_options(reduction, label_smoothing, lse_square_scale, softcap)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    lead = input.shape[:-1]
    N = lead.numel()
    prob_target = target.is_floating_point()
    expected = lead + (V,) if prob_target else lead
    if target.shape != expected:
        what = "class probabilities" if prob_target else "class indices"
        raise ValueError(f"target of {what} must have shape {tuple(expected)} for input of "
                         f"shape {tuple(input.shape)} and {V} classes, got "
                         f"{tuple(target.shape)}")
    tgt = target.reshape(N, V) if prob_target else target.reshape(N)
    logits_like = input.new_empty(()).expand(N, V)  # the logits' shape and device, no memory
    _check_target(logits_like, tgt, ignore_index)  # dtype, device, ignore_index
    _check_weight(logits_like, weight)
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if memory_budget_bytes is not None and (not isinstance(memory_budget_bytes, int)
                                            or memory_budget_bytes < 1):
        raise ValueError(f"memory_budget_bytes must be None or an int >= 1, got "
                         f"{memory_budget_bytes!r}")
    if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
        raise TypeError(f"accum_dtype must be a floating-point torch.dtype, got {accum_dtype!r}")
    if torch.is_grad_enabled() and (target.requires_grad or
                                    (weight is not None and weight.requires_grad)):
        raise ValueError("triton_xent computes gradients of input, linear_weight and "
                         "linear_bias only; detach the target and the class weight")
    problem = core.Problem(
        prob_target=prob_target, reduction=reduction, ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing), lse_square_scale=float(lse_square_scale),
        softcap=None if softcap is None else float(softcap), inplace_backward=False,
        check_targets=bool(check_targets), use_triton=_use_triton(backend, input),
    )
    checked = not prob_target and (problem.check_targets or not problem.use_triton)
    if checked:
        core.check_targets(tgt, V, problem.ignore_index)

    # --- the plan: rows to compute, chunking, denominators ---
    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if weight is not None and problem.use_triton:
        weight = weight.to(torch.float32).contiguous()
    active, weight_sum, count = core.denominators(problem, tgt, weight, N, V, stat_dtype)
    rows = None
    if checked:  # the check above synced already; one more to drop the ignored rows
        kept = active.nonzero().squeeze(1)
        rows = kept if kept.numel() < N else None
    n_compute = N if rows is None else rows.numel()
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (input, linear_weight, linear_bias)]
    plan = _Plan(
        problem=problem, rows=rows,
        chunk_rows=plan_chunk_rows(n_compute, V, input.element_size(), chunk_size=chunk_size,
                                   memory_budget_bytes=memory_budget_bytes),
        accum_dtype=torch.promote_types(accum_dtype, input.dtype),
        active=active, weight_sum=weight_sum, count=count,
        scale=(torch.stack([1.0 / weight_sum, 1.0 / count])
               if reduction == "mean" and any(needs) else None),
        row_shape=lead,
        out_dtype=torch.result_type(input, target) if prob_target else input.dtype,
    )

    x = input.reshape(N, D)
    if any(needs):
        loss, lse = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, tgt,
                                                     weight, plan)
    else:
        ce, lse, *_ = _run(plan, x, linear_weight, linear_bias, tgt, weight)
        loss, lse = _reduce(plan, ce, lse)
    return (loss, lse) if return_lse else loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of linear_cross_entropy. It holds options only, no parameters: the head
    (linear_weight, linear_bias) is passed to forward, so a tied embedding or an existing
    nn.Linear's weight can be used as it is."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,  # (V,) class weights, kept as a buffer
        *,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        backend: str = "auto",
        check_targets: bool = True,
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        accum_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_lse = return_lse
        self.backend = backend
        self.check_targets = check_targets
        self.chunk_size = chunk_size
        self.memory_budget_bytes = memory_budget_bytes
        self.accum_dtype = accum_dtype

    def forward(
        self,
        input: torch.Tensor,  # (..., D)
        linear_weight: torch.Tensor,  # (V, D)
        target: torch.Tensor,  # (...) class indices, or (..., V) probabilities
        linear_bias: torch.Tensor | None = None,  # (V,)
    ):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
            softcap=self.softcap, return_lse=self.return_lse, backend=self.backend,
            check_targets=self.check_targets, chunk_size=self.chunk_size,
            memory_budget_bytes=self.memory_budget_bytes, accum_dtype=self.accum_dtype,
        )

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"backend={self.backend!r}"]
        if self.ignore_index not in (-100, None):
            extras.append(f"ignore_index={self.ignore_index}")
        for name in ("label_smoothing", "lse_square_scale"):
            if getattr(self, name):
                extras.append(f"{name}={getattr(self, name)}")
        for name in ("softcap", "chunk_size", "memory_budget_bytes"):
            if getattr(self, name) is not None:
                extras.append(f"{name}={getattr(self, name)}")
        return ", ".join(extras)
