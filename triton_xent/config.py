"""Every tuning number of triton_xent, and the one path switch (LONG_ROWS), in one place.

Each value says where it was measured. "Not yet measured" means it is a first choice made
from the kernel's arithmetic (registers per thread, bytes per row) and still has to be
measured on a GPU with `bench/bench_xent.py`; replace the note with the device and the
command when that happens.
"""

from __future__ import annotations

import os

# --- cross-entropy row kernel (triton_xent/kernels/xent.py) -------------------------------

# A row is cut into slices of at most this many columns, one program each, held in
# registers: one read of the logits and one write of the gradient for any V (see
# kernels/xent.py). Rows of at most this many classes are whole-row tiles, with no exchange.
# From the offline sm_90 audit (bench/compile_audit.py, triton 3.9, no GPU): 4096 columns at
# SPLIT_NUM_WARPS = 16 take 48 registers a thread, no spills, 2 programs an SM (8192 at 16
# warps: 102 registers, 1 an SM; 2048 at 4 warps: 80, 6 an SM, but P^2 record reads grow:
# each of a row's P programs reads all P records). Speed not yet measured on a GPU:
# `python bench/bench_xent.py --sweep` times the candidates.
ROW_SLICE_MAX_V = 4096
SPLIT_NUM_WARPS = 16

# How rows longer than ROW_SLICE_MAX_V are computed (kernels/xent.py), read at each call:
#   "exchange"  one read of the logits: a row's P slice programs publish their statistics
#               and wait, a bounded while, for their siblings' (split rows, read once);
#   "two_pass"  no program waits on another: one launch writes each slice's statistics,
#               a second merges them and writes the loss and gradient, reading the row again;
#   "sweep"     one program walks a whole row twice in blocks (statistics, then gradient),
#               the second sweep reading from L2 what the first read last (below).
# Under "exchange" a call still takes "two_pass" where a row's slices could not all be
# resident at once (see SPLIT_PROGRAMS_PER_SM below). The environment variable
# TRITON_XENT_LONG_ROWS sets the initial value. Without it every device gets "two_pass", the
# fastest measured: on an NVIDIA H200 (torch 2.11, triton 3.6, 2026-12-04,
# `python bench/gpu_check.py`, bench/results/nvidia-h200.csv), bf16, N = 16384, forward +
# backward, two_pass took 2.63 / 9.39 / 19.15 ms at V = 32000 / 128256 / 256000 against the
# exchange's 3.56 / 13.60 / 27.58, and no config variant of the exchange came closer than
# 11.3 ms at V = 128256. The H100 (same chip, slower memory) takes the H200's measurement;
# "sweep" is not yet measured on a GPU (`python bench/gpu_tune.py` times all three). On ROCm
# the exchange would also be unchecked: an MI300X has 8 XCDs, each with its own L2, and the
# exchange publishes its records with .cg stores (to L2) and reads them after an acquire on
# the row's counter, which is correct where L2 is the point of coherence of all SMs
# (NVIDIA); no AMD GPU has run any path yet.
LONG_ROWS_CHOICES = ("exchange", "two_pass", "sweep")
LONG_ROWS_ENV = "TRITON_XENT_LONG_ROWS"


def initial_long_rows(environ=os.environ) -> str:
    """LONG_ROWS at import: TRITON_XENT_LONG_ROWS if set (ValueError naming it and the
    choices if it holds anything else), else "two_pass"."""
    value = environ.get(LONG_ROWS_ENV)
    if value is None:
        return "two_pass"
    if value not in LONG_ROWS_CHOICES:
        raise ValueError(f"environment variable {LONG_ROWS_ENV}={value!r}: choose one of "
                         f"{', '.join(map(repr, LONG_ROWS_CHOICES))}")
    return value


LONG_ROWS = initial_long_rows()


def long_rows() -> str:
    """LONG_ROWS as it is now, checked (it may be set in code at any time)."""
    if LONG_ROWS not in LONG_ROWS_CHOICES:
        raise ValueError(f"triton_xent.config.LONG_ROWS = {LONG_ROWS!r}: choose one of "
                         f"{', '.join(map(repr, LONG_ROWS_CHOICES))}")
    return LONG_ROWS


