"""Fused linear + cross-entropy: cross_entropy(input @ linear_weight.T + linear_bias, target)
for large vocabularies, computed chunk by chunk so the (N, V) logits are never stored.

Layers: kernels/linear_xent.py (the chunked driver over the row kernel) -> the custom ops
`torch.ops.triton_xent.linear_cross_entropy` and `..._backward` (torch.library, with fake
implementations and registered autograd, so that torch.compile sees opaque nodes) ->
linear_cross_entropy and LinearCrossEntropyLoss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import torch.distributed as dist

from . import core, distributed
from .functional import (_check_options, _check_target, _check_weight, _class_indices,
                         _use_triton)
from .kernels.linear_xent import linear_xent_chunks, plan_chunk_rows


@dataclass(frozen=True)
class _Plan:
    """What one call fixed before any work: options, the rows to compute, the chunking and
    the reduction's denominators (device tensors)."""

    problem: core.Problem
    rows: torch.Tensor | None  # (M,) int64 rows that are not ignored; None: all rows
    chunk_rows: int
    accum_dtype: torch.dtype
    active: torch.Tensor | None  # (N,) bool: rows that count (None: all, probability targets)
    weight_sum: torch.Tensor  # () "mean" divisor of the cross-entropy
    count: torch.Tensor  # () "mean" divisor of the z-loss
    scale: torch.Tensor | None  # (2,) [1 / weight_sum, 1 / count] for "mean", else None
    out_dtype: torch.dtype


def _make_plan(problem: core.Problem, x, V: int, target, weight, chunk_size,
               memory_budget_bytes, accum_dtype, any_grad: bool):
    """(plan, class weights as the row function takes them). With checks on (always on the
    "torch" backend) an out-of-range target raises here and the ignored rows are dropped, for
    one host synchronisation; without, nothing syncs and ignored rows are computed as zeros."""
    N = x.shape[0]  # V: all classes (of every rank, with vocab parallelism)
    checked = not problem.prob_target and (problem.check_targets or not problem.use_triton)
    if checked:
        core.check_targets(target, V, problem.ignore_index)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if weight is not None and problem.use_triton:
        weight = weight.to(torch.float32).contiguous()
    active, weight_sum, count = core.denominators(problem, target, weight, N, V, stat_dtype)
    rows = None
    if checked:  # synced already by the check: drop the ignored rows before the GEMMs
        kept = active.nonzero().squeeze(1)
        rows = kept if kept.numel() < N else None
    n_compute = N if rows is None else rows.numel()
    scale = None
    if problem.reduction == "mean" and any_grad:
        scale = torch.stack([1.0 / weight_sum, 1.0 / count])
        scale = scale.to(torch.float32 if problem.use_triton else stat_dtype)
    plan = _Plan(
        problem=problem, rows=rows,
        chunk_rows=plan_chunk_rows(n_compute, V, x.element_size(), chunk_size=chunk_size,
                                   memory_budget_bytes=memory_budget_bytes,
                                   cpu=x.device.type == "cpu"),
        accum_dtype=torch.promote_types(accum_dtype, x.dtype),
        active=active, weight_sum=weight_sum, count=count, scale=scale,
        out_dtype=torch.result_type(x, target) if problem.prob_target else x.dtype,
    )
    return plan, weight


def _run(plan: _Plan, x, linear_weight, linear_bias, target, weight, *, scale=None,
         grad_output=None, need_input=False, need_weight=False, need_bias=False,
         rows_fn=None):
    return linear_xent_chunks(
        x, linear_weight, linear_bias, target, weight, plan.problem, rows=plan.rows,
        chunk_rows=plan.chunk_rows, scale=scale, grad_output=grad_output,
        need_input=need_input, need_weight=need_weight, need_bias=need_bias,
        accum_dtype=plan.accum_dtype, rows_fn=rows_fn)


def _reduce(plan: _Plan, ce: torch.Tensor, lse: torch.Tensor):
    """(loss, lse) from the per-row (N,) results, assembled as core.forward does ("none"
    stays (N,); the caller gives it the leading shape)."""
    if plan.active is not None:
        lse = torch.where(plan.active, lse, 0.0)  # ignored rows were never computed: 0
    loss = core.reduce_rows(plan.problem, ce, lse, plan.active, plan.weight_sum, plan.count,
                            ce.shape)
    return loss.to(plan.out_dtype), lse.to(torch.float32)


def _precomputed(reduction: str, need_weight: bool, need_bias: bool) -> bool:
    """Whether forward computes the gradients (see the op below)."""
    return reduction != "none" or not (need_weight or need_bias)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


