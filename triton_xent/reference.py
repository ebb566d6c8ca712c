"""The plain-PyTorch backend: the CPU fallback and the readable statement of the semantics.

It computes what the Triton kernel computes (kernels/xent.py), one row at a time in the
math below. For a row of logits x, z = softcap * tanh(x / softcap) / T (no tanh without
softcap; T the temperature), and, all in float32 (float64 for float64 input):

    m = max_c z_c,   d_c = z_c - m,   s = sum_c exp(d_c),   lse = m + log s
    -log p_c = log s - d_c                                     (p = exp(d) / s = softmax(z))
    ce   = a (log s - d_y) + b (U log s - sum_c u_c d_c)  = -a log p_y - b sum_c u_c log p_c
    H    = lse - sum_c p_c z_c = log s - Q / s,   Q = sum_c exp(d_c) d_c <= 0    (the entropy)
    dz   = r (p coef - s_ce (b u + a onehot(y))) + e dH/dz,   dH/dz_c = p_c (Q / s - d_c)
    coef = s_ce (a + b U) + 2 lse_square_scale s_z lse
    grad = dz (1 - tanh^2) / T                    (the softcap's slope and the temperature's)
with a = (1 - eps) w_y, b = eps / V, u = w (ones without weights) for class indices, a = 0 on
ignored rows (whose gradient is 0); a = 0, b = 1, u = w ((1 - eps) t + eps / V) for class
probabilities; U = sum_c u_c; s_ce, s_z the "mean" factors of the two terms (1 otherwise);
r the row weight (row_weight) and e the entropy's weight in the gradient of each row.
Every difference is taken relative to the row's max, so huge equal logits cancel exactly;
both terms of H are >= 0 (s >= 1, Q <= 0), so H is never negative, and a -inf logit adds
exp(d) d = 0 to Q (never 0 * inf).

How, on a CPU: rows go a chunk at a time through one float32 buffer of
config.TORCH_CHUNK_ELEMENTS elements that is reused for every chunk and small enough to stay
in the CPU's cache. Per chunk: a bf16/fp16 chunk is widened into the buffer (never the whole
tensor), the row max (one read of the logits from memory), d = z - m in the buffer, then
2^(d log2 e) = exp(d) in place (the only exponential of an element: the gradient reuses it;
exp2 is about twice as fast as exp on a CPU), the row sums; with a gradient, the buffer is
scaled to the gradient and written once into the output (which may be the logits
themselves: inplace_backward). No (N, V) temporary, no log_softmax tensor. Each torch op
is threaded over the chunk's rows by PyTorch (at::parallel_for), so every core is busy.
The entropy needs exp(d) d beside exp(d): one more chunk-sized temporary, only when asked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from . import config

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _row_chunks(N: int, D: int, V: int) -> Iterator[tuple[int, int, int, int]]:
    """(n0, n1, d0, d1) blocks of rows of a (N, V, D) tensor, each a contiguous range of the
    flat row index n * D + d, holding at most config.TORCH_CHUNK_ELEMENTS logits (or one
    row, if a row is longer)."""
    if N * D == 0:
        return
    rows = _chunk_rows(V)
    if D >= rows:
        for n in range(N):
            for d0 in range(0, D, rows):
                yield n, n + 1, d0, min(D, d0 + rows)
    else:
        per = max(1, rows // D)
        for n0 in range(0, N, per):
            yield n0, min(N, n0 + per), 0, D


def _chunk_rows(V: int) -> int:
    return max(1, config.TORCH_CHUNK_ELEMENTS // max(V, 1))


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



def xent_rows_torch(
    logits: torch.Tensor,  # (N, V, D), any float dtype, any strides
    target: torch.Tensor,  # (N*D,) integer class indices, or (N, V, D) float probabilities
    weight: torch.Tensor | None,  # (V,)
    scale: torch.Tensor | None,  # (2,): the gradient factors s_ce, s_z ("mean"), or None
    grad: torch.Tensor | None,  # (N, V, D) gradient output (may alias logits), or None
    row_weight: torch.Tensor | None = None,  # (N*D,) or (1,): r, factor of the CE gradient
    entropy_weight: torch.Tensor | None = None,  # (N*D,) or (1,): e, factor of dH/dz
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
    argmax None unless asked for; argmax -1 on ignored rows), `grad` filled."""
    N, V, D = logits.shape
    M = N * D
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    eps = label_smoothing
    smoothing = prob_target or eps > 0  # the b (U log s - sum_c u_c d_c) term is there
    x_rows = logits.movedim(1, 2)  # (N, D, V) view
    g_rows = grad.movedim(1, 2) if grad is not None else None
    w = weight.to(acc) if weight is not None else None
    s_ce, s_z = (scale[0], scale[1]) if scale is not None else (1.0, 1.0)
    rw = row_weight.reshape(-1).to(acc).expand(M) if row_weight is not None else None
    ew = entropy_weight.reshape(-1).to(acc).expand(M) if entropy_weight is not None else None
    need_q = entropy or (ew is not None and g_rows is not None)

    # Per-row statistics, filled chunk by chunk; the loss is assembled from them at the end.
    m = torch.empty(M, dtype=acc, device=dev)
    s = torch.empty(M, dtype=acc, device=dev)
    S = torch.empty(M, dtype=acc, device=dev) if smoothing else None  # sum_c u_c d_c
    Q = torch.empty(M, dtype=acc, device=dev) if need_q else None  # sum_c exp(d_c) d_c
    idx = torch.empty(M, dtype=torch.int64, device=dev) if argmax else None
    if prob_target:
        t_rows = target.movedim(1, 2)
        U = torch.empty(M, dtype=acc, device=dev)
        b = 1.0
    else:
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        active = (target != ignore_index) & ~bad
        y = torch.where(active, target, 0).long()
        a = (torch.where(active, (1.0 - eps) * w[y], 0.0) if w is not None
             else active.to(acc) * (1.0 - eps))
        b = eps / V
        U = w.sum() if w is not None else float(V)
        d_y = torch.empty(M, dtype=acc, device=dev)
        # Host checks, once (no cost on a CPU): are there rows whose gradient is 0 or NaN?
        masked = bool((~active).any()) if g_rows is not None else False
        has_bad = bool(bad.any()) if masked else False

    rows = min(_chunk_rows(V), M)
    buf = torch.empty((rows, V), dtype=acc, device=dev)  # d, then exp(d), then the gradient
    capped = softcap is not None
    tempered = temperature != 1.0
    tbuf = torch.empty((rows, V), dtype=acc, device=dev) if capped else None  # tanh(x / c)
    cast = prob_target and target.dtype != acc
    ubuf = torch.empty((rows, V), dtype=acc, device=dev) if cast else None  # t in acc
    if not prob_target and eps > 0 and g_rows is not None:
        bu = (b * s_ce) * (w if w is not None else torch.ones(V, dtype=acc, device=dev))

    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        flat = slice(n0 * D + d0, (n1 - 1) * D + d1)
        x = x_rows[n0:n1, d0:d1].reshape(-1, V)  # (R, V): a view unless D > 1
        R = x.shape[0]
        if capped:
            th = torch.tanh(tbuf[:R].copy_(x).div_(softcap), out=tbuf[:R])
            z = torch.mul(th, softcap, out=buf[:R])
        elif x.dtype != acc or tempered:
            z = buf[:R].copy_(x)  # widened into the buffer (faster than mixed-dtype ops)
        else:
            z = x
        if tempered:
            z.div_(temperature)
        m[flat] = z.amax(-1)
        if argmax:  # the first index of the row's max, as torch.argmax
            first = z.argmax(-1)
            idx[flat] = first if prob_target else torch.where(active[flat], first, -1)
        # The buffer holds d * log2(e): exp2 is about twice as fast as exp on a CPU, and
        # sum_c 2^(d_c log2 e) = s. Differences in base 2 (d2) are scaled back to e below.
        d2 = (z.sub_(m[flat, None]) if z is not x
              else torch.sub(x, m[flat, None], out=buf[:R])).mul_(_LOG2E)
        if prob_target:
            t = t_rows[n0:n1, d0:d1].reshape(-1, V)
            u = ubuf[:R].copy_(t) if cast else t  # (R, V) in acc
            if eps > 0:
                u = u.mul(1.0 - eps).add_(eps / V)  # not in place: t may be the target
            if w is not None:
                u = u * w
            U[flat] = u.sum(-1)
            S[flat] = (d2 * u).sum(-1)
        else:
            y_c = y[flat, None]
            d_y[flat] = d2.gather(1, y_c).squeeze(1)
            if eps > 0:
                S[flat] = torch.mv(d2, w) if w is not None else d2.sum(-1)
        e = d2.exp2_()
        s[flat] = e.sum(-1)
        if need_q:
            ed = torch.xlogy(e, e)  # exp(d) d, 0 where exp(d) = 0 (a -inf logit)
            Q[flat] = ed.sum(-1)
        if g_rows is None:
            continue

        s_c = s[flat]
        r_c = rw[flat] if rw is not None else None
        if prob_target:
            coef = s_ce * U[flat]
        else:
            a_c = a[flat]
            coef = torch.where(active[flat], s_ce * (a_c + b * U), 0.0)
        if lse_square_scale != 0.0:
            lse_c = m[flat] + s_c.log()
            coef = coef + (2.0 * lse_square_scale * s_z) * lse_c
        if r_c is not None:
            coef = coef * r_c
        if ew is not None:  # + e dH/dz = e p (Q / s - d)
            e_c = ew[flat]
            coef = coef + e_c * Q[flat] / s_c
        e.mul_((coef / s_c)[:, None])  # p * coef
        if ew is not None:
            e.sub_(ed.mul_((e_c / s_c)[:, None]))
        if prob_target:
            e.sub_(u * (s_ce if r_c is None else (s_ce * r_c)[:, None]))
        else:
            target_term = -s_ce * a_c if r_c is None else -s_ce * a_c * r_c
            e.scatter_add_(1, y_c, target_term[:, None])
            if eps > 0:
                if r_c is None:
                    e.sub_(bu)
                else:
                    e.addr_(r_c, bu, alpha=-1.0)  # - r b u, with no (R, V) temporary
        if capped:
            e.mul_(th.square_().neg_().add_(1.0))  # dz/dx = 1 - tanh(x / c)^2
        if tempered:
            e.div_(temperature)
        if not prob_target and masked:  # ignored rows (NaN ones too) get 0, bad targets NaN
            e.masked_fill_(~active[flat, None], 0.0)
            if has_bad:
                e.masked_fill_(bad[flat, None], float("nan"))
        block = g_rows[n0:n1, d0:d1]
        block.copy_(e.view(block.shape))

    log_s = s.log()
    if smoothing:
        S.mul_(_LN2)
    lse = torch.where(m.isinf(), m, m + log_s)  # a row of -inf: lse = -inf, as logsumexp
    H = log_s - Q / s if entropy else None
    if prob_target:
        ce = U * log_s - S
    else:
        ce = a * (log_s - _LN2 * d_y)
        if eps > 0:
            ce = ce + b * (U * log_s - S)
        ce = torch.where(active, ce, 0.0)
        # An out-of-range target reaches here only with checks off: NaN, like the kernel.
        ce = torch.where(bad, float("nan"), ce)
        if H is not None:
            H = torch.where(bad, float("nan"), torch.where(active, H, 0.0))
    return ce, lse, H, idx


