"""The cross-entropy kernels (loss, logsumexp and gradient in one pass over the logits) and
their launchers, plus the small kernel that scales a saved gradient by grad_output.

One kernel per job, sharing the @triton.jit helpers at the top:
    _rows_kernel         whole rows (V <= config.ROW_SLICE_MAX_V), a tile of ROWS rows each
    _split_kernel        longer rows cut into P slices, one program a slice, first launch
    _finish_kernel       the second launch: only the slices deferred by the first
    _two_pass_stats_kernel   longer rows without the exchange: each slice's statistics
    _two_pass_finish_kernel  then each slice's loss and gradient from all of its row's
    _sweep_kernel        longer rows, one program walking each whole row twice in blocks
    _slice_stats_kernel  per-row statistics of a vocab-parallel rank's classes
    _slice_grad_kernel   a rank's gradient from the merged statistics of the whole rows
    _scale_rows_kernel   grad[row] *= grad_output[row] (backward)

Rows. The logits are seen as a (N, V, D) tensor: N samples, V classes, D positions (D = 1
for the usual (N, V) logits; (N, V, d1, ..., dk) inputs have D = d1 * ... * dk). Row r is
sample r // D at position r % D; any strides, so a row-strided (N, V) view is read in place.

Math, per row with logits z = softcap(x) / T (softcap(x) = s tanh(x / s), or x; T the
temperature), weights w (all 1 without `weight`), smoothing eps:
    lse   = log sum_c exp(z_c)                      p_c = exp(z_c - lse)
    loss  = a * (lse - z_y) + b * sum_c u_c * (lse - z_c)        (+ zs * lse^2, added outside)
      class index y:       a = (1 - eps) * w_y,  b = eps / V,  u_c = w_c
      class probabilities: a = 0,                b = 1,        u_c = w_c * ((1 - eps) t_c + eps / V)
    dloss/dz_c = p_c * (a + b * U) - b * u_c - a * [c == y]  (+ 2 zs lse p_c),   U = sum_c u_c
    H     = lse - sum_c p_c z_c = -sum_c p_c log p_c          (the entropy)
    dH/dz_c = p_c (lse - z_c - H) = -p_c (log p_c + H)         (0 where z_c = -inf: p_c = 0)
A row weight r multiplies the CE gradient (with its z-loss), an entropy weight e adds e dH/dz
(the caller adds r ce and e H to the loss), and dz/dx = (1 - (softcap(x) / s)^2) / T
multiplies the whole gradient. The argmax is the first column of the largest z.

Statistics (m, s, S, U, Q) of a set of columns: m the max, s = sum exp(z - m), S = sum u (m - z)
(kept relative to the max, so huge equal logits cancel exactly), U = sum u, and for the
entropy Q = sum exp(z - m) (z - m) (also relative to the max; a -inf z adds 0, not 0 * inf).
Sets merge as
    m = max_k m_k,  s = sum_k s_k exp(m_k - m),  S = sum_k S_k + U_k (m - m_k),  U = sum_k U_k,
    Q = sum_k exp(m_k - m) (Q_k + s_k (m_k - m)),  argmax = least argmax_k among k with m_k = m
and then lse - z_y = log s + (m - z_y), sum_c u_c (lse - z_c) = U log s + S and
H = log s - Q / s: two terms >= 0 (s >= 1, Q <= 0), so the entropy is never negative, not
even by rounding, and needs no clamp.

Whole rows (_rows_kernel). A program holds a (ROWS, BLOCK_V) tile, ROWS whole rows, in
registers: one read of the logits, one write of the gradient. Short rows (V = 2 .. 1000) are
many rows per program, so the lanes of a warp spread over rows instead of idling on padding,
and ROW_ALIGN (row_align()) tells the compiler how far apart aligned row starts are, so
that V = 1000 in bf16 (2000-byte rows) still gets 16-byte loads.

Long rows: three paths, config.LONG_ROWS. A row of V > config.ROW_SLICE_MAX_V columns is cut
into P slices of equal width (a multiple of 16, so slices start aligned), one program a
slice, so that even a few rows fill the GPU. The slices' statistics are merged by the
formulas above; the paths differ in how a slice learns the merged row:
  "exchange"  one read of the logits: the slices of a row exchange their statistics through
              global memory while they hold their logits in registers (below);
  "two_pass"  no program waits on another: a first launch writes each slice's record, a
              second reads the slice again, merges the records and writes the loss and
              gradient (below). 1.5x the exchange's bytes with a gradient (read, read, write).
  "sweep"     no slices: one program a row reads it twice in blocks (below), the second
              time from L2 where the first read left it; HBM sees one read when it does.
A call under "exchange" takes "two_pass" where a row's P slices might not all be resident at
once (long_rows_path(): P > config.SPLIT_RESIDENT_MARGIN x SMs x programs per SM), since
the exchange is fast only when a row's siblings run together. Vocab parallelism uses neither:
its rank slices go through _slice_stats_kernel and _slice_grad_kernel.

Split rows, read once (_split_kernel, _finish_kernel; LONG_ROWS = "exchange"). Program
(row, j) holds slice j in registers and
  1. stores its record (the statistics of its slice and z_y if the target is one of its
     columns, else 0), a barrier, then adds 1 to the row's arrival counter (acq_rel);
  2. if the counter's old value was P - 1 it is the row's last, and every record is visible;
     else it polls the counter (acquire) until it reads P, at most `spin_limit` times and,
     on NVIDIA, at most config.SLICE_WAIT_NS nanoseconds of %globaltimer;
  3. loads all P records at once, one (P_PAD, RECORD_WIDTH) tile, and merges them with
     tl.max / tl.sum: the same merge in every program, so every slice uses the same lse;
  4. writes the gradient of its slice from its registers (and slice 0 the loss and lse).
The merge is one atomic and one vector load whatever P (plus the polls of a program that
arrives early), so its dependent global round trips do not grow with P; the audit
(bench/compile_audit.py) counts them in the compiled code at several P. One counter rather
than P flags: the arrival's acq_rel atomic both publishes and tells the last program that
it need not poll at all, and a poll is one scalar acquire load whatever P. Records are
stored and loaded at L2 (.cg): other SMs wrote them, and L1 is not coherent. Each program
reads all P records (32 P bytes, from L2), 1/4 of its bf16 slice's bytes at P = 63. Without
a gradient only slice 0, the loss's writer, waits for the others; the rest publish and exit.

Why a record is visible to a sibling that saw P arrivals (NVIDIA, PTX memory model).
Program k stores its record with st.global.cg: cached at L2 only, and L2 is the point of
coherence of every SM on NVIDIA GPUs. The barrier (bar.sync) orders all of the program's
threads' stores before the one thread's arrival, whose atom.add.acq_rel.gpu is a release
at GPU scope: every write before it in the program (made cumulative by the barrier) is
visible to any thread that later reads the counter with acquire semantics at GPU scope and
sees the value it wrote or a later one. The last arrival's own atomic is that acquire; a
waiting program's poll (an atomic add of 0, acquire) is the other. Read-modify-writes
extend release sequences, so an acquire that reads P synchronizes with all P arrivals, and
the record loads come after it in program order, with ld.global.cg (L2, never a stale L1
line). On ROCm the same code's lowering across an MI300X's XCDs (each with its own L2) is
unchecked; config.py makes "two_pass" the default there.

How long a program waits. On NVIDIA the wait is bounded in time: SLICE_WAIT_NS of the
global timer (TIMED_WAIT, a constexpr the launcher sets on NVIDIA GPUs only, so the
interpreter and AMD compiles never see the PTX), with the poll count as a backstop. A
program whose siblings are not coming soon (not resident: a small or shared GPU) so gives
up after microseconds, not after 16384 polls (milliseconds), and the capacity rule above
keeps such rows off the exchange in the first place. Elsewhere only the count bounds it.

Deferral and the second launch. A program whose siblings have not all arrived when its
wait runs out writes nothing, sets its deferral flag and moves on. After the first
launch ends every record exists; _finish_kernel's program (row, j) reads its flag, and only
if it was deferred re-reads its own slice, loads the records and does steps 3-4. A program
that was not deferred reads one int32 and nothing else. No program ever reads another
slice's logits (the target logit travels in the records), and each writes only its own
slice, so the gradient may overwrite the logits (inplace_backward, the linear op's chunks).

Deadlock freedom, and persistent or not. Every program publishes before it waits and waits
at most `spin_limit` polls, so each finishes whatever the scheduler does: siblings need not
be co-resident for the kernel to be correct, only for it to be fast. A persistent program
publishes slice k before it waits on it and then goes on to slice k + grid, so the same
argument holds for it. config.PERSISTENT picks the schedule: False launches one program a
slice; True launches config.PERSISTENT_PROGRAMS_PER_SM programs per SM that walk the
slices in grid-stride order (item = row * P + j), so the siblings of a row are taken by
neighbouring programs in the same round. Both run the same kernels (a grid-stride loop that
runs once when the grid covers every item). The default is one program a slice: the grid
is dispatched in order, so a row's P siblings (neighbouring program ids) start together
but for the few rows cut by the edge of a wave, and slices of 4096 columns at 16 warps
(48 registers, no spills in the sm_90 audit) keep 2 programs resident per SM, one
exchanging while the other streams; the persistent schedule saves dispatching hundreds of
thousands of short programs, and all its programs are resident at once when that many fit
on an SM, but a program's slices then run one after another. Which is faster is for bench_xent.py --sweep to say on a GPU. Triton's interpreter
runs programs one after another, with config.INTERPRET_SLICE_SPIN_LIMIT polls (0 by
default): there every program of a row but its last arrival is deferred, so tests run both
paths on CPU.

Two passes (_two_pass_stats_kernel, _two_pass_finish_kernel; LONG_ROWS = "two_pass"). The
first launch's program (row, j) reads slice j and stores its record, exactly the exchange's
record (per slice: m_j, s_j = sum exp(z - m_j), S_j, U_j, Q_j, z_y if the target is in the
slice, and the slice's first argmax), with a plain store: the kernel's end publishes it.
The second launch's program (row, j) reads slice j again, loads the row's P records and
merges them as the exchange does (m = max m_j, s = sum s_j exp(m_j - m), ...: the same
_merge_records), then writes the gradient of slice j (and slice 0 the row's loss). Every
record is written before any gradient, so the gradient may overwrite the logits. Without a
gradient only slice 0 of each row runs in the second launch, and reads no logits.

The row sweep (_sweep_kernel; LONG_ROWS = "sweep"). A program takes whole rows in grid-stride
order (one a program unless config.SWEEP_PROGRAMS_PER_SM or SWEEP_L2_FRACTION caps the
grid). Its first sweep reads the row in blocks of BLOCK_V columns seen as LANES = BLOCK_V /
VEC lanes of VEC adjacent columns (VEC = row_align(): 16 bytes where the strides allow); each
lane keeps the statistics (m, s, S, U, Q, argmax) of its columns across blocks, merged block
by block with the formulas above (_tile_stats over the lane's VEC columns, then _merge_pair),
so a block's reductions stay inside a thread: no barrier, and no wait between one block's
loads and the next's (config.SWEEP_PREFETCH issues block k + 1's loads before block k's
arithmetic; SWEEP_STAGES lets Triton's pipeliner keep blocks in flight). At the row's end
the lanes merge once (_reduce_stats) into the loss; the target's z is one load. With a
gradient a second sweep reads the row again, last block first (SWEEP_REVERSE: the blocks the
first sweep read last are the likeliest still in L2), and writes each block's gradient over
nothing but that block, after reading it, so the gradient may overwrite the logits.
Per row: V elem bytes read from HBM, V elem read again (from L2 where it held them) and V
elem written.

Records. float32, RECORD_WIDTH fields a slice (32 bytes, aligned for vector loads), at
record_ptr + (row * P + j) * RECORD_WIDTH, fields by name: REC_M, REC_SUM_EXP, REC_S, REC_U,
REC_ZY, REC_Q, REC_ARGMAX (a column index as a float, exact below ARGMAX_MAX_COLS); the
last is free for more per-slice statistics (add a name, fill it in _pack_record, merge it in
_merge_records). The sync buffer is int32, zeroed: the arrival
counters of the rows at [0, rows), then the deferral flags at rows + row * P + j.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import config
from .tiles import (LOG2E, NEG_INF, _exp, _finite_or_zero, _row_offsets, interpreting, row_align,
                    row_tile, sm_count, split_plan, sweep_grid, sweep_launch_options, sweep_plan,
                    sweep_policies)

# The split-row record (see the module docstring).
RECORD_WIDTH = tl.constexpr(8)
REC_M = tl.constexpr(0)  # max of the slice's z
REC_SUM_EXP = tl.constexpr(1)  # sum exp(z - m)
REC_S = tl.constexpr(2)  # sum u (m - z)
REC_U = tl.constexpr(3)  # sum u
REC_ZY = tl.constexpr(4)  # the target's z if it is one of the slice's columns, else 0
REC_Q = tl.constexpr(5)  # sum exp(z - m) (z - m): the entropy's statistic
REC_ARGMAX = tl.constexpr(6)  # the row's column of the slice's first max, as a float
# Column indices travel as float32 in the records, exact below this many classes.
ARGMAX_MAX_COLS = tl.constexpr(2**24)


# --- shared helpers -------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # Triton has no portable tanh. 1 - 2 / (exp(2x) + 1) is stable at both ends (exp overflow
    # gives +-1) but cancels near 0, where a large softcap puts every logit: below |x| = 0.35
    # take the odd Taylor series to x^11 instead (truncation < 4e-9 there). 1 / v for
    # v = exp(2x) + 1 >= 1 is rsqrt(v)^2: one rsqrt.approx.ftz (relative error < 2^-22.9 by
    # the PTX manual, and 0 at v = inf) where a division takes a range test, a scaling and a
    # reciprocal (sm_90 SASS, Triton 3.6 and 3.9). On a GPU that bounds tanh's absolute
    # error by about 2e-7 (5 ulp at |x| = 0.35, fewer above): softcap s moves a logit by at
    # most 2e-7 s. The interpreter's rsqrt is exact; the GPU check's parity subset tests it.
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    r = tl.math.rsqrt(tl.exp2(x * (2.0 * LOG2E)) + 1.0)
    return tl.where(tl.abs(x) < 0.35, series, 1.0 - 2.0 * (r * r))


@triton.jit
def _row_targets(
    target_ptr, weight_ptr, t_rows, row_mask,  # (R,) target offsets and row validity
    ignore_index, class_offset, n_classes, label_smoothing,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """Per row: the target's column here y, whether the row counts (row_ok), whether it gets
    NaN (an unchecked bad target: never a wild read), and the coefficients a, b."""
    if PROB_TARGET:
        y = tl.full(t_rows.shape, -1, tl.int64)
        row_ok = row_mask
        row_nan = tl.zeros(t_rows.shape, tl.int1)
        a = tl.zeros(t_rows.shape, tl.float32)
        b = a + 1.0
    else:
        y_global = tl.load(target_ptr + t_rows, mask=row_mask, other=ignore_index)
        y_global = y_global.to(tl.int64)
        ignored = y_global == ignore_index
        in_range = (y_global >= 0) & (y_global < n_classes)
        row_ok = in_range & (~ignored) & row_mask
        row_nan = (~in_range) & (~ignored) & row_mask
        w_y = tl.full(t_rows.shape, 1.0, tl.float32)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + tl.where(row_ok, y_global, 0), mask=row_ok, other=0.0)
        a = (1.0 - label_smoothing) * w_y
        b = tl.zeros(t_rows.shape, tl.float32) + label_smoothing / n_classes
        y = y_global - class_offset
    return y, row_ok, row_nan, a, b


@triton.jit
def _tile_z(x, mask, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(x) / T in float32 (-inf where not `mask`) and t = tanh(x / softcap) (x
    without softcap) of a tile of logits x as loaded."""
    x = x.to(tl.float32)
    t = x
    if HAS_SOFTCAP:
        t = _tanh(x * (1.0 / softcap))
        x = softcap * t
    return tl.where(mask, x * inv_temperature, NEG_INF), t


