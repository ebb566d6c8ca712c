"""Fused linear + distillation: distillation_loss(input @ weight.T + bias, teacher_input @
teacher_weight.T + teacher_bias) for large vocabularies, both heads computed chunk by chunk so
that neither (N, V) logits tensor is ever stored.

Per chunk of R rows (chunks.linear_chunks drives it; `on_chunk` below is the callback):

    s_c = x_c @ W.T + b               (R, V) the student's logits, in the driver's buffer
    t_c = xt_c @ Wt.T + bt            (R, V) the teacher's, in a buffer of their own
    loss_c, d s_c = distill_rows(s_c, t_c)   the gradient written over s_c (distill.py)
    then d_x, d_W, d_b from d s_c     (the driver's gradient GEMMs; the teacher gets none)

so the memory beyond the inputs is two (R, V) chunks plus the student's gradient
accumulators. Under the "vocab" schedule (config.LINEAR_SCHEDULE; chunks.vocab_blocks) both
heads are computed a block of classes at a time over all the kept rows instead, in passes:
the blocks' statistics (distill.distill_stats, merged by distill.merge_stats), for JSD the
sums of its terms (distill.distill_terms), then the gradient of each block
(distill.distill_grad): two (M, B) blocks beyond the inputs and no (V, D) accumulator, at
the cost of both logits GEMMs once per pass. The teacher's hidden size Dt may differ from the
student's D; only the class count V is shared. Rows whose target is ignore_index are dropped
before both GEMMs (one host synchronisation, to count them).

Layers: chunks.py (driver) -> the custom ops `torch.ops.triton_xent.linear_distillation` and
`..._backward` (torch.library: opaque to torch.compile, fullgraph included) ->
linear_distillation_loss and LinearDistillationLoss. The split between forward and backward
is linear_cross_entropy's: the student's gradients are computed in forward, backward scales
them by grad_output; for reduction "none" with a trainable head, backward recomputes the
chunks with grad_output as the rows' factors. With a process_group (or DTensor heads) both
heads are this rank's class slice: the same chunks run on every rank, each chunk's rows
merged across ranks (distill.distill_rows_vocab_parallel), then d_x summed over ranks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import config, core, distill, distributed, dtensor
from .chunks import (BlockPass, head_logits, linear_chunks, plan_block_cols, plan_chunk_rows,
                     vocab_blocks)
from .distill import distill_rows, distill_rows_vocab_parallel, prepare_distill
from .functional import (_KERNEL_DTYPES, _check_distill_options, _refuse_eager_only,
                         _use_triton, loss_dtype)
from .linear import _add, _or_empty, _precomputed, _scaled


def _kept_rows(target: torch.Tensor | None, ignore_index: int, n_rows: int):
    """(rows to compute (M,) int64 or None for all, active (N,) bool or None for all): the
    rows whose target is not ignore_index."""
    if target is None:
        return None, None
    active = target != ignore_index
    kept = active.nonzero().squeeze(1)  # the host sync that lets both GEMMs skip the rows
    return (kept if kept.numel() < n_rows else None), active


def _row_factors(active: torch.Tensor | None, reduction: str, n_rows: int,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_scale (N,), count ()) in `dtype`: each row's factor in the reduced loss and
    its gradient (batchmean: 1 / max(count, 1), so an all-ignored batch is 0, not NaN; sum
    and none: 1), 0 on the rows that do not count; count the number of rows that count."""
    if active is None:
        active = torch.ones(n_rows, dtype=torch.bool, device=device)
    count = active.sum().to(dtype)
    factor = 1.0 / count.clamp(min=1.0) if reduction == "batchmean" else torch.ones_like(count)
    return torch.where(active, factor, 0.0), count


