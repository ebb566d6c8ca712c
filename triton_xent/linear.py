"""Fused linear + cross-entropy: cross_entropy(input @ linear_weight.T + linear_bias, target)
for large vocabularies, computed chunk by chunk so the (N, V) logits are never stored.

Layers: chunks.py (the chunk driver, shared with the linear distillation; here the row
function is its per-chunk callback, in _run, or under the "vocab" schedule the slice
statistics and gradient of distributed.py are its per-block callbacks) -> the custom ops
`torch.ops.triton_xent.linear_cross_entropy` and `..._backward` (torch.library, with fake
implementations and registered autograd, so that torch.compile sees opaque nodes) ->
linear_cross_entropy and LinearCrossEntropyLoss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import torch.distributed as dist

from . import config, core, distributed, dtensor
from .autograd import func_function, option_list_grad, register_vmap_by_samples
from .functional import (_check_options, _check_row_extras, _check_target, _check_temperature,
                         _check_weight, _class_indices, _func_op, _refuse_eager_only,
                         _results, _transformed, _use_triton, loss_dtype, op_options)
from .chunks import BlockPass, linear_chunks, plan_block_cols, plan_chunk_rows, vocab_blocks


@dataclass(frozen=True)
class _Plan:
    """What one call fixed before any work: options, the rows to compute, the chunking and
    the reduction's denominators (device tensors)."""

    problem: core.Problem
    rows: torch.Tensor | None  # (M,) int64 rows that are not ignored; None: all rows
    schedule: str  # "rows" or "vocab" (config.LINEAR_SCHEDULE, resolved by _schedule)
    chunk_rows: int  # "rows": rows per chunk
    block_cols: int  # "vocab": classes per block
    accum_dtype: torch.dtype
    active: torch.Tensor | None  # (N,) bool: rows that count (None: all, probability targets)
    weight_sum: torch.Tensor  # () "mean" divisor of the cross-entropy
    count: torch.Tensor  # () "mean" divisor of the z-loss
    scale: torch.Tensor | None  # (2,) [1 / weight_sum, 1 / count] for "mean", else None


def _schedule(x: torch.Tensor, prob_target: bool, chunk_size: int | None,
              vocab_parallel: bool) -> str:
    """The schedule of a call: config.LINEAR_SCHEDULE's for x's device, except "rows" where
    the caller gives chunk_size (rows per chunk) or "vocab" cannot run: probability
    targets (the slice statistics take class indices) and vocab parallelism."""
    schedule = config.linear_schedule(x.device)
    if schedule == "vocab" and (chunk_size is not None or prob_target or vocab_parallel):
        return "rows"
    return schedule


def _make_plan(problem: core.Problem, x, V: int, target, weight, chunk_size,
               memory_budget_bytes, accum_dtype, schedule: str, any_grad: bool):
    """(plan, class weights as the row function takes them). With checks on (always on the
    "torch" backend) an out-of-range target raises here and the ignored rows are dropped, for
    one host synchronisation; without, nothing syncs and ignored rows are computed as zeros."""
    N = x.shape[0]  # V: all classes (of every rank, with vocab parallelism)
    if schedule == "vocab" and problem.prob_target:  # _schedule never asks for it
        raise ValueError("the 'vocab' schedule takes class-index targets")
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
        problem=problem, rows=rows, schedule=schedule,
        chunk_rows=plan_chunk_rows(n_compute, V, x.element_size(), chunk_size=chunk_size,
                                   memory_budget_bytes=memory_budget_bytes,
                                   cpu=x.device.type == "cpu"),
        block_cols=plan_block_cols(n_compute, V, x.element_size(),
                                   memory_budget_bytes=memory_budget_bytes),
        accum_dtype=torch.promote_types(accum_dtype, x.dtype),
        active=active, weight_sum=weight_sum, count=count, scale=scale,
    )
    return plan, weight


