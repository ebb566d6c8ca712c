"""The row-wise cross-entropy kernel (loss, logsumexp and gradient in one launch) and its
launcher, plus the small kernel that scales a saved gradient by grad_output in backward.

Rows. The logits are seen as a (N, V, D) tensor: N samples, V classes, D positions (D = 1
for the usual (N, V) logits; (N, V, d1, ..., dk) inputs have D = d1 * ... * dk). Row r is
sample r // D at position r % D; any strides, so a row-strided (N, V) view is read in place.

Math, per row with (softcapped) logits z, weights w (all 1 without `weight`), smoothing eps:
    lse   = log sum_c exp(z_c)                      p_c = exp(z_c - lse)
    loss  = a * (lse - z_y) + b * sum_c u_c * (lse - z_c)        (+ zs * lse^2, added outside)
      class index y:       a = (1 - eps) * w_y,  b = eps / V,  u_c = w_c
      class probabilities: a = 0,                b = 1,        u_c = w_c * ((1 - eps) t_c + eps / V)
    dloss/dz_c = p_c * (a + b * U) - b * u_c - a * [c == y]  (+ 2 zs lse p_c),   U = sum_c u_c
and softcap z = s * tanh(x / s) multiplies the gradient by dz/dx = 1 - (z / s)^2.

Online logsumexp over blocks of a row, with m the running max and s the running sum:
    m' = max(m, max_block z),  s' = s * exp(m - m') + sum_block exp(z - m')
and the smoothing sum is kept relative to the running max so that huge equal logits cancel
exactly: S = sum_c u_c * (m - z_c) becomes S' = S + U * (m' - m) + sum_block u_c * (m' - z_c).
Then lse - z_y = log s + (m - z_y) and sum_c u_c (lse - z_c) = U log s + S.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import config

NEG_INF = float("-inf")


@triton.jit
def _tanh(x):
    # tanh from exp, stable at both ends (exp overflow gives +-1); Triton has no portable tanh.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_block(
    row_ptr, target_row_ptr, weight_ptr,  # pointers
    cols, mask,  # (BLOCK_V,) column indices and their validity
    stride_col, stride_target_col, label_smoothing, n_cols, softcap,  # strides, options
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Loads one block of a row: z (softcapped, -inf off the row), tanh(x/s), and u."""
    cols64 = cols.to(tl.int64)
    x = tl.load(row_ptr + cols64 * stride_col, mask=mask, other=0.0).to(tl.float32)
    t = x
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    z = tl.where(mask, x, NEG_INF)
    u = mask.to(tl.float32)
    if HAS_WEIGHT:
        u = tl.load(weight_ptr + cols64, mask=mask, other=0.0).to(tl.float32)
    if PROB_TARGET:
        q = tl.load(target_row_ptr + cols64 * stride_target_col, mask=mask, other=0.0)
        q = q.to(tl.float32)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / n_cols
        u = u * tl.where(mask, q, 0.0)
    return z, t, u


