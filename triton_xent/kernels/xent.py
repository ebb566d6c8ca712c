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

Online logsumexp. Statistics (m, s, S, U) of a set of columns: m the max, s = sum exp(z - m),
S = sum u (m - z) (kept relative to the max, so huge equal logits cancel exactly), U = sum u.
Two sets merge as
    m = max(m1, m2),  s = s1 exp(m1 - m) + s2 exp(m2 - m),  S = S1 + U1 (m - m1) + S2 + U2 (m - m2)
and then lse - z_y = log s + (m - z_y) and sum_c u_c (lse - z_c) = U log s + S.

Split rows, read once. A row is cut into P slices of at most config.ROW_SLICE_MAX_V columns;
program (row, j) holds slice j in registers, publishes its statistics (stores, a barrier,
then a flag set with release semantics), merges all P records in slice order (the same
order in every program, so every slice uses the same lse), and writes the gradient of its
slice from registers: one read of the logits, one write of the gradient, for any V.
No program waits without bound, and no program ever reads another slice's logits, so the
gradient may overwrite the logits (inplace_backward, the linear op's chunks): a program
whose siblings have not all published after `spin_limit` polls writes nothing, marks
itself deferred, and exits; a second, cheap launch (FINISH) lets each deferred program
re-read its own slice, which nobody else writes, and finish from the now complete records.
The target logit that the loss needs is kept in slice 0's record, read before any gradient
of that row can exist (a sibling writes only after it has seen slice 0's flag). So the
kernel cannot deadlock when siblings are not co-resident, and Triton's interpreter, which
runs programs one after another with config.INTERPRET_SLICE_SPIN_LIMIT polls (0 by
default), runs the same code: there every program but a row's last is deferred.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import config

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _tanh(x):
    # Triton has no portable tanh. 1 - 2 / (exp(2x) + 1) is stable at both ends (exp overflow
    # gives +-1) but cancels near 0, where a large softcap puts every logit: below |x| = 0.35
    # take the odd Taylor series to x^11 instead (truncation < 4e-9 there; the exp form's
    # rounding is then at most ~2 ulp).
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    return tl.where(tl.abs(x) < 0.35, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _load_block(
    row_ptr, target_row_ptr, weight_ptr,  # pointers
    cols, mask,  # (BLOCK_V,) column indices and their validity
    stride_col, stride_target_col, label_smoothing, class_offset, n_classes, softcap,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Loads one block of a row: z (softcapped, -inf off the row), tanh(x/s), and u.
    Column c is class class_offset + c of n_classes (a vocab-parallel rank's slice)."""
    cols64 = cols.to(tl.int64)
    x = tl.load(row_ptr + cols64 * stride_col, mask=mask, other=0.0).to(tl.float32)
    t = x
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    z = tl.where(mask, x, NEG_INF)
    u = mask.to(tl.float32)
    if HAS_WEIGHT:
        u = tl.load(weight_ptr + class_offset + cols64, mask=mask, other=0.0).to(tl.float32)
    if PROB_TARGET:
        q = tl.load(target_row_ptr + cols64 * stride_target_col, mask=mask, other=0.0)
        q = q.to(tl.float32)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / n_classes
        u = u * tl.where(mask, q, 0.0)
    return z, t, u


@triton.jit
def _merge_stats(m1, s1, S1, U1, m2, s2, S2, U2, TRACK_U: tl.constexpr):
    """Statistics of the union of two column sets (see the module docstring)."""
    m = tl.maximum(m1, m2)
    # A set that is all -inf so far keeps s = 0 instead of exp(-inf - -inf) = nan.
    m_ref = tl.where(m == NEG_INF, 0.0, m)
    s = s1 * tl.exp(m1 - m_ref) + s2 * tl.exp(m2 - m_ref)
    S = S1
    U = U1
    if TRACK_U:
        # Guards keep 0 * inf (no weight yet, or an -inf max) out of the sums.
        S = (S1 + U1 * tl.where((m == m1) | (U1 == 0.0), 0.0, m - m1)
             + S2 + U2 * tl.where((m == m2) | (U2 == 0.0), 0.0, m - m2))
        U = U1 + U2
    return m, s, S, U


@triton.jit
def _block_stats(z, u, TRACK_U: tl.constexpr):
    """Statistics (m, s, S, U) of one block of softcapped logits z and smoothing weights u."""
    m = tl.max(z, axis=0)
    m_ref = tl.where(m == NEG_INF, 0.0, m)
    s = tl.sum(tl.exp(z - m_ref), axis=0)
    S = tl.zeros((), tl.float32)
    U = tl.zeros((), tl.float32)
    if TRACK_U:
        # z == m also covers an all -inf block, whose terms are 0 relative to its own max.
        S = tl.sum(u * tl.where((u == 0.0) | (z == m), 0.0, m - z), axis=0)
        U = tl.sum(u, axis=0)
    return m, s, S, U


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
    record_ptr, flag_ptr, stats_ptr,
    # sizes: this tensor's n_cols columns are classes class_offset.. of n_classes
    n_cols, n_inner, n_slices, slice_width, class_offset, n_classes,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, spin_limit,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    TRACK_U: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SPLIT: tl.constexpr,
    FINISH: tl.constexpr, STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # STATS: 0 the loss of whole rows; 1 write each row's (m, s, S, U, z_y) instead of the
    # loss (vocab-parallel ranks, whose rows are slices of the classes); 2 take the row's
    # merged (m, s, S, U) from stats_ptr and write the gradient only.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_slices
    j = pid % n_slices  # this program's slice of the row
    n = row // n_inner
    d = row % n_inner
    row_ptr = logits_ptr + n * stride_x_n + d * stride_x_d
    target_row_ptr = target_ptr + n * stride_t_n + d * stride_t_d

    # Target and the row's coefficients a, b (see the module docstring).
    if PROB_TARGET:
        y = -1
        row_ok = True
        row_nan = False
        a = 0.0
        b = 1.0
        z_y = 0.0
    else:
        y_global = tl.load(target_row_ptr).to(tl.int64)
        ignored = y_global == ignore_index
        in_range = (y_global >= 0) & (y_global < n_classes)
        row_ok = in_range & (y_global != ignore_index)
        row_nan = (~in_range) & (~ignored)  # an unchecked bad target: NaN, never a wild read
        w_y = 1.0
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + tl.where(row_ok, y_global, 0)).to(tl.float32)
        a = (1.0 - label_smoothing) * w_y
        b = label_smoothing / n_classes
        y = y_global - class_offset  # the target's column here, if it is one of ours
        has_y = row_ok & (y >= 0) & (y < n_cols)
        if FINISH:
            z_y = tl.load(record_ptr + pid * 5 + 4)  # the logit may hold a gradient by now
        else:
            z_y = tl.load(row_ptr + tl.where(has_y, y, 0) * stride_x_c).to(tl.float32)
            if HAS_SOFTCAP:
                z_y = softcap * _tanh(z_y / softcap)
            z_y = tl.where(has_y, z_y, 0.0)

    # This program's slice, held in registers until its gradient is written.
    cols = j * slice_width + tl.arange(0, BLOCK_V)
    mask = (tl.arange(0, BLOCK_V) < slice_width) & (cols < n_cols)
    z, t, u = _load_block(row_ptr, target_row_ptr, weight_ptr, cols, mask, stride_x_c,
                          stride_t_c, label_smoothing, class_offset, n_classes, softcap,
                          PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    if STATS == 2:
        m = tl.load(stats_ptr + row * 4)
        s = tl.load(stats_ptr + row * 4 + 1)
        S = tl.load(stats_ptr + row * 4 + 2)
        U = tl.load(stats_ptr + row * 4 + 3)
    else:
        m, s, S, U = _block_stats(z, u, TRACK_U)
    # 1 when this program writes its results now; 0 when it has nothing to do (FINISH launch
    # of a program that was not deferred, or a slice other than 0 without a gradient).
    active = tl.full((), 1, tl.int32)

    if SPLIT:
        record = record_ptr + pid * 5  # (m, s, S, U, z_y) of this slice
        if FINISH:
            active = (tl.load(flag_ptr + pid) == 2).to(tl.int32)
        else:
            tl.store(record, m)
            tl.store(record + 1, s)
            tl.store(record + 2, S)
            tl.store(record + 3, U)
            tl.store(record + 4, z_y)
            tl.debug_barrier()  # the whole program's stores come before the releasing flag
            tl.atomic_xchg(flag_ptr + pid, 1, sem="release")
            if not COMPUTE_GRAD:  # without a gradient only slice 0, the loss's writer, merges
                active = (j == 0).to(tl.int32)
        # Merge the P records in slice order (bounded polls in the first launch; in FINISH
        # every record is there, the first launch having ended).
        m_all = tl.full((), NEG_INF, tl.float32)
        s_all = tl.zeros((), tl.float32)
        S_all = tl.zeros((), tl.float32)
        U_all = tl.zeros((), tl.float32)
        missing = tl.zeros((), tl.int32)
        if active != 0:
            for k in range(0, n_slices):
                theirs = record_ptr + (row * n_slices + k) * 5
                ready = tl.atomic_add(flag_ptr + row * n_slices + k, 0, sem="acquire")
                polls = 0
                while (ready == 0) & (polls < spin_limit):
                    ready = tl.atomic_add(flag_ptr + row * n_slices + k, 0, sem="acquire")
                    polls += 1
                if ready != 0:
                    km = tl.load(theirs, volatile=True)
                    ks = tl.load(theirs + 1, volatile=True)
                    kS = tl.load(theirs + 2, volatile=True)
                    kU = tl.load(theirs + 3, volatile=True)
                    m_all, s_all, S_all, U_all = _merge_stats(m_all, s_all, S_all, U_all,
                                                              km, ks, kS, kU, TRACK_U)
                else:
                    missing += 1
        if missing != 0:  # a sibling is late: write nothing now, finish in the FINISH launch
            tl.atomic_xchg(flag_ptr + pid, 2)
            active = tl.zeros((), tl.int32)
        m, s, S, U = m_all, s_all, S_all, U_all

    if active != 0:
        log_s = tl.log(s)
        if j == 0:
            if STATS == 0:
                ce = a * (log_s + (m - z_y))
                if TRACK_U:
                    ce += b * (U * log_s + S)
                ce = tl.where(row_ok, ce, 0.0)
                ce = tl.where(row_nan, float("nan"), ce)
                tl.store(ce_ptr + row, ce)
                tl.store(lse_ptr + row, m + log_s)
            if STATS == 1:
                tl.store(stats_ptr + row * 5, m)
                tl.store(stats_ptr + row * 5 + 1, s)
                tl.store(stats_ptr + row * 5 + 2, S)
                tl.store(stats_ptr + row * 5 + 3, U)
                tl.store(stats_ptr + row * 5 + 4, z_y)
        # The gradient of this slice, already scaled by the reduction (1/denominator, "mean").
        if COMPUTE_GRAD:
            scale_ce = 1.0
            scale_z = 1.0
            if HAS_SCALE:
                scale_ce = tl.load(scale_ptr)
                scale_z = tl.load(scale_ptr + 1)
            coef = (a + b * U) * scale_ce
            if HAS_ZLOSS:
                coef += 2.0 * lse_square_scale * (m + log_s) * scale_z
            grad_row_ptr = grad_ptr + n * stride_g_n + d * stride_g_d
            _store_grad(grad_row_ptr, cols, mask, stride_g_c, z, t, u, y, m, 1.0 / s, coef,
                        a * scale_ce, b * scale_ce, row_ok, row_nan, softcap, HAS_SOFTCAP,
                        TRACK_U)


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


def _launch(
    logits: torch.Tensor,  # (N, V, D)
    target: torch.Tensor,  # (N*D,) class indices, or (N, V, D) probabilities
    weight: torch.Tensor | None,  # (n_classes,) float32, contiguous
    scale: torch.Tensor | None,  # (2,) float32
    grad: torch.Tensor | None,  # (N, V, D) or None
    outputs: tuple,  # (ce, lse, stats): the mode's output tensors, None where unused
    *,
    stats_mode: int,  # the kernel's STATS switch
    class_offset: int,
    n_classes: int,
    prob_target: bool,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
) -> None:
    N, V, D = logits.shape
    rows = N * D
    if rows == 0:
        return
    device = logits.device
    n_slices = triton.cdiv(V, config.ROW_SLICE_MAX_V)
    slice_width = triton.cdiv(triton.cdiv(V, n_slices), 16) * 16  # aligned slice starts
    block_v = triton.next_power_of_2(slice_width)
    split = n_slices > 1 and stats_mode != 2  # with the statistics given, slices are alone
    records = flags = None
    if split:
        records = torch.empty(rows * n_slices * 5, device=device, dtype=torch.float32)
        flags = torch.zeros(rows * n_slices, device=device, dtype=torch.int32)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    g = grad if grad is not None else logits  # never written when COMPUTE_GRAD is off
    # Class indices are a flat (N*D,) vector with one stride: row n*D + d sits at that offset.
    t_strides = target.stride() if prob_target else (D * target.stride(0), 0, target.stride(0))
    ce, lse, stats = outputs
    args = (
        logits, g, target, weight, scale, ce, lse, records, flags, stats,
        V, D, n_slices, slice_width, class_offset, n_classes,
        *logits.stride(), *g.stride(), *t_strides,
        ignore_index, float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap is not None else 1.0,
        config.INTERPRET_SLICE_SPIN_LIMIT if interpreting else config.SLICE_SPIN_LIMIT,
    )
    switches = dict(
        PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None,
        TRACK_U=prob_target or label_smoothing > 0.0,  # the smoothing sums S, U are needed
        HAS_ZLOSS=lse_square_scale != 0.0,
        HAS_SCALE=scale is not None,
        COMPUTE_GRAD=grad is not None,
        SPLIT=split,
        STATS=stats_mode,
        BLOCK_V=block_v,
        num_warps=config.num_warps_for(block_v),
    )
    _xent_kernel[(rows * n_slices,)](*args, FINISH=False, **switches)
    if split:  # programs whose siblings were late finish here (most exit at once)
        _xent_kernel[(rows * n_slices,)](*args, FINISH=True, **switches)


def xent_rows(
    logits: torch.Tensor,  # (N, V, D), fp32/fp16/bf16, any strides
    target: torch.Tensor,  # (N*D,) integer class indices (any stride), or (N, V, D) probabilities
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
    ce = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    _launch(logits, target, weight, scale, grad, (ce, lse, None), stats_mode=0, class_offset=0,
            n_classes=V, prob_target=prob_target, ignore_index=ignore_index,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap)
    return ce, lse


def xent_slice_stats(
    logits: torch.Tensor,  # (N, V_r, D): classes class_offset .. class_offset + V_r - 1
    target: torch.Tensor,  # (N*D,) global class indices
    weight: torch.Tensor | None,  # (n_classes,) float32, contiguous: all classes' weights
    *,
    class_offset: int,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
) -> torch.Tensor:
    """(N*D, 5) float32 statistics of each row's slice: max m, sum exp(z - m), S = sum u (m - z),
    U = sum u, and the target's (softcapped) logit where it lies in the slice, else 0."""
    N, V, D = logits.shape
    stats = torch.empty((N * D, 5), device=logits.device, dtype=torch.float32)
    _launch(logits, target, weight, None, None, (None, None, stats), stats_mode=1,
            class_offset=class_offset, n_classes=n_classes, prob_target=False,
            ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=0.0,
            softcap=softcap)
    return stats


def xent_slice_grad(
    logits: torch.Tensor,  # (N, V_r, D): classes class_offset .. class_offset + V_r - 1
    target: torch.Tensor,  # (N*D,) global class indices
    weight: torch.Tensor | None,  # (n_classes,) float32, contiguous
    stats: torch.Tensor,  # (N*D, 4) float32 (m, s, S, U) of the whole rows
    scale: torch.Tensor | None,  # (2,) float32 "mean" factors, or None
    grad: torch.Tensor,  # (N, V_r, D) written
    *,
    class_offset: int,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
) -> None:
    """Writes the gradient of a slice of classes from the statistics of the whole rows."""
    _launch(logits, target, weight, scale, grad, (None, None, stats.contiguous()),
            stats_mode=2, class_offset=class_offset, n_classes=n_classes, prob_target=False,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap)


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