# Resident programs per SM of the exchange's first launch (_split_kernel), from the offline
# sm_90 audit (bench/compile_audit.py, triton 3.9, no GPU; registers bind in every case, at
# 16 warps a program): 2 for "lean" rows, 16-bit logits with class-index targets and none
# of class weights, smoothing, softcap, z-loss or the argmax (40 to 62 registers a thread;
# temperature, the entropy and row weights keep it), and 1 otherwise (72 to 84 registers:
# float32 logits, the options' per-column terms, the argmax's (value, index) reduction).
# tests/test_compile_audit.py checks that no audited case holds fewer than assumed here.
# Under "exchange" a call takes the exchange only if a row's P slices fit in
# SPLIT_RESIDENT_MARGIN of the device's resident programs, P <= MARGIN x SMs x programs per
# SM; else "two_pass" for that call. The margin leaves room for rows cut by the edge of a
# wave and for SMs taken by concurrent kernels (NCCL's): V = 256000 (P = 63) takes the
# exchange on 63 SMs or more for lean rows (126 otherwise: an H100 SXM's 132, not an H100
# PCIe's 114), never on a 16-SM MIG slice. A first choice, not yet measured on a GPU.
# With Triton 3.4 and 3.6 (the GPU machine's) the entropy and row weights take the split
# kernel to one program per SM (88 and 94 registers); there the margin is what keeps a row's
# P <= 0.5 x SMs x 2 = SMs slices resident (tests/test_compile_audit.py's strict xfail).
SPLIT_PROGRAMS_PER_SM_LEAN = 2
SPLIT_PROGRAMS_PER_SM = 1
SPLIT_RESIDENT_MARGIN = 0.5

# A program of the exchange polls its row's arrival counter at most this many times, and on
# NVIDIA for at most SLICE_WAIT_NS nanoseconds of the GPU's %globaltimer (whichever ends
# first), before it stops waiting, defers its slice to the second (finish) launch and moves
# on. The time bound is the one that binds on NVIDIA (a poll is an L2 round trip, about a
# microsecond at most, so 16384 polls are milliseconds); elsewhere (ROCm) the count alone
# bounds the wait. SLICE_WAIT_NS is about ten times our estimate (not a measurement) of the
# microseconds a 4096-column slice takes to load. Not yet measured on a GPU:
# `python bench/bench_xent.py --sweep` times the candidates (wait5us, wait100us, spin*).
SLICE_SPIN_LIMIT = 1 << 14
SLICE_WAIT_NS = 20_000

# The same under Triton's interpreter (TRITON_INTERPRET=1), which runs a grid's programs one
# after another: a sibling can never publish while a program polls, so polling only costs
# time and every program but a row's last defers at once. Tests raise it to run the polling
# loop itself through the interpreter. Not a speed setting.
INTERPRET_SLICE_SPIN_LIMIT = 0

# Warps per whole-row program, by the elements of its tile (ROWS x BLOCK_V; first match
# wins). Whole rows are tiles of ROWS x BLOCK_V, BLOCK_V the row's width to the next power of
# 2 and ROWS as many rows as fill ROWS_TILE_ELEMENTS: V = 10 gets 128 rows a program, V = 1000
# two, V >= 2048 one. From the offline sm_90 audit (bf16, no GPU): a 2048-element tile at 4
# warps takes 76 to 110 registers for V = 2 .. 1000 (4 to 6 programs an SM), no spills.
# Speed not yet measured on a GPU: `python bench/bench_xent.py --sweep` times the candidates.
NUM_WARPS_BY_BLOCK = ((2048, 4), (4096, 8), (1 << 62, 16))
ROWS_TILE_ELEMENTS = 2048

# Persistent schedule: False launches one program per tile or slice; True launches
# PERSISTENT_PROGRAMS_PER_SM programs per SM (the interpreter counts as one SM) that walk them
# in grid-stride order (see kernels/xent.py). Not yet measured on a GPU:
# `python bench/bench_xent.py --sweep` times both.
# On the H200 (2026-12-04) the exchange with PERSISTENT_PROGRAMS_PER_SM = 4 (more programs
# than fit at once, so many waits ran out) gave a NaN loss; 2 did not. The likely cause,
# found by reading the code since: each thread read the wait's timer itself, so the warps of
# one program could disagree on leaving the wait, whose loop holds barriers. The timer is now
# one value a program (kernels/xent.py _clock_ns); not yet run on a GPU.
PERSISTENT = False
PERSISTENT_PROGRAMS_PER_SM = 2

