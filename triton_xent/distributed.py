"""Vocab-parallel cross-entropy over torch.distributed: each rank holds a contiguous slice of
the classes, and the loss comes from small per-row statistics, never from gathered logits.

Per row, each rank computes the statistics of its slice (kernel STATS=1, or the plain-PyTorch
twin): m_r = max z, s_r = sum exp(z - m_r), S_r = sum u (m_r - z), U_r = sum u, and z_y if the
target is one of its classes (else 0). They merge exactly as slices of one row do inside the
kernel (kernels/xent.py):
    m = max_r m_r,  s = sum_r s_r exp(m_r - m),  S = sum_r S_r + U_r (m - m_r),  U = sum_r U_r
and then lse = m + log s, loss = a (log s + m - z_y) + b (U log s + S) with b = eps / V for
the global V. Each rank then writes the gradient of its own slice from (m, s, S, U).

Collectives per call, on a group of R ranks and N rows: one all_gather of one int64 per rank
(the slice sizes, hence each rank's first class), one all_reduce MAX of N float32 (m), one
all_reduce SUM of 4N float32 (s, S, U, z_y rescaled to m): 20 N bytes per rank, whatever V.
linear_cross_entropy with the head split by rows makes the same two all-reduces per chunk of
rows (20 bytes a row in all), then one all_reduce SUM of the (N, D) input gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import core, reference

NEG_INF = float("-inf")


def _slice_fns(use_triton: bool):
    if use_triton:
        from .kernels import xent

        return xent.xent_slice_stats, xent.xent_slice_grad
    return reference.slice_stats_torch, reference.slice_grad_torch


def class_slices(n_local: int, device: torch.device, group) -> tuple[int, int]:
    """(first class of this rank, total classes), from every rank's slice size in rank order."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device),
                    group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _merge_across_ranks(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s, S, U) of whole rows (N, 4) and their target logit (N,), from each rank's (N, 5)."""
    m_local, s, S, U, z_y = stats.unbind(1)
    m = m_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_ref = torch.where(m == NEG_INF, 0.0, m)  # a row all -inf everywhere keeps s = 0
    shift = torch.where((m == m_local) | (U == 0), 0.0, m - m_local)
    summed = torch.stack([s * torch.exp(m_local - m_ref), S + U * shift, U, z_y], dim=1)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return torch.cat([m[:, None], summed[:, :3]], dim=1), summed[:, 3]


def sliced_rows(group, class_offset: int, n_classes: int, use_triton: bool):
    """A row function with the contract of kernels.xent.xent_rows for logits (N, V_r, D) that
    are this rank's classes class_offset .. class_offset + V_r - 1 of n_classes: (ce, lse) of
    the whole rows, the same on every rank, and `grad` (if given) filled for the slice.
    Every rank must call it with the same rows: it runs two collectives."""
    stats_fn, grad_fn = _slice_fns(use_triton)

    def rows(logits, target, weight, scale, grad, *, prob_target, ignore_index,
             label_smoothing, lse_square_scale, softcap):
        if prob_target:
            raise ValueError("vocab parallelism takes class-index targets")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        options = dict(class_offset=class_offset, n_classes=n_classes,
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       softcap=softcap)
        stats = stats_fn(logits, target, weight, **options)
        row_stats, z_y = _merge_across_ranks(stats.to(acc), group)
        m, s, S, U = row_stats.unbind(1)
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        active = (target != ignore_index) & ~bad
        w_y = (weight.to(acc)[torch.where(active, target, 0).long()] if weight is not None
               else torch.ones_like(m))
        log_s = torch.log(s)
        ce = (1.0 - label_smoothing) * w_y * (log_s + (m - z_y))
        if label_smoothing > 0:
            ce = ce + label_smoothing / n_classes * (U * log_s + S)
        ce = torch.where(bad, float("nan"), torch.where(active, ce, 0.0))
        if grad is not None:
            grad_fn(logits, target, weight, row_stats.to(stats.dtype), scale, grad,
                    lse_square_scale=lse_square_scale, **options)
        return ce, m + log_s

    return rows


def prepare(problem: core.Problem, n_local: int, target: torch.Tensor,
            weight: torch.Tensor | None, group):
    """(class_offset, n_classes, flat target (int64 or int32), weight as the row functions
    take it), after the checks that every rank makes alike (it holds the same targets and weights)
    before any collective that another rank could be left waiting in."""
    class_offset, n_classes = class_slices(n_local, target.device, group)
    if weight is not None and weight.shape != (n_classes,):
        raise ValueError(f"with a process_group, weight holds all {n_classes} classes' weights "
                         f"on every rank, got shape {tuple(weight.shape)}")
    tgt = target.reshape(-1)  # int64 or int32 (functional._class_indices)
    if problem.check_targets or not problem.use_triton:
        core.check_targets(tgt, n_classes, problem.ignore_index)
    if weight is not None and problem.use_triton:
        weight = weight.to(torch.float32).contiguous()
    return class_offset, n_classes, tgt, weight


def forward(problem: core.Problem, input: torch.Tensor, target: torch.Tensor,
            weight: torch.Tensor | None, group, *, compute_grad: bool):
    """(loss, lse, grad of the local slice): the loss of the full problem, on every rank."""
    logits = core.rows_view(input)
    N, V_local, D = logits.shape
    class_offset, n_classes, tgt, weight = prepare(problem, V_local, target, weight, group)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    active, weight_sum, count = core.denominators(problem, tgt, weight, N * D, n_classes, acc)
    scale = grad = None
    if compute_grad:
        if problem.reduction == "mean":
            scale = torch.stack([1.0 / weight_sum, 1.0 / count])
            scale = scale.to(torch.float32 if problem.use_triton else acc)
        grad = torch.empty((N, V_local, D), dtype=input.dtype, device=input.device)
    rows = sliced_rows(group, class_offset, n_classes, problem.use_triton)
    ce, lse = rows(logits, tgt, weight, scale, grad, **problem.row_kwargs())
    loss_shape = core.row_shape(input, target, prob_target=False)
    loss = core.reduce_rows(problem, ce, lse, active, weight_sum, count, loss_shape)
    if grad is not None:
        grad = grad.reshape(input.shape)
    return loss.to(input.dtype), lse.to(torch.float32).view(loss_shape), grad