def _run(x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows, row_scale, *,
         options: dict, chunk_rows: int, need_input: bool, need_weight: bool, need_bias: bool,
         rows_fn=distill_rows, block_cols: int | None = None):
    """(loss_rows (N,) in core.acc_dtype, d_x (N, D), d_W (V, D), d_b (V,)): each row's
    divergence unscaled (0 on rows not computed) and the student's gradients of
    sum_rows row_scale * loss_row (None where not asked for; d_W in float32 (float64 for
    float64 x) under "rows", in x's dtype under "vocab"). `rows_fn`: distill_rows, or
    distill_rows_vocab_parallel bound to a group for heads sharded by classes.
    block_cols: the "vocab" schedule with blocks of that many classes; None: "rows"."""
    N = x.shape[0]
    loss_rows = x.new_zeros(N, dtype=core.acc_dtype(x.dtype))
    compute_grad = need_input or need_weight or need_bias
    if block_cols is not None:
        d_x, d_w, d_b = _vocab_blocks(
            x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows, row_scale,
            loss_rows, options=options, block_cols=block_cols, need_input=need_input,
            need_weight=need_weight, need_bias=need_bias)
        return loss_rows, d_x, d_w, d_b
    teacher_buf = teacher_x.new_empty((min(chunk_rows, max(N, 1)), teacher_weight.shape[0]))

    def on_chunk(logits, take):  # student (R, V) -> (loss of the chunk's rows,)
        teacher = head_logits(take(teacher_x), teacher_weight, teacher_bias, teacher_buf)
        return (rows_fn(logits, teacher, logits if compute_grad else None, take(row_scale),
                        **options),)

    d_x, d_w, d_b = linear_chunks(
        x, weight, bias, on_chunk, (loss_rows,), rows=rows, chunk_rows=chunk_rows,
        need_input=need_input, need_weight=need_weight, need_bias=need_bias,
        accum_dtype=torch.promote_types(torch.float32, x.dtype))
    return loss_rows, d_x, d_w, d_b


