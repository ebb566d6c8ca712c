"""The plain-PyTorch backend: the CPU fallback and the readable statement of the semantics.

It computes exactly what the Triton kernel computes (see kernels/xent.py for the math), row
chunk by row chunk, so that it never holds more than about four float32 copies of one chunk
(config.TORCH_CHUNK_ELEMENTS elements), whatever the batch size:

    log p = log_softmax(z)                         (z = softcap * tanh(x / softcap) if capped)
    ce    = a * (-log p_y) + b * sum_c u_c * (-log p_c)
    grad  = p * (a + b * U) - b * u - a * onehot(y)            (then * (1 - (z/softcap)^2))
with a = (1 - eps) w_y, b = eps / V, u = w for class indices; a = 0, b = 1,
u = w * ((1 - eps) t + eps / V) for class probabilities; U = sum_c u_c.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import config


def _row_chunks(N: int, D: int, V: int) -> Iterator[tuple[int, int, int, int]]:
    """(n0, n1, d0, d1) blocks of rows of a (N, V, D) tensor, each a contiguous range of the
    flat row index n * D + d, holding about config.TORCH_CHUNK_ELEMENTS logits."""
    if N * D == 0:
        return
    rows = max(1, config.TORCH_CHUNK_ELEMENTS // max(V, 1))
    if D >= rows:
        for n in range(N):
            for d0 in range(0, D, rows):
                yield n, n + 1, d0, min(D, d0 + rows)
    else:
        per = max(1, rows // D)
        for n0 in range(0, N, per):
            yield n0, min(N, n0 + per), 0, D


def _chunk(
    x: torch.Tensor,  # (R, V) logits of R rows
    target: torch.Tensor,  # (R,) class indices, or (R, V) probabilities
    weight: torch.Tensor | None,  # (V,)
    scale: torch.Tensor | None,  # (2,) gradient factors of the CE and z-loss terms
    *,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ce (R,), lse (R,) and the gradient (R, V) of one chunk, in the accumulation dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, V = x.shape
    z = x.to(acc)
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    w = weight.to(acc) if weight is not None else None

    if prob_target:
        active = torch.ones(R, dtype=torch.bool, device=x.device)
        q = target.to(acc)
        if label_smoothing > 0:
            q = (1.0 - label_smoothing) * q + label_smoothing / V
        u = q * w if w is not None else q
        a = torch.zeros(R, dtype=acc, device=x.device)
        b = 1.0
        ce = -(logp * u).sum(-1)
        U = u.sum(-1)
    else:
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        active = (target != ignore_index) & ~bad
        y = torch.where(active, target, 0).long()
        w_y = w[y] if w is not None else torch.ones(R, dtype=acc, device=x.device)
        a = torch.where(active, (1.0 - label_smoothing) * w_y, 0.0)
        ce = a * -logp.gather(1, y[:, None]).squeeze(1)
        b = label_smoothing / V if V > 0 else 0.0
        u = w if w is not None else torch.ones(V, dtype=acc, device=x.device)
        U = u.sum()
        if label_smoothing > 0:
            ce = ce + b * -(logp * u).sum(-1)
        ce = torch.where(active, ce, 0.0)
        # An out-of-range target reaches here only with checks off: NaN, like the kernel.
        ce = torch.where(bad, float("nan"), ce)

    grad = None
    if compute_grad:
        s_ce, s_z = (scale[0], scale[1]) if scale is not None else (1.0, 1.0)
        coef = (a + b * U) * s_ce
        if lse_square_scale != 0.0:
            coef = coef + 2.0 * lse_square_scale * lse * s_z
        grad = logp.exp_().mul_(coef[:, None])
        if prob_target or label_smoothing > 0:
            grad -= (b * s_ce) * u
        if not prob_target:
            grad.scatter_add_(1, y[:, None], -(a * s_ce)[:, None])
            grad = torch.where(active[:, None], grad, 0.0)
            grad = torch.where(bad[:, None], float("nan"), grad)
        if softcap is not None:
            grad *= 1.0 - tanh * tanh
    return ce, lse, grad


def xent_rows_torch(
    logits: torch.Tensor,  # (N, V, D), any float dtype, any strides
    target: torch.Tensor,  # (N*D,) integer class indices, or (N, V, D) float probabilities
    weight: torch.Tensor | None,  # (V,)
    scale: torch.Tensor | None,  # (2,) float32: gradient factors of the CE and z-loss terms
    grad: torch.Tensor | None,  # (N, V, D) gradient output (may alias logits), or None
    *,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.xent.xent_rows: (ce, lse) of shape (N*D,), `grad` filled."""
    N, V, D = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = torch.empty(N * D, dtype=acc, device=logits.device)
    lse = torch.empty(N * D, dtype=acc, device=logits.device)
    x_rows = logits.movedim(1, 2)  # (N, D, V) view
    g_rows = grad.movedim(1, 2) if grad is not None else None
    t_rows = target.movedim(1, 2) if prob_target else target.view(N, D)
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        flat = slice(n0 * D + d0, (n1 - 1) * D + d1)
        t = t_rows[n0:n1, d0:d1]
        c_ce, c_lse, c_grad = _chunk(
            x_rows[n0:n1, d0:d1].reshape(-1, V),
            t.reshape(-1, V) if prob_target else t.reshape(-1),
            weight, scale,
            prob_target=prob_target, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            softcap=softcap, compute_grad=g_rows is not None,
        )
        ce[flat] = c_ce
        lse[flat] = c_lse
        if g_rows is not None:
            g_rows[n0:n1, d0:d1] = c_grad.view(n1 - n0, d1 - d0, V)
    return ce, lse