def _run(plan: _Plan, x, linear_weight, linear_bias, target, weight, *, scale=None,
         row_weight=None, entropy_weight=None, need_input=False, need_weight=False,
         need_bias=False, rows_fn=None) -> tuple:
    """(ce, lse, H, argmax, d_input, d_weight, d_bias) of cross_entropy(x @ W.T + b, target)
    per row, chunk by chunk (chunks.linear_chunks with the row function as its callback),
    or block by block under the "vocab" schedule (_vocab_blocks).

    ce (N,): the unreduced cross-entropy without the z-loss; lse (N,): the logsumexp of each
    row (after softcap and temperature); H (N,): the entropy if the row function is asked
    for it (`problem.entropy`, or an entropy_weight), else None; all float32 (float64 for
    float64 x) and 0 on rows not computed; argmax (N,) int64 if `problem.argmax`, -1 on rows
    not computed. d_input (N, D) in x's dtype, d_weight (V, D) in accum_dtype ("rows") or
    x's dtype ("vocab"), d_bias (V,) in accum_dtype, each None unless asked for. When none
    is asked for, the row function computes no gradient at all. `scale`: (2,) "mean" factors
    of the CE and z-loss gradients; row_weight, entropy_weight: (N,) factors of each row's
    CE gradient and dH; rows_fn: the row function (core.row_fns' by default;
    distributed.sliced_rows')."""
    problem = plan.problem
    kernel_dtype = torch.float32 if problem.use_triton else None
    row_weight, entropy_weight = (
        t.to(kernel_dtype or t.dtype).contiguous() if t is not None else None
        for t in (row_weight, entropy_weight))
    N = x.shape[0]
    stat_dtype = core.acc_dtype(x.dtype)
    new = x.new_empty if plan.rows is None else x.new_zeros
    entropy = problem.entropy or entropy_weight is not None
    ce = new(N, dtype=stat_dtype)
    lse = new(N, dtype=stat_dtype)
    H = new(N, dtype=stat_dtype) if entropy else None
    idx = None
    if problem.argmax:
        idx = (x.new_empty(N, dtype=torch.int64) if plan.rows is None
               else x.new_full((N,), -1, dtype=torch.int64))
    compute_grad = need_input or need_weight or need_bias
    if plan.schedule == "vocab":
        d_input, d_weight, d_bias = _vocab_blocks(
            plan, x, linear_weight, linear_bias, target, weight, (ce, lse, H, idx), scale=scale,
            row_weight=row_weight, entropy_weight=entropy_weight, need_input=need_input,
            need_weight=need_weight, need_bias=need_bias)
        return ce, lse, H, idx, d_input, d_weight, d_bias
    rows_fn = rows_fn or core.row_fns(problem.use_triton)[0]
    row_kwargs = problem.row_kwargs()
    row_kwargs["entropy"] = entropy

    def on_chunk(logits, take):  # (R, V) -> (ce, lse, H, argmax) of the chunk's rows
        logits3 = logits.unsqueeze(-1)  # (R, V, 1): the row function's (N, V, D) view
        t_c = take(target)
        return rows_fn(
            logits3, t_c.unsqueeze(-1) if problem.prob_target else t_c, weight, scale,
            logits3 if compute_grad else None,  # the gradient overwrites the logits
            take(row_weight) if compute_grad else None,
            take(entropy_weight) if compute_grad else None, **row_kwargs)

    d_input, d_weight, d_bias = linear_chunks(
        x, linear_weight, linear_bias, on_chunk, (ce, lse, H, idx), rows=plan.rows,
        chunk_rows=plan.chunk_rows, need_input=need_input, need_weight=need_weight,
        need_bias=need_bias, accum_dtype=plan.accum_dtype)
    return ce, lse, H, idx, d_input, d_weight, d_bias