def scale_rows_torch_(
    grad: torch.Tensor,  # (N, V, D), scaled in place
    grad_output: torch.Tensor,  # (N*D,) per row, or a single value
) -> torch.Tensor:
    """grad[n, :, d] *= grad_output[n * D + d] in place (plain PyTorch); nothing to do when
    every factor is 1 (a loss.backward() of a reduced loss), as the kernel skips such rows."""
    N, V, D = grad.shape
    go = grad_output.reshape(-1)
    if bool((go == 1).all()):
        return grad
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


# --- distillation (kernels/distill.py states the math) -------------------------------------
#
# The same functions as the kernels' launchers, on (R, V) or (N, D, V) logits, classes last,
# in float32 (float64 for float64 input), a chunk of rows at a time. Per chunk: z = x / T,
# each tensor's differences to its row max d = z - m, e = exp(d), s = sum e, and
# D_t = sum e_t (d_t - d_s), D_s = sum e_s (d_s - d_t) (a term with e = 0 is 0); then
# log p = d - log s, and the losses and the student's gradient as kernels/distill.py says.
# merge_stats and row_losses, the steps between the slice kernels, are plain torch ops on
# (rows, slices, 6) statistics (STATS: m_s, s_s, m_t, s_t, D_t, D_s), shared by both
# backends.