def scale_rows_torch_(
    grad: torch.Tensor,  # (N, V, D), scaled in place
    grad_output: torch.Tensor,  # (N*D,) per row, or a single value
) -> torch.Tensor:
    """grad[n, :, d] *= grad_output[n * D + d] in place (plain PyTorch)."""
    N, V, D = grad.shape
    go = grad_output.reshape(-1)
    factor = go.view(N, 1, D) if go.numel() == N * D and go.numel() != 1 else go.reshape(())
    return grad.mul_(factor)


# --- rows that are a slice of the classes (vocab parallelism, distributed.py) --------------


def _slice_chunk(x, target, weight, class_offset, n_classes, label_smoothing, softcap,
                 ignore_index):
    """Common part of a chunk of a class slice: z, tanh, u, and the target's position."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, V = x.shape
    z = x.to(acc)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    u = (weight[class_offset:class_offset + V].to(acc) if weight is not None
         else torch.ones(V, dtype=acc, device=x.device))
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    active = (target != ignore_index) & ~bad
    y = target - class_offset
    has_y = active & (y >= 0) & (y < V)
    y = torch.where(has_y, y, 0).long()
    w_y = (weight.to(acc)[torch.where(active, target, 0).long()] if weight is not None
           else torch.ones(R, dtype=acc, device=x.device))
    return z, tanh, u, active, bad, has_y, y, w_y


def slice_stats_torch(logits, target, weight, *, class_offset, n_classes, ignore_index,
                      label_smoothing, softcap):
    """Same contract as kernels.xent.xent_slice_stats: (N*D, 5) rows of (m, s, S, U, z_y)."""
    N, V, D = logits.shape
    x_rows = logits.movedim(1, 2)
    t_rows = target.view(N, D)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    stats = torch.zeros((N * D, 5), dtype=acc, device=logits.device)
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        z, _, u, _, _, has_y, y, _ = _slice_chunk(
            x_rows[n0:n1, d0:d1].reshape(-1, V), t_rows[n0:n1, d0:d1].reshape(-1), weight,
            class_offset, n_classes, label_smoothing, softcap, ignore_index)
        m = z.amax(-1, keepdim=True)
        m_ref = torch.where(m == float("-inf"), 0.0, m)
        part = stats[n0 * D + d0:(n1 - 1) * D + d1]
        part[:, 0] = m.squeeze(1)
        part[:, 1] = torch.exp(z - m_ref).sum(-1)
        if label_smoothing > 0:
            part[:, 2] = (u * torch.where((u == 0) | (z == m), 0.0, m - z)).sum(-1)
            part[:, 3] = u.sum()
        part[:, 4] = torch.where(has_y, z.gather(1, y[:, None]).squeeze(1), 0.0)
    return stats


def slice_grad_torch(logits, target, weight, stats, scale, grad, *, class_offset, n_classes,
                     ignore_index, label_smoothing, lse_square_scale, softcap):
    """Same contract as kernels.xent.xent_slice_grad: the slice's gradient from the (m, s, S, U)
    of the whole rows (see the module docstring for the formula)."""
    N, V, D = logits.shape
    x_rows = logits.movedim(1, 2)
    g_rows = grad.movedim(1, 2)
    t_rows = target.view(N, D)
    s_ce, s_z = (scale[0], scale[1]) if scale is not None else (1.0, 1.0)
    b = label_smoothing / n_classes
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        flat = slice(n0 * D + d0, (n1 - 1) * D + d1)
        z, tanh, u, active, bad, has_y, y, w_y = _slice_chunk(
            x_rows[n0:n1, d0:d1].reshape(-1, V), t_rows[n0:n1, d0:d1].reshape(-1), weight,
            class_offset, n_classes, label_smoothing, softcap, ignore_index)
        m, s, _, U = (stats[flat, k].to(z.dtype) for k in range(4))
        a = torch.where(active, (1.0 - label_smoothing) * w_y, 0.0)
        coef = (a + b * U) * s_ce
        if lse_square_scale != 0.0:
            coef = coef + 2.0 * lse_square_scale * (m + torch.log(s)) * s_z
        g = torch.exp(z - m[:, None]) / s[:, None] * coef[:, None]
        if label_smoothing > 0:
            g = g - (b * s_ce) * u
        g = g - torch.zeros_like(g).scatter_(1, y[:, None], (a * s_ce * has_y)[:, None])
        g = torch.where(active[:, None], g, 0.0)
        g = torch.where(bad[:, None], float("nan"), g)
        if tanh is not None:
            g = g * (1.0 - tanh * tanh)
        g_rows[n0:n1, d0:d1] = g.view(n1 - n0, d1 - d0, V)
