"""Vocab-parallel cross-entropy over torch.distributed: each rank holds a contiguous slice of
the classes, and the loss comes from small per-row statistics, never from gathered logits.

Per row, each rank computes the statistics of its slice (the slice-statistics kernel, or
the plain-PyTorch twin): m_r = max z, s_r = sum exp(z - m_r), S_r = sum u (m_r - z),
U_r = sum u, Q_r = sum exp(z - m_r) (z - m_r) (the entropy's), and z_y if the target is one
of its classes (else 0), all of the tempered logits. They merge exactly as slices of one row
do inside the kernel (kernels/xent.py):
    m = max_r m_r,  s = sum_r s_r exp(m_r - m),  S = sum_r S_r + U_r (m - m_r),  U = sum_r U_r,
    Q = sum_r exp(m_r - m) (Q_r + s_r (m_r - m))
and then lse = m + log s, loss = a (log s + m - z_y) + b (U log s + S) with b = eps / V for
the global V, and H = log s - Q / s. Each rank then writes the gradient of its own slice
from (m, s, S, U, H). The argmax is the least global index among the ranks whose own max is m.

Collectives per call, on a group of R ranks and N rows: one all_gather of six int64 per rank
(the slice size, hence each rank's first class, and what every rank checks alike before
anything else: its row count, its targets' range, a fingerprint of them, and whether its
own argument checks failed), one all_reduce MAX of N floats (m), one all_reduce SUM of 5N
floats (s, S, U, Q, z_y rescaled to m): 24 N bytes per rank in float32 (48 N in float64),
whatever V; return_argmax adds an all_reduce MIN of N int64. The returned entropy's
gradient is recomputed in backward, with these collectives again. linear_cross_entropy with
the head split by rows makes the same two all-reduces per chunk of rows (24 bytes a row),
then one all_reduce SUM of the (N, D) input gradient; with reduction "none" and a trainable
head its backward recomputes the chunks: two more all-reduces per chunk and that of the
input gradient again.

A rank's slice may be empty (m = -inf, s = S = U = 0: it adds nothing), as long as some
rank holds a class. The same statistics, merged in one process (merge_slices) over blocks of
classes instead of ranks, are the linear op's "vocab" schedule (linear.py, chunks.py).

Vocab-parallel distillation (distill.py) builds on the same checks (agreed_facts) and runs
its own collectives; this module never imports it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import core, reference

NEG_INF = float("-inf")


def slice_fns(use_triton: bool):
    """(slice statistics, slice gradient) of the backend: the functions that split a row's
    classes into slices (ranks here, blocks of classes in the linear ops' "vocab"
    schedule)."""
    if use_triton:
        from .kernels import xent

        return (core.on_tensors_device(xent.xent_slice_stats),
                core.on_tensors_device(xent.xent_slice_grad))
    return reference.slice_stats_torch, reference.slice_grad_torch


_BIG = 2**62  # above any class index: the neutral element of the targets' minimum
_N_FACTS = 6


def _all_gather(mine: torch.Tensor, group) -> list:
    """Every rank's _N_FACTS int64, in rank order: the call's first collective."""
    facts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(facts, mine, group=group)
    return torch.stack(facts).tolist()


def _gather_facts(n_local: int, target: torch.Tensor, ignore_index: int, group) -> list:
    """Every rank's [slice size, rows, least and largest counted target, fingerprint of the
    targets, refused] in rank order, from one all_gather (and one host sync)."""
    t = target.long()
    counted = t != ignore_index
    pad = t.new_full((1,), _BIG)
    position = torch.arange(1, t.numel() + 1, device=t.device)
    mine = torch.stack([
        torch.tensor(n_local, device=t.device), torch.tensor(t.numel(), device=t.device),
        torch.cat([torch.where(counted, t, _BIG), pad]).amin(),
        torch.cat([torch.where(counted, t, -_BIG), -pad]).amax(),
        (t * position).sum(),  # differs (almost surely) when the targets or their order do
        torch.tensor(0, device=t.device),
    ])
    return _all_gather(mine, group)


def _refusals(message: str | None, group) -> list:
    """Every rank's reason for refusing its arguments (None where it did not), in rank order:
    the collective that follows a first all_gather in which some rank refused."""
    reasons = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, message, group=group)
    return reasons


def agreed_facts(n_local: int, target: torch.Tensor, ignore_index: int, group,
                  rows_name: str) -> tuple:
    """(slice sizes, least and largest counted targets) of every rank, in rank order, after
    the checks all ranks run alike on them: every rank accepted its arguments, holds the
    same rows and the same targets, and some rank holds a class."""
    facts = _gather_facts(n_local, target, ignore_index, group)
    sizes, rows, lows, highs, prints, refused = zip(*facts)
    if any(refused):
        reasons = _refusals(None, group)
        raise ValueError("with a process_group every rank must accept its arguments; " +
                         "; ".join(f"rank {r} refused them ({why})"
                                   for r, why in enumerate(reasons) if why is not None))
    if len(set(rows)) > 1:
        raise ValueError(f"with a process_group every rank passes the same rows; the ranks "
                         f"hold {list(rows)} {rows_name}")
    if len(set(prints)) > 1:
        raise ValueError("with a process_group every rank passes the same (global) targets; "
                         "they differ between ranks")
    if sum(sizes) == 0:
        raise ValueError("with a process_group some rank must hold a class; every slice "
                         "is empty")
    return sizes, lows, highs


@contextlib.contextmanager
def refusing_together(group, device_hint):
    """Runs one rank's local argument checks. With a group, a rank whose checks raise first
    joins the call's first collective as a refusal (and the exchange of reasons after it),
    so that the other ranks raise too, naming it, instead of waiting there; then it raises
    its own error. `device_hint`: a tensor argument, for the device of that collective."""
    if group is None:
        yield
        return
    try:
        yield
    except Exception as error:
        if isinstance(device_hint, torch.Tensor):
            device = device_hint.device
        elif dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        mine = torch.zeros(_N_FACTS, dtype=torch.int64, device=device)
        mine[-1] = 1
        _all_gather(mine, group)
        _refusals(f"{type(error).__name__}: {error}", group)
        raise


def _merge_across_ranks(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s, S, U, Q) of whole rows (N, 5) and their target logit (N,), from each rank's
    (N, 6) rows of (m, s, S, U, z_y, Q)."""
    m_local, s, S, U, z_y, Q = stats.unbind(1)
    m = m_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_ref = torch.where(m == NEG_INF, 0.0, m)  # a row all -inf everywhere keeps s = 0
    scale = torch.exp(m_local - m_ref)
    shift = torch.where((m == m_local) | (U == 0), 0.0, m - m_local)
    q_shift = torch.where((m == m_local) | (s == 0), 0.0, m_local - m)
    summed = torch.stack([s * scale, S + U * shift, U, scale * (Q + s * q_shift), z_y], dim=1)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return torch.cat([m[:, None], summed[:, :4]], dim=1), summed[:, 4]