def _distill_chunks(x3: torch.Tensor):
    """(flat row slice, (R, V) block) of an (N, D, V) tensor, a chunk of rows at a time (a
    view unless a chunk spans samples of a tensor whose D rows are not contiguous)."""
    N, D, V = x3.shape
    for n0, n1, d0, d1 in _row_chunks(N, D, V):
        yield slice(n0 * D + d0, (n1 - 1) * D + d1), (n0, n1, d0, d1)


def _block(x3: torch.Tensor, where: tuple, temperature: float) -> torch.Tensor:
    """The (R, V) tempered logits of a chunk in the accumulation dtype."""
    n0, n1, d0, d1 = where
    x = x3[n0:n1, d0:d1].reshape(-1, x3.shape[-1])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc)
    return z / temperature if temperature != 1.0 else z


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == float("-inf"), 0.0, m)


def _pair_stats_torch(z_s: torch.Tensor, z_t: torch.Tensor):
    """(R, 6) STATS of (R, V) tempered logits, and the differences d_s, d_t."""
    m_s = z_s.amax(-1)
    m_t = z_t.amax(-1)
    d_s = z_s - _finite_or_zero(m_s)[:, None]
    d_t = z_t - _finite_or_zero(m_t)[:, None]
    e_s, e_t = d_s.exp(), d_t.exp()
    D_t = _weighted_sum(e_t, d_t - d_s)
    D_s = _weighted_sum(e_s, d_s - d_t)
    return torch.stack([m_s, e_s.sum(-1), m_t, e_t.sum(-1), D_t, D_s], -1), d_s, d_t