# --- the custom ops --------------------------------------------------------------------------
#
# When are the gradients computed? d_logits times a scalar g gives g * (d_input, d_W, d_b), so
# for "mean" and "sum" (scalar grad_output) the forward op computes all three in the same pass
# as the loss and backward only multiplies them by g. A per-row g ("none") commutes with
# d_input = d_logits @ W row by row, but not with the sum over rows in d_W = d_logits.T @ x and
# d_b = sum_rows d_logits: there, forward computes only the loss and the backward op
# recomputes the chunks with d_logits scaled row by row (one more GEMM per chunk; with a
# frozen head, d_input is still precomputed). Nothing (N, V)-sized is allocated beyond a chunk.


@torch.library.custom_op("triton_xent::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,  # (N, D)
    linear_weight: torch.Tensor,  # (V, D)
    linear_bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) class indices or (N, V) probabilities
    weight: torch.Tensor | None,  # (V,) class weights
    prob_target: bool, reduction: str, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float | None, check_targets: bool, use_triton: bool,
    chunk_size: int | None, memory_budget_bytes: int | None, accum_dtype: torch.dtype,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse (N,), d_x (N, D), d_W (V, D), d_b (V,)): loss "none" is (N,); the gradients
    are empty where not asked for or not precomputed (d_W, d_b in the accumulation dtype)."""
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton)
    pre = _precomputed(reduction, need_weight, need_bias)
    any_grad = pre and (need_input or need_weight or need_bias)
    plan, weight = _make_plan(problem, x, linear_weight.shape[0], target, weight, chunk_size,
                              memory_budget_bytes, accum_dtype, any_grad)
    ce, lse, d_x, d_w, d_b = _run(
        plan, x, linear_weight, linear_bias, target, weight, scale=plan.scale,
        need_input=need_input and pre, need_weight=need_weight and pre,
        need_bias=need_bias and pre)
    loss, lse = _reduce(plan, ce, lse)
    return loss, lse, _or_empty(d_x, x), _or_empty(d_w, x), _or_empty(d_b, x)


@linear_cross_entropy_op.register_fake
def _(x, linear_weight, linear_bias, target, weight, prob_target, reduction, ignore_index,
      label_smoothing, lse_square_scale, softcap, check_targets, use_triton, chunk_size,
      memory_budget_bytes, accum_dtype, need_input, need_weight, need_bias):
    N, D = x.shape
    V = linear_weight.shape[0]
    pre = _precomputed(reduction, need_weight, need_bias)
    acc = torch.promote_types(accum_dtype, x.dtype)
    out_dtype = torch.result_type(x, target) if prob_target else x.dtype
    return (x.new_empty((N,) if reduction == "none" else (), dtype=out_dtype),
            x.new_empty(N, dtype=torch.float32),
            x.new_empty((N, D) if need_input and pre else (0,)),
            # an empty placeholder has x's dtype, as _or_empty makes it
            x.new_empty((V, D), dtype=acc) if need_weight and pre else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias and pre else x.new_empty(0))


@torch.library.custom_op("triton_xent::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    x: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
    target: torch.Tensor, weight: torch.Tensor | None,
    grad_output: torch.Tensor,  # (N,) per-row factors ("none")
    prob_target: bool, reduction: str, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float | None, check_targets: bool, use_triton: bool,
    chunk_size: int | None, memory_budget_bytes: int | None, accum_dtype: torch.dtype,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_W, d_b) recomputed chunk by chunk with per-row grad_output; empty if unasked."""
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton)
    plan, weight = _make_plan(problem, x, linear_weight.shape[0], target, weight, chunk_size,
                              memory_budget_bytes, accum_dtype, any_grad=False)
    _, _, d_x, d_w, d_b = _run(plan, x, linear_weight, linear_bias, target, weight,
                               grad_output=grad_output.reshape(-1), need_input=need_input,
                               need_weight=need_weight, need_bias=need_bias)
    return _or_empty(d_x, x), _or_empty(d_w, x), _or_empty(d_b, x)


@linear_cross_entropy_backward_op.register_fake
def _(x, linear_weight, linear_bias, target, weight, grad_output, prob_target, reduction,
      ignore_index, label_smoothing, lse_square_scale, softcap, check_targets, use_triton,
      chunk_size, memory_budget_bytes, accum_dtype, need_input, need_weight, need_bias):
    N, D = x.shape
    V = linear_weight.shape[0]
    acc = torch.promote_types(accum_dtype, x.dtype)
    return (x.new_empty((N, D) if need_input else (0,)),
            x.new_empty((V, D), dtype=acc) if need_weight else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias else x.new_empty(0))


N_OP_ARGS = 19  # the forward op's arguments, for backward's tuple of gradients