def _argmax_across_ranks(idx: torch.Tensor, m_local: torch.Tensor, m: torch.Tensor,
                         group) -> torch.Tensor:
    """The first global index of each row's maximum: the least index among the ranks whose
    own maximum is the row's (a third collective, only for return_argmax)."""
    candidate = torch.where(m_local == m, idx, _BIG)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


def sliced_rows(group, class_offset: int, n_classes: int, use_triton: bool):
    """A row function with the contract of kernels.xent.xent_rows for logits (N, V_r, D) that
    are this rank's classes class_offset .. class_offset + V_r - 1 of n_classes: (ce, lse,
    H, argmax) of the whole rows, the same on every rank, and `grad` (if given) filled for
    the slice. Every rank must call it with the same rows: it runs two collectives (three
    with argmax)."""
    stats_fn, grad_fn = slice_fns(use_triton)

    def rows(logits, target, weight, scale, grad, row_weight=None, entropy_weight=None, *,
             prob_target, ignore_index, label_smoothing, lse_square_scale, softcap,
             temperature=1.0, entropy=False, argmax=False):
        if prob_target:
            raise ValueError("vocab parallelism takes class-index targets")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        options = dict(class_offset=class_offset, n_classes=n_classes,
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       softcap=softcap, temperature=temperature)
        entropy = entropy or entropy_weight is not None  # the gradient's dH needs H
        if logits.shape[1] == 0:  # an empty slice: max -inf, and sums of nothing
            stats = torch.zeros((target.numel(), 6), dtype=acc, device=logits.device)
            stats[:, 0] = NEG_INF
            idx = torch.full((target.numel(),), _BIG, dtype=torch.int64,
                             device=logits.device)
        else:
            stats, idx = stats_fn(logits, target, weight, entropy=entropy, argmax=argmax,
                                  **options)
        stats = stats.to(acc)
        row_stats, z_y = _merge_across_ranks(stats, group)
        ce, lse, H, grad_stats, active = slice_row_results(
            row_stats, z_y, target, weight, n_classes=n_classes, ignore_index=ignore_index,
            label_smoothing=label_smoothing, entropy=entropy)
        if argmax:
            idx = _argmax_across_ranks(idx, stats[:, 0], row_stats[:, 0], group)
            idx = torch.where(active, idx, -1)
        if grad is not None and grad.numel() > 0:
            grad_fn(logits, target, weight, grad_stats.to(stats.dtype), scale, grad,
                    row_weight, entropy_weight, lse_square_scale=lse_square_scale, **options)
        return ce, lse, H, idx

    return rows