def merge_stats(stats: torch.Tensor) -> torch.Tensor:  # (R, P, 6) -> (R, 6)
    """The STATS of whole rows from those of their P slices (or ranks), with m = max_k m_k:
        s = sum_k s_k exp(m_k - m),
        D_t = sum_k exp(m_t,k - m_t) (D_t,k + s_t,k ((m_t,k - m_t) - (m_s,k - m_s)))
    and D_s alike (roles swapped). A slice where the weighting tensor is all -inf (s_k = 0)
    adds nothing (its shifts may be -inf or NaN); maxes of -inf count as 0 in the shifts,
    as they do in the slices' own differences."""
    m_s, s_s, m_t, s_t, D_t, D_s = stats.unbind(-1)
    M_s = m_s.amax(1, keepdim=True)
    M_t = m_t.amax(1, keepdim=True)
    shift_s = _finite_or_zero(m_s) - _finite_or_zero(M_s)  # (R, P)
    shift_t = _finite_or_zero(m_t) - _finite_or_zero(M_t)
    w_s = (m_s - _finite_or_zero(M_s)).exp()  # exp(m_k - m); 0 for a slice of -inf
    w_t = (m_t - _finite_or_zero(M_t)).exp()
    D_t = torch.where(s_t == 0, 0.0, w_t * (D_t + s_t * (shift_t - shift_s))).sum(1)
    D_s = torch.where(s_s == 0, 0.0, w_s * (D_s + s_s * (shift_s - shift_t))).sum(1)
    return torch.stack([M_s[:, 0], (s_s * w_s).sum(1), M_t[:, 0], (s_t * w_t).sum(1), D_t,
                        D_s], -1)


def row_losses(merged: torch.Tensor, terms: torch.Tensor | None, divergence: str):
    """(loss, kl_s) per row from whole rows' (R, 6) STATS and, for JSD, their (R, 2) sums
    of J's and K's terms: forward KL D_t / s_t + log s_s - log s_t (kl_s None: its gradient
    needs none), reverse KL D_s / s_s + log s_t - log s_s (kl_s = the loss), JSD (J, K)."""
    if divergence == "jsd":
        return terms[:, 0], terms[:, 1]
    _, s_s, _, s_t, D_t, D_s = merged.unbind(-1)
    if divergence == "forward_kl":
        return D_t / s_t + (s_s.log() - s_t.log()), None
    loss = D_s / s_s + (s_t.log() - s_s.log())
    return loss, loss