def _vocab_blocks(x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows, row_scale,
                  loss_rows, *, options: dict, block_cols: int, need_input: bool,
                  need_weight: bool, need_bias: bool) -> tuple:
    """_run's "vocab" schedule: the passes over blocks of classes (see the module
    docstring), each block of the teacher's logits computed beside the student's; the kept
    rows' losses written into loss_rows. (d_x, d_W, d_b) as chunks.vocab_blocks returns
    them."""
    divergence, beta, temperature, use_triton = (
        options["divergence"], options["beta"], options["temperature"], options["use_triton"])

    def take(t):
        return t if t is None or rows is None else t.index_select(0, rows)

    tx_k, scale_k = take(teacher_x), take(row_scale)
    M, V = tx_k.shape[0], weight.shape[0]
    teacher_buf = teacher_x.new_empty(M * min(block_cols, V))
    dtype = torch.float32 if use_triton else core.acc_dtype(x.dtype)
    stats = x.new_empty((M, -(-V // block_cols), 6), dtype=dtype)  # (M, P, 6)
    state = {}

    def teacher(lo, hi):  # (M, B): the teacher's logits of the block
        return head_logits(tx_k, teacher_weight[lo:hi],
                           teacher_bias[lo:hi] if teacher_bias is not None else None,
                           teacher_buf[:M * (hi - lo)].view(M, hi - lo))

    def block_stats(student, lo, hi):
        stats[:, lo // block_cols] = distill.distill_stats(
            student, teacher(lo, hi), temperature=temperature, use_triton=use_triton)

    def block_terms(student, lo, hi):  # JSD: its sums of terms add up over the blocks
        state["terms"] += distill.distill_terms(student, teacher(lo, hi), state["merged"],
                                                beta=beta, temperature=temperature,
                                                use_triton=use_triton)

    def merge():
        state["merged"] = distill.merge_stats(stats)
        state["terms"] = stats.new_zeros((M, 2)) if divergence == "jsd" else None
        if divergence != "jsd":
            losses()

    def losses():
        loss, state["kl_s"] = distill.row_losses(state["merged"], state["terms"], divergence)
        if scale_k is not None:
            loss = torch.where(scale_k == 0, 0.0, loss)
        if rows is None:
            loss_rows.copy_(loss)
        else:
            loss_rows.index_copy_(0, rows, loss.to(loss_rows.dtype))

    def block_grad(student, lo, hi):  # the student's d_logits written over its logits
        distill.distill_grad(student, teacher(lo, hi), state["merged"], state["kl_s"],
                             student, scale_k, divergence=divergence, beta=beta,
                             temperature=temperature, use_triton=use_triton)

    passes = [BlockPass(block_stats, merge)]
    if divergence == "jsd":
        passes.append(BlockPass(block_terms, losses))
    if need_input or need_weight or need_bias:
        passes.append(BlockPass(block_grad))
    return vocab_blocks(x, weight, bias, passes, rows=rows, block_cols=block_cols,
                        need_input=need_input, need_weight=need_weight, need_bias=need_bias,
                        accum_dtype=torch.promote_types(torch.float32, x.dtype))


def _reduce(loss_rows: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / count.clamp(min=1.0).to(total.dtype) if reduction == "batchmean" else total


def _plan(x, target, ignore_index, reduction, use_triton):
    """(rows to compute, row_scale (N,), count (), number of rows to compute); row_scale in
    float32 for the kernels, in core.acc_dtype for the PyTorch backend."""
    rows, active = _kept_rows(target, ignore_index, x.shape[0])
    dtype = torch.float32 if use_triton else core.acc_dtype(x.dtype)
    row_scale, count = _row_factors(active, reduction, x.shape[0], x.device, dtype)
    n_compute = x.shape[0] if rows is None else rows.numel()
    return rows, row_scale, count, n_compute


def _chunk_rows(x, V, n_compute, chunk_size):
    return plan_chunk_rows(n_compute, V, x.element_size(), chunk_size=chunk_size,
                           memory_budget_bytes=None, cpu=x.device.type == "cpu")


def _schedule(x: torch.Tensor, chunk_size: int | None, vocab_parallel: bool) -> str:
    """config.LINEAR_SCHEDULE's schedule for x's device, except "rows" where the caller
    gives chunk_size (rows per chunk) or the heads are vocab-parallel."""
    schedule = config.linear_schedule(x.device)
    return "rows" if chunk_size is not None or vocab_parallel else schedule


def _block_cols(x, V, n_compute, schedule):
    """Classes per block under "vocab" (chunks.plan_block_cols), None under "rows"."""
    if schedule != "vocab":
        return None
    return plan_block_cols(n_compute, V, x.element_size(), memory_budget_bytes=None)


@torch.library.custom_op("triton_xent::linear_distillation", mutates_args=())
def linear_distillation_op(
    x: torch.Tensor,  # (N, D) the student's hidden states
    weight: torch.Tensor,  # (V, D)
    bias: torch.Tensor | None,  # (V,)
    teacher_x: torch.Tensor,  # (N, Dt)
    teacher_weight: torch.Tensor,  # (V, Dt)
    teacher_bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor | None,  # (N,) class indices (only compared with ignore_index)
    divergence: str, beta: float, temperature: float, ignore_index: int, reduction: str,
    use_triton: bool, chunk_size: int | None,
    schedule: str,  # "rows" or "vocab", as _schedule resolved it
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_x (N, D), d_W (V, D), d_b (V,)): loss reduced ("none": (N,)) in
    core.acc_dtype; the gradients empty where not asked for or not precomputed (d_b in
    float32, or float64 for float64 x; d_W likewise under "rows", in x's dtype under
    "vocab"). Autocast is off inside."""
    options = dict(divergence=divergence, beta=beta, temperature=temperature,
                   use_triton=use_triton)
    pre = _precomputed(reduction, need_weight, need_bias)
    with torch.autocast(x.device.type, enabled=False):
        rows, row_scale, count, n_compute = _plan(x, target, ignore_index, reduction,
                                                  use_triton)
        loss_rows, d_x, d_w, d_b = _run(
            x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows, row_scale,
            options=options, chunk_rows=_chunk_rows(x, weight.shape[0], n_compute, chunk_size),
            block_cols=_block_cols(x, weight.shape[0], n_compute, schedule),
            need_input=need_input and pre, need_weight=need_weight and pre,
            need_bias=need_bias and pre)
        loss = _reduce(loss_rows, count, reduction)
    return loss, _or_empty(d_x, x), _or_empty(d_w, x), _or_empty(d_b, x)


@linear_distillation_op.register_fake
def _(x, weight, bias, teacher_x, teacher_weight, teacher_bias, target, divergence, beta,
      temperature, ignore_index, reduction, use_triton, chunk_size, schedule, need_input,
      need_weight, need_bias):
    N, D = x.shape
    V = weight.shape[0]
    pre = _precomputed(reduction, need_weight, need_bias)
    acc = torch.promote_types(torch.float32, x.dtype)
    acc_w = x.dtype if schedule == "vocab" else acc
    return (x.new_empty((N,) if reduction == "none" else (), dtype=core.acc_dtype(x.dtype)),
            x.new_empty((N, D) if need_input and pre else (0,)),
            x.new_empty((V, D), dtype=acc_w) if need_weight and pre else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias and pre else x.new_empty(0))


@torch.library.custom_op("triton_xent::linear_distillation_backward", mutates_args=())
def linear_distillation_backward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher_x: torch.Tensor,
    teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    row_factor: torch.Tensor,  # (N,) grad_output of each row's loss
    divergence: str, beta: float, temperature: float, ignore_index: int, reduction: str,
    use_triton: bool, chunk_size: int | None, schedule: str,
    need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_W, d_b) of sum_rows row_factor * loss_row, recomputed chunk by chunk (the
    backward of reduction "none" with a trainable head); empty where not asked for."""
    options = dict(divergence=divergence, beta=beta, temperature=temperature,
                   use_triton=use_triton)
    with torch.autocast(x.device.type, enabled=False):
        rows, row_scale, _, n_compute = _plan(x, target, ignore_index, "none", use_triton)
        _, d_x, d_w, d_b = _run(
            x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows,
            row_scale * row_factor.to(row_scale.dtype), options=options,
            chunk_rows=_chunk_rows(x, weight.shape[0], n_compute, chunk_size),
            block_cols=_block_cols(x, weight.shape[0], n_compute, schedule),
            need_input=need_input, need_weight=need_weight, need_bias=need_bias)
    return _or_empty(d_x, x), _or_empty(d_w, x), _or_empty(d_b, x)


@linear_distillation_backward_op.register_fake
def _(x, weight, bias, teacher_x, teacher_weight, teacher_bias, target, row_factor,
      divergence, beta, temperature, ignore_index, reduction, use_triton, chunk_size,
      schedule, need_input, need_weight, need_bias):
    N, D = x.shape
    V = weight.shape[0]
    acc = torch.promote_types(torch.float32, x.dtype)
    acc_w = x.dtype if schedule == "vocab" else acc
    return (x.new_empty((N, D) if need_input else (0,)),
            x.new_empty((V, D), dtype=acc_w) if need_weight else x.new_empty(0),
            x.new_empty((V,), dtype=acc) if need_bias else x.new_empty(0))


_N_OP_ARGS = 18  # the forward op's arguments, for backward's tuple of gradients


def _setup_context(ctx, inputs, output):
    x, weight, bias, teacher_x, teacher_weight, teacher_bias, target = inputs[:7]
    ctx.options = inputs[7:]
    reduction = inputs[11]
    *_, need_input, need_weight, need_bias = inputs
    _, d_x, d_w, d_b = output
    ctx.precompute = _precomputed(reduction, need_weight, need_bias)
    ctx.reduction = reduction
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(
        *((d_x, d_w, d_b) if ctx.precompute else (None,) * 3),
        *((None,) * 7 if ctx.precompute else inputs[:7]))
    ctx.mark_non_differentiable(d_x, d_w, d_b)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_dx, grad_dw, grad_db):
    need = ctx.needs_input_grad[:3]
    if not any(need) or grad_loss is None:
        return (None,) * _N_OP_ARGS
    saved = ctx.saved_tensors
    out = _scaled(saved[:3], grad_loss, ctx.precompute, ctx.reduction, need,
                  ctx.dtypes if ctx.precompute else None)  # cast while scaling
    if not ctx.precompute:
        again = linear_distillation_backward_op(*saved[3:], grad_loss.reshape(-1),
                                                *ctx.options)
        out = [_add(g, h) if wanted else None for g, h, wanted in zip(out, again, need)]
    out = tuple(g.to(dtype) if wanted and g is not None else None
                for g, dtype, wanted in zip(out, ctx.dtypes, need))
    return out + (None,) * (_N_OP_ARGS - 3)


linear_distillation_op.register_autograd(_backward, setup_context=_setup_context)


# --- vocab parallelism (eager: collectives) --------------------------------------------------


class VocabParallelLinearDistillFunction(torch.autograd.Function):
    """The linear op with both heads sharded by classes over `group` (each rank holds the
    same class slice of weight and teacher_weight): the same chunks on every rank, each
    chunk's rows merged across ranks by distill_rows_vocab_parallel, and d_x (a sum over
    all classes) summed over the ranks. Forward and backward split as in the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, teacher_x, teacher_weight, teacher_bias, target,
                options, group, chunk_size, needs):
        divergence, beta, temperature, ignore_index, reduction, use_triton = options
        n_classes = prepare_distill(weight.shape[0], target, x.shape[0], group, x.device)
        rows_fn = functools.partial(distill_rows_vocab_parallel, group=group)
        need_x, need_w, need_b = needs
        pre = _precomputed(reduction, need_w, need_b)
        rows, row_scale, count, n_compute = _plan(x, target, ignore_index, reduction,
                                                  use_triton)
        run = dict(options=dict(divergence=divergence, beta=beta, temperature=temperature,
                                use_triton=use_triton),
                   chunk_rows=_chunk_rows(x, n_classes, n_compute, chunk_size), rows_fn=rows_fn)
        loss_rows, d_x, d_w, d_b = _run(
            x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows, row_scale,
            need_input=need_x and pre, need_weight=need_w and pre, need_bias=need_b and pre,
            **run)
        if d_x is not None:
            torch.distributed.all_reduce(d_x, group=group)
        ctx.pre, ctx.reduction, ctx.run, ctx.group = pre, reduction, run, group
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(
            *((d_x, d_w, d_b) if pre else (None,) * 3),
            *((None,) * 7 if pre else (x, weight, bias, teacher_x, teacher_weight,
                                       teacher_bias, target)))
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        return _reduce(loss_rows, count, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        need = ctx.needs_input_grad[:3]
        if not any(need) or grad_loss is None:
            return (None,) * 11
        saved = ctx.saved_tensors
        out = _scaled(saved[:3], grad_loss, ctx.pre, ctx.reduction, need)
        if not ctx.pre:
            x, weight, bias, teacher_x, teacher_weight, teacher_bias, target = saved[3:]
            rows, row_scale, _, _ = _plan(x, target, ctx.ignore_index, "none",
                                          ctx.run["options"]["use_triton"])
            _, d_x, d_w, d_b = _run(
                x, weight, bias, teacher_x, teacher_weight, teacher_bias, rows,
                row_scale * grad_loss.reshape(-1).to(row_scale.dtype), need_input=need[0],
                need_weight=need[1], need_bias=need[2], **ctx.run)
            if d_x is not None:
                torch.distributed.all_reduce(d_x, group=ctx.group)
            out = [_add(g, h) for g, h in zip(out, (d_x, d_w, d_b))]
        out = [g.to(dtype) if g is not None and wanted else None
               for g, dtype, wanted in zip(out, ctx.dtypes, need)]
        return (*out,) + (None,) * 8


# --- the public function and module ---------------------------------------------------------


def _check_target(target, lead: torch.Size, device: torch.device) -> None:
    """target: None, or integer class indices of the hidden states' leading shape."""
    if target is None:
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor or None, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (it marks ignored rows), "
                        f"got {target.dtype}")
    if target.shape != lead:
        raise ValueError(f"target must have shape {tuple(lead)}, one per row of the hidden "
                         f"states, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but input is on {device}")


def _check_head(name: str, weight, bias, bias_name: str, hidden, hidden_name: str,
                V: int | None) -> tuple[int, int]:
    """(V, D) of one head, after its checks against its hidden states."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{hidden_name} must be a tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"{hidden_name} must hold floating-point hidden states, got "
                        f"{hidden.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"{hidden_name} must have a feature dimension: shape (..., D), got "
                         f"a 0-dim tensor")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must have shape (V, D) as nn.Linear stores it, got "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hidden_name}'s last dimension ({hidden.shape[-1]}) must match "
                         f"{name}'s in_features (shape (V, D) = {tuple(weight.shape)})")
    if V is not None and weight.shape[0] != V:
        raise ValueError(f"{name} has {weight.shape[0]} classes (rows) but weight has {V}: "
                         f"student and teacher share the classes")
    for what, t in ((name, weight), (bias_name, bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{what} must have {hidden_name}'s dtype {hidden.dtype}, got "
                            f"{t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{what} is on {t.device} but {hidden_name} is on "
                             f"{hidden.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), one per row of "
                         f"{name}, got {tuple(bias.shape)}")
    return weight.shape


@dtensor.routes_dtensors(dtensor.linear_distillation_arguments)  # DTensor heads: dtensor.py
def linear_distillation_loss(
    input: torch.Tensor,  # (..., D) the student's hidden states
    weight: torch.Tensor,  # (V, D) the student's head, as nn.Linear stores it
    teacher_input: torch.Tensor,  # (..., Dt) the teacher's hidden states, same leading shape
    teacher_weight: torch.Tensor,  # (V, Dt) the teacher's head
    target: torch.Tensor | None = None,  # (...) class indices: only ignore_index is read
    *,
    bias: torch.Tensor | None = None,  # (V,)
    teacher_bias: torch.Tensor | None = None,  # (V,)
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    backend: str = "auto",
    process_group=None,
    chunk_size: int | None = None,
):
    """distillation_loss(input @ weight.T + bias, teacher_input @ teacher_weight.T +
    teacher_bias, target, ...) without storing either (N, V) logits tensor: rows go through
    both heads `chunk_size` at a time (see the module docstring), and each chunk's student
    logits are turned into loss and gradient in place.

    divergence, beta, temperature, ignore_index, reduction, backend: as in
    triton_xent.distillation_loss (no T^2 factor: multiply the loss by temperature**2 for
    Hinton's scaling). The teacher's hidden size may differ from the student's; the heads
    share V. Rows whose target is ignore_index are dropped before both GEMMs, for one host
    synchronisation; target None: every row counts.

    Gradients go to input, weight and bias only, each only if it requires grad; teacher
    tensors that require grad are refused (detach them). For "batchmean" and "sum" they are
    computed in forward and backward multiplies by grad_output; for "none" with a trainable
    head backward recomputes the chunks.

    chunk_size: rows per chunk; giving it selects the "rows" schedule. None: the schedule is
        config.LINEAR_SCHEDULE's for the device; under "rows" config.LINEAR_CPU_CHUNK_ROWS on
        a CPU, else config.LINEAR_GPU_CHUNK_ROWS or as many rows as
        config.LINEAR_CHUNK_BUDGET_BYTES of the student's logits hold (the teacher's chunk
        comes on top); under "vocab" blocks of config.LINEAR_VOCAB_BLOCK_BYTES of each head's
        logits (see the module docstring).
    process_group: vocab parallelism. weight (V_r, D), bias (V_r,), teacher_weight (V_r, Dt)
        and teacher_bias (V_r,) are this rank's class slice of both heads (the same slice of
        each, in group-rank order, slices may be unequal); the hidden states and target are
        the same on every rank, and so is the loss. Each rank gets its slice's head gradients
        and the full input gradient. Eager only. DTensor heads sharded by rows (Shard(0), as
        ColwiseParallel's lm_head.weight) take this path without process_group.

    torch.compile (fullgraph=True included) sees the op as one opaque node.
    """
    _refuse_eager_only(process_group=process_group is not None, inplace_backward=False,
                       input=input)
    with distributed.refusing_together(process_group, target if target is not None
                                       else input):
        V, D = _check_head("weight", weight, bias, "bias", input, "input", None)
        if V == 0 and process_group is None:
            raise ValueError("weight has no rows: there must be at least one class")
        _, Dt = _check_head("teacher_weight", teacher_weight, teacher_bias, "teacher_bias",
                            teacher_input, "teacher_input", V)
        if teacher_input.device != input.device:
            raise ValueError(f"teacher_input is on {teacher_input.device} but input is on "
                             f"{input.device}")
        lead = input.shape[:-1]
        if teacher_input.shape[:-1] != lead:
            raise ValueError(f"teacher_input's leading shape {tuple(teacher_input.shape[:-1])} "
                             f"must match input's {tuple(lead)}: one teacher row per student "
                             f"row")
        for name, t in (("teacher_input", teacher_input), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
            if t is not None and t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{name} requires grad, but the teacher gets no gradient: "
                                 f"detach it (or run the teacher under torch.no_grad())")
        N = lead.numel()
        _check_target(target, lead, input.device)
        divergence, beta, temperature, reduction = _check_distill_options(
            divergence, beta, temperature, reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or
                                       not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        use_triton = _use_triton(backend, input)
        if use_triton and teacher_input.dtype not in _KERNEL_DTYPES:
            if backend == "triton":
                raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 "
                                f"teacher_input, got {teacher_input.dtype}; use "
                                f"backend='torch' or 'auto'")
            use_triton = False
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                  for t in (input, weight, bias))
    x, tx = input.reshape(N, D), teacher_input.reshape(N, Dt)
    tgt = target.reshape(N) if target is not None else None
    if process_group is not None:
        with torch.autocast(input.device.type, enabled=False):
            loss = VocabParallelLinearDistillFunction.apply(
                x, weight, bias, tx.detach(), teacher_weight.detach(),
                teacher_bias.detach() if teacher_bias is not None else None, tgt,
                (divergence, beta, temperature, ignore_index, reduction, use_triton),
                process_group, chunk_size, needs)
    else:
        loss = linear_distillation_op(
            x, weight, bias, tx, teacher_weight, teacher_bias, tgt, divergence, float(beta),
            float(temperature), int(ignore_index), reduction, use_triton, chunk_size,
            _schedule(x, chunk_size, vocab_parallel=False), *needs)[0]
    loss = loss.to(loss_dtype(input, teacher_input))
    return loss.view(lead) if reduction == "none" else loss


class LinearDistillationLoss(nn.Module):
    """Module form of linear_distillation_loss: options only, no parameters (both heads are
    passed to forward, so existing nn.Linear weights are used as they are)."""

    def __init__(self, *, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str = "auto",
                 chunk_size: int | None = None) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(
        self,
        input: torch.Tensor,  # (..., D)
        weight: torch.Tensor,  # (V, D)
        teacher_input: torch.Tensor,  # (..., Dt)
        teacher_weight: torch.Tensor,  # (V, Dt)
        target: torch.Tensor | None = None,  # (...)
        bias: torch.Tensor | None = None,  # (V,)
        teacher_bias: torch.Tensor | None = None,  # (V,)
    ) -> torch.Tensor:
        return linear_distillation_loss(
            input, weight, teacher_input, teacher_weight, target, bias=bias,
            teacher_bias=teacher_bias, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        extras = [f"divergence={self.divergence!r}", f"reduction={self.reduction!r}",
                  f"temperature={self.temperature}"]
        if self.divergence == "jsd":
            extras.append(f"beta={self.beta}")
        if self.chunk_size is not None:
            extras.append(f"chunk_size={self.chunk_size}")
        return ", ".join(extras)