@triton.jit
def _tile_u(
    t_ptr, t_offs, weight_ptr, w_offs, mask,  # offsets of the tile's targets and weights
    label_smoothing, n_classes,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """The column weights u of a tile (the mask's shape): the class weights (1 without), times
    the smoothed target probabilities for probability targets."""
    u = mask.to(tl.float32)
    if HAS_WEIGHT:
        # The weights as the mask's shape: Triton 3.4's load broadcasts the mask to the
        # pointer, not the pointer to the mask.
        u = tl.load(tl.broadcast_to(weight_ptr + w_offs, mask.shape), mask=mask, other=0.0)
    if PROB_TARGET:
        q = tl.load(t_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / n_classes
        u = u * tl.where(mask, q, 0.0)
    return u


@triton.jit
def _load_tile(
    x_ptr, x_rows, t_ptr, t_rows, weight_ptr,  # (R,) row offsets of logits and targets
    cols, mask,  # (B,) column indices, (R, B) validity
    stride_x_c, stride_t_c, label_smoothing, class_offset, n_classes, softcap, inv_temperature,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """An (R, B) tile: z = softcap(x) / T (-inf off the rows), t = tanh(x / softcap), and u.
    Column c is class class_offset + c of n_classes (a vocab-parallel rank's slice)."""
    cols64 = cols.to(tl.int64)[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + cols64 * stride_x_c, mask=mask, other=0.0)
    z, t = _tile_z(x, mask, softcap, inv_temperature, HAS_SOFTCAP)
    u = _tile_u(t_ptr, t_rows[:, None] + cols64 * stride_t_c, weight_ptr,
                class_offset + cols64, mask, label_smoothing, n_classes, PROB_TARGET,
                HAS_WEIGHT, HAS_SMOOTHING)
    return z, t, u


@triton.jit
def _tile_stats(z, u, TRACK_U: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr):
    """(R,) statistics (m, s, S, U, Q) of the rows of an (R, B) tile of z and weights u, and
    the tile column of each row's first max (0 unless ARGMAX: the max's own reduction, which
    breaks ties to the left, gives it)."""
    if ARGMAX:
        m, idx = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
    else:
        m = tl.max(z, axis=1)
        idx = tl.zeros(m.shape, tl.int32)
    m_ref = _finite_or_zero(m)  # an all -inf row keeps s = 0, not nan
    Q = tl.zeros(m.shape, tl.float32)
    if ENTROPY:
        # s and Q in one reduction; e = 0 (a -inf logit, or one that underflows) adds 0 to
        # Q, not 0 * -inf.
        d = z - m_ref[:, None]
        e = _exp(d)
        s, Q = tl.reduce((e, tl.where(e == 0.0, 0.0, e * d)), 1, _add_pair)
    else:
        s = tl.sum(_exp(z - m_ref[:, None]), axis=1)
    S = tl.zeros(m.shape, tl.float32)
    U = tl.zeros(m.shape, tl.float32)
    if TRACK_U:
        # z == m also covers an all -inf row, whose terms are 0 relative to its own max.
        S = tl.sum(u * tl.where((u == 0.0) | (z == m[:, None]), 0.0, m[:, None] - z), axis=1)
        U = tl.sum(u, axis=1)
    return m, s, S, U, Q, idx.to(tl.int64)


@triton.jit
def _add_pair(s1, q1, s2, q2):
    return s1 + s2, q1 + q2


@triton.jit
def _row_factors(row_weight_ptr, entropy_weight_ptr, rows, row_mask,
                 HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr):
    """(R,) row weights r and entropy-gradient weights e (0 where not given: then unused)."""
    r = tl.zeros(rows.shape, tl.float32)
    e = tl.zeros(rows.shape, tl.float32)
    if HAS_ROW_WEIGHT:
        r = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)
    if HAS_ENTROPY_WEIGHT:
        e = tl.load(entropy_weight_ptr + rows, mask=row_mask, other=0.0)
    return r, e


@triton.jit
def _merge_pair(m1, s1, S1, U1, Q1, m2, s2, S2, U2, Q2, TRACK_U: tl.constexpr,
                ENTROPY: tl.constexpr):
    """Statistics of the union of two column sets (the slice-statistics kernel's loop)."""
    m = tl.maximum(m1, m2)
    m_ref = _finite_or_zero(m)
    e1 = _exp(m1 - m_ref)
    e2 = _exp(m2 - m_ref)
    s = s1 * e1 + s2 * e2
    S = S1
    U = U1
    Q = Q1
    if TRACK_U:
        # Guards keep 0 * inf (no weight yet, or an -inf max) out of the sums.
        S = (S1 + U1 * tl.where((m == m1) | (U1 == 0.0), 0.0, m - m1)
             + S2 + U2 * tl.where((m == m2) | (U2 == 0.0), 0.0, m - m2))
        U = U1 + U2
    if ENTROPY:  # Q = sum_k exp(m_k - m) (Q_k + s_k (m_k - m)), guarded as S is
        Q = (e1 * (Q1 + s1 * tl.where((m == m1) | (s1 == 0.0), 0.0, m1 - m))
             + e2 * (Q2 + s2 * tl.where((m == m2) | (s2 == 0.0), 0.0, m2 - m)))
    return m, s, S, U, Q


@triton.jit
def _target_logit(z, cols, mask, y, row_ok):
    """(R,) z[r, y[r]] where the row counts and that column is in the tile, else 0."""
    hit = mask & (cols[None, :] == y[:, None]) & row_ok[:, None]
    return tl.sum(tl.where(hit, z, 0.0), axis=1)


@triton.jit
def _entropy(s, Q):
    """H = log s - Q / s: two terms >= 0 (s >= 1 holds the max's exp(0) = 1, and Q <= 0), so
    H never goes negative, not even by rounding."""
    return tl.log(s) - Q / s


@triton.jit
def _write_loss(ce_ptr, lse_ptr, entropy_ptr, argmax_ptr, rows, row_mask,
                m, s, S, U, z_y, Q, idx, a, b, row_ok, row_nan,
                TRACK_U: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr):
    """ce = a (log s + m - z_y) + b (U log s + S), lse = m + log s, and if asked for the
    entropy H (0 on ignored rows) and the argmax (-1 there) of (R,) rows."""
    log_s = tl.log(s)
    ce = a * (log_s + (m - z_y))
    if TRACK_U:
        ce += b * (U * log_s + S)
    ce = tl.where(row_ok, ce, 0.0)
    ce = tl.where(row_nan, float("nan"), ce)
    tl.store(ce_ptr + rows, ce, mask=row_mask)
    tl.store(lse_ptr + rows, m + log_s, mask=row_mask)
    if ENTROPY:
        H = tl.where(row_ok, _entropy(s, Q), 0.0)
        tl.store(entropy_ptr + rows, tl.where(row_nan, float("nan"), H), mask=row_mask)
    if ARGMAX:
        tl.store(argmax_ptr + rows, tl.where(row_ok, idx, -1), mask=row_mask)


@triton.jit
def _grad_tile(
    cols, z, t, u, y, m, s, U, H, a, b, r, e, row_ok, row_nan,  # (B,), (R, B) tiles, (R,) rows
    scale_ptr, lse_square_scale, softcap, inv_temperature,
    HAS_SCALE: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TRACK_U: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    WITH_TARGET: tl.constexpr = True,
):
    """The float32 (R, B) gradient tile, column c of row i being class cols[c] - y[i] + the
    row's target (y is relative to the tile, as cols are; without WITH_TARGET the target's
    -a term is left out, for a caller that writes the target's column itself):
    dloss/dz = r ((p (a + b U) - b u - a [c == y]) * ce_scale + 2 zs lse p * z_scale)
    + e p (log s + m - z - H), times dz/dx = softcap slope / T; the scales are the
    reduction's 1/denominators ("mean"), else 1; r the row weight, e the entropy's (already
    scaled by the caller)."""
    scale_ce = 1.0
    scale_z = 1.0
    if HAS_SCALE:
        scale_ce = tl.load(scale_ptr)
        scale_z = tl.load(scale_ptr + 1)
    log_s = tl.log(s)
    coef = (a + b * U) * scale_ce
    if HAS_ZLOSS:
        coef += 2.0 * lse_square_scale * (m + log_s) * scale_z
    a_scaled = a * scale_ce
    b_scaled = b * scale_ce
    if HAS_ROW_WEIGHT:
        coef = coef * r
        a_scaled = a_scaled * r
        b_scaled = b_scaled * r
    p = _exp(z - m[:, None]) * (1.0 / s)[:, None]
    g = p * coef[:, None]
    if WITH_TARGET:
        g = g - tl.where(cols[None, :] == y[:, None], a_scaled[:, None], 0.0)
    if TRACK_U:
        g = g - b_scaled[:, None] * u
    if HAS_ENTROPY_WEIGHT:
        # dH/dz_c = p_c (lse - z_c - H), with lse - z_c = log s + (m - z_c) (exact for huge
        # equal logits); a -inf logit has p = 0 and adds 0, not 0 * inf.
        dH = tl.where(z == NEG_INF, 0.0, p * ((log_s - H)[:, None] + (m[:, None] - z)))
        g = g + e[:, None] * dH
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    g = g * inv_temperature
    g = tl.where(row_ok[:, None], g, 0.0)
    return tl.where(row_nan[:, None], float("nan"), g)


@triton.jit
def _write_grad(
    grad_ptr, g_rows, cols, mask, stride_g_c,  # where: (R,) row offsets, (B,), (R, B)
    z, t, u, y, m, s, U, H, a, b, r, e, row_ok, row_nan,  # (R, B) tiles, (R,) row values
    scale_ptr, lse_square_scale, softcap, inv_temperature,
    HAS_SCALE: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TRACK_U: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
):
    """Stores _grad_tile's gradient in the gradient's dtype."""
    g = _grad_tile(cols, z, t, u, y, m, s, U, H, a, b, r, e, row_ok, row_nan, scale_ptr,
                   lse_square_scale, softcap, inv_temperature, HAS_SCALE, HAS_ZLOSS,
                   HAS_SOFTCAP, TRACK_U, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)
    tl.store(grad_ptr + g_rows[:, None] + cols.to(tl.int64)[None, :] * stride_g_c,
             g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pack_record(m, s, S, U, z_y, Q, idx):
    """(1, RECORD_WIDTH) record of one slice from its (1,) statistics; unused fields 0."""
    k = tl.arange(0, RECORD_WIDTH)[None, :]
    rec = tl.where(k == REC_M, m[:, None], 0.0)
    rec = tl.where(k == REC_SUM_EXP, s[:, None], rec)
    rec = tl.where(k == REC_S, S[:, None], rec)
    rec = tl.where(k == REC_U, U[:, None], rec)
    rec = tl.where(k == REC_Q, Q[:, None], rec)
    rec = tl.where(k == REC_ARGMAX, idx.to(tl.float32)[:, None], rec)
    return tl.where(k == REC_ZY, z_y[:, None], rec)


@triton.jit
def _slice_record(z, u, cols, mask, y, row_ok, j, slice_width, TRACK_U: tl.constexpr,
                  ENTROPY: tl.constexpr, ARGMAX: tl.constexpr):
    """(1, RECORD_WIDTH) record of slice j of a row from its (1, BLOCK_V) tile: the slice's
    statistics, the target's z if it is one of the slice's columns (else 0), and the row's
    column of the slice's first max."""
    m, s, S, U, Q, idx = _tile_stats(z, u, TRACK_U, ENTROPY, ARGMAX)
    return _pack_record(m, s, S, U, _target_logit(z, cols, mask, y, row_ok), Q,
                        idx + j * slice_width)


@triton.jit
def _clock_ns():
    """The GPU's global nanosecond timer (%globaltimer, NVIDIA only: PTX), as this thread
    reads it: threads read it at their own moments, so values differ between warps."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _any_thread(flag):
    """1 in every thread of the program if the int32 `flag` is nonzero in any of them, else
    0 (PTX's barrier reduction, bar.red.or: every thread of the program must reach it). A
    loop that holds barriers (a scalar atomic's broadcast) must be left by all warps at
    once: a per-thread timer reading alone would let them disagree."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $1, 0; bar.red.or.pred p, 0, p; selp.s32 $0, 1, 0, p; }",
        "=r,r", [flag], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _field(rec, name):
    """(P_PAD,) column `name` of a (P_PAD, RECORD_WIDTH) tile of records."""
    k = tl.arange(0, RECORD_WIDTH)[None, :]
    return tl.sum(tl.where(k == name, rec, 0.0), axis=1)


@triton.jit
def _reduce_stats(m, s, S, U, Q, idx, TRACK_U: tl.constexpr, ENTROPY: tl.constexpr,
                  ARGMAX: tl.constexpr):
    """(1,) statistics (m, s, S, U, Q) of the union of K column sets given by their (K,)
    statistics (the merge of the module docstring, as reductions), and the least of the
    sets' first-max columns `idx` among those whose max is the union's (a set that is not
    there has m = -inf and idx >= ARGMAX_MAX_COLS)."""
    m_all = tl.max(m, axis=0)
    m_ref = _finite_or_zero(m_all)
    w = _exp(m - m_ref)
    s_all = tl.sum(s * w, axis=0)
    S_all = tl.zeros((), tl.float32)
    U_all = tl.zeros((), tl.float32)
    if TRACK_U:
        # Guards keep 0 * inf (a set without weight, or an all -inf set) out of S.
        S_all = tl.sum(S + U * tl.where((m == m_all) | (U == 0.0), 0.0, m_all - m), axis=0)
        U_all = tl.sum(U, axis=0)
    Q_all = tl.zeros((), tl.float32)
    if ENTROPY:  # Q = sum_k exp(m_k - m) (Q_k + s_k (m_k - m)), guarded as S is
        Q_all = tl.sum(w * (Q + s * tl.where((m == m_all) | (s == 0.0), 0.0, m - m_all)),
                       axis=0)
    idx_all = tl.zeros((), tl.int64)
    if ARGMAX:
        idx_all = tl.min(tl.where(m == m_all, idx, ARGMAX_MAX_COLS), axis=0).to(tl.int64)
    one = tl.zeros((1,), tl.float32)
    return (m_all + one, s_all + one, S_all + one, U_all + one, Q_all + one,
            idx_all + one.to(tl.int64))


@triton.jit
def _merge_records(record_ptr, row, n_slices, TRACK_U: tl.constexpr, ENTROPY: tl.constexpr,
                   ARGMAX: tl.constexpr, P_PAD: tl.constexpr):
    """(1,) merged (m, s, S, U, z_y, Q, argmax) of a row's P records: one (P_PAD,
    RECORD_WIDTH) load (L2, .cg: the records were written by other SMs), then reductions
    over the slices. The argmax is the least column among the slices whose max is m."""
    p = tl.arange(0, P_PAD)
    present = p < n_slices
    offs = (row * n_slices + p).to(tl.int64)[:, None] * RECORD_WIDTH \
        + tl.arange(0, RECORD_WIDTH)[None, :]
    rec = tl.load(record_ptr + offs, mask=present[:, None], other=0.0, cache_modifier=".cg")
    first = tl.where(present, _field(rec, REC_ARGMAX), ARGMAX_MAX_COLS * 1.0)
    m, s, S, U, Q, idx = _reduce_stats(
        tl.where(present, _field(rec, REC_M), NEG_INF), _field(rec, REC_SUM_EXP),
        _field(rec, REC_S), _field(rec, REC_U), _field(rec, REC_Q), first, TRACK_U, ENTROPY,
        ARGMAX)
    z_y = tl.sum(_field(rec, REC_ZY), axis=0) + tl.zeros((1,), tl.float32)
    return m, s, S, U, z_y, Q, idx


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _rows_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    entropy_ptr, argmax_ptr, row_weight_ptr, entropy_weight_ptr,
    # sizes
    n_rows, n_cols, n_inner,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Loss, lse and gradient of whole rows, ROWS rows of at most BLOCK_V columns a tile,
    tiles taken in grid-stride order (one a program unless the launch is persistent).
    ROW_ALIGN divides V and every row's first element offset in logits and gradient
    (row_align()), so short rows (V = 1000: 2000 bytes) still get vector loads and stores."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    cols = tl.arange(0, BLOCK_V)
    n_cols_aligned = n_cols // ROW_ALIGN * ROW_ALIGN  # = n_cols, now provably aligned
    for tile in range(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, ROWS),
                      tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols[None, :] < n_cols_aligned)
        x_rows = _row_offsets(rows, n_inner, stride_x_n, stride_x_d)
        x_rows = tl.multiple_of(x_rows, ROW_ALIGN)
        t_rows = _row_offsets(rows, n_inner, stride_t_n, stride_t_d)
        y, row_ok, row_nan, a, b = _row_targets(
            target_ptr, weight_ptr, t_rows, row_mask, ignore_index, 0, n_cols,
            label_smoothing, PROB_TARGET, HAS_WEIGHT)
        z, t, u = _load_tile(logits_ptr, x_rows, target_ptr, t_rows, weight_ptr, cols, mask,
                             stride_x_c, stride_t_c, label_smoothing, 0, n_cols, softcap,
                             inv_temperature, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING,
                             HAS_SOFTCAP)
        m, s, S, U, Q, idx = _tile_stats(z, u, TRACK_U, ENTROPY, ARGMAX)
        z_y = _target_logit(z, cols, mask, y, row_ok)
        _write_loss(ce_ptr, lse_ptr, entropy_ptr, argmax_ptr, rows, row_mask, m, s, S, U, z_y,
                    Q, idx, a, b, row_ok, row_nan, TRACK_U, ENTROPY, ARGMAX)
        if COMPUTE_GRAD:
            r, e = _row_factors(row_weight_ptr, entropy_weight_ptr, rows, row_mask,
                                HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)
            g_rows = tl.multiple_of(_row_offsets(rows, n_inner, stride_g_n, stride_g_d),
                                    ROW_ALIGN)
            _write_grad(grad_ptr, g_rows, cols, mask, stride_g_c, z, t, u, y, m, s, U,
                        _entropy(s, Q), a, b, r, e, row_ok, row_nan, scale_ptr,
                        lse_square_scale, softcap, inv_temperature, HAS_SCALE, HAS_ZLOSS,
                        HAS_SOFTCAP, TRACK_U, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)


@triton.jit
def _split_slice(
    item, logits_ptr, target_ptr, weight_ptr,
    n_cols, n_inner, n_slices, slice_width,
    stride_x_n, stride_x_c, stride_x_d, stride_t_n, stride_t_c, stride_t_d,
    ignore_index, label_smoothing, softcap, inv_temperature,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The (1, BLOCK_V) tile of slice j = item % P of row item // P, its row's targets and the
    pointers' row offsets: what both launches of a split row start from."""
    row = item // n_slices
    j = item % n_slices
    rows = row + tl.zeros((1,), tl.int64)
    row_mask = rows >= 0
    cols = j * slice_width + tl.arange(0, BLOCK_V)
    mask = row_mask[:, None] & (tl.arange(0, BLOCK_V) < slice_width)[None, :] \
        & (cols < n_cols)[None, :]
    x_rows = _row_offsets(rows, n_inner, stride_x_n, stride_x_d)
    t_rows = _row_offsets(rows, n_inner, stride_t_n, stride_t_d)
    y, row_ok, row_nan, a, b = _row_targets(
        target_ptr, weight_ptr, t_rows, row_mask, ignore_index, 0, n_cols, label_smoothing,
        PROB_TARGET, HAS_WEIGHT)
    z, t, u = _load_tile(logits_ptr, x_rows, target_ptr, t_rows, weight_ptr, cols, mask,
                         stride_x_c, stride_t_c, label_smoothing, 0, n_cols, softcap,
                         inv_temperature, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    return row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u


@triton.jit
def _finish_slice(
    row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u,  # from _split_slice
    grad_ptr, scale_ptr, ce_ptr, lse_ptr, entropy_ptr, argmax_ptr, row_weight_ptr,
    entropy_weight_ptr, record_ptr, n_inner, n_slices,
    stride_g_n, stride_g_c, stride_g_d, lse_square_scale, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, TRACK_U: tl.constexpr, ENTROPY: tl.constexpr,
    ARGMAX: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    P_PAD: tl.constexpr,
):
    """Steps 3-4 of the module docstring, once every record of the row is visible."""
    m, s, S, U, z_y, Q, idx = _merge_records(record_ptr, row, n_slices, TRACK_U, ENTROPY,
                                             ARGMAX, P_PAD)
    if j == 0:
        _write_loss(ce_ptr, lse_ptr, entropy_ptr, argmax_ptr, rows, rows >= 0, m, s, S, U,
                    z_y, Q, idx, a, b, row_ok, row_nan, TRACK_U, ENTROPY, ARGMAX)
    if COMPUTE_GRAD:
        r, e = _row_factors(row_weight_ptr, entropy_weight_ptr, rows, rows >= 0,
                            HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)
        g_rows = _row_offsets(rows, n_inner, stride_g_n, stride_g_d)
        _write_grad(grad_ptr, g_rows, cols, mask, stride_g_c, z, t, u, y, m, s, U,
                    _entropy(s, Q), a, b, r, e, row_ok, row_nan, scale_ptr, lse_square_scale,
                    softcap, inv_temperature, HAS_SCALE, HAS_ZLOSS, HAS_SOFTCAP, TRACK_U,
                    HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)


@triton.jit
def _split_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    entropy_ptr, argmax_ptr, row_weight_ptr, entropy_weight_ptr, record_ptr, sync_ptr,
    # sizes: rows of n_cols columns, cut into n_slices slices of slice_width
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # the wait's bounds: polls, and nanoseconds if TIMED_WAIT
    spin_limit, wait_ns,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr, P_PAD: tl.constexpr, TIMED_WAIT: tl.constexpr,
):
    """First launch of split rows: publish, merge (bounded wait), write or defer.
    TIMED_WAIT (NVIDIA only) also bounds the wait by wait_ns of the GPU's global timer."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    for item in range(tl.program_id(0).to(tl.int64), n_rows * n_slices, tl.num_programs(0)):
        row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u = _split_slice(
            item, logits_ptr, target_ptr, weight_ptr, n_cols, n_inner, n_slices, slice_width,
            stride_x_n, stride_x_c, stride_x_d, stride_t_n, stride_t_c, stride_t_d,
            ignore_index, label_smoothing, softcap, inv_temperature,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_V)
        # 1. Publish: the record, a barrier (all the program's stores come first), then the
        # arrival, whose release makes the record visible to whoever acquires the counter.
        rec = _slice_record(z, u, cols, mask, y, row_ok, j, slice_width, TRACK_U, ENTROPY,
                            ARGMAX)
        tl.store(record_ptr + item * RECORD_WIDTH + tl.arange(0, RECORD_WIDTH)[None, :], rec,
                 cache_modifier=".cg")
        tl.debug_barrier()
        arrived = tl.atomic_add(sync_ptr + row, 1, sem="acq_rel") + 1
        # Without a gradient only slice 0, the loss's writer, needs the others' records.
        if (j == 0) | COMPUTE_GRAD:
            # 2. A bounded wait for the siblings that have not arrived yet.
            polls = 0
            in_time = True  # stays so without the timer
            if TIMED_WAIT:
                deadline = _clock_ns() + wait_ns
            while (arrived < n_slices) & (polls < spin_limit) & in_time:
                arrived = tl.atomic_add(sync_ptr + row, 0, sem="acquire")
                polls += 1
                if TIMED_WAIT:
                    in_time = _any_thread((_clock_ns() >= deadline).to(tl.int32)) == 0
            if arrived < n_slices:  # a sibling is late: finish in the second launch
                tl.store(sync_ptr + n_rows + item, 1)
            else:  # 3-4. Merge and write.
                _finish_slice(row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u,
                              grad_ptr, scale_ptr, ce_ptr, lse_ptr, entropy_ptr, argmax_ptr,
                              row_weight_ptr, entropy_weight_ptr, record_ptr, n_inner,
                              n_slices, stride_g_n, stride_g_c, stride_g_d, lse_square_scale,
                              softcap, inv_temperature, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE,
                              COMPUTE_GRAD, TRACK_U, ENTROPY, ARGMAX, HAS_ROW_WEIGHT,
                              HAS_ENTROPY_WEIGHT, P_PAD)


@triton.jit
def _finish_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    entropy_ptr, argmax_ptr, row_weight_ptr, entropy_weight_ptr, record_ptr, sync_ptr,
    # sizes
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr, P_PAD: tl.constexpr,
):
    """Second launch of split rows: each slice reads its deferral flag, and only a deferred
    one reads anything more (its own slice and the row's records, all present now)."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    for item in range(tl.program_id(0).to(tl.int64), n_rows * n_slices, tl.num_programs(0)):
        if tl.load(sync_ptr + n_rows + item, volatile=True) != 0:  # the audit's marker
            row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u = _split_slice(
                item, logits_ptr, target_ptr, weight_ptr, n_cols, n_inner, n_slices,
                slice_width, stride_x_n, stride_x_c, stride_x_d, stride_t_n, stride_t_c,
                stride_t_d, ignore_index, label_smoothing, softcap, inv_temperature,
                PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_V)
            _finish_slice(row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u,
                          grad_ptr, scale_ptr, ce_ptr, lse_ptr, entropy_ptr, argmax_ptr,
                          row_weight_ptr, entropy_weight_ptr, record_ptr, n_inner, n_slices,
                          stride_g_n, stride_g_c, stride_g_d, lse_square_scale, softcap,
                          inv_temperature, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE, COMPUTE_GRAD,
                          TRACK_U, ENTROPY, ARGMAX, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT, P_PAD)


@triton.jit
def _two_pass_stats_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, record_ptr,
    # sizes: rows of n_cols columns, cut into n_slices slices of slice_width
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, class, position) of logits and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, softcap, inv_temperature,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """First pass of LONG_ROWS = "two_pass": the record of each slice (row, j), as the
    exchange publishes it, stored and nothing more (the second launch reads it)."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    for item in range(tl.program_id(0).to(tl.int64), n_rows * n_slices, tl.num_programs(0)):
        row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u = _split_slice(
            item, logits_ptr, target_ptr, weight_ptr, n_cols, n_inner, n_slices, slice_width,
            stride_x_n, stride_x_c, stride_x_d, stride_t_n, stride_t_c, stride_t_d,
            ignore_index, label_smoothing, softcap, inv_temperature,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_V)
        rec = _slice_record(z, u, cols, mask, y, row_ok, j, slice_width, TRACK_U, ENTROPY,
                            ARGMAX)
        tl.store(record_ptr + item * RECORD_WIDTH + tl.arange(0, RECORD_WIDTH)[None, :], rec)


@triton.jit
def _two_pass_finish_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    entropy_ptr, argmax_ptr, row_weight_ptr, entropy_weight_ptr, record_ptr,
    # sizes
    n_rows, n_cols, n_inner, n_slices, slice_width,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr, P_PAD: tl.constexpr,
):
    """Second pass of "two_pass": steps 3-4 of the exchange for every slice, all records
    present. Without a gradient only slice 0 of each row runs (it writes the loss), and its
    logits are not read: nothing uses them."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    n_items = n_rows * n_slices if COMPUTE_GRAD else n_rows
    for k in range(tl.program_id(0).to(tl.int64), n_items, tl.num_programs(0)):
        item = k if COMPUTE_GRAD else k * n_slices
        row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u = _split_slice(
            item, logits_ptr, target_ptr, weight_ptr, n_cols, n_inner, n_slices, slice_width,
            stride_x_n, stride_x_c, stride_x_d, stride_t_n, stride_t_c, stride_t_d,
            ignore_index, label_smoothing, softcap, inv_temperature,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_V)
        _finish_slice(row, j, rows, cols, mask, y, row_ok, row_nan, a, b, z, t, u,
                      grad_ptr, scale_ptr, ce_ptr, lse_ptr, entropy_ptr, argmax_ptr,
                      row_weight_ptr, entropy_weight_ptr, record_ptr, n_inner, n_slices,
                      stride_g_n, stride_g_c, stride_g_d, lse_square_scale, softcap,
                      inv_temperature, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE, COMPUTE_GRAD,
                      TRACK_U, ENTROPY, ARGMAX, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT, P_PAD)


@triton.jit
def _sweep_block_stats(
    x_ptr, x_row, t_ptr, t_rows, weight_ptr, cols, m, s, S, U, Q, idx,  # (LANES, VEC) cols
    n_cols, stride_x_c, stride_t_c, label_smoothing, softcap, inv_temperature,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    MASKED: tl.constexpr, EVICT: tl.constexpr,
):
    """One block of the first sweep: its logits merged into the lanes' (LANES,) statistics
    (_tile_stats over each lane's VEC columns, then _merge_pair), a lane's argmax moving only
    to a strictly larger max. Unless MASKED every column is in the row: no masks at all."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    if MASKED:
        mask = cols < n_cols
        x = tl.load(x_ptr + x_row + cols * stride_x_c, mask=mask, other=0.0,
                    eviction_policy=EVICT)
    else:
        mask = tl.full(cols.shape, 1, tl.int1)
        x = tl.load(x_ptr + x_row + cols * stride_x_c, eviction_policy=EVICT)
    return _sweep_merge_block(x, t_ptr, t_rows, weight_ptr, cols, mask, m, s, S, U, Q, idx,
                              n_cols, stride_t_c, label_smoothing, softcap, inv_temperature,
                              PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ENTROPY,
                              ARGMAX)


@triton.jit
def _sweep_merge_block(
    x, t_ptr, t_rows, weight_ptr, cols, mask, m, s, S, U, Q, idx,  # x: a block as loaded
    n_cols, stride_t_c, label_smoothing, softcap, inv_temperature,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
):
    """_sweep_block_stats's merge, of a block already loaded (the prefetched one)."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    z, t = _tile_z(x, mask, softcap, inv_temperature, HAS_SOFTCAP)
    u = _tile_u(t_ptr, t_rows[:, None] + cols * stride_t_c, weight_ptr, cols, mask,
                label_smoothing, n_cols, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    bm, bs, bS, bU, bQ, b_idx = _tile_stats(z, u, TRACK_U, ENTROPY, ARGMAX)
    if ARGMAX:
        idx = tl.where(bm > m, b_idx + tl.min(cols, axis=1), idx)
    m, s, S, U, Q = _merge_pair(m, s, S, U, Q, bm, bs, bS, bU, bQ, TRACK_U, ENTROPY)
    return m, s, S, U, Q, idx


@triton.jit
def _sweep_block_grad(
    x_ptr, x_row, grad_ptr, g_row, t_ptr, t_rows, weight_ptr, cols, vec,  # (LANES, VEC) cols
    m, s, U, H, a, b, r, e, scale_ptr,  # the row's (1,) values
    n_cols, stride_x_c, stride_g_c, stride_t_c, label_smoothing, lse_square_scale, softcap,
    inv_temperature,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    MASKED: tl.constexpr, EVICT: tl.constexpr,
):
    """One block of the second sweep of a row that counts: its gradient but the target's -a
    term (the caller writes the target's column after the sweep), read, then written over
    the same block only. Unless MASKED every column is in the row: no masks at all."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    if MASKED:
        mask = cols < n_cols
        x = tl.load(x_ptr + x_row + cols * stride_x_c, mask=mask, other=0.0,
                    eviction_policy=EVICT)
    else:
        mask = tl.full(cols.shape, 1, tl.int1)
        x = tl.load(x_ptr + x_row + cols * stride_x_c, eviction_policy=EVICT)
    z, t = _tile_z(x, mask, softcap, inv_temperature, HAS_SOFTCAP)
    u = _tile_u(t_ptr, t_rows[:, None] + cols * stride_t_c, weight_ptr, cols, mask,
                label_smoothing, n_cols, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    # (a row that counts: row_ok and no NaN, as constants the compiler folds away)
    yes = tl.full((1,), 1, tl.int1)
    g = _grad_tile(vec, z, t, u, vec[None, :], m, s, U, H, a, b, r, e, yes, yes == 0,
                   scale_ptr, lse_square_scale, softcap, inv_temperature, HAS_SCALE, HAS_ZLOSS,
                   HAS_SOFTCAP, TRACK_U, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT,
                   WITH_TARGET=False)
    g = g.to(grad_ptr.dtype.element_ty)
    if MASKED:
        tl.store(grad_ptr + g_row + cols * stride_g_c, g, mask=mask, eviction_policy=EVICT)
    else:
        tl.store(grad_ptr + g_row + cols * stride_g_c, g, eviction_policy=EVICT)


@triton.jit
def _sweep_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, ce_ptr, lse_ptr,
    entropy_ptr, argmax_ptr, row_weight_ptr, entropy_weight_ptr,
    # sizes
    n_rows, n_cols, n_inner,
    # strides (sample, class, position) of logits, gradient and targets
    stride_x_n, stride_x_c, stride_x_d,
    stride_g_n, stride_g_c, stride_g_d,
    stride_t_n, stride_t_c, stride_t_d,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # compile-time switches
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_ENTROPY_WEIGHT: tl.constexpr,
    # the sweep: BLOCK_V columns a step as BLOCK_V / VEC lanes of VEC adjacent columns
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
    REVERSE: tl.constexpr, FIRST_EVICT: tl.constexpr, SECOND_EVICT: tl.constexpr,
):
    """LONG_ROWS = "sweep": a program walks whole rows (grid-stride order), each in two sweeps
    of BLOCK_V columns: the first reads the row and keeps the statistics (m, s, S, U, Q,
    argmax) of each lane; they merge once at the row's end into the loss; the second (with a
    gradient) reads the row again (last block first if REVERSE) and writes the gradient.
    VEC divides V and every row's first offset (row_align()), so lanes load VEC columns at
    once. The row's full blocks go without masks, its last part-full block (if any) with.
    PREFETCH issues block k + 1's loads before block k's arithmetic (into registers);
    STAGES > 1 lets Triton's pipeliner keep STAGES - 1 blocks in flight (cp.async into shared
    memory on NVIDIA; 1: no pipelining). FIRST_EVICT and SECOND_EVICT are the eviction
    policies of the two sweeps' accesses ("" for none; "evict_last" keeps the row in L2 for
    the second sweep, "evict_first" lets the second sweep's reads and the gradient go
    first)."""
    TRACK_U: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    LANES: tl.constexpr = BLOCK_V // VEC
    lane_cols = tl.arange(0, LANES).to(tl.int64) * VEC  # (LANES,) first column of each lane
    vec = tl.arange(0, VEC)  # (VEC,)
    block = lane_cols[:, None] + vec[None, :]  # (LANES, VEC) columns of block 0
    n_full = n_cols // BLOCK_V  # blocks without a column past the row's end
    tail = n_full * BLOCK_V < n_cols
    # Per row, bytes: V * elem read by the first sweep (HBM), and with a gradient V * elem
    # read by the second (L2 for the blocks the first read last: REVERSE) and V * elem
    # written. Lanes keep their own statistics, so a block's reductions stay inside a
    # thread: no barrier between one block's loads and the next block's.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        rows = row + tl.zeros((1,), tl.int64)
        row_mask = rows >= 0
        x_row = tl.multiple_of(_row_offsets(row, n_inner, stride_x_n, stride_x_d), VEC)
        t_rows = _row_offsets(rows, n_inner, stride_t_n, stride_t_d)
        y, row_ok, row_nan, a, b = _row_targets(
            target_ptr, weight_ptr, t_rows, row_mask, ignore_index, 0, n_cols,
            label_smoothing, PROB_TARGET, HAS_WEIGHT)
        # The target's logit, read where it is (the first sweep never looks for it).
        y_col = tl.where(row_ok, y, 0)
        x_y = tl.load(logits_ptr + x_row + y_col * stride_x_c, mask=row_ok, other=0.0)
        z_y, t_y = _tile_z(x_y, row_ok, softcap, inv_temperature, HAS_SOFTCAP)
        z_y = tl.where(row_ok, z_y, 0.0)

        # First sweep: the lanes' statistics (the module docstring's merge, per lane).
        m = tl.full((LANES,), NEG_INF, tl.float32)
        s = tl.zeros((LANES,), tl.float32)
        S = tl.zeros((LANES,), tl.float32)
        U = tl.zeros((LANES,), tl.float32)
        Q = tl.zeros((LANES,), tl.float32)
        idx = tl.zeros((LANES,), tl.int64)
        if PREFETCH:
            x_next = tl.load(logits_ptr + x_row + block * stride_x_c, mask=block < n_cols,
                             other=0.0, eviction_policy=FIRST_EVICT)
        for blk in tl.range(0, n_full, num_stages=STAGES):
            cols = blk * BLOCK_V + block
            if PREFETCH:  # block k + 1's loads go out before block k's arithmetic
                x = x_next
                ahead = cols + BLOCK_V
                x_next = tl.load(logits_ptr + x_row + ahead * stride_x_c, mask=ahead < n_cols,
                                 other=0.0, eviction_policy=FIRST_EVICT)
                m, s, S, U, Q, idx = _sweep_merge_block(
                    x, target_ptr, t_rows, weight_ptr, cols, tl.full(cols.shape, 1, tl.int1),
                    m, s, S, U, Q, idx, n_cols, stride_t_c, label_smoothing, softcap,
                    inv_temperature, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                    ENTROPY, ARGMAX)
            else:
                m, s, S, U, Q, idx = _sweep_block_stats(
                    logits_ptr, x_row, target_ptr, t_rows, weight_ptr, cols, m, s, S, U, Q, idx,
                    n_cols, stride_x_c, stride_t_c, label_smoothing, softcap, inv_temperature,
                    PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ENTROPY, ARGMAX,
                    False, FIRST_EVICT)
        if tail:
            m, s, S, U, Q, idx = _sweep_block_stats(
                logits_ptr, x_row, target_ptr, t_rows, weight_ptr, n_full * BLOCK_V + block,
                m, s, S, U, Q, idx, n_cols, stride_x_c, stride_t_c, label_smoothing, softcap,
                inv_temperature, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ENTROPY,
                ARGMAX, True, FIRST_EVICT)
        m, s, S, U, Q, idx = _reduce_stats(m, s, S, U, Q, idx, TRACK_U, ENTROPY, ARGMAX)
        _write_loss(ce_ptr, lse_ptr, entropy_ptr, argmax_ptr, rows, row_mask, m, s, S, U, z_y,
                    Q, idx, a, b, row_ok, row_nan, TRACK_U, ENTROPY, ARGMAX)

        if COMPUTE_GRAD:  # Second sweep: the gradient, one block at a time.
            g_row = tl.multiple_of(_row_offsets(row, n_inner, stride_g_n, stride_g_d), VEC)
            if tl.max(row_ok.to(tl.int32), axis=0) != 0:  # the row counts
                r, e = _row_factors(row_weight_ptr, entropy_weight_ptr, rows, row_mask,
                                    HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)
                H = _entropy(s, Q)
                if tail and REVERSE:
                    _sweep_block_grad(
                        logits_ptr, x_row, grad_ptr, g_row, target_ptr, t_rows, weight_ptr,
                        n_full * BLOCK_V + block, vec, m, s, U, H, a, b, r, e, scale_ptr,
                        n_cols, stride_x_c, stride_g_c, stride_t_c, label_smoothing,
                        lse_square_scale, softcap, inv_temperature, PROB_TARGET, HAS_WEIGHT,
                        HAS_SMOOTHING, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE, HAS_ROW_WEIGHT,
                        HAS_ENTROPY_WEIGHT, True, SECOND_EVICT)
                for k in tl.range(0, n_full, num_stages=STAGES):
                    blk = n_full - 1 - k if REVERSE else k
                    _sweep_block_grad(
                        logits_ptr, x_row, grad_ptr, g_row, target_ptr, t_rows, weight_ptr,
                        blk * BLOCK_V + block, vec, m, s, U, H, a, b, r, e, scale_ptr, n_cols,
                        stride_x_c, stride_g_c, stride_t_c, label_smoothing,
                        lse_square_scale, softcap, inv_temperature, PROB_TARGET, HAS_WEIGHT,
                        HAS_SMOOTHING, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE, HAS_ROW_WEIGHT,
                        HAS_ENTROPY_WEIGHT, False, SECOND_EVICT)
                if tail and not REVERSE:
                    _sweep_block_grad(
                        logits_ptr, x_row, grad_ptr, g_row, target_ptr, t_rows, weight_ptr,
                        n_full * BLOCK_V + block, vec, m, s, U, H, a, b, r, e, scale_ptr,
                        n_cols, stride_x_c, stride_g_c, stride_t_c, label_smoothing,
                        lse_square_scale, softcap, inv_temperature, PROB_TARGET, HAS_WEIGHT,
                        HAS_SMOOTHING, HAS_SOFTCAP, HAS_ZLOSS, HAS_SCALE, HAS_ROW_WEIGHT,
                        HAS_ENTROPY_WEIGHT, True, SECOND_EVICT)
                if not PROB_TARGET:  # the target's column, with its -a term, once its block
                    tl.debug_barrier()  # is written (by any of the program's threads)
                    u_y = _tile_u(target_ptr, t_rows[:, None], weight_ptr, y_col[:, None],
                                  row_ok[:, None], label_smoothing, n_cols, PROB_TARGET,
                                  HAS_WEIGHT, HAS_SMOOTHING)
                    g_y = _grad_tile(y * 0, z_y[:, None], t_y[:, None], u_y, y * 0, m, s, U,
                                     H, a, b, r, e, row_ok, row_nan, scale_ptr,
                                     lse_square_scale, softcap, inv_temperature, HAS_SCALE,
                                     HAS_ZLOSS, HAS_SOFTCAP, TRACK_U, HAS_ROW_WEIGHT,
                                     HAS_ENTROPY_WEIGHT)
                    tl.store(grad_ptr + g_row + y_col[:, None] * stride_g_c,
                             g_y.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None])
            else:  # an ignored row: 0, or NaN for an unchecked bad target; nothing read
                fill = tl.where(row_nan, float("nan"), 0.0).to(grad_ptr.dtype.element_ty)
                fill = tl.broadcast_to(fill[:, None], (LANES, VEC))
                for blk in range(0, n_full):
                    tl.store(grad_ptr + g_row + (blk * BLOCK_V + block) * stride_g_c, fill,
                             eviction_policy=SECOND_EVICT)
                if tail:
                    cols = n_full * BLOCK_V + block
                    tl.store(grad_ptr + g_row + cols * stride_g_c, fill, mask=cols < n_cols,
                             eviction_policy=SECOND_EVICT)


@triton.jit
def _slice_stats_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, stats_ptr, argmax_ptr,
    # sizes: this tensor's n_cols columns are classes class_offset.. of n_classes
    n_rows, n_cols, n_inner, class_offset, n_classes,
    # strides (sample, class, position) of the logits; the targets' row stride
    stride_x_n, stride_x_c, stride_x_d, stride_t_row,
    # options
    ignore_index, label_smoothing, softcap, inv_temperature,
    # compile-time switches
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """(m, s, S, U, z_y, Q) of ROWS rows of a vocab-parallel rank's classes, and the global
    class of each row's first max: the rows' blocks of BLOCK_V columns in turn, merged as
    they come (no gradient, so nothing is held)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = _row_offsets(rows, n_inner, stride_x_n, stride_x_d)
    y, row_ok, row_nan, a, b = _row_targets(
        target_ptr, weight_ptr, rows * stride_t_row, row_mask, ignore_index, class_offset,
        n_classes, label_smoothing, False, HAS_WEIGHT)
    m = tl.full((ROWS,), NEG_INF, tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    S = tl.zeros((ROWS,), tl.float32)
    U = tl.zeros((ROWS,), tl.float32)
    Q = tl.zeros((ROWS,), tl.float32)
    z_y = tl.zeros((ROWS,), tl.float32)
    idx = tl.zeros((ROWS,), tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        z, t, u = _load_tile(logits_ptr, x_rows, target_ptr, rows, weight_ptr, cols, mask,
                             stride_x_c, 0, label_smoothing, class_offset, n_classes, softcap,
                             inv_temperature, False, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
        bm, bs, bS, bU, bQ, b_idx = _tile_stats(z, u, HAS_SMOOTHING, ENTROPY, ARGMAX)
        if ARGMAX:  # a later block takes over only with a strictly larger max
            idx = tl.where((bm > m) | (start == 0), b_idx + start, idx)
        m, s, S, U, Q = _merge_pair(m, s, S, U, Q, bm, bs, bS, bU, bQ, HAS_SMOOTHING, ENTROPY)
        z_y += _target_logit(z, cols, mask, y, row_ok)
    out = stats_ptr + rows * 6
    tl.store(out, m, mask=row_mask)
    tl.store(out + 1, s, mask=row_mask)
    tl.store(out + 2, S, mask=row_mask)
    tl.store(out + 3, U, mask=row_mask)
    tl.store(out + 4, z_y, mask=row_mask)
    tl.store(out + 5, Q, mask=row_mask)
    if ARGMAX:
        tl.store(argmax_ptr + rows, idx + class_offset, mask=row_mask)


@triton.jit
def _slice_grad_kernel(
    # pointers
    logits_ptr, grad_ptr, target_ptr, weight_ptr, stats_ptr, scale_ptr, row_weight_ptr,
    entropy_weight_ptr,
    # sizes: this tensor's n_cols columns are classes class_offset.. of n_classes
    n_rows, n_cols, n_inner, class_offset, n_classes,
    # strides (sample, class, position) of logits and gradient; the targets' row stride
    stride_x_n, stride_x_c, stride_x_d, stride_g_n, stride_g_c, stride_g_d, stride_t_row,
    # options
    ignore_index, label_smoothing, lse_square_scale, softcap, inv_temperature,
    # compile-time switches
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    HAS_ENTROPY_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The gradient of a (ROWS, BLOCK_V) tile of a rank's classes from the rows' merged
    (m, s, S, U, H): program (i, k) takes rows i * ROWS.. and columns k * BLOCK_V.."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    y, row_ok, row_nan, a, b = _row_targets(
        target_ptr, weight_ptr, rows * stride_t_row, row_mask, ignore_index, class_offset,
        n_classes, label_smoothing, False, HAS_WEIGHT)
    z, t, u = _load_tile(logits_ptr, _row_offsets(rows, n_inner, stride_x_n, stride_x_d),
                         target_ptr, rows, weight_ptr, cols, mask, stride_x_c, 0,
                         label_smoothing, class_offset, n_classes, softcap, inv_temperature,
                         False, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
    m = tl.load(stats_ptr + rows * 5, mask=row_mask, other=0.0)
    s = tl.load(stats_ptr + rows * 5 + 1, mask=row_mask, other=1.0)
    U = tl.load(stats_ptr + rows * 5 + 3, mask=row_mask, other=0.0)
    H = tl.load(stats_ptr + rows * 5 + 4, mask=row_mask, other=0.0)
    r, e = _row_factors(row_weight_ptr, entropy_weight_ptr, rows, row_mask, HAS_ROW_WEIGHT,
                        HAS_ENTROPY_WEIGHT)
    _write_grad(grad_ptr, _row_offsets(rows, n_inner, stride_g_n, stride_g_d), cols, mask,
                stride_g_c, z, t, u, y, m, s, U, H, a, b, r, e, row_ok, row_nan, scale_ptr,
                lse_square_scale, softcap, inv_temperature, HAS_SCALE, HAS_ZLOSS, HAS_SOFTCAP,
                HAS_SMOOTHING, HAS_ROW_WEIGHT, HAS_ENTROPY_WEIGHT)


@triton.jit
def _scale_rows_kernel(
    grad_ptr, grad_out_ptr,  # pointers
    n_rows, n_cols, n_inner,  # sizes
    stride_g_n, stride_g_c, stride_g_d, stride_go_row,  # strides
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad[row, :] *= grad_out[row] for tiles of ROWS rows (grid-stride order), in blocks of
    BLOCK_V columns; a tile whose factors are all 1 moves no gradient bytes (a scalar
    grad_output of 1, the mean's and the sum's usual one, costs one load a tile)."""
    cols = tl.arange(0, BLOCK_V)
    for tile in range(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, ROWS),
                      tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        go = tl.load(grad_out_ptr + rows * stride_go_row, mask=row_mask, other=1.0)
        go = go.to(tl.float32)
        if tl.max((go != 1.0).to(tl.int32), axis=0) != 0:
            g_rows = _row_offsets(rows, n_inner, stride_g_n, stride_g_d)
            for start in range(0, n_cols, BLOCK_V):
                offs = g_rows[:, None] + (start + cols).to(tl.int64)[None, :] * stride_g_c
                mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
                g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_ptr + offs, (g * go[:, None]).to(grad_ptr.dtype.element_ty),
                         mask=mask)


# --- launch plans -----------------------------------------------------------------------------


def _grid(n_items: int, device: torch.device) -> tuple[int]:
    """One program an item, or, persistent, config.PERSISTENT_PROGRAMS_PER_SM per SM (the
    interpreter counts as one SM) walking the items in grid-stride order."""
    if not config.PERSISTENT:
        return (n_items,)
    sms = sm_count(device) or 1
    return (max(1, min(n_items, sms * config.PERSISTENT_PROGRAMS_PER_SM)),)


def split_programs_per_sm(element_size: int, switches: dict) -> int:
    """Resident programs per SM assumed of the exchange's first launch for logits of
    `element_size` bytes and the launch's constexpr `switches` (config.py: the audit's)."""
    heavy = ("PROB_TARGET", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP", "HAS_ZLOSS", "ARGMAX")
    if element_size <= 2 and not any(switches.get(name) for name in heavy):
        return config.SPLIT_PROGRAMS_PER_SM_LEAN
    return config.SPLIT_PROGRAMS_PER_SM


def long_rows_path(n_slices: int, device: torch.device, programs_per_sm: int) -> str:
    """The path of rows cut into n_slices slices: config.LONG_ROWS, except that "exchange"
    falls back to "two_pass" where a row's slices might not all be resident at once, P >
    SPLIT_RESIDENT_MARGIN x SMs x programs_per_sm (config.py). Under the interpreter (no
    SMs: one program at a time) "exchange" stays: deferral covers it, and tests run it."""
    path = config.long_rows()
    sms = sm_count(device)
    if path != "exchange" or sms is None:
        return path
    fits = n_slices <= config.SPLIT_RESIDENT_MARGIN * sms * programs_per_sm
    return "exchange" if fits else "two_pass"


def timed_wait(device: torch.device) -> bool:
    """Whether the exchange's wait is also bounded in time (%globaltimer): NVIDIA GPUs."""
    return device.type == "cuda" and torch.version.hip is None


def _target_strides(target, prob_target, D):
    """Strides (sample, class, position) of the targets: class indices are a flat (N*D,)
    vector with one stride, so row n*D + d sits at that offset."""
    return target.stride() if prob_target else (D * target.stride(0), 0, target.stride(0))


# --- launchers --------------------------------------------------------------------------------


def xent_rows(
    logits: torch.Tensor,  # (N, V, D), fp32/fp16/bf16, any strides
    target: torch.Tensor,  # (N*D,) integer class indices (any stride), or (N, V, D) probabilities
    weight: torch.Tensor | None,  # (V,) float32, contiguous
    scale: torch.Tensor | None,  # (2,) float32: gradient factors of the CE and z-loss terms
    grad: torch.Tensor | None,  # (N, V, D) gradient output (may alias logits), or None
    row_weight: torch.Tensor | None = None,  # (N*D,) float32 contiguous: factor of the CE grad
    entropy_weight: torch.Tensor | None = None,  # (N*D,) float32 contiguous: factor of dH
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
    """Launches the row kernels. Returns (ce, lse, H, argmax), each (N*D,): float32, and
    int64 for the argmax; H and argmax None unless asked for. Fills `grad` if given.

    `ce` is the unreduced cross-entropy of each row (0 for ignored rows, NaN for an unchecked
    out-of-range target), without the z-loss, which the caller adds from `lse`; so are the
    row weights and the entropy term (they enter the gradient only).
    """
    config.long_rows()  # a bad LONG_ROWS fails every call, not only those of long rows
    N, V, D = logits.shape
    n_rows = N * D
    device = logits.device
    ce = torch.empty(n_rows, device=device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=device, dtype=torch.float32)
    entropy = entropy or (entropy_weight is not None and grad is not None)  # dH needs H
    H = torch.empty(n_rows, device=device, dtype=torch.float32) if entropy else None
    idx = torch.empty(n_rows, device=device, dtype=torch.int64) if argmax else None
    if n_rows == 0:
        return ce, lse, H, idx
    g = grad if grad is not None else logits  # never written when COMPUTE_GRAD is off
    with_grad = grad is not None
    pointers = (logits, g, target, weight, scale, ce, lse, H, idx,
                row_weight if with_grad else None, entropy_weight if with_grad else None)
    t_strides = _target_strides(target, prob_target, D)
    strides = (*logits.stride(), *g.stride(), *t_strides)
    softcap_value = float(softcap) if softcap is not None else 1.0
    options = (ignore_index, float(label_smoothing), float(lse_square_scale), softcap_value,
               1.0 / float(temperature))
    load_switches = dict(PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
                         HAS_SMOOTHING=label_smoothing > 0.0, HAS_SOFTCAP=softcap is not None)
    switches = dict(**load_switches, HAS_ZLOSS=lse_square_scale != 0.0,
                    HAS_SCALE=scale is not None, COMPUTE_GRAD=with_grad, ENTROPY=entropy,
                    ARGMAX=argmax, HAS_ROW_WEIGHT=with_grad and row_weight is not None,
                    HAS_ENTROPY_WEIGHT=with_grad and entropy_weight is not None)
    fusion = config.FP_FUSION
    if V <= config.ROW_SLICE_MAX_V:
        rows, block_v, warps = row_tile(V, n_rows)
        _rows_kernel[_grid(triton.cdiv(n_rows, rows), device)](
            *pointers, n_rows, V, D, *strides, *options, **switches, ROWS=rows,
            BLOCK_V=block_v, ROW_ALIGN=row_align(V, logits, g), num_warps=warps,
            enable_fp_fusion=fusion)
        return ce, lse, H, idx
    if argmax and V >= ARGMAX_MAX_COLS.value:
        raise ValueError(f"return_argmax takes at most {ARGMAX_MAX_COLS.value - 1} classes on "
                         f"the kernel path, got {V}")
    n_slices, slice_width, block_v, warps = split_plan(V)
    path = long_rows_path(n_slices, device,
                          split_programs_per_sm(logits.element_size(), switches))
    if path == "sweep":
        block_v, warps = sweep_plan(V)
        first, second = sweep_policies()
        _sweep_kernel[sweep_grid(n_rows, V * logits.element_size(), device)](
            *pointers, n_rows, V, D, *strides, *options, **switches, BLOCK_V=block_v,
            VEC=min(row_align(V, logits, g), block_v), PREFETCH=config.SWEEP_PREFETCH,
            STAGES=config.SWEEP_STAGES, REVERSE=config.SWEEP_REVERSE, FIRST_EVICT=first,
            SECOND_EVICT=second, num_warps=warps, enable_fp_fusion=fusion,
            **sweep_launch_options())
        return ce, lse, H, idx
    records = torch.empty(n_rows * n_slices * RECORD_WIDTH.value, device=device,
                          dtype=torch.float32)
    grid = _grid(n_rows * n_slices, device)
    sizes = (n_rows, V, D, n_slices, slice_width)
    common = dict(**switches, BLOCK_V=block_v, P_PAD=triton.next_power_of_2(n_slices),
                  num_warps=warps, enable_fp_fusion=fusion)
    if path == "two_pass":
        _two_pass_stats_kernel[grid](
            logits, target, weight, records, *sizes, *logits.stride(), *t_strides,
            ignore_index, float(label_smoothing), softcap_value, 1.0 / float(temperature),
            **load_switches, ENTROPY=entropy, ARGMAX=argmax, BLOCK_V=block_v,
            num_warps=warps, enable_fp_fusion=fusion)
        second = grid if with_grad else _grid(n_rows, device)  # forward: slice 0 of a row
        _two_pass_finish_kernel[second](*pointers, records, *sizes, *strides, *options,
                                        **common)
        return ce, lse, H, idx
    sync = torch.zeros(n_rows * (1 + n_slices), device=device, dtype=torch.int32)
    spin = config.INTERPRET_SLICE_SPIN_LIMIT if interpreting() else config.SLICE_SPIN_LIMIT
    _split_kernel[grid](*pointers, records, sync, *sizes, *strides, *options, spin,
                        config.SLICE_WAIT_NS, **common, TIMED_WAIT=timed_wait(device))
    _finish_kernel[grid](*pointers, records, sync, *sizes, *strides, *options, **common)
    return ce, lse, H, idx


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
    temperature: float = 1.0,
    entropy: bool = False,
    argmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N*D, 6) float32 statistics of each row's slice: max m, sum exp(z - m), S = sum u (m - z),
    U = sum u, the target's (tempered) logit where it lies in the slice, else 0, and
    Q = sum exp(z - m) (z - m) (0 unless `entropy`); and, if `argmax`, the (N*D,) int64 global
    class of the slice's first max, else None."""
    N, V, D = logits.shape
    n_rows = N * D
    stats = torch.empty((n_rows, 6), device=logits.device, dtype=torch.float32)
    idx = torch.empty(n_rows, device=logits.device, dtype=torch.int64) if argmax else None
    if n_rows == 0:
        return stats, idx
    rows, block_v, warps = row_tile(min(V, config.ROW_SLICE_MAX_V), n_rows)
    _slice_stats_kernel[(triton.cdiv(n_rows, rows),)](
        logits, target, weight, stats, idx, n_rows, V, D, class_offset, n_classes,
        *logits.stride(), target.stride(0), ignore_index, float(label_smoothing),
        float(softcap) if softcap is not None else 1.0, 1.0 / float(temperature),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None, ENTROPY=entropy, ARGMAX=argmax, ROWS=rows,
        BLOCK_V=block_v, num_warps=warps, enable_fp_fusion=config.FP_FUSION)
    return stats, idx


def xent_slice_grad(
    logits: torch.Tensor,  # (N, V_r, D): classes class_offset .. class_offset + V_r - 1
    target: torch.Tensor,  # (N*D,) global class indices
    weight: torch.Tensor | None,  # (n_classes,) float32, contiguous
    stats: torch.Tensor,  # (N*D, 5) float32 (m, s, S, U, H) of the whole rows
    scale: torch.Tensor | None,  # (2,) float32 "mean" factors, or None
    grad: torch.Tensor,  # (N, V_r, D) written
    row_weight: torch.Tensor | None,  # (N*D,) float32 contiguous, or None
    entropy_weight: torch.Tensor | None,  # (N*D,) float32 contiguous, or None
    *,
    class_offset: int,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    temperature: float = 1.0,
) -> None:
    """Writes the gradient of a slice of classes from the statistics of the whole rows."""
    N, V, D = logits.shape
    n_rows = N * D
    if n_rows == 0 or V == 0:
        return
    rows, block_v, warps = row_tile(min(V, config.ROW_SLICE_MAX_V), n_rows)
    _slice_grad_kernel[(triton.cdiv(n_rows, rows), triton.cdiv(V, block_v))](
        logits, grad, target, weight, stats.contiguous(), scale, row_weight, entropy_weight,
        n_rows, V, D, class_offset, n_classes, *logits.stride(), *grad.stride(),
        target.stride(0), ignore_index, float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap is not None else 1.0, 1.0 / float(temperature),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None, HAS_ZLOSS=lse_square_scale != 0.0,
        HAS_SCALE=scale is not None, HAS_ROW_WEIGHT=row_weight is not None,
        HAS_ENTROPY_WEIGHT=entropy_weight is not None, ROWS=rows, BLOCK_V=block_v,
        num_warps=warps, enable_fp_fusion=config.FP_FUSION)


def scale_rows_(
    grad: torch.Tensor,  # (N, V, D), scaled in place
    grad_output: torch.Tensor,  # (N*D,) per row, or a single value (stride 0 over rows)
) -> torch.Tensor:
    """grad[n, :, d] *= grad_output[n * D + d] in place; rows whose factor is 1 are not touched.
    Tiles of rows as the whole-row kernel's (row_tile) on rows of at most SCALE_BLOCK_V
    columns, one row otherwise, at most config.SCALE_PROGRAMS_PER_SM programs an SM walking
    them (the interpreter counts as one SM)."""
    N, V, D = grad.shape
    rows = N * D
    if rows == 0 or V == 0:
        return grad
    go = grad_output.reshape(-1)
    go_stride = 0 if go.numel() == 1 else go.stride(0)
    tile_rows, block_v, _ = row_tile(min(V, config.SCALE_BLOCK_V), rows)
    n_tiles = triton.cdiv(rows, tile_rows)
    programs = (sm_count(grad.device) or 1) * config.SCALE_PROGRAMS_PER_SM
    _scale_rows_kernel[(min(n_tiles, programs),)](
        grad, go, rows, V, D, *grad.stride(), go_stride, ROWS=tile_rows, BLOCK_V=block_v,
        num_warps=config.SCALE_NUM_WARPS, enable_fp_fusion=config.FP_FUSION,
    )
    return grad