def _log_probs(z_s, z_t, merged):
    """(R, V) log p_s, log p_t of a chunk from its rows' (R, 6) merged STATS."""
    m_s, s_s, m_t, s_t = (merged[:, k, None].to(z_s.dtype) for k in range(4))
    return (z_s - _finite_or_zero(m_s)) - s_s.log(), (z_t - _finite_or_zero(m_t)) - s_t.log()


def _log_mixture(lp_s, lp_t, beta):
    """log M, M = beta p_t + (1 - beta) p_s (-inf where both are 0)."""
    return torch.logaddexp(lp_t + math.log(beta), lp_s + math.log1p(-beta))


def _jsd_terms_torch(lp_s, lp_t, beta):
    """(R, 2) sums of J's and K's terms (K = KL(p_s || M)), and log M."""
    log_m = _log_mixture(lp_s, lp_t, beta)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    k_s = torch.where(p_s == 0, 0.0, p_s * (lp_s - log_m)).sum(-1)
    k_t = torch.where(p_t == 0, 0.0, p_t * (lp_t - log_m)).sum(-1)
    return torch.stack([beta * k_t + (1.0 - beta) * k_s, k_s], -1), log_m


def _distill_grad_chunk(lp_s, lp_t, log_m, kl_s, scale, divergence, beta, temperature):
    """scale * dloss/dx_s of a chunk (kernels/distill.py's gradients); 0 on rows of scale 0."""
    p_s = lp_s.exp()
    if divergence == "forward_kl":
        g = p_s - lp_t.exp()
    else:
        log_q = lp_t if divergence == "reverse_kl" else log_m
        g = torch.where(p_s == 0, 0.0, p_s * (lp_s - log_q - kl_s[:, None]))
        if divergence == "jsd":
            g = g * (1.0 - beta)
    if scale is None:
        return g / temperature
    scale = scale.to(g.dtype)[:, None]
    return torch.where(scale == 0, 0.0, g * (scale / temperature))


def _store(grad3: torch.Tensor, where: tuple, g: torch.Tensor) -> None:
    n0, n1, d0, d1 = where
    block = grad3[n0:n1, d0:d1]
    block.copy_(g.view(block.shape))