# The backward's grad_output scaling kernel: blocks of at most SCALE_BLOCK_V columns, tiles
# of rows as the whole-row kernel's (ROWS_TILE_ELEMENTS), at most SCALE_PROGRAMS_PER_SM
# programs an SM walking the tiles. A program a row, as before, cost the H200 (2026-12-04,
# bench/results/nvidia-h200.csv) about 1.6 ms for 2^20 rows even with a grad_output of 1 (the
# mean's): forward + backward 2.05 ms against the forward's 0.46 at V = 10, 4.35 against
# 2.73 at V = 1000. The values below are not yet measured on a GPU.
SCALE_BLOCK_V = 4096
SCALE_NUM_WARPS = 8
SCALE_PROGRAMS_PER_SM = 4

# Floating-point contraction (a * b + c as one fused multiply-add) in every kernel we compile,
# passed to each launch as `enable_fp_fusion`, so that our numerics do not follow Triton's
# default (which Triton 3.9 warns will change in 3.10). On: one rounding instead of two in the
# exponent arguments and the gradient's products, and the code the offline sm_90 audit
# (bench/compile_audit.py) read. A numerics choice, not a speed setting.
FP_FUSION = True

# The row sweep (LONG_ROWS = "sweep", kernels/xent.py _sweep_kernel): one program walks a
# whole row in steps of SWEEP_BLOCK_V columns at SWEEP_NUM_WARPS warps, twice (statistics,
# then the gradient), so the second sweep reads what the first left in L2.
#   SWEEP_PREFETCH         issue step k + 1's loads before step k's arithmetic (registers)
#   SWEEP_STAGES           > 1: Triton's loop pipeliner keeps SWEEP_STAGES - 1 steps in
#                          flight (cp.async into shared memory; seen in the sm_90 code of
#                          Triton 3.6 and 3.9 for loops that name num_stages); 1: off
#   SWEEP_REVERSE          the second sweep starts at the row's end, the blocks read last
#   SWEEP_EVICT            the first sweep's loads evict_last, the second's and the
#                          gradient's evict_first
#   SWEEP_PROGRAMS_PER_SM  None: one program a row; k: at most k programs per SM, walking
#                          the rows in grid-stride order
#   SWEEP_L2_FRACTION      None, or at most as many programs (rows between their sweeps) as
#                          fill this fraction of the L2
#   SWEEP_MAX_REGISTERS    None: ptxas allots the registers; r: at most r a thread (ptxas's
#                          maxnreg; NVIDIA only), what does not fit spilling to local
#                          memory. An SM holds 65536: at r = 64, 2 programs of 16 warps or 4
#                          of 8. The compile audit with Triton 3.6, 8192 columns at 16 warps:
#                          the plain call takes 64 registers (2 programs an SM) but smoothing
#                          123, class weights and z-loss 87 and argmax 92 (1 an SM), so they
#                          are predicted at 2.0x the plain call's time from L2 (4.6-4.7 ms
#                          against 2.36); at r = 64 all fit 2 an SM, smoothing with a
#                          120-byte spill the model does not price, the others at 2.30-2.36
#                          ms. Distillation there: forward KL no better, JSD 5.09 -> 4.12
#                          ms with spills and more instructions (with Triton 3.9 JSD gets
#                          slower, 4.1 -> 6.4). Predictions, not measurements.
# First choices, not yet measured on a GPU: `python bench/gpu_tune.py` times the candidates.
# The compile audit's prediction (`python bench/compile_audit.py --predict`, sm_90, bf16,
# N = 16384, V = 128256, forward + backward; a prediction): with the Triton of the GPU
# machine (3.6) 8192 columns at 16 warps take 64 registers, 2 programs an SM, 3.30 ms if the
# second sweep reads HBM and 2.36 ms if L2; 4096 columns at 8 warps 3.17 and 2.14 ms (58
# registers, 4 an SM) but with every option 166 registers there, and a spill with 3.9. With
# Triton 3.9 8192 columns at 16 warps take 74 registers, 1 program an SM (4.47 ms).
SWEEP_BLOCK_V = 8192
SWEEP_NUM_WARPS = 16
SWEEP_PREFETCH = True
SWEEP_STAGES = 1
SWEEP_REVERSE = True
SWEEP_EVICT = True
SWEEP_PROGRAMS_PER_SM = None
SWEEP_L2_FRACTION = None
SWEEP_MAX_REGISTERS = None

# --- distillation (triton_xent/kernels/distill.py) ---------------------------------------

