"""Distillation from logits: what both backends share, between the public function and the
kernels (kernels/distill.py, which states the math) or their plain-PyTorch twins
(reference.py): the row view of (..., V) logits, each row's factor from the target and the
reduction, the long rows' path (config.LONG_ROWS: the row sweep, or the stages), the
vocab-parallel driver, the loss's assembly, and the backward's scale.

The stage functions below are the internal interface the linear op and the vocab-parallel
path build on; each takes `use_triton` to pick the backend:

    distill_rows(student, teacher, grad, row_scale, *, divergence, beta, temperature,
                 use_triton) -> (R,) per-row loss, unscaled (0 where row_scale is 0); writes
                 grad = row_scale * dloss/dx_s
    distill_stats(student, teacher, *, temperature, use_triton) -> (R, 6) statistics of the
                 columns here (m_s, s_s, m_t, s_t, D_t, D_s), merged over them
    merge_stats(stats) -> (R, 6): (R, P, 6) statistics of P column sets (slices, ranks)
                 merged into those of the whole rows
    distill_terms(student, teacher, merged, *, beta, temperature, use_triton) -> (R, 2)
                 JSD only: the sums of J's and K's terms (K = KL(p_s || M)) over the columns
                 here, which add up over column sets
    row_losses(merged, terms, divergence) -> (loss, kl_s), each (R,): kl_s is what the
                 gradient needs (RKL for reverse KL, K for JSD, None for forward KL)
    distill_grad(student, teacher, merged, kl_s, grad, row_scale, *, divergence, beta,
                 temperature, use_triton): writes the gradient of the columns here

student, teacher and grad are (R, V) or (N, D, V) (rows r = n * D + d), any strides; grad
may alias student. row_scale is (R,) float32 contiguous or None (1). Results are float32
(float64 for float64 input on the PyTorch backend).

Vocab parallelism (distill_rows_vocab_parallel, after prepare_distill's one all_gather of
facts, distributed.agreed_facts): student and teacher are sharded alike; each rank's six
statistics per row (distill_stats) are all-gathered and merged as the slices of one row
are, and JSD all-reduces its two sums of terms per row: 24 R bytes from each rank, plus 8 R
for JSD. This module builds on distributed.py, which never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import config, core, distributed, reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")


# --- the stages, by backend -------------------------------------------------------------------


def _kernels():
    from .kernels import distill  # imported here: triton is optional on CPU-only installs

    return distill


def distill_rows(student, teacher, grad, row_scale, *, divergence, beta, temperature,
                 use_triton):
    """Per-row loss and gradient of whole rows: one kernel for rows of at most
    config.ROW_SLICE_MAX_V columns; longer rows by config.LONG_ROWS, as cross-entropy's:
    "sweep", one kernel whose programs walk whole rows (kernels.distill.distill_sweep);
    "two_pass" and "exchange" (distillation has no exchange: it takes "two_pass"), the
    stages (stats, merge, JSD's terms, grad), no program waiting on another."""
    options = dict(divergence=divergence, beta=beta, temperature=temperature)
    if not use_triton:
        return reference.distill_rows_torch(student, teacher, grad, row_scale, **options)
    kd = _kernels()
    path = config.long_rows()  # a bad LONG_ROWS fails every call, not only long rows'
    if student.shape[-1] <= config.ROW_SLICE_MAX_V:
        return core.on_tensors_device(kd.distill_rows)(student, teacher, grad, row_scale,
                                                        **options)
    if path == "sweep":
        return core.on_tensors_device(kd.distill_sweep)(student, teacher, grad, row_scale,
                                                         **options)
    with core.device_guard(student.device):
        merged = merge_stats(kd.distill_slice_stats(student, teacher, temperature=temperature))
        terms = None
        if divergence == "jsd":
            terms = kd.distill_slice_terms(student, teacher, merged, beta=beta,
                                           temperature=temperature).sum(1)
        loss, kl_s = row_losses(merged, terms, divergence)
        if grad is not None:
            kd.distill_slice_grad(student, teacher, merged, kl_s, grad, row_scale, **options)
    return loss if row_scale is None else torch.where(row_scale == 0, 0.0, loss)


def _n_rows(x: torch.Tensor) -> int:
    return x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)