def _rows3(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x


def _weighted_sum(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(R,) sum_c w_c v_c of (R, V) tiles, terms with w = 0 taken as 0 (never 0 * inf; a
    NaN stays NaN). Overwrites v."""
    return v.mul_(w).masked_fill_(w == 0, 0.0).sum(-1)


def _differences(x3: torch.Tensor, where: tuple, temperature: float, out: torch.Tensor):
    """d = x / T - max_c(x / T) of a chunk's rows, in `out` (the chunk's rows of a buffer in
    the accumulation dtype): the logits are widened there, never the whole tensor."""
    n0, n1, d0, d1 = where
    x = x3[n0:n1, d0:d1].reshape(out.shape)
    if x.dtype == out.dtype and temperature != 1.0:
        d = torch.div(x, temperature, out=out)
    else:  # widened first: half-precision arithmetic would round x / T
        d = out.copy_(x)
        if temperature != 1.0:
            d.div_(temperature)
    return d.sub_(_finite_or_zero(d.amax(-1, keepdim=True)))


def distill_rows_torch(student, teacher, grad, row_scale, *, divergence, beta, temperature):
    """Same contract as kernels.distill.distill_rows, for any V: the (R,) per-row loss
    (float32; float64 for float64 input), unscaled and 0 where row_scale is 0; grad =
    row_scale * dloss/dx_s written if given.

    Per chunk, with two buffers holding d_s and d_t (the logits are read once) and e = exp(d):
        forward_kl  loss = D_t / s_t + log s_s - log s_t,  grad = p_s - p_t
        reverse_kl  loss = D_s / s_s + log s_t - log s_s,
                    grad = p_s ((d_s - d_t) - (log s_s - log s_t) - loss)
        jsd         log p = d - log s, log M, then J, K and grad from them
    all over T, then times row_scale."""
    s3, t3 = _rows3(student), _rows3(teacher)
    g3 = _rows3(grad) if grad is not None else None
    N, D, V = s3.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(N * D, dtype=acc, device=student.device)
    rows = min(_chunk_rows(V), N * D)
    buf_s = torch.empty((rows, V), dtype=acc, device=student.device)
    buf_t = torch.empty((rows, V), dtype=acc, device=student.device)
    for flat, where in _distill_chunks(s3):
        R = flat.stop - flat.start
        d_s = _differences(s3, where, temperature, buf_s[:R])
        d_t = _differences(t3, where, temperature, buf_t[:R])
        e_s, e_t = d_s.exp(), d_t.exp()
        log_s_s, log_s_t = e_s.sum(-1).log()[:, None], e_t.sum(-1).log()[:, None]
        p_s = e_s.div_(log_s_s.exp())
        p_t = e_t.div_(log_s_t.exp())
        if divergence == "forward_kl":
            chunk_loss = _weighted_sum(p_t, d_t - d_s) + (log_s_s - log_s_t)[:, 0]
            g = p_s.sub_(p_t)
        elif divergence == "reverse_kl":
            diff = d_s.sub_(d_t)  # d_s - d_t; log p_s - log p_t = diff - (log s_s - log s_t)
            chunk_loss = _weighted_sum(p_s, diff.clone()) + (log_s_t - log_s_s)[:, 0]
            g = diff.sub_(log_s_s - log_s_t + chunk_loss[:, None]).mul_(p_s)
            g.masked_fill_(p_s == 0, 0.0)
        else:
            lp_s, lp_t = d_s.sub_(log_s_s), d_t.sub_(log_s_t)
            log_m = _log_mixture(lp_s, lp_t, beta)
            k_t = _weighted_sum(p_t, lp_t.sub_(log_m))
            ratio = lp_s.sub_(log_m)  # log p_s - log M
            k_s = _weighted_sum(p_s, ratio.clone())
            chunk_loss = beta * k_t + (1.0 - beta) * k_s
            g = ratio.sub_(k_s[:, None]).mul_(p_s).masked_fill_(p_s == 0, 0.0)
            g.mul_(1.0 - beta)
        scale = row_scale[flat] if row_scale is not None else None
        loss[flat] = chunk_loss if scale is None else torch.where(scale == 0, 0.0, chunk_loss)
        if g3 is None:
            continue
        if scale is None:
            g.div_(temperature)
        else:
            scale = scale.to(acc)[:, None]
            g.mul_(scale / temperature).masked_fill_(scale == 0, 0.0)
        _store(g3, where, g)
    return loss


def distill_stats_torch(student, teacher, *, temperature):
    """(R, 6) STATS of each row's columns here (a rank's classes): kernels.distill's
    slice statistics, already merged over the row."""
    s3, t3 = _rows3(student), _rows3(teacher)
    N, D, V = s3.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    stats = torch.empty((N * D, 6), dtype=acc, device=student.device)
    for flat, where in _distill_chunks(s3):
        stats[flat] = _pair_stats_torch(_block(s3, where, temperature),
                                        _block(t3, where, temperature))[0]
    return stats


def distill_terms_torch(student, teacher, merged, *, beta, temperature):
    """(R, 2) JSD sums of J's and K's terms over the columns here, from the whole rows'
    merged (R, 6) STATS."""
    s3, t3 = _rows3(student), _rows3(teacher)
    N, D, V = s3.shape
    terms = torch.empty((N * D, 2), dtype=merged.dtype, device=student.device)
    for flat, where in _distill_chunks(s3):
        lp_s, lp_t = _log_probs(_block(s3, where, temperature), _block(t3, where, temperature),
                                merged[flat])
        terms[flat] = _jsd_terms_torch(lp_s, lp_t, beta)[0]
    return terms


def distill_grad_torch(student, teacher, merged, kl_s, grad, row_scale, *, divergence, beta,
                       temperature):
    """Writes grad = row_scale * dloss/dx_s of the columns here from the whole rows' merged
    (R, 6) STATS and their (R,) kl_s (RKL or K; None for forward KL)."""
    s3, t3, g3 = _rows3(student), _rows3(teacher), _rows3(grad)
    for flat, where in _distill_chunks(s3):
        lp_s, lp_t = _log_probs(_block(s3, where, temperature), _block(t3, where, temperature),
                                merged[flat])
        log_m = _log_mixture(lp_s, lp_t, beta) if divergence == "jsd" else None
        _store(g3, where, _distill_grad_chunk(
            lp_s, lp_t, log_m, kl_s[flat].to(lp_s.dtype) if kl_s is not None else None,
            row_scale[flat] if row_scale is not None else None, divergence, beta,
            temperature))