def _setup_context(ctx, inputs, output):
    x, linear_weight, linear_bias, target, weight = inputs[:5]
    ctx.options = inputs[5:]
    *_, need_input, need_weight, need_bias = inputs
    reduction = inputs[6]
    _, lse, d_x, d_w, d_b = output
    ctx.precompute = _precomputed(reduction, need_weight, need_bias)
    ctx.reduction = reduction
    ctx.dtypes = (x.dtype, linear_weight.dtype,
                  linear_bias.dtype if linear_bias is not None else None)
    if ctx.precompute:
        ctx.save_for_backward(d_x, d_w, d_b)
    else:
        ctx.save_for_backward(x, linear_weight, linear_bias, target, weight)
    ctx.mark_non_differentiable(lse, d_x, d_w, d_b)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, grad_dx, grad_dw, grad_db):
    need = ctx.needs_input_grad[:3]
    if grad_loss is None or not any(need):
        return (None,) * N_OP_ARGS
    if ctx.precompute:
        grads = ctx.saved_tensors
        in_place = core.saved_grad_is_spent(grad_loss)
        per_row = grad_loss.reshape(-1, 1) if ctx.reduction == "none" else grad_loss
        factors = (per_row, grad_loss, grad_loss)
        out = tuple(
            ((g.mul_(f) if in_place else g * f).to(dtype) if wanted else None)
            for g, f, dtype, wanted in zip(grads, factors, ctx.dtypes, need))
    else:
        x, linear_weight, linear_bias, target, weight = ctx.saved_tensors
        d_x, d_w, d_b = linear_cross_entropy_backward_op(
            x, linear_weight, linear_bias, target, weight, grad_loss, *ctx.options)
        out = tuple(g.to(dtype) if wanted else None
                    for g, dtype, wanted in zip((d_x, d_w, d_b), ctx.dtypes, need))
    return out + (None,) * (N_OP_ARGS - 3)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --- vocab parallelism (eager: collectives) --------------------------------------------------


def _run_sliced(plan: _Plan, group, class_offset: int, n_classes: int, x, linear_weight,
                linear_bias, target, weight, **kwargs):
    """_run for a head whose rows are this rank's classes: the row function merges the
    ranks' statistics per chunk, and d_input, a sum over all classes, is summed over ranks."""
    rows_fn = distributed.sliced_rows(group, class_offset, n_classes, plan.problem.use_triton)
    ce, lse, d_x, d_w, d_b = _run(plan, x, linear_weight, linear_bias, target, weight,
                                  rows_fn=rows_fn, **kwargs)
    if d_x is not None:
        dist.all_reduce(d_x, group=group)
    return ce, lse, d_x, d_w, d_b


