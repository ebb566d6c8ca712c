"""The plain-PyTorch backend: the CPU fallback and the readable statement of the semantics.

It computes exactly what the Triton kernel computes (see kernels/xent.py for the math), row
chunk by row chunk, so that it never holds more than about four float32 copies of one chunk
(config.TORCH_CHUNK_ELEMENTS elements), whatever the batch size:

    z     = softcap * tanh(x / softcap) / T          (no tanh without softcap; T the temperature)
    log p = log_softmax(z)
    ce    = a * (-log p_y) + b * sum_c u_c * (-log p_c)
    H     = -sum_c p_c log p_c                        (the entropy; p log p = 0 where p = 0)
    dz    = r * (p * (a + b * U) - b * u - a * onehot(y)) + e * dH/dz,  dH/dz = -p (log p + H)
    grad  = dz * (1 - tanh^2) / T                     (the softcap's slope and the temperature's)
with a = (1 - eps) w_y, b = eps / V, u = w for class indices; a = 0, b = 1,
u = w * ((1 - eps) t + eps / V) for class probabilities; U = sum_c u_c; r the row weight
(row_weight, also on the z-loss term) and e the entropy's gradient weight of each row.
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


def _tempered(x: torch.Tensor, softcap: float | None, temperature: float):
    """(z, tanh(x / softcap) or None) in the accumulation dtype: z = softcap(x) / T."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    if temperature != 1.0:
        z = z / temperature
    return z, tanh


def _entropy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_c p_c log p_c per row (R,), with p log p = 0 where p = 0 (a -inf logit):
    every term is >= 0 (log p <= 0, as log_softmax computes it), so H never goes negative."""
    return -torch.where(logp == float("-inf"), 0.0, p * logp).sum(-1)


def _chunk(
    x: torch.Tensor,  # (R, V) logits of R rows
    target: torch.Tensor,  # (R,) class indices, or (R, V) probabilities
    weight: torch.Tensor | None,  # (V,)
    scale: torch.Tensor | None,  # (2,) gradient factors of the CE and z-loss terms
    row_weight: torch.Tensor | None,  # (R,) factor of each row's CE (and z-loss) gradient
    entropy_weight: torch.Tensor | None,  # (R,) factor of each row's entropy gradient
    *,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    temperature: float,
    entropy: bool,
    argmax: bool,
    compute_grad: bool,
) -> tuple:
    """ce (R,), lse (R,), H (R,) or None, argmax (R,) or None and the gradient (R, V) or None
    of one chunk, in the accumulation dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, V = x.shape
    z, tanh = _tempered(x, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    w = weight.to(acc) if weight is not None else None

    if prob_target:
        active = torch.ones(R, dtype=torch.bool, device=x.device)
        bad = None
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

    H = idx = None
    if entropy:
        H = _entropy(logp.exp(), logp)
        if bad is not None:
            H = torch.where(bad, float("nan"), torch.where(active, H, 0.0))
    if argmax:
        idx = z.argmax(-1)  # the first index on ties, as torch.argmax
        if not prob_target:
            idx = torch.where(active, idx, -1)

    grad = None
    if compute_grad:
        dH = None
        if entropy_weight is not None:  # dH/dz = -p (log p + H), 0 where p = 0
            p = logp.exp()
            H_rows = H if H is not None else _entropy(p, logp)
            dH = -torch.where(logp == float("-inf"), 0.0, p * (logp + H_rows[:, None]))
            dH *= entropy_weight.to(acc)[:, None]
        s_ce, s_z = (scale[0], scale[1]) if scale is not None else (1.0, 1.0)
        r = row_weight.to(acc) if row_weight is not None else 1.0
        coef = (a + b * U) * s_ce
        if lse_square_scale != 0.0:
            coef = coef + 2.0 * lse_square_scale * lse * s_z
        grad = logp.exp_().mul_((coef * r)[:, None])  # logp is spent: p, in place
        if prob_target or label_smoothing > 0:
            grad -= (b * s_ce) * u * (r[:, None] if row_weight is not None else 1.0)
        if not prob_target:
            grad.scatter_add_(1, y[:, None], -(a * s_ce * r)[:, None])
        if dH is not None:
            grad += dH
        if not prob_target:
            grad = torch.where(active[:, None], grad, 0.0)
            grad = torch.where(bad[:, None], float("nan"), grad)
        if tanh is not None:
            grad *= 1.0 - tanh * tanh
        if temperature != 1.0:
            grad /= temperature
    return ce, lse, H, idx, grad


def xent_rows_torch(
    logits: torch.Tensor,  # (N, V, D), any float dtype, any strides
    target: torch.Tensor,  # (N*D,) integer class indices, or (N, V, D) float probabilities
    weight: torch.Tensor | None,  # (V,)
    scale: torch.Tensor | None,  # (2,) float32: gradient factors of the CE and z-loss terms
    grad: torch.Tensor | None,  # (N, V, D) gradient output (may alias logits), or None
    row_weight: torch.Tensor | None = None,  # (N*D,) or (1,): factor of the CE gradient
    entropy_weight: torch.Tensor | None = None,  # (N*D,) or (1,): factor of dH in the gradient
    *,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    temperature: float = 1.0,
    entropy: bool = False,
    argmax: bool = False,
) -> tuple:
    """Same contract as kernels.xent.xent_rows: (ce, lse, H, argmax) of shape (N*D,) (H and
    argmax None unless asked for), `grad` filled."""
    N, V, D = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    M = N * D
    ce = torch.empty(M, dtype=acc, device=logits.device)
    lse = torch.empty(M, dtype=acc, device=logits.device)
    H = torch.empty(M, dtype=acc, device=logits.device) if entropy else None
    idx = torch.empty(M, dtype=torch.int64, device=logits.device) if argmax else None
    rw = row_weight.reshape(-1).expand(M) if row_weight is not None else None
    ew = entropy_weight.reshape(-1).expand(M) if entropy_weight is not None else None
    x_rows = logits.movedim(1, 2)  # (N, D, V) view
    g_rows = grad.movedim(1, 2) if grad is not None else None
    t_rows = target.movedim(1, 2) if prob_target else target.view(N, D)
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        flat = slice(n0 * D + d0, (n1 - 1) * D + d1)
        t = t_rows[n0:n1, d0:d1]
        c_ce, c_lse, c_H, c_idx, c_grad = _chunk(
            x_rows[n0:n1, d0:d1].reshape(-1, V),
            t.reshape(-1, V) if prob_target else t.reshape(-1),
            weight, scale, rw[flat] if rw is not None else None,
            ew[flat] if ew is not None else None,
            prob_target=prob_target, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            softcap=softcap, temperature=temperature, entropy=entropy, argmax=argmax,
            compute_grad=g_rows is not None,
        )
        ce[flat] = c_ce
        lse[flat] = c_lse
        if entropy:
            H[flat] = c_H
        if argmax:
            idx[flat] = c_idx
        if g_rows is not None:
            g_rows[n0:n1, d0:d1] = c_grad.view(n1 - n0, d1 - d0, V)
    return ce, lse, H, idx


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
                 temperature, ignore_index):
    """Common part of a chunk of a class slice: z, tanh, u, and the target's position."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, V = x.shape
    z, tanh = _tempered(x, softcap, temperature)
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
                      label_smoothing, softcap, temperature, entropy, argmax):
    """Same contract as kernels.xent.xent_slice_stats: (N*D, 6) rows of (m, s, S, U, z_y, Q)
    (Q = sum exp(z - m) (z - m), 0 unless `entropy`), and the (N*D,) int64 global index of
    the slice's first maximum if `argmax`, else None."""
    N, V, D = logits.shape
    x_rows = logits.movedim(1, 2)
    t_rows = target.view(N, D)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    stats = torch.zeros((N * D, 6), dtype=acc, device=logits.device)
    idx = torch.empty(N * D, dtype=torch.int64, device=logits.device) if argmax else None
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        z, _, u, _, _, has_y, y, _ = _slice_chunk(
            x_rows[n0:n1, d0:d1].reshape(-1, V), t_rows[n0:n1, d0:d1].reshape(-1), weight,
            class_offset, n_classes, label_smoothing, softcap, temperature, ignore_index)
        m = z.amax(-1, keepdim=True)
        m_ref = torch.where(m == float("-inf"), 0.0, m)
        flat = slice(n0 * D + d0, (n1 - 1) * D + d1)
        part = stats[flat]
        e = torch.exp(z - m_ref)
        part[:, 0] = m.squeeze(1)
        part[:, 1] = e.sum(-1)
        if label_smoothing > 0:
            part[:, 2] = (u * torch.where((u == 0) | (z == m), 0.0, m - z)).sum(-1)
            part[:, 3] = u.sum()
        part[:, 4] = torch.where(has_y, z.gather(1, y[:, None]).squeeze(1), 0.0)
        if entropy:  # e = 0 (a -inf logit, an all -inf row) gives a term of 0, not 0 * inf
            part[:, 5] = torch.where(e == 0, 0.0, e * (z - m_ref)).sum(-1)
        if argmax:
            idx[flat] = z.argmax(-1) + class_offset
    return stats, idx