def slice_row_results(row_stats: torch.Tensor, z_y: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None, *, n_classes: int, ignore_index: int,
                      label_smoothing: float, entropy: bool) -> tuple:
    """(ce, lse, H or None, grad_stats, active) of whole rows from their merged statistics
    row_stats (N, 5) = (m, s, S, U, Q) and target logit z_y (N,) (see the module docstring):
    ce and H are 0 on ignored rows and NaN on rows whose target is out of range;
    grad_stats (N, 5) = (m, s, S, U, H) is what the slice-gradient functions take; active
    (N,) bool marks the rows with a target in range."""
    m, s, S, U, Q = row_stats.unbind(1)
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    active = (target != ignore_index) & ~bad
    w_y = (weight.to(m.dtype)[torch.where(active, target, 0).long()] if weight is not None
           else torch.ones_like(m))
    log_s = torch.log(s)
    ce = (1.0 - label_smoothing) * w_y * (log_s + (m - z_y))
    if label_smoothing > 0:
        ce = ce + label_smoothing / n_classes * (U * log_s + S)
    ce = torch.where(bad, float("nan"), torch.where(active, ce, 0.0))
    H = None
    if entropy:  # H = log s - Q / s, two terms >= 0 (see kernels/xent.py)
        H = torch.where(bad, float("nan"), torch.where(active, log_s - Q / s, 0.0))
    grad_stats = torch.stack([m, s, S, U, H if H is not None else torch.zeros_like(m)], dim=1)
    return ce, m + log_s, H, grad_stats, active