class VocabParallelLinearFunction(torch.autograd.Function):
    """The linear op with linear_weight (and linear_bias) sharded by rows over `group`: the
    same chunked algorithm and the same split between forward and backward as the custom ops
    above; every rank runs the same chunks (chunking follows the global class count)."""

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, problem, group, tuning,
                needs):
        class_offset, n_classes, target, weight = distributed.prepare(
            problem, linear_weight.shape[0], target, weight, group)
        need_x, need_w, need_b = needs
        pre = _precomputed(problem.reduction, need_w, need_b)
        plan, weight = _make_plan(problem, x, n_classes, target, weight, *tuning,
                                  any_grad=pre and any(needs))
        ce, lse, d_x, d_w, d_b = _run_sliced(
            plan, group, class_offset, n_classes, x, linear_weight, linear_bias, target, weight,
            scale=plan.scale, need_input=need_x and pre, need_weight=need_w and pre,
            need_bias=need_b and pre)
        ctx.pre = pre
        ctx.context = (plan, group, class_offset, n_classes)
        ctx.dtypes = (x.dtype, linear_weight.dtype,
                      linear_bias.dtype if linear_bias is not None else None)
        if pre:
            ctx.save_for_backward(d_x, d_w, d_b)
        else:
            ctx.save_for_backward(x, linear_weight, linear_bias, target, weight)
        loss, lse = _reduce(plan, ce, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        need = ctx.needs_input_grad[:3]
        if grad_loss is None or not any(need):
            return (None,) * 9
        if ctx.pre:
            in_place = core.saved_grad_is_spent(grad_loss)
            per_row = grad_loss.reshape(-1, 1) if ctx.context[0].problem.reduction == "none" \
                else grad_loss
            grads = zip(ctx.saved_tensors, (per_row, grad_loss, grad_loss))
            out = [((g.mul_(f) if in_place else g * f) if g is not None else None)
                   for g, f in grads]
        else:
            plan, group, class_offset, n_classes = ctx.context
            _, _, *out = _run_sliced(plan, group, class_offset, n_classes, *ctx.saved_tensors,
                                     grad_output=grad_loss.reshape(-1), need_input=need[0],
                                     need_weight=need[1], need_bias=need[2])
        out = [g.to(dtype) if g is not None and wanted else None
               for g, dtype, wanted in zip(out, ctx.dtypes, need)]
        return (*out,) + (None,) * 6


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
    process_group=None,
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

    process_group: vocab parallelism (see cross_entropy): linear_weight (V_r, D) and
        linear_bias (V_r,) are this rank's rows of the head, in group-rank order; input and
        target are the same on every rank, and so is the loss; weight holds all classes'.
        Each rank gets its head slice's gradients and the full input gradient. Eager only.

    Gradients go to input, linear_weight and linear_bias, each only if it requires grad;
    nothing gradient-related runs when none does. For "mean" and "sum" they are computed in
    forward (backward multiplies by grad_output); for "none" with a trainable head, backward
    recomputes the chunks (see the custom ops above). Double backward is not supported.
    """
    # --- checks: every one before anything is computed or written; with a group, a rank
    # that fails them still joins the first collective, so the others fail too ---
    with distributed.refusing_together(process_group, target):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"input must hold floating-point activations, got {input.dtype}")
        if input.dim() == 0:
            raise ValueError("input must have a feature dimension: shape (D,) or (..., D), "
                             "got a 0-dim tensor")
        if not isinstance(linear_weight, torch.Tensor):
            raise TypeError(f"linear_weight must be a tensor, got "
                            f"{type(linear_weight).__name__}")
        if linear_weight.dim() != 2:
            raise ValueError(f"linear_weight must have shape (V, D) as nn.Linear stores it, "
                             f"got {tuple(linear_weight.shape)}")
        V, D = linear_weight.shape
        if input.shape[-1] != D:
            raise ValueError(f"input's last dimension ({input.shape[-1]}) must match "
                             f"linear_weight's in_features (shape (V, D) = "
                             f"{tuple(linear_weight.shape)})")
        if V == 0 and process_group is None:  # with a group, other ranks may hold the classes
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
        reduction = _check_options(reduction, label_smoothing, lse_square_scale, softcap)
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor, got {type(target).__name__}")
        lead = input.shape[:-1]
        N = lead.numel()
        prob_target = target.is_floating_point()
        expected = lead + (V,) if prob_target else lead
        if target.shape != expected:
            what = "class probabilities" if prob_target else "class indices"
            raise ValueError(f"target of {what} must have shape {tuple(expected)} for input "
                             f"of shape {tuple(input.shape)} and {V} classes, got "
                             f"{tuple(target.shape)}")
        tgt = target.reshape(N, V) if prob_target else target.reshape(N)
        logits_like = input.new_empty(()).expand(N, V)  # the logits' shape and device only
        _check_target(logits_like, tgt, ignore_index)  # dtype, device, ignore_index
        if not prob_target:
            tgt = _class_indices(tgt, ignore_index)
        if process_group is None:  # with a group, weight holds every rank's classes
            _check_weight(logits_like, weight)
        if chunk_size is not None and (isinstance(chunk_size, bool) or
                                       not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if memory_budget_bytes is not None and (not isinstance(memory_budget_bytes, int)
                                                or memory_budget_bytes < 1):
            raise ValueError(f"memory_budget_bytes must be None or an int >= 1, got "
                             f"{memory_budget_bytes!r}")
        if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
            raise TypeError(f"accum_dtype must be a floating-point torch.dtype, got "
                            f"{accum_dtype!r}")
        if torch.is_grad_enabled() and (target.requires_grad or
                                        (weight is not None and weight.requires_grad)):
            raise ValueError("triton_xent computes gradients of input, linear_weight and "
                             "linear_bias only; detach the target and the class weight")
        if process_group is not None and prob_target:
            raise ValueError("process_group takes class-index targets")
        use_triton = _use_triton(backend, input)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (input, linear_weight, linear_bias)]
    if process_group is not None:
        problem = core.Problem(prob_target, reduction, int(ignore_index), float(label_smoothing),
                               float(lse_square_scale), None if softcap is None else float(softcap),
                               bool(check_targets), use_triton)
        loss, lse = VocabParallelLinearFunction.apply(
            input.reshape(N, D), linear_weight, linear_bias, tgt, weight, problem,
            process_group, (chunk_size, memory_budget_bytes, accum_dtype), tuple(needs))
        if reduction == "none":
            loss = loss.view(lead)
        lse = lse.view(lead)
        return (loss, lse) if return_lse else loss
    loss, lse, *_ = linear_cross_entropy_op(
        input.reshape(N, D), linear_weight, linear_bias, tgt, weight, prob_target, reduction,
        int(ignore_index), float(label_smoothing), float(lse_square_scale),
        None if softcap is None else float(softcap), bool(check_targets),
        use_triton, chunk_size, memory_budget_bytes, accum_dtype, *needs)
    if reduction == "none":
        loss = loss.view(lead)
    lse = lse.view(lead)
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