def distill_stats(student, teacher, *, temperature, use_triton):
    """(R, 6) statistics of the columns here; those of no column (a rank's empty slice: m =
    -inf, s = D = 0) add nothing when merged."""
    if student.shape[-1] == 0:
        dtype = torch.float32 if use_triton else core.acc_dtype(student.dtype)
        stats = torch.zeros((_n_rows(student), 6), dtype=dtype, device=student.device)
        stats[:, [0, 2]] = float("-inf")
        return stats
    if not use_triton:
        return reference.distill_stats_torch(student, teacher, temperature=temperature)
    stats = core.on_tensors_device(_kernels().distill_slice_stats)(student, teacher,
                                                                    temperature=temperature)
    return merge_stats(stats)


merge_stats = reference.merge_stats
row_losses = reference.row_losses


def distill_terms(student, teacher, merged, *, beta, temperature, use_triton):
    """(R, 2) JSD sums over the columns here, from the whole rows' merged statistics."""
    if student.shape[-1] == 0:
        return merged.new_zeros((_n_rows(student), 2))
    if not use_triton:
        return reference.distill_terms_torch(student, teacher, merged, beta=beta,
                                             temperature=temperature)
    return core.on_tensors_device(_kernels().distill_slice_terms)(
        student, teacher, merged, beta=beta, temperature=temperature).sum(1)


def distill_grad(student, teacher, merged, kl_s, grad, row_scale, *, divergence, beta,
                 temperature, use_triton):
    """Writes grad = row_scale * dloss/dx_s of the columns here."""
    if student.shape[-1] == 0:
        return
    fn = (core.on_tensors_device(_kernels().distill_slice_grad) if use_triton
          else reference.distill_grad_torch)
    fn(student, teacher, merged, kl_s, grad, row_scale, divergence=divergence, beta=beta,
       temperature=temperature)


# --- vocab parallelism -----------------------------------------------------------------------


def prepare_distill(n_local: int, target: torch.Tensor | None, n_rows: int, group,
                    device: torch.device) -> int:
    """The number of classes of all ranks, after the checks every rank runs alike from one
    all_gather of facts (so that a failing call raises everywhere instead of leaving a rank
    waiting in a collective; distributed.agreed_facts). Without a target, a marker of n_rows
    rows stands for it, on `device` (the collective's: NCCL's is a GPU). The targets' range
    is not checked (distillation reads no class from them), so any ignore_index does."""
    marker = (target.reshape(-1) if target is not None
              else torch.zeros(n_rows, dtype=torch.int64, device=device))
    sizes, _, _ = distributed.agreed_facts(n_local, marker, -1, group, "rows")
    return sum(sizes)