def slice_grad_torch(logits, target, weight, stats, scale, grad, row_weight, entropy_weight,
                     *, class_offset, n_classes, ignore_index, label_smoothing,
                     lse_square_scale, softcap, temperature):
    """Same contract as kernels.xent.xent_slice_grad: the slice's gradient from the
    (m, s, S, U, H) of the whole rows (see the module docstring for the formula)."""
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
            class_offset, n_classes, label_smoothing, softcap, temperature, ignore_index)
        m, s, _, U, H = (stats[flat, k].to(z.dtype) for k in range(5))
        r = (row_weight.reshape(-1).expand(N * D)[flat].to(z.dtype)[:, None]
             if row_weight is not None else 1.0)
        a = torch.where(active, (1.0 - label_smoothing) * w_y, 0.0)
        lse = m + torch.log(s)
        coef = (a + b * U) * s_ce
        if lse_square_scale != 0.0:
            coef = coef + 2.0 * lse_square_scale * lse * s_z
        p = torch.exp(z - m[:, None]) / s[:, None]
        g = p * coef[:, None]
        if label_smoothing > 0:
            g = g - (b * s_ce) * u
        g = g - torch.zeros_like(g).scatter_(1, y[:, None], (a * s_ce * has_y)[:, None])
        g = g * r
        if entropy_weight is not None:  # dH/dz = p (lse - z - H); 0 where z = -inf
            ew = entropy_weight.reshape(-1).expand(N * D)[flat].to(z.dtype)[:, None]
            dH = torch.where(z == float("-inf"), 0.0, p * (lse[:, None] - z - H[:, None]))
            g = g + ew * dH
        g = torch.where(active[:, None], g, 0.0)
        g = torch.where(bad[:, None], float("nan"), g)
        if tanh is not None:
            g = g * (1.0 - tanh * tanh)
        if temperature != 1.0:
            g = g / temperature
        g_rows[n0:n1, d0:d1] = g.view(n1 - n0, d1 - d0, V)