# Distillation uses the cross-entropy's numbers above: whole rows up to ROW_SLICE_MAX_V
# columns as ROWS_TILE_ELEMENTS tiles with NUM_WARPS_BY_BLOCK warps; longer rows by
# LONG_ROWS, the same switch and default ("exchange" takes "two_pass": distillation has no
# exchange), in slices of split_plan's width at SPLIT_NUM_WARPS ("two_pass") or in the row
# sweep with the SWEEP_* knobs ("sweep"). Its tiles hold two logits tensors, so the offline
# sm_90 audit (bench/compile_audit.py, triton 3.9, no GPU, bf16) was read for them too: whole
# rows of V = 4096 at 8 warps take 48 (forward KL), 64 (reverse KL) and 79 (JSD) registers,
# 5, 4 and 3 programs an SM; V = 1000 JSD at 4 warps 64, 8 an SM; the slice kernels at 16
# warps 26 to 39, 3 or 4 an SM; the sweep at V = 128256 (8192 columns, 16 warps, prefetch)
# 74, 74 and 84, 1 program an SM; no spills. Speed not yet measured on a GPU:
# `python bench/gpu_tune.py OUT --steps distill` times both long-row paths.

# --- the linear ops' chunk driver (triton_xent/chunks.py) ------------------------------
#
# The choices below are the chunk driver's: how the (N, V) logits are cut, which GEMMs run
# and where the head's gradient d_W accumulates. bench/README.md ("Linear cross-entropy:
# notes") has the arithmetic behind each; `python bench/bench_linear.py --variants` (or
# bench_linear.tune_step, gpu_tune.py's linear step) times them side by side.

# Schedule of the linear ops, per device type (read at each call; others get "rows"):
#   "rows"   row chunks: per chunk of R rows the logits GEMM, the loss callback, d_x's rows
#            (one GEMM, written once) and d_W += d_logits.T @ x_c, accumulated over the
#            chunks in a (V, D) buffer of accum_dtype (float32 by default): 3 GEMMs, and
#            that buffer (V * D * 4 bytes: 2.36 GB for Gemma 2's head) on top of the chunk.
#   "vocab"  blocks of B classes over all (kept) rows, in two passes: the logits GEMM and
#            each row's statistics of the block (merged over the blocks), then the logits
#            GEMM again, the gradient of the block from the merged statistics, d_W's rows
#            of the block in one GEMM over all rows (float32 accumulation inside the GEMM,
#            written once in the head's dtype: no (V, D) accumulator) and d_x += d_logits @
#            W_block into an (N, D) float32 buffer: 4 GEMMs, one (N, B) block on top.
#            Cross-entropy with class-index targets and distillation; probability targets
#            and vocab parallelism (process_group, DTensor heads) take "rows".
# Neither has been timed on a GPU: "rows" stays the default there because it runs a GEMM
# less (a prediction of about 1.33x the three GEMMs' time for "vocab"); bench_linear.tune_step
# times both. On a CPU "rows" stays the default too (the CPU measurement is in
# bench/README.md's notes).
LINEAR_SCHEDULE_CHOICES = ("rows", "vocab")
LINEAR_SCHEDULE = {"cuda": "rows", "cpu": "rows"}


def linear_schedule(device: torch.device) -> str:
    """LINEAR_SCHEDULE's entry for the device's type ("rows" for a type it does not name),
    checked (it may be set in code at any time)."""
    value = LINEAR_SCHEDULE.get(device.type, "rows")
    if value not in LINEAR_SCHEDULE_CHOICES:
        raise ValueError(f"triton_xent.config.LINEAR_SCHEDULE[{device.type!r}] = {value!r}: "
                         f"choose one of {', '.join(map(repr, LINEAR_SCHEDULE_CHOICES))}")
    return value


# "rows": bytes of one (chunk_rows, V) logits chunk on a GPU when the caller gives neither
# `chunk_size` nor `memory_budget_bytes`: 1024 rows of bf16 logits for V = 128256 (Llama 3),
# 512 for V = 256000 (Gemma 2), 512 in fp32. Not yet measured on a GPU.
LINEAR_CHUNK_BUDGET_BYTES = 256 * 2**20