def distill_rows_vocab_parallel(student, teacher, grad, row_scale, *, divergence, beta,
                                temperature, use_triton, group):
    """distill_rows over a group: student and teacher are this rank's slice of the classes
    (the same slice of both, possibly empty); every rank gets the whole rows' loss and
    writes its slice of the gradient. Every rank must call it with the same rows.

    The (R, 6) statistics of each rank's columns (distill_stats) are all-gathered and
    merged as slices of one row are (merge_stats: maxes, then each sum rescaled to them);
    JSD then all-reduces (SUM) its (R, 2) sums of terms over the local columns
    (distill_terms); each rank writes its gradient from the merged statistics
    (distill_grad). The stage kernels whatever config.LONG_ROWS: a rank's columns are a
    slice of the rows. Per call: 24 R bytes a rank gathered from each rank (float32), plus
    8 R all-reduced for JSD, whatever V."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    # an empty slice has the statistics of nothing (maxes -inf, sums 0): it merges as nothing
    stats = distill_stats(student, teacher, temperature=temperature,
                          use_triton=use_triton).to(acc)
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, stats.contiguous(), group=group)
    merged = merge_stats(torch.stack(gathered, 1))  # (R, P, 6) -> (R, 6)
    terms = None
    if divergence == "jsd":
        terms = distill_terms(student, teacher, merged, beta=beta, temperature=temperature,
                              use_triton=use_triton).to(acc)
        dist.all_reduce(terms, group=group)
    loss, kl_s = row_losses(merged, terms, divergence)
    if grad is not None and grad.numel() > 0:
        distill_grad(student, teacher, merged, kl_s, grad, row_scale, divergence=divergence,
                     beta=beta, temperature=temperature, use_triton=use_triton)
    return loss if row_scale is None else torch.where(row_scale == 0, 0.0, loss)


# --- the op ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillProblem:
    """The options of one distillation_loss call, after validation."""

    divergence: str  # "forward_kl" | "reverse_kl" | "jsd"
    beta: float
    temperature: float
    ignore_index: int
    reduction: str  # "batchmean" | "sum" | "none"
    use_triton: bool

    def stage_kwargs(self) -> dict:
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                    use_triton=self.use_triton)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(V,) -> (1, 1, V); (R, V) -> (R, 1, V); (B, T, V) as is; (d1, ..., dk, T, V) ->
    (d1 * ... * dk, T, V). A view but for the last when the strides do not allow it."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.flatten(0, -3) if x.dim() > 3 else x


def row_scale(problem: DistillProblem, target: torch.Tensor | None, n_rows: int,
              device: torch.device, dtype: torch.dtype):
    """(row_scale, inverse count): the factor of each row's loss and gradient, (n_rows,) in
    `dtype` or None for 1, and "batchmean"'s 1 / max(counted rows, 1) (a tensor on the
    device: no host sync), else None. Ignored rows get 0; with no row counted, "batchmean"
    gives loss 0 and a zero gradient."""
    active = target.reshape(-1) != problem.ignore_index if target is not None else None
    if problem.reduction != "batchmean":
        return (active.to(dtype) if active is not None else None), None
    if active is None:
        inv = torch.full((), 1.0 / max(n_rows, 1), dtype=dtype, device=device)
        return inv.expand(n_rows).contiguous(), inv
    inv = 1.0 / active.sum().clamp(min=1).to(dtype)
    return torch.where(active, inv, 0.0), inv


def forward(problem: DistillProblem, input: torch.Tensor, teacher: torch.Tensor,
            target: torch.Tensor | None, *, compute_grad: bool, process_group=None):
    """(loss, grad): the reduced loss in core.acc_dtype(input.dtype) (the caller casts it),
    and dloss/dinput shaped like input (None unless compute_grad), pre-scaled by the
    reduction. With a process_group, input and teacher are this rank's slice of the classes
    (distill_rows_vocab_parallel). Autocast is off inside."""
    with torch.autocast(input.device.type, enabled=False):
        s3, t3 = rows_view(input), rows_view(teacher)
        N, D, V = s3.shape
        n_rows = N * D
        acc = core.acc_dtype(input.dtype)
        scale, inv_count = row_scale(problem, target, n_rows, input.device,
                                     torch.float32 if problem.use_triton else acc)
        grad = (torch.empty((N, D, V), dtype=input.dtype, device=input.device)
                if compute_grad else None)
        if process_group is None:
            rows_fn = distill_rows
        else:
            prepare_distill(V, target, n_rows, process_group, input.device)

            def rows_fn(*args, **kwargs):
                return distill_rows_vocab_parallel(*args, group=process_group, **kwargs)
        loss_rows = rows_fn(s3, t3, grad, scale, **problem.stage_kwargs()).to(acc)
        if problem.reduction == "none":
            loss = loss_rows.view(input.shape[:-1])
        elif problem.reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() * inv_count.to(acc)
        return loss, grad.view(input.shape) if grad is not None else None


def scale_saved_grad(problem: DistillProblem, grad: torch.Tensor,
                     grad_loss: torch.Tensor) -> torch.Tensor:
    """A backward: grad * grad_loss (a scalar, or one per row for "none"), in place when the
    saved gradient is spent (core.saved_grad_is_spent)."""
    if grad.numel() == 0:  # a rank's empty class slice (vocab parallelism): nothing to scale
        return grad
    V = grad.shape[-1]
    rows = grad.reshape(-1, V, 1)  # a view: the forward allocated it contiguous
    go = grad_loss.reshape(-1)
    if not core.saved_grad_is_spent(grad):
        factor = go.view(-1, 1, 1) if problem.reduction == "none" else go.reshape(())
        return (rows * factor).to(grad.dtype).view(grad.shape)
    _, scale_fn = core.row_fns(problem.use_triton)
    scale_fn(rows, go)
    return grad