@triton.jit
def _update_stats(m, s, S, U, z, u, TRACK_U: tl.constexpr):
    """One step of the online logsumexp (m, s) and of the relative smoothing sum (S, U)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # A row that is -inf so far keeps s = 0 instead of exp(-inf - -inf) = nan.
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
    if TRACK_U:
        # Guards keep 0 * inf (an unweighted or off-row -inf logit) out of the sums.
        shift = U * tl.where((m_new == m) | (U == 0.0), 0.0, m_new - m)
        S = S + shift + tl.sum(u * tl.where(u == 0.0, 0.0, m_new - z), axis=0)
        U = U + tl.sum(u, axis=0)
    return m_new, s, S, U


@triton.jit
def _store_grad(
    grad_row_ptr, cols, mask, stride_grad_col,  # where
    z, t, u, y, m, inv_s, coef, a_scaled, b_scaled, row_ok, row_nan,  # what
    softcap, HAS_SOFTCAP: tl.constexpr, TRACK_U: tl.constexpr,
):
    """Writes dloss/dx for one block: p * coef - b u - a [c == y], times the softcap slope."""
    p = tl.exp(z - m) * inv_s
    g = p * coef - tl.where(cols == y, a_scaled, 0.0)
    if TRACK_U:
        g = g - b_scaled * u
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    g = tl.where(row_ok, g, 0.0)
    g = tl.where(row_nan, float("nan"), g)
    tl.store(grad_row_ptr + cols.to(tl.int64) * stride_grad_col,
             g.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xent_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    # sizes
    n_cols, n_inner,
    # strides (sample, class, position) of logits, gradient and probability targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // n_inner
    d = row % n_inner
    row_ptr = logits_ptr + n * stride_x_n + d * stride_x_d
    target_row_ptr = target_ptr + n * stride_t_n + d * stride_t_d
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    # Target and the row's coefficients a, b (see the module docstring).
    if PROB_TARGET:
        y = -1
        row_ok = True
        row_nan = False
        a = 0.0
        b = 1.0
        z_y = 0.0
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < n_cols)
        row_ok = in_range & (y != ignore_index)
        row_nan = (~in_range) & (~ignored)  # an unchecked bad target: NaN, never a wild read
        y_safe = tl.where(row_ok, y, 0)
        w_y = 1.0
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y_safe).to(tl.float32)
        a = (1.0 - label_smoothing) * w_y
        b = label_smoothing / n_cols
        x_y = tl.load(row_ptr + y_safe * stride_x_c).to(tl.float32)
        if HAS_SOFTCAP:
            x_y = softcap * _tanh(x_y / softcap)
        z_y = x_y

    # Pass 1: online logsumexp and smoothing sums.
    m = tl.full((), NEG_INF, tl.float32)
    s = tl.zeros((), tl.float32)
    S = tl.zeros((), tl.float32)
    U = tl.zeros((), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if SINGLE_BLOCK:
        mask = cols < n_cols
        z, t, u = _load_block(row_ptr, target_row_ptr, weight_ptr, cols, mask, stride_x_c,
                              stride_t_c, label_smoothing, n_cols, softcap,
                              PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
        m, s, S, U = _update_stats(m, s, S, U, z, u, TRACK_U)
    else:
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            z, t, u = _load_block(row_ptr, target_row_ptr, weight_ptr, start + cols, mask,
                                  stride_x_c, stride_t_c, label_smoothing, n_cols, softcap,
                                  PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
            m, s, S, U = _update_stats(m, s, S, U, z, u, TRACK_U)

    log_s = tl.log(s)
    lse = m + log_s
    ce = a * (log_s + (m - z_y))
    if TRACK_U:
        ce += b * (U * log_s + S)
    ce = tl.where(row_ok, ce, 0.0)
    ce = tl.where(row_nan, float("nan"), ce)
    tl.store(ce_ptr + row, ce)
    tl.store(lse_ptr + row, lse)

    # Pass 2: the gradient, already scaled by the reduction (1/denominator for "mean").
    if COMPUTE_GRAD:
        scale_ce = 1.0
        scale_z = 1.0
        if HAS_SCALE:
            scale_ce = tl.load(scale_ptr)
            scale_z = tl.load(scale_ptr + 1)
        coef = (a + b * U) * scale_ce
        if HAS_ZLOSS:
            coef += 2.0 * lse_square_scale * lse * scale_z
        a_scaled = a * scale_ce
        b_scaled = b * scale_ce
        inv_s = 1.0 / s
        grad_row_ptr = grad_ptr + n * stride_g_n + d * stride_g_d
        if SINGLE_BLOCK:
            _store_grad(grad_row_ptr, cols, mask, stride_g_c, z, t, u, y, m, inv_s, coef,
                        a_scaled, b_scaled, row_ok, row_nan, softcap, HAS_SOFTCAP, TRACK_U)
        else:
            for start in range(0, n_cols, BLOCK_V):
                mask = start + cols < n_cols
                z, t, u = _load_block(row_ptr, target_row_ptr, weight_ptr, start + cols, mask,
                                      stride_x_c, stride_t_c, label_smoothing, n_cols, softcap,
                                      PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
                _store_grad(grad_row_ptr, start + cols, mask, stride_g_c, z, t, u, y, m,
                            inv_s, coef, a_scaled, b_scaled, row_ok, row_nan, softcap,
                            HAS_SOFTCAP, TRACK_U)


@triton.jit
def _scale_rows_kernel(
    grad_ptr, grad_out_ptr,  # pointers
    n_cols, n_inner,  # sizes
    stride_g_n, stride_g_c, stride_g_d, stride_go_row,  # strides
    BLOCK_V: tl.constexpr,
):
    """grad[row, :] *= grad_out[row], skipping the row's memory traffic when it is 1."""
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(grad_out_ptr + row * stride_go_row).to(tl.float32)
    if go != 1.0:
        row_ptr = grad_ptr + (row // n_inner) * stride_g_n + (row % n_inner) * stride_g_d
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64) * stride_g_c
            mask = start + cols < n_cols
            g = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(row_ptr + offs, (g * go).to(row_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------


def xent_rows(
    logits: torch.Tensor,  # (N, V, D), fp32/fp16/bf16, any strides
    target: torch.Tensor,  # (N*D,) integer class indices, or (N, V, D) float probabilities
    weight: torch.Tensor | None,  # (V,) float32, contiguous
    scale: torch.Tensor | None,  # (2,) float32: gradient factors of the CE and z-loss terms
    grad: torch.Tensor | None,  # (N, V, D) gradient output (may alias logits), or None
    *,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the row kernel. Returns (ce, lse), both (N*D,) float32; fills `grad` if given.

    `ce` is the unreduced cross-entropy of each row (0 for ignored rows, NaN for an unchecked
    out-of-range target), without the z-loss, which the caller adds from `lse`.
    """
    N, V, D = logits.shape
    rows = N * D
    ce = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return ce, lse
    single = V <= config.SINGLE_PASS_MAX_V
    block_v = triton.next_power_of_2(V) if single else config.MULTI_PASS_BLOCK_V
    g = grad if grad is not None else logits  # never written when COMPUTE_GRAD is off
    t_strides = target.stride() if prob_target else (0, 0, 0)
    _xent_kernel[(rows,)](
        logits, g, target, weight, scale, ce, lse,
        V, D,
        *logits.stride(), *g.stride(), *t_strides,
        ignore_index, float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap is not None else 1.0,
        PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_ZLOSS=lse_square_scale != 0.0,
        HAS_SCALE=scale is not None,
        COMPUTE_GRAD=grad is not None,
        SINGLE_BLOCK=single,
        BLOCK_V=block_v,
        num_warps=config.num_warps_for(block_v),
    )
    return ce, lse


def scale_rows_(
    grad: torch.Tensor,  # (N, V, D), scaled in place
    grad_output: torch.Tensor,  # (N*D,) per row, or a single value (stride 0 over rows)
) -> torch.Tensor:
    """grad[n, :, d] *= grad_output[n * D + d] in place; rows whose factor is 1 are not touched."""
    N, V, D = grad.shape
    rows = N * D
    if rows == 0 or V == 0:
        return grad
    go = grad_output.reshape(-1)
    go_stride = 0 if go.numel() == 1 else go.stride(0)
    _scale_rows_kernel[(rows,)](
        grad, go, V, D, *grad.stride(), go_stride,
        BLOCK_V=min(config.SCALE_BLOCK_V, triton.next_power_of_2(V)),
        num_warps=config.SCALE_NUM_WARPS,
    )
    return grad