# "rows": rows per chunk on a GPU when the caller gives neither `chunk_size` nor
# `memory_budget_bytes`; None sizes the chunk from LINEAR_CHUNK_BUDGET_BYTES. The rows are the
# inner size of d_W's GEMM, whose float32 (V, D) accumulator is read and written once per
# chunk (8 bytes per element against 2 R flops): R >= 4 x (the GPU's flops per byte) keeps
# that GEMM bound by its flops, about R >= 650 on an H200 from the first run's own numbers
# (693 TFLOP/s in the three GEMMs, 4237 GB/s copy bandwidth). A prediction, not yet measured:
# bench_linear.tune_step times 512, 1024 and 2048 rows.
LINEAR_GPU_CHUNK_ROWS = None

# Chunks from a budget are a multiple of this many rows (the M tile of the GEMMs) once they
# are at least this large. Not yet measured on a GPU.
LINEAR_CHUNK_ROW_MULTIPLE = 64

# Rows per chunk of the linear op on a CPU when the caller gives neither `chunk_size` nor
# `memory_budget_bytes`. There the chunk's size in bytes buys no speed, and each chunk costs
# one read and write of the (V, D) head-gradient accumulator (d_W += d_logits.T @ x_c, a GEMM
# whose inner size is the chunk's rows): 128 rows keep that traffic a small part of the
# chunk's three GEMMs while the chunk stays small (16 MB of fp32 logits at V = 32000).
# Measured on the 2-core CI machine (AMD EPYC; torch 2.13, one thread, machine shared with
# other jobs), N=1024, D=512, V=32000 fp32, forward+backward, median of 3: 64 rows 4.5 s,
# 128 rows 3.6 s, 256 rows 3.0 s, 1024 rows 2.9 s; torch's chunked F.linear_cross_entropy
# 9.6 s. 256 rows would cost a chunk twice the size for 16% less time.
LINEAR_CPU_CHUNK_ROWS = 128

# "vocab": bytes of one (rows, B) block of logits (B classes over all the kept rows), when
# the caller gives no `chunk_size`; B is rounded down to a multiple of
# LINEAR_VOCAB_BLOCK_MULTIPLE (at least one multiple). 64 MiB: B = 4096 for 8192 bf16 rows.
# The block's GEMMs read x (N, D) once each, so B flops per byte of x: B >= 1024 keeps them
# bound by their flops on an H200 (a prediction). Not yet measured on a GPU:
# bench_linear.tune_step times B = 2048, 4096 and 8192 at N = 8192.
LINEAR_VOCAB_BLOCK_BYTES = 64 * 2**20
LINEAR_VOCAB_BLOCK_MULTIPLE = 256

# "rows", a float32 accumulator and 16-bit inputs on CUDA: d_W += d_logits.T @ x_c as one
# GEMM that reads and writes the float32 accumulator (torch.addmm with out_dtype=float32 and
# out= the accumulator, beta = 1: cuBLAS adds the product to it in float32, so no chunk's
# product is ever rounded to 16 bits and no (V, D) temporary exists). A torch without
# pytorch/pytorch#167931 (Nov 2025: torch 2.8 and 2.9 at least) refuses a float32 `self`
# there ("self and mat2 must have the same dtype"); the driver then falls back, once per
# process, to a float32 product and an add (what False selects: one more (V, D) float32
# write and two reads per chunk, 9.4 GB instead of 4.7 GB a chunk for Gemma 2's head). True
# is the arithmetic's choice; timed against False by bench_linear.tune_step.
LINEAR_FUSED_ACCUMULATE = True

# --- CPU fallback (triton_xent/reference.py) ----------------------------------------------

# Elements (rows x classes) per chunk of the plain-PyTorch path: its one float32 buffer
# (4 MiB at this size), reused for every chunk, and the chunk's logits and gradient should
# stay in the CPU's cache between the passes over them. Measured on the 2-core CI machine
# (AMD EPYC, 1 MiB L2 per core, 32 MiB L3; torch 2.13, N=2048, V=32000 fp32, median of 3,
# machine shared with other jobs): one thread, forward+backward, 2^18 and 2^20 alike,
# 2^22 7% slower; forward only, 2^18 1.3x faster than 2^22. 2^20 keeps the number of
# threaded ops per call low (each op is one parallel region over the chunk's rows).
TORCH_CHUNK_ELEMENTS = 1 << 20


def num_warps_for(block_v: int) -> int:
    """Warps for a whole-row program whose tile holds `block_v` elements."""
    for limit, warps in NUM_WARPS_BY_BLOCK:
        if block_v <= limit:
            return warps
    raise AssertionError("NUM_WARPS_BY_BLOCK must end with an unbounded entry")