def merge_slices(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s, S, U, Q) of whole rows (N, 5) and their target logit (N,), from (N, P, 6) rows
    of (m, s, S, U, z_y, Q) of P column slices of them held in one process (the merge that
    _merge_across_ranks makes over ranks)."""
    m_p, s, S, U, z_y, Q = stats.unbind(2)  # each (N, P)
    m = m_p.amax(1, keepdim=True)
    m_ref = torch.where(m == NEG_INF, 0.0, m)  # a row all -inf everywhere keeps s = 0
    scale = torch.exp(m_p - m_ref)
    shift = torch.where((m == m_p) | (U == 0), 0.0, m - m_p)
    q_shift = torch.where((m == m_p) | (s == 0), 0.0, m_p - m)
    merged = torch.stack([m.squeeze(1), (s * scale).sum(1), (S + U * shift).sum(1), U.sum(1),
                          (scale * (Q + s * q_shift)).sum(1)], dim=1)
    return merged, z_y.sum(1)


def prepare(problem: core.Problem, n_local: int, target: torch.Tensor,
            weight: torch.Tensor | None, group):
    """(class_offset, n_classes, flat target (int64 or int32), weight as the row functions
    take it). The checks run on every rank alike, from facts all ranks have gathered, so
    that a failing call raises everywhere instead of leaving a rank waiting in a collective:
    the same rows and targets on every rank, some class somewhere, targets in range."""
    tgt = target.reshape(-1)  # int64 or int32 (functional._class_indices)
    sizes, lows, highs = agreed_facts(n_local, tgt, problem.ignore_index, group,
                                       "target rows")
    n_classes = sum(sizes)
    class_offset = sum(sizes[:dist.get_rank(group)])
    if weight is not None and weight.shape != (n_classes,):
        raise ValueError(f"with a process_group, weight holds all {n_classes} classes' weights "
                         f"on every rank, got shape {tuple(weight.shape)}")
    if problem.check_targets or not problem.use_triton:
        low, high = min(lows), max(highs)
        if high >= n_classes or low < 0:
            value = high if high >= n_classes else low
            raise core.target_out_of_bounds(value, n_classes, problem.ignore_index)
    if weight is not None and problem.use_triton:
        weight = weight.to(torch.float32).contiguous()
    return class_offset, n_classes, tgt, weight


def forward(problem: core.Problem, input: torch.Tensor, target: torch.Tensor,
            weight: torch.Tensor | None, group, row_weight: torch.Tensor | None = None,
            entropy_weight: torch.Tensor | None = None, *, compute_grad: bool):
    """(loss, lse, H, argmax, grad of the local slice): the loss of the full problem, on
    every rank, in core.acc_dtype (the caller casts it); H and argmax None unless the
    problem asks for them (see core.forward)."""
    logits = core.rows_view(input)
    N, V_local, D = logits.shape
    class_offset, n_classes, tgt, weight = prepare(problem, V_local, target, weight, group)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    active, weight_sum, count = core.denominators(problem, tgt, weight, N * D, n_classes, acc)
    r, e, e_grad = core.row_coefficients(problem, row_weight, entropy_weight, active, count,
                                         N * D, acc)
    scale = grad = None
    if compute_grad:
        if problem.reduction == "mean":
            scale = torch.stack([1.0 / weight_sum, 1.0 / count])
            scale = scale.to(torch.float32 if problem.use_triton else acc)
        grad = torch.empty((N, V_local, D), dtype=input.dtype, device=input.device)
    kernel_dtype = torch.float32 if problem.use_triton else acc
    rows = sliced_rows(group, class_offset, n_classes, problem.use_triton)
    kwargs = problem.row_kwargs()
    kwargs["entropy"] = problem.entropy or e is not None
    ce, lse, H, idx = rows(
        logits, tgt, weight, scale, grad,
        r.to(kernel_dtype).contiguous() if r is not None and compute_grad else None,
        e_grad.to(kernel_dtype).contiguous() if e_grad is not None and compute_grad else None,
        **kwargs)
    loss_shape = core.row_shape(input, target, prob_target=False)
    loss = core.reduce_rows(problem, ce, lse, H, r, e, active, weight_sum, count, loss_shape)
    if grad is not None:
        grad = grad.reshape(input.shape)
    return (loss, lse.to(torch.float32).view(loss_shape),
            H.to(torch.float32).view(loss_shape) if problem.entropy else None,
            idx.view(loss_shape) if idx is not None else None, grad)
