"""What the kernel families share (kernels/xent.py, kernels/distill.py): the row offsets of
an (N, ., D) tensor, the reference point of a max, and the launch plans: whole-row tiles,
their alignment, split rows' slices, and the row sweep's block, grid and eviction policies
(config.SWEEP_*). Neither family's file imports the other's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import config

NEG_INF = tl.constexpr(float("-inf"))
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e), rounded to float32 where it is used


@triton.jit
def _row_offsets(rows, n_inner, stride_n, stride_d):
    """(R,) int64 offsets of rows r = n * D + d of a (N, ., D) tensor."""
    return (rows // n_inner) * stride_n + (rows % n_inner) * stride_d


@triton.jit
def _finite_or_zero(m):
    """The reference point of a set's differences z - m: its max m, or 0 for a set of -inf
    (whose sum of exp(z - m) is then 0, not NaN)."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _exp(x):
    """e^x, as 2^(x log2 e). On NVIDIA, Triton (3.6 and 3.9) lowers tl.exp2 to one
    ex2.approx.ftz.f32, and tl.exp to the same multiply and an ex2.approx.f32 that ptxas
    wraps in a range test and two scalings for subnormal results (sm_90 SASS: MUFU.EX2 and
    its FMUL, then 3 instructions more a logit). The one difference in value: a result
    below 2^-126 (1.2e-38) is 0. On AMD both lower to the same v_exp_f32."""
    return tl.exp2(x * LOG2E)


# --- launch plans ---------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_tile(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps) of a whole-rows tile: rows of n_cols <= ROW_SLICE_MAX_V
    columns, as many as fill config.ROWS_TILE_ELEMENTS (but no more than there are rows)."""
    block_v = triton.next_power_of_2(max(n_cols, 1))
    rows = max(1, config.ROWS_TILE_ELEMENTS // block_v)
    rows = min(rows, triton.next_power_of_2(max(n_rows, 1)))
    return rows, block_v, config.num_warps_for(rows * block_v)


def row_align(n_cols: int, *tensors: torch.Tensor) -> int:
    """The largest power of 2, up to 16 bytes' worth of elements, that divides n_cols and the
    offset of every row's first element in each (N, V, D) tensor (its strides other than the
    class stride). Triton's JIT proves 16 by itself only when a number divides by 16."""
    align = 16 // tensors[0].element_size()
    while n_cols % align:
        align //= 2
    for x in tensors:
        for stride, size in ((x.stride(0), x.shape[0]), (x.stride(2), x.shape[2])):
            while size > 1 and stride % align:
                align //= 2
    return align


def split_plan(n_cols: int) -> tuple[int, int, int, int]:
    """(P, slice_width, BLOCK_V, num_warps) of rows of n_cols > ROW_SLICE_MAX_V columns: P
    slices of equal width, a multiple of 16 so that every slice starts aligned."""
    n_slices = triton.cdiv(n_cols, config.ROW_SLICE_MAX_V)
    slice_width = triton.cdiv(triton.cdiv(n_cols, n_slices), 16) * 16
    n_slices = triton.cdiv(n_cols, slice_width)  # rounding up the width may spare a slice
    block_v = triton.next_power_of_2(slice_width)
    return n_slices, slice_width, block_v, config.SPLIT_NUM_WARPS


def sm_count(device: torch.device) -> int | None:
    """The GPU's SMs (CUs on ROCm; a MIG slice's own), None off a GPU (the interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def sweep_plan(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row sweep: config.SWEEP_BLOCK_V columns a step, or the
    row's width to the next power of 2 if that is less."""
    return (min(config.SWEEP_BLOCK_V, triton.next_power_of_2(n_cols)),
            config.SWEEP_NUM_WARPS)


def sweep_grid(n_rows: int, row_bytes: int, device: torch.device) -> tuple[int]:
    """Programs of the row sweep: one a row, at most config.SWEEP_PROGRAMS_PER_SM per SM if
    set, and at most as many rows as fill config.SWEEP_L2_FRACTION of the device's L2 if set
    (each program holds one row between its sweeps). Off a GPU (the interpreter) one a row,
    at most 3 with a cap, so that tests run the grid-stride loop."""
    programs = n_rows
    if device.type != "cuda":
        capped = config.SWEEP_PROGRAMS_PER_SM or config.SWEEP_L2_FRACTION
        return (max(1, min(n_rows, 3 if capped else n_rows)),)
    props = torch.cuda.get_device_properties(device)
    if config.SWEEP_PROGRAMS_PER_SM:
        programs = min(programs, props.multi_processor_count * config.SWEEP_PROGRAMS_PER_SM)
    if config.SWEEP_L2_FRACTION:
        programs = min(programs, int(props.L2_cache_size * config.SWEEP_L2_FRACTION
                                     // max(row_bytes, 1)))
    return (max(1, programs),)


def sweep_launch_options() -> dict:
    """The sweep's extra launch options: ptxas's register cap per thread (maxnreg) when
    config.SWEEP_MAX_REGISTERS is set, on NVIDIA (ROCm has no such option); none otherwise.
    The interpreter ignores it."""
    if config.SWEEP_MAX_REGISTERS is None or torch.version.hip:
        return {}
    return {"maxnreg": config.SWEEP_MAX_REGISTERS}


def sweep_policies() -> tuple[str, str]:
    """The eviction policies of the sweep's first and second sweeps (config.SWEEP_EVICT)."""
    return ("evict_last", "evict_first") if config.SWEEP_EVICT else ("", "")