def _vocab_blocks(plan: _Plan, x, linear_weight, linear_bias, target, weight, outputs, *,
                  scale, row_weight, entropy_weight, need_input, need_weight, need_bias):
    """_run's "vocab" schedule (chunks.vocab_blocks): a first pass writes each block's slice
    statistics (distributed.py's, as a rank of a vocab-parallel head does for its classes),
    merged over the blocks into each row's (ce, lse, H, argmax), written into `outputs` at the
    kept rows; with a gradient asked for, a second pass writes each block's d_logits from the
    merged statistics. (d_input, d_weight, d_bias) as chunks.vocab_blocks returns them."""
    problem = plan.problem
    stats_fn, grad_fn = distributed.slice_fns(problem.use_triton)
    rows = plan.rows

    def take(t):
        return t if t is None or rows is None else t.index_select(0, rows)

    t_k, rw_k, ew_k = take(target), take(row_weight), take(entropy_weight)
    V = linear_weight.shape[0]
    n_blocks = -(-V // plan.block_cols)
    stat_dtype = core.acc_dtype(x.dtype)
    entropy = outputs[2] is not None
    options = dict(n_classes=V, ignore_index=problem.ignore_index,
                   label_smoothing=problem.label_smoothing, softcap=problem.softcap,
                   temperature=problem.temperature)
    stats = x.new_empty((t_k.shape[0], n_blocks, 6), dtype=stat_dtype)  # (M, P, 6)
    idx = (x.new_empty((t_k.shape[0], n_blocks), dtype=torch.int64) if problem.argmax
           else None)
    merged = {}

    def block_stats(logits, lo, hi):  # (M, B): the block's statistics, (M, 6)
        block, block_idx = stats_fn(logits.unsqueeze(-1), t_k, weight, class_offset=lo,
                                    entropy=entropy, argmax=problem.argmax, **options)
        stats[:, lo // plan.block_cols] = block
        if idx is not None:
            idx[:, lo // plan.block_cols] = block_idx

    def merge():  # the rows' results from all blocks' statistics
        row_stats, z_y = distributed.merge_slices(stats)
        ce, lse, H, grad_stats, active = distributed.slice_row_results(
            row_stats, z_y, t_k, weight, n_classes=V, ignore_index=problem.ignore_index,
            label_smoothing=problem.label_smoothing, entropy=entropy)
        first_max = None
        if idx is not None:  # the least index among the blocks that hold the row's maximum
            at_max = stats[:, :, 0] == row_stats[:, :1]
            first_max = torch.where(at_max, idx, V).amin(1)
            first_max = torch.where(active, first_max, -1)
        for out, value in zip(outputs, (ce, lse, H, first_max)):
            if out is None:
                continue
            if rows is None:
                out.copy_(value)
            else:
                out.index_copy_(0, rows, value.to(out.dtype))
        merged["grad_stats"] = grad_stats.to(stats.dtype if not problem.use_triton
                                             else torch.float32)

    def block_grad(logits, lo, hi):  # (M, B): d loss / d logits written over the logits
        logits3 = logits.unsqueeze(-1)
        grad_fn(logits3, t_k, weight, merged["grad_stats"], scale, logits3, rw_k, ew_k,
                class_offset=lo, lse_square_scale=problem.lse_square_scale, **options)

    passes = [BlockPass(block_stats, merge)]
    if need_input or need_weight or need_bias:
        passes.append(BlockPass(block_grad))
    return vocab_blocks(x, linear_weight, linear_bias, passes, rows=rows,
                        block_cols=plan.block_cols, need_input=need_input,
                        need_weight=need_weight, need_bias=need_bias,
                        accum_dtype=plan.accum_dtype)


def _coefficients(plan: _Plan, x, row_weight, entropy_weight):
    """core.row_coefficients for the plan's rows: (r, e, e_grad), each (N,) or None."""
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return core.row_coefficients(plan.problem, row_weight, entropy_weight, plan.active,
                                 plan.count, x.shape[0], stat_dtype)


def _reduce(plan: _Plan, ce, lse, H, r, e):
    """(loss, lse, H) from the per-row (N,) results, assembled as core.forward does ("none"
    stays (N,); the caller gives it the leading shape and its dtype)."""
    if plan.active is not None:
        lse = torch.where(plan.active, lse, 0.0)  # ignored rows were never computed: 0
    loss = core.reduce_rows(plan.problem, ce, lse, H, r, e, plan.active, plan.weight_sum,
                            plan.count, ce.shape)
    H = H.to(torch.float32) if plan.problem.entropy else None
    return loss, lse.to(torch.float32), H


def _precomputed(reduction: str, need_weight: bool, need_bias: bool) -> bool:
    """Whether forward computes the gradients (see the op below)."""
    return reduction != "none" or not (need_weight or need_bias)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return t if t is not None else like.new_empty(0, dtype=dtype)


def _recompute_factors(precomputed: bool, grad_loss, grad_entropy, row_weight,
                       entropy_weight):
    """(r, e): the per-row factors of the CE and entropy gradients that backward must
    recompute from the chunks, or (None, None) when nothing is to be recomputed.

    A per-row g ("none", not precomputed) gives r = g * row_weight, e = g * entropy_weight;
    an upstream gradient g_H of the returned entropy adds g_H to e (with r = 0 where the
    CE's gradient was precomputed)."""
    r = e = None
    if grad_loss is not None and not precomputed:
        g = grad_loss.reshape(-1).to(torch.float32)
        r = g * row_weight.reshape(-1) if row_weight is not None else g
        e = g * entropy_weight.reshape(-1) if entropy_weight is not None else None
    if grad_entropy is not None:
        g_H = grad_entropy.reshape(-1).to(torch.float32)
        r = torch.zeros_like(g_H) if r is None else r
        e = g_H if e is None else e + g_H
    return r, e


# --- the custom ops --------------------------------------------------------------------------
#
# When are the gradients computed? d_logits times a scalar g gives g * (d_input, d_W, d_b), so
# for "mean" and "sum" (scalar grad_output) the forward op computes all three in the same pass
# as the loss and backward only multiplies them by g. A per-row g ("none") commutes with
# d_input = d_logits @ W row by row, but not with the sum over rows in d_W = d_logits.T @ x and
# d_b = sum_rows d_logits: there, forward computes only the loss and the backward op
# recomputes the chunks with the row kernel's per-row factors set to g (one more GEMM per
# chunk; with a frozen head, d_input is still precomputed). The same holds for the returned
# entropy, whose upstream gradient is per-row: backward recomputes it (row_weight and
# entropy_weight, which enter the loss, are in forward's gradients). Nothing (N, V)-sized
# is allocated beyond a chunk.


@torch.library.custom_op("triton_xent::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,  # (N, D)
    linear_weight: torch.Tensor,  # (V, D)
    linear_bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) class indices or (N, V) probabilities
    weight: torch.Tensor | None,  # (V,) class weights
    row_weight: torch.Tensor | None,  # (N,)
    entropy_weight: torch.Tensor | None,  # () or (N,)
    prob_target: bool, reduction: str, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float | None,
    option_tensors: list[torch.Tensor | None],  # core.FLOAT_OPTIONS given as 0-dim tensors
    check_targets: bool, use_triton: bool, temperature: float, entropy: bool, argmax: bool,
    chunk_size: int | None, memory_budget_bytes: int | None, accum_dtype: torch.dtype,
    schedule: str,  # "rows" or "vocab", as _schedule resolved it
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss, lse (N,), H (N,), argmax (N,), d_x (N, D), d_W (V, D), d_b (V,)): loss "none"
    is (N,), in core.acc_dtype (the caller casts it); H and argmax are empty unless asked
    for; the gradients are empty where not asked for or not precomputed (d_W in the
    accumulation dtype for "rows", x's for "vocab"; d_b in the accumulation dtype). Autocast
    is off inside."""
    label_smoothing, lse_square_scale, softcap, temperature = core.resolve_options(
        (label_smoothing, lse_square_scale, softcap, temperature), option_tensors)
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton, temperature,
                           entropy, argmax)
    pre = _precomputed(reduction, need_weight, need_bias)
    any_grad = pre and (need_input or need_weight or need_bias)
    with torch.autocast(x.device.type, enabled=False):
        plan, weight = _make_plan(problem, x, linear_weight.shape[0], target, weight,
                                  chunk_size, memory_budget_bytes, accum_dtype, schedule,
                                  any_grad)
        r, e, e_grad = _coefficients(plan, x, row_weight, entropy_weight)
        ce, lse, H, idx, d_x, d_w, d_b = _run(
            plan, x, linear_weight, linear_bias, target, weight, scale=plan.scale,
            row_weight=r if any_grad else None, entropy_weight=e_grad if any_grad else None,
            need_input=need_input and pre, need_weight=need_weight and pre,
            need_bias=need_bias and pre)
        loss, lse, H = _reduce(plan, ce, lse, H, r, e)
    return (loss, lse, _or_empty(H, lse), _or_empty(idx, lse, torch.int64), _or_empty(d_x, x),
            _or_empty(d_w, x), _or_empty(d_b, x))


@linear_cross_entropy_op.register_fake
def _(x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight, prob_target,
      reduction, ignore_index, label_smoothing, lse_square_scale, softcap, option_tensors,
      check_targets, use_triton, temperature, entropy, argmax, chunk_size, memory_budget_bytes,
      accum_dtype, schedule, need_input, need_weight, need_bias):
    N, D = x.shape
    V = linear_weight.shape[0]
    pre = _precomputed(reduction, need_weight, need_bias)
    acc = torch.promote_types(accum_dtype, x.dtype)
    acc_w = x.dtype if schedule == "vocab" else acc
    return (x.new_empty((N,) if reduction == "none" else (), dtype=core.acc_dtype(x.dtype)),
            x.new_empty(N, dtype=torch.float32),
            x.new_empty(N if entropy else 0, dtype=torch.float32),
            x.new_empty(N if argmax else 0, dtype=torch.int64),
            x.new_empty((N, D) if need_input and pre else (0,)),
            # an empty placeholder has x's dtype, as _or_empty makes it
            x.new_empty((V, D), dtype=acc_w) if need_weight and pre else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias and pre else x.new_empty(0))


@torch.library.custom_op("triton_xent::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    x: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
    target: torch.Tensor, weight: torch.Tensor | None,
    row_factor: torch.Tensor,  # (N,) factor of each row's CE gradient
    entropy_factor: torch.Tensor | None,  # (N,) factor of each row's dH
    prob_target: bool, reduction: str, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float | None, option_tensors: list[torch.Tensor | None],
    check_targets: bool, use_triton: bool, temperature: float, entropy: bool, argmax: bool,
    chunk_size: int | None, memory_budget_bytes: int | None, accum_dtype: torch.dtype,
    schedule: str, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_W, d_b) recomputed chunk by chunk with the per-row factors, as the gradient of
    a "none" loss (no "mean" scaling: the factors carry it); empty if unasked."""
    label_smoothing, lse_square_scale, softcap, temperature = core.resolve_options(
        (label_smoothing, lse_square_scale, softcap, temperature), option_tensors)
    problem = core.Problem(prob_target, reduction, ignore_index, label_smoothing,
                           lse_square_scale, softcap, check_targets, use_triton, temperature)
    with torch.autocast(x.device.type, enabled=False):
        plan, weight = _make_plan(problem, x, linear_weight.shape[0], target, weight,
                                  chunk_size, memory_budget_bytes, accum_dtype, schedule,
                                  any_grad=False)
        *_, d_x, d_w, d_b = _run(plan, x, linear_weight, linear_bias, target, weight,
                                 row_weight=row_factor, entropy_weight=entropy_factor,
                                 need_input=need_input, need_weight=need_weight,
                                 need_bias=need_bias)
    return _or_empty(d_x, x), _or_empty(d_w, x), _or_empty(d_b, x)


@linear_cross_entropy_backward_op.register_fake
def _(x, linear_weight, linear_bias, target, weight, row_factor, entropy_factor, prob_target,
      reduction, ignore_index, label_smoothing, lse_square_scale, softcap, option_tensors,
      check_targets, use_triton, temperature, entropy, argmax, chunk_size, memory_budget_bytes,
      accum_dtype, schedule, need_input, need_weight, need_bias):
    N, D = x.shape
    V = linear_weight.shape[0]
    acc = torch.promote_types(accum_dtype, x.dtype)
    acc_w = x.dtype if schedule == "vocab" else acc
    return (x.new_empty((N, D) if need_input else (0,)),
            x.new_empty((V, D), dtype=acc_w) if need_weight else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias else x.new_empty(0))


N_OP_ARGS = 26  # the forward op's arguments, for backward's tuple of gradients
_OPTION_TENSORS = 13  # the position of option_tensors among them


def _grads(ctx, *grads) -> tuple:
    """The forward op's gradients: `grads` for its first arguments, then None for each other
    argument (for option_tensors, autograd.option_list_grad's)."""
    out = list(grads) + [None] * (N_OP_ARGS - len(grads))
    out[_OPTION_TENSORS] = ctx.option_tensors_grad
    return tuple(out)


def _setup_context(ctx, inputs, output):
    x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight = inputs[:7]
    ctx.options = inputs[7:]
    ctx.option_tensors_grad = option_list_grad(inputs[_OPTION_TENSORS])
    *_, need_input, need_weight, need_bias = inputs
    reduction, entropy = inputs[8], inputs[17]
    _, lse, H, idx, d_x, d_w, d_b = output
    ctx.precompute = _precomputed(reduction, need_weight, need_bias)
    ctx.dtypes = (x.dtype, linear_weight.dtype,
                  linear_bias.dtype if linear_bias is not None else None)
    recompute = not ctx.precompute or entropy
    ctx.save_for_backward(
        *((d_x, d_w, d_b) if ctx.precompute else (None,) * 3),
        *((x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight)
          if recompute else (None,) * 7))
    ctx.mark_non_differentiable(lse, idx, d_x, d_w, d_b)
    ctx.set_materialize_grads(False)


def _scaled(grads, grad_loss, precomputed: bool, reduction: str, need, dtypes=None):
    """The precomputed (d_x, d_W, d_b) times grad_output (per row for d_x with "none"); None
    where not wanted or not precomputed. With `dtypes` (the parameters'), each product is
    written in its parameter's dtype by the multiplication itself: one pass over a float32
    d_W instead of a scaling pass and a cast. In place when the saved gradients are spent
    and already in that dtype."""
    if grad_loss is None or not precomputed:
        return [None, None, None]
    in_place = core.saved_grad_is_spent(grad_loss)
    per_row = grad_loss.reshape(-1, 1) if reduction == "none" else grad_loss
    out = []
    for g, f, wanted, dtype in zip(grads, (per_row, grad_loss, grad_loss), need,
                                   dtypes or (None,) * 3):
        if not wanted or g is None:
            out.append(None)
        elif dtype is not None and dtype != g.dtype and not _transforms_active():
            out.append(torch.mul(g, f, out=torch.empty_like(g, dtype=dtype)))
        else:
            out.append(g.mul_(f) if in_place else g * f)
    return out


def _transforms_active() -> bool:
    """Whether a torch.func transform runs the backward (its batched tensors take no out=)."""
    return torch._C._are_functorch_transforms_active()


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _backward(ctx, grad_loss, grad_lse, grad_entropy, grad_argmax, grad_dx, grad_dw, grad_db):
    need = ctx.needs_input_grad[:3]
    if not any(need) or (grad_loss is None and grad_entropy is None):
        return _grads(ctx)
    saved = ctx.saved_tensors
    x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight = saved[3:]
    r, e = _recompute_factors(ctx.precompute, grad_loss, grad_entropy, row_weight,
                              entropy_weight)
    # cast while scaling unless a recomputed part is still to be added (in the wider dtype)
    out = _scaled(saved[:3], grad_loss, ctx.precompute, ctx.options[1], need,
                  ctx.dtypes if r is None else None)
    if r is not None:
        again = linear_cross_entropy_backward_op(
            x, linear_weight, linear_bias, target, weight, r, e, *ctx.options)
        out = [_add(g, h) if wanted else None for g, h, wanted in zip(out, again, need)]
    out = tuple(g.to(dtype) if wanted and g is not None else None
                for g, dtype, wanted in zip(out, ctx.dtypes, need))
    return _grads(ctx, *out)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
register_vmap_by_samples(linear_cross_entropy_op)
register_vmap_by_samples(linear_cross_entropy_backward_op)


# torch.func's door to the forward op (see autograd.func_function)
LinearCrossEntropyFuncFunction = func_function(linear_cross_entropy_op, _setup_context,
                                               _backward)


# --- vocab parallelism (eager: collectives) --------------------------------------------------


def _run_sliced(plan: _Plan, group, class_offset: int, n_classes: int, x, linear_weight,
                linear_bias, target, weight, **kwargs):
    """_run for a head whose rows are this rank's classes: the row function merges the
    ranks' statistics per chunk, and d_input, a sum over all classes, is summed over ranks."""
    rows_fn = distributed.sliced_rows(group, class_offset, n_classes, plan.problem.use_triton)
    ce, lse, H, idx, d_x, d_w, d_b = _run(plan, x, linear_weight, linear_bias, target, weight,
                                          rows_fn=rows_fn, **kwargs)
    if d_x is not None:
        dist.all_reduce(d_x, group=group)
    return ce, lse, H, idx, d_x, d_w, d_b


class VocabParallelLinearFunction(torch.autograd.Function):
    """The linear op with linear_weight (and linear_bias) sharded by rows over `group`: the
    same chunked algorithm and the same split between forward and backward as the custom ops
    above; every rank runs the same chunks (chunking follows the global class count)."""

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, weight, row_weight,
                entropy_weight, problem, group, tuning, needs):
        class_offset, n_classes, target, weight = distributed.prepare(
            problem, linear_weight.shape[0], target, weight, group)
        need_x, need_w, need_b = needs
        pre = _precomputed(problem.reduction, need_w, need_b)
        any_grad = pre and any(needs)
        plan, weight = _make_plan(problem, x, n_classes, target, weight, *tuning, "rows",
                                  any_grad=any_grad)
        r, e, e_grad = _coefficients(plan, x, row_weight, entropy_weight)
        ce, lse, H, idx, d_x, d_w, d_b = _run_sliced(
            plan, group, class_offset, n_classes, x, linear_weight, linear_bias, target, weight,
            scale=plan.scale, row_weight=r if any_grad else None,
            entropy_weight=e_grad if any_grad else None, need_input=need_x and pre,
            need_weight=need_w and pre, need_bias=need_b and pre)
        ctx.pre = pre
        ctx.context = (plan, group, class_offset, n_classes)
        ctx.dtypes = (x.dtype, linear_weight.dtype,
                      linear_bias.dtype if linear_bias is not None else None)
        recompute = not pre or problem.entropy
        ctx.save_for_backward(
            *((d_x, d_w, d_b) if pre else (None,) * 3),
            *((x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight)
              if recompute else (None,) * 7))
        loss, lse, H = _reduce(plan, ce, lse, H, r, e)
        H, idx = _or_empty(H, lse), _or_empty(idx, lse, torch.int64)
        ctx.mark_non_differentiable(lse, idx)
        ctx.set_materialize_grads(False)
        return loss, lse, H, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse, grad_entropy, grad_argmax):
        need = ctx.needs_input_grad[:3]
        if not any(need) or (grad_loss is None and grad_entropy is None):
            return (None,) * 11
        plan, group, class_offset, n_classes = ctx.context
        saved = ctx.saved_tensors
        out = _scaled(saved[:3], grad_loss, ctx.pre, plan.problem.reduction, need)
        x, linear_weight, linear_bias, target, weight, row_weight, entropy_weight = saved[3:]
        # Every rank recomputes alike (the entropy must get a gradient on every rank or none).
        r, e = _recompute_factors(ctx.pre, grad_loss, grad_entropy, row_weight, entropy_weight)
        if r is not None:
            *_, d_x, d_w, d_b = _run_sliced(
                plan, group, class_offset, n_classes, x, linear_weight, linear_bias, target,
                weight, row_weight=r, entropy_weight=e, need_input=need[0],
                need_weight=need[1], need_bias=need[2])
            out = [_add(g, h) for g, h in zip(out, (d_x, d_w, d_b))]
        out = [g.to(dtype) if g is not None and wanted else None
               for g, dtype, wanted in zip(out, ctx.dtypes, need)]
        return (*out,) + (None,) * 8


@dtensor.routes_dtensors(dtensor.linear_arguments)  # DTensor arguments: dtensor.py
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
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_weight: float | torch.Tensor = 0.0,  # a number, or input's leading shape (...)
    row_weight: torch.Tensor | None = None,  # input's leading shape (...)
    return_argmax: bool = False,
):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without storing the
    (N, V) logits: rows go through the head `chunk_size` at a time, and each chunk's logits are
    turned into loss and gradient in place (see chunks.py).

    The first arguments are those of torch.nn.functional.linear_cross_entropy (torch >= 2.13),
    whose `ignore_index=None` also means -100. Unlike it, `input` may have any number of
    leading dimensions: every leading position is one row, whose classes are the head's V
    outputs, so input (B, T, D) takes target (B, T) (or probabilities (B, T, V)), and
    reduction "none" returns target's (B, T) shape.

    Options as triton_xent.cross_entropy: weight, reduction, ignore_index, label_smoothing,
    lse_square_scale (z-loss), softcap, return_lse (the per-row logsumexp of z, after
    softcap and temperature, float32, shaped like the unreduced loss; 0 at ignored
    positions, which are never computed), backend ("auto", "triton", "torch": "torch" is
    the same chunked algorithm with the plain-PyTorch row function) and check_targets. With check_targets=True (and always on
    the "torch" backend) an out-of-range class index raises IndexError and ignored rows are
    dropped before the GEMMs, for one host synchronisation; with False nothing syncs, ignored
    rows are computed (and zeroed) like the others, and an out-of-range target gives NaN.

    Tuning (keyword-only). The chunk driver's schedule is config.LINEAR_SCHEDULE's for the
    device ("rows" by default; see triton_xent/config.py and chunks.py):
    chunk_size: rows per chunk; giving it selects the "rows" schedule. None picks it from
        the memory budget (on a CPU: config.LINEAR_CPU_CHUNK_ROWS).
    memory_budget_bytes: bytes for one chunk of logits: "rows": chunk_size = budget /
        (V * itemsize) rounded down to a multiple of 64 rows, None meaning 256 MiB on a GPU
        (1024 rows of bf16 logits for V = 128256); "vocab": a block of budget / (N *
        itemsize) classes over all N rows, None meaning 64 MiB. The gradients (d_W, d_b,
        d_input) and their accumulators come on top.
    accum_dtype: dtype in which d_W and d_b are summed over row chunks (default float32;
        never narrower than input's dtype). They are kept in it until backward, then cast to
        the parameters' dtypes: a bf16 head with accum_dtype=torch.bfloat16 halves that
        memory, at the cost of a rounding of d_W per chunk (bench/README.md's notes measure
        it). Under "vocab" d_W is summed over all rows inside one float32 GEMM per block and
        kept in the head's dtype whatever accum_dtype is.

    process_group: vocab parallelism (see cross_entropy): linear_weight (V_r, D) and
        linear_bias (V_r,) are this rank's rows of the head, in group-rank order; input and
        target are the same on every rank, and so is the loss; weight holds all classes'.
        Each rank gets its head slice's gradients and the full input gradient. Eager only.
        A DTensor head sharded by rows (ColwiseParallel's lm_head.weight) needs no
        process_group: its mesh gives it (triton_xent/dtensor.py).

    temperature, return_entropy, entropy_weight, row_weight, return_argmax: as in
        cross_entropy, per leading position (so a GRPO loss is one call on the hidden
        states: row_weight = advantage * mask, entropy_weight = -c * mask, reduction="sum",
        with every gradient computed in the forward pass). The returned entropy's own
        gradient is recomputed chunk by chunk in backward.

    Gradients go to input, linear_weight and linear_bias, each only if it requires grad;
    nothing gradient-related runs when none does. For "mean" and "sum" they are computed in
    forward (backward multiplies by grad_output); for "none" with a trainable head, backward
    recomputes the chunks (see the custom ops above). Double backward is not supported.

    Under torch.autocast the head's matmul runs in the autocast dtype and the loss is
    float32, as with torch's F.linear_cross_entropy. torch.compile and torch.func (grad, vjp,
    vmap) are supported; process_group is eager-only.
    """
    _refuse_eager_only(process_group=process_group is not None, inplace_backward=False,
                       input=input)
    input, linear_weight, linear_bias = _autocast_operands(input, linear_weight, linear_bias)
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
        reduction, label_smoothing, lse_square_scale, softcap = _check_options(
            reduction, label_smoothing, lse_square_scale, softcap)
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
        temperature = _check_temperature(temperature)
        row_weight, entropy_weight = _check_row_extras(row_weight, entropy_weight, lead,
                                                       input.device)
        use_triton = _use_triton(backend, input)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (input, linear_weight, linear_bias)]
    extras = (bool(return_lse), bool(return_entropy), bool(return_argmax))
    rows = (row_weight.reshape(N) if row_weight is not None else None,
            entropy_weight.reshape(N) if entropy_weight is not None and entropy_weight.dim()
            else entropy_weight)
    if process_group is not None:  # eager: numbers
        options = (prob_target, reduction, int(ignore_index), float(label_smoothing),
                   float(lse_square_scale), None if softcap is None else float(softcap),
                   bool(check_targets), use_triton, float(temperature), extras[1], extras[2])
        problem = core.Problem(*options)
        with torch.autocast(input.device.type, enabled=False):
            out = VocabParallelLinearFunction.apply(
                input.reshape(N, D), linear_weight, linear_bias, tgt, weight, *rows, problem,
                process_group, (chunk_size, memory_budget_bytes, accum_dtype), tuple(needs))
    else:
        transformed = any(t is not None and _transformed(t)
                          for t in (input, linear_weight, linear_bias))
        op = (_func_op(LinearCrossEntropyFuncFunction) if transformed
              else linear_cross_entropy_op)
        ls, lss, cap, temp, tensors = op_options(label_smoothing, lse_square_scale, softcap,
                                                 temperature)
        schedule = _schedule(input, prob_target, chunk_size, vocab_parallel=False)
        out = op(input.reshape(N, D), linear_weight, linear_bias, tgt, weight, *rows,
                 prob_target, reduction, int(ignore_index), ls, lss, cap, tensors,
                 bool(check_targets), use_triton, temp, extras[1], extras[2], chunk_size,
                 memory_budget_bytes, accum_dtype, schedule, *needs)[:4]
    loss, lse, H, idx = out
    loss = loss.to(loss_dtype(input, tgt if prob_target else None))
    if reduction == "none":
        loss = loss.view(lead)
    return _results(loss, lse.view(lead), H.view(lead) if extras[1] else None,
                    idx.view(lead) if extras[2] else None, *extras)


def _autocast_operands(input, linear_weight, linear_bias):
    """Under torch.autocast the head's matmul runs in the autocast dtype, as F.linear and
    torch's F.linear_cross_entropy run it: float32 and half-precision operands are cast
    (differentiably: their gradients come back in their own dtypes), and the loss is float32
    (functional.loss_dtype). Outside autocast, or for anything not a tensor, unchanged."""
    if not isinstance(input, torch.Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(input.device.type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in castable else t
                 for t in (input, linear_weight, linear_bias))


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
        temperature: float = 1.0,
        return_entropy: bool = False,
        entropy_weight: float = 0.0,
        return_argmax: bool = False,
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
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.entropy_weight = entropy_weight
        self.return_argmax = return_argmax

    def forward(
        self,
        input: torch.Tensor,  # (..., D)
        linear_weight: torch.Tensor,  # (V, D)
        target: torch.Tensor,  # (...) class indices, or (..., V) probabilities
        linear_bias: torch.Tensor | None = None,  # (V,)
        row_weight: torch.Tensor | None = None,  # (...)
        entropy_weight: torch.Tensor | None = None,  # (...); None: the constructor's number
    ):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
            softcap=self.softcap, return_lse=self.return_lse, backend=self.backend,
            check_targets=self.check_targets, chunk_size=self.chunk_size,
            memory_budget_bytes=self.memory_budget_bytes, accum_dtype=self.accum_dtype,
            temperature=self.temperature, return_entropy=self.return_entropy,
            entropy_weight=self.entropy_weight if entropy_weight is None else entropy_weight,
            row_weight=row_weight, return_argmax=self.return_argmax,
        )

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"backend={self.backend!r}"]
        if self.ignore_index not in (-100, None):
            extras.append(f"ignore_index={self.ignore_index}")
        if self.temperature != 1.0:
            extras.append(f"temperature={self.temperature}")
        for name in ("label_smoothing", "lse_square_scale", "entropy_weight"):
            if getattr(self, name):
                extras.append(f"{name}={getattr(self, name)}")
        for name in ("softcap", "chunk_size", "memory_budget_bytes"):
            if getattr(self, name) is not None:
                extras.append(f"{name}={getattr(self, name)}")
        return ", ".join(extras)
