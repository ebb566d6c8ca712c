"""The distillation kernels (forward KL, reverse KL and JSD between a student's and a teacher's
logits, loss and the student's gradient in one pass) and their launchers.

    _distill_rows_kernel         whole rows (V <= config.ROW_SLICE_MAX_V), ROWS rows a tile:
                                 one read of both logits, loss and gradient from registers
    _distill_slice_stats_kernel  per-(row, slice) statistics of longer rows (or of a
                                 vocab-parallel rank's classes)
    _distill_slice_terms_kernel  JSD only: per-(row, slice) sums that need the whole rows'
                                 logsumexps
    _distill_slice_grad_kernel   the student's gradient of a slice from the merged statistics
    _distill_sweep_kernel        longer rows under config.LONG_ROWS = "sweep": one program
                                 walks each whole row in blocks, twice or three times

Rows. Both logits are seen as (N, D, V) tensors, classes last (D = 1 for (R, V) logits; (B, T,
V) logits are read in place whatever their strides over B and T, a logits[:, :-1] view too).
Row r is (r // D, r % D).

Math, per row, with z_s = x_s / T (student), z_t = x_t / T (teacher), each relative to its own
max: d = z - m, s = sum_c exp(d_c), log p_c = d_c - log s (m taken as 0 for a row of -inf):
    forward_kl  sum_c p_t (log p_t - log p_s) = D_t / s_t + log s_s - log s_t,
                D_t = sum_c e_t (d_t - d_s),  e = exp(d)
    reverse_kl  sum_c p_s (log p_s - log p_t) = D_s / s_s + log s_t - log s_s,
                D_s = sum_c e_s (d_s - d_t)
    jsd         beta KL(p_t || M) + (1 - beta) KL(p_s || M),  M = beta p_t + (1 - beta) p_s,
                log M_c = logaddexp(log beta + log p_t,c, log(1 - beta) + log p_s,c)
Gradients w.r.t. the student's logits x_s (the teacher gets none):
    forward_kl  (p_s - p_t) / T
    reverse_kl  p_s (log p_s - log p_t - RKL) / T
    jsd         (1 - beta) p_s (log p_s - log M - K) / T,   K = KL(p_s || M)
(derivation: d/dz_c sum_j p_j g_j with sum_j p_j = 1 is p_c (g_c - sum_j p_j g_j) for the part
through p_s, and the log p_s part adds sum_j p_j (delta_jc - p_c) = 0; for JSD,
dJ/dp_s,c = (1 - beta) log(p_s,c / M_c).) A term whose probability is 0 is 0 (e = 0 adds
nothing to D, never 0 * inf), so a -inf teacher logit is allowed: forward KL and JSD stay
finite, and reverse KL is +inf where the student puts mass on such a class (the true value).
D_t is exactly 0 when the teacher equals the student, so equal distributions give exactly 0
and no cancellation of two large sums.

Long rows (V > config.ROW_SLICE_MAX_V) take config.LONG_ROWS's path, as cross-entropy's
do (kernels/xent.py): "sweep" the row sweep below; "two_pass", and "exchange" (distillation
has no exchange), the slice kernels' stages. Vocab-parallel shards always take the stages.

Stages (slice kernels; long rows and vocab-parallel shards): no program waits on
another. The stats kernel writes (m_s, s_s, m_t, s_t, D_t, D_s) of each (row, slice) (the
STATS fields below); the caller merges them with torch ops (reference.merge_stats; across
ranks after an all_gather), with m = max_k m_k per tensor:
    s = sum_k s_k exp(m_k - m)
    D_t = sum_k exp(m_t,k - m_t) (D_t,k + s_t,k ((m_t,k - m_t) - (m_s,k - m_s)))   (D_s alike)
For JSD the terms kernel then sums, per (row, slice), J's terms and K's (the caller sums
them over slices and ranks). The grad kernel writes each slice's gradient from the merged
statistics (and RKL or K).

The row sweep (_distill_sweep_kernel; LONG_ROWS = "sweep", config.SWEEP_*). A program takes
whole rows in grid-stride order (kernels.tiles.sweep_grid) and reads a row in blocks of
BLOCK_V columns, seen as LANES = BLOCK_V / VEC lanes of VEC adjacent columns (VEC =
row_align() over student, teacher and gradient: 16 bytes where the strides allow). Sweeps:
  1. statistics: each lane keeps the STATS of its columns, the block's (_pair_stats of the
     lane's VEC columns) merged in as blocks come by the merge above (_merge_stats), so a
     block's reductions stay inside a thread: no barrier, and block k + 1's loads may go out
     before block k's arithmetic (SWEEP_PREFETCH) or stay in flight (SWEEP_STAGES). At the
     row's end the lanes merge once (_reduce_stats): the row's m_s, s_s, m_t, s_t, D_t, D_s,
     and the KLs' loss;
  2. JSD only, the terms: J's and K's sums need both logsumexps, so a second sweep (each
     lane summing its own, added up at the row's end);
  3. with a gradient, the gradient: each block read, then written over nothing but itself
     (grad may alias the student).
SWEEP_REVERSE runs each sweep after the first from where the one before ended (the row's
end for the second, its start again for JSD's third), so that it reads first what is
likeliest still in L2; the eviction hints (SWEEP_EVICT) keep a row in L2 for a later sweep
and let the last sweep's reads and the gradient go first.

Reads of both logits per row (V (e_s + e_t) bytes each), forward + backward (forward alone):
    path                 forward / reverse KL   JSD     from
    whole rows           1 (1)                  1 (1)   HBM
    two_pass (stages)    2 (1)                  3 (2)   HBM: a launch reads every row
                                                        before the next launch begins
    sweep                2 (1)                  3 (2)   the first from HBM, the later ones
                                                        within microseconds of it
plus one write of the gradient (V e_s). The floor is one read and one write: the sweep makes
as many reads as the stages, and is faster only where its later sweeps hit L2. Predicted, not
measured: a bf16 row pair at V = 128256 is 513 KB, so a GPU's tens of MB of L2 hold about
a hundred rows between their sweeps; with a program a row resident on each SM (the sm_90
audit: 1 at 16 warps) more rows than that are in flight, and the later sweeps would hit L2
for the blocks read last (REVERSE), the rest from HBM. config.SWEEP_L2_FRACTION caps the
rows in flight to fit. JSD's transcendental functions (9 a column: 2 in the statistics, 4 in
the terms, 3 in the gradient) may bind before memory does. bench/gpu_tune.py --steps distill
measures both paths.

The gradient is pre-scaled by `row_scale` (the reduction's factor of each row, 0 on ignored
rows, whose loss and gradient are then exactly 0 whatever the logits) and cast to the
gradient's dtype. `grad` may alias the student: a program reads its whole tile (the sweep:
each block, in its last sweep) before it writes it, and writes only that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import config
from .tiles import (NEG_INF, _exp, _finite_or_zero, _row_offsets, row_align, row_tile,
                    split_plan, sweep_grid, sweep_launch_options, sweep_plan, sweep_policies)

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}

# The per-(row, slice) statistics STATS, in this order: m_s, s_s, m_t, s_t, D_t, D_s
# (reference.merge_stats reads the same).
N_STATS = tl.constexpr(6)


# --- shared helpers -------------------------------------------------------------------------


@triton.jit
def _load_raw(
    s_ptr, s_rows, stride_s_c, t_ptr, t_rows, stride_t_c,  # pointers, (R,) row offsets
    cols, mask, EVICT: tl.constexpr,  # (B,) column indices, (R, B) validity, load policy
):
    """(R, B) tiles x_s and x_t as stored (0 off the rows), loaded with eviction policy
    EVICT ("" for none)."""
    cols64 = cols.to(tl.int64)[None, :]
    x_s = tl.load(s_ptr + s_rows[:, None] + cols64 * stride_s_c, mask=mask, other=0.0,
                  eviction_policy=EVICT)
    x_t = tl.load(t_ptr + t_rows[:, None] + cols64 * stride_t_c, mask=mask, other=0.0,
                  eviction_policy=EVICT)
    return x_s, x_t


@triton.jit
def _tempered(x_s, x_t, mask, inv_temperature):
    """z_s = x_s / T and z_t = x_t / T in float32, -inf where not `mask`."""
    z_s = tl.where(mask, x_s.to(tl.float32) * inv_temperature, NEG_INF)
    z_t = tl.where(mask, x_t.to(tl.float32) * inv_temperature, NEG_INF)
    return z_s, z_t


@triton.jit
def _load_pair(
    s_ptr, s_rows, stride_s_c, t_ptr, t_rows, stride_t_c,  # pointers, (R,) row offsets
    cols, mask, inv_temperature,  # (B,) column indices, (R, B) validity
):
    """(R, B) tiles z_s = x_s / T and z_t = x_t / T in float32, -inf off the rows."""
    x_s, x_t = _load_raw(s_ptr, s_rows, stride_s_c, t_ptr, t_rows, stride_t_c, cols, mask, "")
    return _tempered(x_s, x_t, mask, inv_temperature)


@triton.jit
def _pair_stats(z_s, z_t):
    """(R,) m_s, s_s, m_t, s_t, D_t, D_s of the rows of (R, B) tiles (see the module
    docstring), and the (R, B) differences d_s, d_t. e = 0 (a -inf logit) adds 0 to D."""
    m_s = tl.max(z_s, axis=1)
    m_t = tl.max(z_t, axis=1)
    d_s = z_s - _finite_or_zero(m_s)[:, None]
    d_t = z_t - _finite_or_zero(m_t)[:, None]
    e_s = _exp(d_s)
    e_t = _exp(d_t)
    D_t = tl.sum(tl.where(e_t == 0.0, 0.0, e_t * (d_t - d_s)), axis=1)
    D_s = tl.sum(tl.where(e_s == 0.0, 0.0, e_s * (d_s - d_t)), axis=1)
    return m_s, tl.sum(e_s, axis=1), m_t, tl.sum(e_t, axis=1), D_t, D_s, d_s, d_t


@triton.jit
def _rescaled(m_s, s_s, m_t, s_t, D_t, D_s, M_s, M_t):
    """(s_s, s_t, D_t, D_s) of a column set whose maxes are (m_s, m_t), taken relative to
    the maxes (M_s, M_t) of a union it is part of (the module docstring's merge, one term):
        s -> s exp(m - M),  D_t -> exp(m_t - M_t) (D_t + s_t ((m_t - M_t) - (m_s - M_s)))
    and D_s alike. A set where the weighting tensor is all -inf (s = 0) adds 0 to D, never
    0 * inf; maxes of -inf count as 0 in the shifts, as in the sets' own differences."""
    shift_s = _finite_or_zero(m_s) - _finite_or_zero(M_s)
    shift_t = _finite_or_zero(m_t) - _finite_or_zero(M_t)
    w_s = _exp(m_s - _finite_or_zero(M_s))  # 0 for a set of -inf
    w_t = _exp(m_t - _finite_or_zero(M_t))
    D_t = tl.where(s_t == 0.0, 0.0, w_t * (D_t + s_t * (shift_t - shift_s)))
    D_s = tl.where(s_s == 0.0, 0.0, w_s * (D_s + s_s * (shift_s - shift_t)))
    return s_s * w_s, s_t * w_t, D_t, D_s


@triton.jit
def _merge_stats(m_s1, s_s1, m_t1, s_t1, D_t1, D_s1, m_s2, s_s2, m_t2, s_t2, D_t2, D_s2):
    """The STATS of the union of two column sets (elementwise: the sweep's lanes)."""
    m_s = tl.maximum(m_s1, m_s2)
    m_t = tl.maximum(m_t1, m_t2)
    s_s1, s_t1, D_t1, D_s1 = _rescaled(m_s1, s_s1, m_t1, s_t1, D_t1, D_s1, m_s, m_t)
    s_s2, s_t2, D_t2, D_s2 = _rescaled(m_s2, s_s2, m_t2, s_t2, D_t2, D_s2, m_s, m_t)
    return m_s, s_s1 + s_s2, m_t, s_t1 + s_t2, D_t1 + D_t2, D_s1 + D_s2


@triton.jit
def _reduce_stats(m_s, s_s, m_t, s_t, D_t, D_s):
    """(1,) STATS of the union of K column sets given by their (K,) STATS (the sweep's
    lanes at a row's end): the merge as reductions."""
    M_s = tl.max(m_s, axis=0)
    M_t = tl.max(m_t, axis=0)
    s_s, s_t, D_t, D_s = _rescaled(m_s, s_s, m_t, s_t, D_t, D_s, M_s, M_t)
    one = tl.zeros((1,), tl.float32)
    return (M_s + one, tl.sum(s_s, axis=0) + one, M_t + one, tl.sum(s_t, axis=0) + one,
            tl.sum(D_t, axis=0) + one, tl.sum(D_s, axis=0) + one)


@triton.jit
def _log_probs(z_s, z_t, m_s, s_s, m_t, s_t):
    """(R, B) log p_s and log p_t of a tile from its rows' (R,) merged m_s, s_s, m_t, s_t."""
    lp_s = (z_s - _finite_or_zero(m_s)[:, None]) - tl.log(s_s)[:, None]
    lp_t = (z_t - _finite_or_zero(m_t)[:, None]) - tl.log(s_t)[:, None]
    return lp_s, lp_t


@triton.jit
def _kl_loss(s_s, s_t, D_t, D_s, DIVERGENCE: tl.constexpr):
    """(R,) forward or reverse KL of whole rows from their statistics."""
    if DIVERGENCE == FORWARD_KL:
        return D_t / s_t + (tl.log(s_s) - tl.log(s_t))
    return D_s / s_s + (tl.log(s_t) - tl.log(s_s))


@triton.jit
def _log1p_unit(w):
    """log(1 + w) for w in [0, 1], as 2 atanh(u) = 2 (u + u^3 / 3 + ... + u^13 / 13) with
    u = w / (2 + w) in [0, 1/3]: the terms left out, from 2 u^15 / 15 on, are below 1.5e-8
    of the value (float64, over w in [0, 1]). No 1 + w is rounded, so a small w keeps its
    digits. A division and 7 multiply-adds, where tl.log is libdevice's logf, a longer
    sequence: JSD's row sweep at V = 128256 issues 32037 instructions a warp a row, where
    it issued 37045 with tl.log (sm_90, Triton 3.9)."""
    u = w / (2.0 + w)
    u2 = u * u
    return u * (2.0 + u2 * (2.0 / 3.0 + u2 * (2.0 / 5.0 + u2 * (2.0 / 7.0 + u2 * (
        2.0 / 9.0 + u2 * (2.0 / 11.0 + u2 * (2.0 / 13.0)))))))


@triton.jit
def _log_mixture(lp_s, lp_t, beta):
    """log M = logaddexp(log beta + log p_t, log(1 - beta) + log p_s) of (R, B) tiles; -inf
    where both probabilities are 0."""
    a = lp_t + tl.log(beta)
    b = lp_s + tl.log(1.0 - beta)
    hi = tl.maximum(a, b)
    return tl.where(hi == NEG_INF, NEG_INF, hi + _log1p_unit(_exp(tl.minimum(a, b) - hi)))


@triton.jit
def _jsd_terms(lp_s, lp_t, beta):
    """(R,) J = beta KL(p_t || M) + (1 - beta) KL(p_s || M) and K = KL(p_s || M) summed over
    the columns of (R, B) log-probability tiles, and the (R, B) tile log M."""
    log_m = _log_mixture(lp_s, lp_t, beta)
    p_s = _exp(lp_s)
    p_t = _exp(lp_t)
    k_s = tl.where(p_s == 0.0, 0.0, p_s * (lp_s - log_m))
    k_t = tl.where(p_t == 0.0, 0.0, p_t * (lp_t - log_m))
    K = tl.sum(k_s, axis=1)
    J = beta * tl.sum(k_t, axis=1) + (1.0 - beta) * K
    return J, K, log_m


@triton.jit
def _write_grad(
    grad_ptr, g_rows, stride_g_c, cols, mask,  # where: (R,) row offsets, (B,), (R, B)
    lp_s, lp_t, log_m, kl_s, scale,  # (R, B) tiles, (R,) RKL or K, (R,) row_scale
    beta, inv_temperature, DIVERGENCE: tl.constexpr, EVICT: tl.constexpr,
):
    """Stores scale * dloss/dx_s of an (R, B) tile (see the module docstring) with eviction
    policy EVICT ("" for none); exactly 0 on rows whose scale is 0, and where p_s = 0 for
    reverse KL and JSD."""
    p_s = _exp(lp_s)
    if DIVERGENCE == FORWARD_KL:
        g = p_s - _exp(lp_t)
    elif DIVERGENCE == REVERSE_KL:
        g = tl.where(p_s == 0.0, 0.0, p_s * (lp_s - lp_t - kl_s[:, None]))
    else:
        g = (1.0 - beta) * tl.where(p_s == 0.0, 0.0, p_s * (lp_s - log_m - kl_s[:, None]))
    g = tl.where(scale[:, None] == 0.0, 0.0, g * (scale * inv_temperature)[:, None])
    tl.store(grad_ptr + g_rows[:, None] + cols.to(tl.int64)[None, :] * stride_g_c,
             g.to(grad_ptr.dtype.element_ty), mask=mask, eviction_policy=EVICT)


@triton.jit
def _row_scale(row_scale_ptr, rows, row_mask, HAS_ROW_SCALE: tl.constexpr):
    """(R,) factor of each row's loss and gradient (1 without row_scale)."""
    if HAS_ROW_SCALE:
        return tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _merged_log_probs(stats_ptr, rows, row_mask, z_s, z_t):
    """(R, B) log p_s and log p_t of a tile from the rows' merged (R, 6) statistics."""
    out = stats_ptr + rows * N_STATS
    m_s = tl.load(out, mask=row_mask, other=0.0)
    s_s = tl.load(out + 1, mask=row_mask, other=1.0)
    m_t = tl.load(out + 2, mask=row_mask, other=0.0)
    s_t = tl.load(out + 3, mask=row_mask, other=1.0)
    return _log_probs(z_s, z_t, m_s, s_s, m_t, s_t)


@triton.jit
def _slice_tile(
    s_ptr, t_ptr, n_rows, n_cols, n_inner, slice_width,
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c, inv_temperature,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (i, j)'s tile of the slice kernels: rows i * ROWS.., the columns of slice j."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.program_id(1)
    cols = j * slice_width + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & ((tl.arange(0, BLOCK_V) < slice_width) & (cols < n_cols))[None, :]
    z_s, z_t = _load_pair(s_ptr, _row_offsets(rows, n_inner, stride_s_n, stride_s_d),
                          stride_s_c, t_ptr, _row_offsets(rows, n_inner, stride_t_n, stride_t_d),
                          stride_t_c, cols, mask, inv_temperature)
    return rows, j, cols, row_mask, mask, z_s, z_t


@triton.jit
def _lane_block(
    s_ptr, s_row, stride_s_c, t_ptr, t_row, stride_t_c, blk,  # pointers, row offsets, block
    lane_cols, vec, n_cols, inv_temperature,  # (LANES,) lane starts, (VEC,), V aligned
    BLOCK_V: tl.constexpr, EVICT: tl.constexpr,
):
    """Block blk of a row in the sweep: (LANES, VEC) tiles z_s, z_t (lane l holds columns
    blk * BLOCK_V + lane_cols[l] + vec), the (LANES,) first column of each lane and the
    (LANES, VEC) validity."""
    lane_start = blk * BLOCK_V + lane_cols
    mask = (lane_start[:, None] + vec[None, :]) < n_cols
    x_s, x_t = _load_raw(s_ptr, s_row + lane_start * stride_s_c, stride_s_c, t_ptr,
                         t_row + lane_start * stride_t_c, stride_t_c, vec, mask, EVICT)
    z_s, z_t = _tempered(x_s, x_t, mask, inv_temperature)
    return z_s, z_t, lane_start, mask


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _distill_rows_kernel(
    # pointers
    student_ptr, teacher_ptr, grad_ptr, row_scale_ptr, loss_ptr,
    # sizes
    n_rows, n_cols, n_inner,
    # strides (sample, position, class) of student, teacher and gradient
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c,
    stride_g_n, stride_g_d, stride_g_c,
    # options
    beta, inv_temperature,
    # compile-time switches
    DIVERGENCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Loss and gradient of ROWS whole rows of at most BLOCK_V columns, from registers.
    ROW_ALIGN divides V and every row's first element offset in the three tensors
    (kernels.tiles.row_align), so short rows (V = 1000 in bf16) still get vector loads."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    n_cols_aligned = n_cols // ROW_ALIGN * ROW_ALIGN  # = n_cols, now provably aligned
    mask = row_mask[:, None] & (cols < n_cols_aligned)[None, :]
    s_rows = tl.multiple_of(_row_offsets(rows, n_inner, stride_s_n, stride_s_d), ROW_ALIGN)
    t_rows = tl.multiple_of(_row_offsets(rows, n_inner, stride_t_n, stride_t_d), ROW_ALIGN)
    z_s, z_t = _load_pair(student_ptr, s_rows, stride_s_c, teacher_ptr, t_rows, stride_t_c,
                          cols, mask, inv_temperature)
    m_s, s_s, m_t, s_t, D_t, D_s, d_s, d_t = _pair_stats(z_s, z_t)
    lp_s = d_s - tl.log(s_s)[:, None]
    lp_t = d_t - tl.log(s_t)[:, None]
    if DIVERGENCE == JSD:
        loss, kl_s, log_m = _jsd_terms(lp_s, lp_t, beta)
    else:
        loss = _kl_loss(s_s, s_t, D_t, D_s, DIVERGENCE)
        kl_s = loss
        log_m = lp_t  # unused
    scale = _row_scale(row_scale_ptr, rows, row_mask, HAS_ROW_SCALE)
    tl.store(loss_ptr + rows, tl.where(scale == 0.0, 0.0, loss), mask=row_mask)
    if COMPUTE_GRAD:
        g_rows = tl.multiple_of(_row_offsets(rows, n_inner, stride_g_n, stride_g_d),
                                ROW_ALIGN)
        _write_grad(grad_ptr, g_rows, stride_g_c, cols, mask, lp_s, lp_t, log_m, kl_s, scale,
                    beta, inv_temperature, DIVERGENCE, "")


@triton.jit
def _distill_slice_stats_kernel(
    # pointers
    student_ptr, teacher_ptr, stats_ptr,
    # sizes: rows of n_cols columns cut into n_slices slices of slice_width
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, position, class) of student and teacher
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c,
    # options
    inv_temperature,
    # compile-time switches
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (i, j) writes the STATS of slice j of rows i * ROWS.. at
    stats[(row * n_slices + j) * 6 ..]."""
    rows, j, cols, row_mask, mask, z_s, z_t = _slice_tile(
        student_ptr, teacher_ptr, n_rows, n_cols, n_inner, slice_width, stride_s_n,
        stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c, inv_temperature, ROWS,
        BLOCK_V)
    m_s, s_s, m_t, s_t, D_t, D_s, d_s, d_t = _pair_stats(z_s, z_t)
    out = stats_ptr + (rows * n_slices + j) * N_STATS
    tl.store(out, m_s, mask=row_mask)
    tl.store(out + 1, s_s, mask=row_mask)
    tl.store(out + 2, m_t, mask=row_mask)
    tl.store(out + 3, s_t, mask=row_mask)
    tl.store(out + 4, D_t, mask=row_mask)
    tl.store(out + 5, D_s, mask=row_mask)


@triton.jit
def _distill_slice_terms_kernel(
    # pointers
    student_ptr, teacher_ptr, stats_ptr, terms_ptr,
    # sizes
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, position, class) of student and teacher
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c,
    # options
    beta, inv_temperature,
    # compile-time switches
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """JSD: program (i, j) writes slice j's sums of J's and K's terms, from the rows' merged
    statistics, at terms[(row * n_slices + j) * 2 ..]."""
    rows, j, cols, row_mask, mask, z_s, z_t = _slice_tile(
        student_ptr, teacher_ptr, n_rows, n_cols, n_inner, slice_width, stride_s_n,
        stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c, inv_temperature, ROWS,
        BLOCK_V)
    lp_s, lp_t = _merged_log_probs(stats_ptr, rows, row_mask, z_s, z_t)
    J, K, log_m = _jsd_terms(lp_s, lp_t, beta)
    out = terms_ptr + (rows * n_slices + j) * 2
    tl.store(out, J, mask=row_mask)
    tl.store(out + 1, K, mask=row_mask)


@triton.jit
def _distill_slice_grad_kernel(
    # pointers
    student_ptr, teacher_ptr, grad_ptr, stats_ptr, kl_s_ptr, row_scale_ptr,
    # sizes
    n_rows, n_cols, n_inner, slice_width,
    # strides (sample, position, class) of student, teacher and gradient
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c,
    stride_g_n, stride_g_d, stride_g_c,
    # options
    beta, inv_temperature,
    # compile-time switches
    DIVERGENCE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Program (i, j) writes the gradient of slice j of rows i * ROWS.. from the rows' merged
    statistics and (reverse KL, JSD) their RKL or K."""
    rows, j, cols, row_mask, mask, z_s, z_t = _slice_tile(
        student_ptr, teacher_ptr, n_rows, n_cols, n_inner, slice_width, stride_s_n,
        stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c, inv_temperature, ROWS,
        BLOCK_V)
    lp_s, lp_t = _merged_log_probs(stats_ptr, rows, row_mask, z_s, z_t)
    log_m = lp_t  # forward and reverse KL: unused
    kl_s = tl.zeros((ROWS,), tl.float32)
    if DIVERGENCE != FORWARD_KL:
        kl_s = tl.load(kl_s_ptr + rows, mask=row_mask, other=0.0)
    if DIVERGENCE == JSD:
        log_m = _log_mixture(lp_s, lp_t, beta)
    scale = _row_scale(row_scale_ptr, rows, row_mask, HAS_ROW_SCALE)
    _write_grad(grad_ptr, _row_offsets(rows, n_inner, stride_g_n, stride_g_d), stride_g_c,
                cols, mask, lp_s, lp_t, log_m, kl_s, scale, beta, inv_temperature, DIVERGENCE,
                "")


@triton.jit
def _distill_sweep_kernel(
    # pointers
    student_ptr, teacher_ptr, grad_ptr, row_scale_ptr, loss_ptr,
    # sizes
    n_rows, n_cols, n_inner,
    # strides (sample, position, class) of student, teacher and gradient
    stride_s_n, stride_s_d, stride_s_c, stride_t_n, stride_t_d, stride_t_c,
    stride_g_n, stride_g_d, stride_g_c,
    # options
    beta, inv_temperature,
    # compile-time switches
    DIVERGENCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    # the sweep: BLOCK_V columns a step as BLOCK_V / VEC lanes of VEC adjacent columns
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
    REVERSE: tl.constexpr, STATS_EVICT: tl.constexpr, TERMS_EVICT: tl.constexpr,
    GRAD_EVICT: tl.constexpr,
):
    """LONG_ROWS = "sweep": a program walks whole rows (grid-stride order), each in sweeps of
    BLOCK_V columns (the module docstring's "The row sweep"): the statistics (each lane's,
    merged once at the row's end), then for JSD the sums of J's and K's terms, then with a
    gradient the gradient. VEC divides V and every row's first offset in the three tensors
    (row_align()), so lanes load VEC columns at once. PREFETCH issues the first sweep's block
    k + 1 loads before block k's arithmetic (registers); STAGES > 1 lets Triton's pipeliner
    keep STAGES - 1 blocks in flight. REVERSE: each sweep after the first starts where the
    one before ended (the terms sweep from the row's end, the gradient's from wherever the
    sweep before it ended). *_EVICT: each sweep's eviction policy ("" for none): the
    launcher keeps a row in L2 for a later sweep ("evict_last") and lets the last go first."""
    LANES: tl.constexpr = BLOCK_V // VEC
    # With REVERSE the terms sweep runs backwards, so JSD's gradient sweep runs forwards.
    GRAD_BACKWARDS: tl.constexpr = REVERSE and DIVERGENCE != JSD
    lane_cols = tl.arange(0, LANES).to(tl.int64) * VEC  # (LANES,) first column of each lane
    vec = tl.arange(0, VEC)  # (VEC,)
    n_blocks = tl.cdiv(n_cols, BLOCK_V)
    n_cols_aligned = n_cols // VEC * VEC  # = n_cols, now provably a multiple of VEC
    # Per row, a sweep reads V * (student + teacher element bytes): the first from HBM, the
    # later ones from L2 where it still holds the blocks; the gradient sweep writes V * the
    # gradient's element bytes. Lanes keep their own statistics and sums, so a block's
    # reductions stay inside a thread: no barrier between one block's loads and the next's.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        rows = row + tl.zeros((1,), tl.int64)
        s_row = tl.multiple_of(_row_offsets(row, n_inner, stride_s_n, stride_s_d), VEC)
        t_row = tl.multiple_of(_row_offsets(row, n_inner, stride_t_n, stride_t_d), VEC)

        # First sweep: each lane's STATS, merged block by block (_merge_stats), then the
        # lanes' merged once (_reduce_stats): those of the whole row.
        m_s = tl.full((LANES,), NEG_INF, tl.float32)
        s_s = tl.zeros((LANES,), tl.float32)
        m_t = tl.full((LANES,), NEG_INF, tl.float32)
        s_t = tl.zeros((LANES,), tl.float32)
        D_t = tl.zeros((LANES,), tl.float32)
        D_s = tl.zeros((LANES,), tl.float32)
        if PREFETCH:
            x_s_next, x_t_next = _load_raw(
                student_ptr, s_row + lane_cols * stride_s_c, stride_s_c, teacher_ptr,
                t_row + lane_cols * stride_t_c, stride_t_c, vec,
                (lane_cols[:, None] + vec[None, :]) < n_cols_aligned, STATS_EVICT)
        for blk in tl.range(0, n_blocks, num_stages=STAGES):
            if PREFETCH:  # the next block's loads go out before this block's arithmetic
                lane_start = blk * BLOCK_V + lane_cols
                mask = (lane_start[:, None] + vec[None, :]) < n_cols_aligned
                x_s, x_t = x_s_next, x_t_next
                ahead = lane_start + BLOCK_V
                x_s_next, x_t_next = _load_raw(
                    student_ptr, s_row + ahead * stride_s_c, stride_s_c, teacher_ptr,
                    t_row + ahead * stride_t_c, stride_t_c, vec,
                    (ahead[:, None] + vec[None, :]) < n_cols_aligned, STATS_EVICT)
                z_s, z_t = _tempered(x_s, x_t, mask, inv_temperature)
            else:
                z_s, z_t, lane_start, mask = _lane_block(
                    student_ptr, s_row, stride_s_c, teacher_ptr, t_row, stride_t_c, blk,
                    lane_cols, vec, n_cols_aligned, inv_temperature, BLOCK_V, STATS_EVICT)
            bm_s, bs_s, bm_t, bs_t, bD_t, bD_s, _, _ = _pair_stats(z_s, z_t)
            m_s, s_s, m_t, s_t, D_t, D_s = _merge_stats(m_s, s_s, m_t, s_t, D_t, D_s,
                                                        bm_s, bs_s, bm_t, bs_t, bD_t, bD_s)
        m_s, s_s, m_t, s_t, D_t, D_s = _reduce_stats(m_s, s_s, m_t, s_t, D_t, D_s)

        if DIVERGENCE == JSD:  # Second sweep: J's and K's terms need both logsumexps.
            J = tl.zeros((LANES,), tl.float32)
            K = tl.zeros((LANES,), tl.float32)
            for k in tl.range(0, n_blocks, num_stages=STAGES):
                blk = n_blocks - 1 - k if REVERSE else k
                z_s, z_t, lane_start, mask = _lane_block(
                    student_ptr, s_row, stride_s_c, teacher_ptr, t_row, stride_t_c, blk,
                    lane_cols, vec, n_cols_aligned, inv_temperature, BLOCK_V, TERMS_EVICT)
                lp_s, lp_t = _log_probs(z_s, z_t, m_s, s_s, m_t, s_t)
                bJ, bK, _ = _jsd_terms(lp_s, lp_t, beta)
                J += bJ
                K += bK
            loss = tl.sum(J, axis=0) + tl.zeros((1,), tl.float32)
            kl_s = tl.sum(K, axis=0) + tl.zeros((1,), tl.float32)
        else:
            loss = _kl_loss(s_s, s_t, D_t, D_s, DIVERGENCE)
            kl_s = loss
        scale = _row_scale(row_scale_ptr, rows, rows >= 0, HAS_ROW_SCALE)
        tl.store(loss_ptr + rows, tl.where(scale == 0.0, 0.0, loss))

        if COMPUTE_GRAD:  # Last sweep: the gradient, each block written after it is read.
            g_row = tl.multiple_of(_row_offsets(row, n_inner, stride_g_n, stride_g_d), VEC)
            for k in tl.range(0, n_blocks, num_stages=STAGES):
                blk = n_blocks - 1 - k if GRAD_BACKWARDS else k
                z_s, z_t, lane_start, mask = _lane_block(
                    student_ptr, s_row, stride_s_c, teacher_ptr, t_row, stride_t_c, blk,
                    lane_cols, vec, n_cols_aligned, inv_temperature, BLOCK_V, GRAD_EVICT)
                lp_s, lp_t = _log_probs(z_s, z_t, m_s, s_s, m_t, s_t)
                log_m = lp_t  # forward and reverse KL: unused
                if DIVERGENCE == JSD:
                    log_m = _log_mixture(lp_s, lp_t, beta)
                # Lanes as the tile's rows: lane l's columns are lane_start[l] + vec.
                _write_grad(grad_ptr, g_row + lane_start * stride_g_c, stride_g_c, vec, mask,
                            lp_s, lp_t, log_m, kl_s, scale, beta, inv_temperature, DIVERGENCE,
                            GRAD_EVICT)


# --- launch plans and launchers ---------------------------------------------------------------


def rows3(x: torch.Tensor) -> torch.Tensor:
    """(R, V) -> (R, 1, V); (N, D, V) as is: the row view the launchers take."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def slice_plan(n_cols: int, n_rows: int) -> tuple[int, int, int, int, int]:
    """(ROWS, P, slice_width, BLOCK_V, num_warps) of the slice kernels: whole-row tiles when a
    row fits in one slice, else P slices of one row each (kernels.tiles.split_plan)."""
    if n_cols <= config.ROW_SLICE_MAX_V:
        rows, block_v, warps = row_tile(n_cols, n_rows)
        return rows, 1, max(n_cols, 1), block_v, warps
    n_slices, width, block_v, warps = split_plan(n_cols)
    return 1, n_slices, width, block_v, warps


def _strides(*tensors: torch.Tensor) -> tuple:
    return tuple(s for x in tensors for s in x.stride())


def distill_rows(
    student: torch.Tensor,  # (R, V) or (N, D, V), fp32/fp16/bf16, any strides
    teacher: torch.Tensor,  # the student's shape, fp32/fp16/bf16, any strides
    grad: torch.Tensor | None,  # the student's shape, written (may alias student), or None
    row_scale: torch.Tensor | None,  # (R,) float32 contiguous, or None for 1
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Whole rows (V <= config.ROW_SLICE_MAX_V): returns the (R,) float32 per-row loss,
    unscaled (0 where row_scale is 0); writes grad = row_scale * dloss/dx_s."""
    s3, t3 = rows3(student), rows3(teacher)
    N, D, V = s3.shape
    n_rows = N * D
    assert V <= config.ROW_SLICE_MAX_V, "longer rows take the slice kernels"
    loss = torch.empty(n_rows, device=student.device, dtype=torch.float32)
    if n_rows == 0:
        return loss
    g3 = rows3(grad) if grad is not None else s3  # never written without COMPUTE_GRAD
    rows, block_v, warps = row_tile(V, n_rows)
    _distill_rows_kernel[(triton.cdiv(n_rows, rows),)](
        s3, t3, g3, row_scale, loss, n_rows, V, D, *_strides(s3, t3, g3), float(beta),
        1.0 / float(temperature), DIVERGENCE=DIVERGENCES[divergence],
        COMPUTE_GRAD=grad is not None, HAS_ROW_SCALE=row_scale is not None, ROWS=rows,
        BLOCK_V=block_v, ROW_ALIGN=row_align(V, *(x.transpose(1, 2) for x in (s3, t3, g3))),
        num_warps=warps, enable_fp_fusion=config.FP_FUSION)
    return loss


def sweep_evictions(divergence: str, with_grad: bool) -> dict:
    """The eviction policies of the sweep's three sweeps (kernels.tiles.sweep_policies): the
    keeping one where the row is read again, the other for the last sweep made (the
    statistics' alone for a KL without a gradient, the terms' for JSD without one)."""
    keep, last = sweep_policies()
    made = ["STATS"] + (["TERMS"] if divergence == "jsd" else []) + (["GRAD"] if with_grad
                                                                    else [])
    return {f"{name}_EVICT": keep if name != made[-1] else last
            for name in ("STATS", "TERMS", "GRAD")}


def distill_sweep(
    student: torch.Tensor,  # (R, V) or (N, D, V), fp32/fp16/bf16, any strides
    teacher: torch.Tensor,  # the student's shape, fp32/fp16/bf16, any strides
    grad: torch.Tensor | None,  # the student's shape, written (may alias student), or None
    row_scale: torch.Tensor | None,  # (R,) float32 contiguous, or None for 1
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """distill_rows' contract for rows of any length, one program walking each whole row
    (config.LONG_ROWS = "sweep", config.SWEEP_*): returns the (R,) float32 per-row loss,
    unscaled (0 where row_scale is 0); writes grad = row_scale * dloss/dx_s."""
    s3, t3 = rows3(student), rows3(teacher)
    N, D, V = s3.shape
    n_rows = N * D
    loss = torch.empty(n_rows, device=student.device, dtype=torch.float32)
    if n_rows == 0:
        return loss
    g3 = rows3(grad) if grad is not None else s3  # never written without COMPUTE_GRAD
    block_v, warps = sweep_plan(V)
    vec = min(row_align(V, *(x.transpose(1, 2) for x in (s3, t3, g3))), block_v)
    held = V * (s3.element_size() + t3.element_size())  # a row's bytes between its sweeps
    _distill_sweep_kernel[sweep_grid(n_rows, held, student.device)](
        s3, t3, g3, row_scale, loss, n_rows, V, D, *_strides(s3, t3, g3), float(beta),
        1.0 / float(temperature), DIVERGENCE=DIVERGENCES[divergence],
        COMPUTE_GRAD=grad is not None, HAS_ROW_SCALE=row_scale is not None, BLOCK_V=block_v,
        VEC=vec, PREFETCH=config.SWEEP_PREFETCH, STAGES=config.SWEEP_STAGES,
        REVERSE=config.SWEEP_REVERSE, **sweep_evictions(divergence, grad is not None),
        num_warps=warps, enable_fp_fusion=config.FP_FUSION, **sweep_launch_options())
    return loss


def distill_slice_stats(
    student: torch.Tensor,  # (R, V) or (N, D, V): any V, a rank's classes or a whole row
    teacher: torch.Tensor,  # the student's shape
    *,
    temperature: float,
) -> torch.Tensor:
    """(R, P, 6) float32 STATS of each row's P slices (slice_plan)."""
    s3, t3 = rows3(student), rows3(teacher)
    N, D, V = s3.shape
    n_rows = N * D
    rows, n_slices, width, block_v, warps = slice_plan(V, n_rows)
    stats = torch.empty((n_rows, n_slices, 6), device=student.device, dtype=torch.float32)
    if n_rows == 0:
        return stats
    _distill_slice_stats_kernel[(triton.cdiv(n_rows, rows), n_slices)](
        s3, t3, stats, n_rows, V, D, n_slices, width, *_strides(s3, t3),
        1.0 / float(temperature), ROWS=rows, BLOCK_V=block_v, num_warps=warps,
        enable_fp_fusion=config.FP_FUSION)
    return stats


def distill_slice_terms(
    student: torch.Tensor,  # (R, V) or (N, D, V)
    teacher: torch.Tensor,  # the student's shape
    merged: torch.Tensor,  # (R, 6) float32 STATS of the whole rows
    *,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """(R, P, 2) float32 JSD sums of each slice: J's terms, K's terms."""
    s3, t3 = rows3(student), rows3(teacher)
    N, D, V = s3.shape
    n_rows = N * D
    rows, n_slices, width, block_v, warps = slice_plan(V, n_rows)
    terms = torch.empty((n_rows, n_slices, 2), device=student.device, dtype=torch.float32)
    if n_rows == 0:
        return terms
    _distill_slice_terms_kernel[(triton.cdiv(n_rows, rows), n_slices)](
        s3, t3, merged.to(torch.float32).contiguous(), terms, n_rows, V, D, n_slices, width,
        *_strides(s3, t3), float(beta), 1.0 / float(temperature), ROWS=rows,
        BLOCK_V=block_v, num_warps=warps, enable_fp_fusion=config.FP_FUSION)
    return terms


def distill_slice_grad(
    student: torch.Tensor,  # (R, V) or (N, D, V)
    teacher: torch.Tensor,  # the student's shape
    merged: torch.Tensor,  # (R, 6) float32 STATS of the whole rows
    kl_s: torch.Tensor | None,  # (R,) float32: RKL (reverse_kl) or K (jsd); None: forward_kl
    grad: torch.Tensor,  # the student's shape, written (may alias student)
    row_scale: torch.Tensor | None,  # (R,) float32 contiguous, or None for 1
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> None:
    """Writes grad = row_scale * dloss/dx_s of these columns from the whole rows' merged
    statistics."""
    s3, t3, g3 = rows3(student), rows3(teacher), rows3(grad)
    N, D, V = s3.shape
    n_rows = N * D
    if n_rows == 0 or V == 0:
        return
    rows, n_slices, width, block_v, warps = slice_plan(V, n_rows)
    _distill_slice_grad_kernel[(triton.cdiv(n_rows, rows), n_slices)](
        s3, t3, g3, merged.to(torch.float32).contiguous(),
        kl_s.to(torch.float32).contiguous() if kl_s is not None else None, row_scale,
        n_rows, V, D, width, *_strides(s3, t3, g3), float(beta), 1.0 / float(temperature),
        DIVERGENCE=DIVERGENCES[divergence], HAS_ROW_SCALE=row_scale is not None, ROWS=rows,
        BLOCK_V=block_v, num_warps=warps, enable_fp_fusion=config.FP_FUSION)

