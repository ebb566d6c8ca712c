"""The chunk driver of the linear ops: a loss of the logits x @ W.T + b, with its gradients
for x, W and b, without ever holding the (N, V) logits. Two schedules (config.LINEAR_SCHEDULE;
bench/README.md's notes have the arithmetic of each):

"rows" (linear_chunks): rows are taken `chunk_rows` at a time. For one chunk of R rows:

    logits  = x_c @ W.T + b            (R, V), input dtype, fp32 accumulation in the GEMM
    out_c   = on_chunk(logits, take)   per-row results; d_logits written over the logits
    d_x_c   = d_logits @ W             (R, D), one write per row, no accumulation
    d_W    += d_logits.T @ x_c         (V, D), accumulated in `accum_dtype`
    d_b    += sum_rows d_logits        (V,),   accumulated in `accum_dtype`

so the memory beyond the inputs is one (R, V) chunk (and whatever the callback holds: the
teacher's chunk for distillation) plus the gradient accumulators, whatever N is. Bytes per
chunk: the logits are written once by the GEMM, read and overwritten once by the callback,
then read once by each of the (up to) two gradient GEMMs; a float32 d_W is read and written
once by its GEMM (no (V, D) temporary: _accumulate_product_).

"vocab" (vocab_blocks): classes are taken `block_cols` at a time, over all the kept rows, in
passes that the callback defines. For a block of B classes, in every pass:

    logits  = x @ W_blk.T + b_blk      (M, B), input dtype
    on_block(logits, lo, hi)           the pass's work: statistics, or (last pass, with a
                                       gradient asked for) d_logits written over the logits
and after the last pass's callback:
    d_W_blk = d_logits.T @ x           (B, D): the sum over all M rows inside one GEMM (fp32
                                       accumulation), written once in x's dtype
    d_b_blk = sum_rows d_logits        (B,) in `accum_dtype`
    d_x    += d_logits @ W_blk         (M, D), accumulated in float32 (or x's wider dtype)

so there is no (V, D) accumulator: the memory beyond the inputs and the gradients is one
(M, B) block and the (M, D) float32 d_x, at the cost of the logits GEMM once per pass.

The losses are the callbacks': linear.py's cross-entropy (the row functions of core.row_fns,
or the slice statistics of distributed.py for "vocab") and linear_distill.py's divergences.
No @triton.jit code here: all the per-element work is the callbacks' and the GEMMs' (cuBLAS).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from . import config


def _evened(n: int, size: int, multiple: int) -> int:
    """`size` per piece evened out over ceil(n / size) pieces of about equal size (so that
    the last is not a sliver), rounded up to a multiple of `multiple` where that stays
    <= size. Always >= 1."""
    if n <= size:
        return max(1, n)
    pieces = -(-n // size)
    even = -(-n // pieces)
    rounded = -(-even // multiple) * multiple
    return rounded if rounded <= size else even


def plan_chunk_rows(
    n_rows: int,  # rows that will be computed (ignored rows already dropped)
    n_classes: int,  # V
    itemsize: int,  # bytes per logit (the input dtype's)
    *,
    chunk_size: int | None,
    memory_budget_bytes: int | None,
    cpu: bool,  # the rows live on a CPU
) -> int:
    """Rows per chunk ("rows" schedule): `chunk_size` if given; else budget / (V * itemsize)
    rows for the `memory_budget_bytes` given, rounded down to a multiple of
    LINEAR_CHUNK_ROW_MULTIPLE; else the device's default: LINEAR_CPU_CHUNK_ROWS rows on a CPU
    (where the head's gradient update per chunk, not the chunk's bytes, sets the size),
    LINEAR_GPU_CHUNK_ROWS rows elsewhere if set, else the LINEAR_CHUNK_BUDGET_BYTES budget.
    Then evened out so that the last chunk is not a sliver (N rows in ceil(N / rows) chunks
    of about equal size). Always >= 1."""
    if chunk_size is not None:
        return chunk_size
    multiple = config.LINEAR_CHUNK_ROW_MULTIPLE
    if memory_budget_bytes is None and cpu:
        rows = config.LINEAR_CPU_CHUNK_ROWS
    elif memory_budget_bytes is None and config.LINEAR_GPU_CHUNK_ROWS is not None:
        rows = config.LINEAR_GPU_CHUNK_ROWS
    else:
        budget = memory_budget_bytes or config.LINEAR_CHUNK_BUDGET_BYTES
        rows = max(1, budget // max(1, n_classes * itemsize))
        if rows >= multiple:
            rows -= rows % multiple
    return _evened(n_rows, rows, multiple)


def plan_block_cols(
    n_rows: int,  # rows that will be computed (ignored rows already dropped)
    n_classes: int,  # V
    itemsize: int,  # bytes per logit
    *,
    memory_budget_bytes: int | None,
) -> int:
    """Classes per block ("vocab" schedule): budget / (rows * itemsize) for the
    `memory_budget_bytes` given, else LINEAR_VOCAB_BLOCK_BYTES, rounded down to a multiple of
    LINEAR_VOCAB_BLOCK_MULTIPLE once at least that large, then evened out over the V classes
    as plan_chunk_rows evens rows. Always >= 1."""
    multiple = config.LINEAR_VOCAB_BLOCK_MULTIPLE
    budget = memory_budget_bytes or config.LINEAR_VOCAB_BLOCK_BYTES
    cols = max(1, budget // max(1, n_rows * itemsize))
    if cols >= multiple:
        cols -= cols % multiple
    return _evened(n_classes, cols, multiple)


# Whether torch.addmm takes a float32 `self` with 16-bit matrices and out_dtype=float32 on
# CUDA (a torch without pytorch/pytorch#167931, 2.8 and 2.9 at least, refuses it on the host,
# before any work; config.LINEAR_FUSED_ACCUMULATE): None until first tried.
_fused_fp32_addmm: bool | None = None


def _accumulate_product_(
    acc: torch.Tensor,  # (V, D) accumulator, written (first) or updated in place
    a: torch.Tensor,  # (V, R)
    b: torch.Tensor,  # (R, D)
    first: bool,  # acc holds nothing yet: write the product instead of adding it
) -> None:
    """acc = a @ b (first) or acc += a @ b, with the sum kept in acc's dtype (which may be
    wider than a's). Where cuBLAS can, the product goes straight into acc: 16-bit a and b
    with a float32 acc on CUDA are one GEMM that accumulates in float32 and reads and writes
    acc once (beta = 1), with no (V, D) temporary and no rounding of the chunk's product."""
    global _fused_fp32_addmm
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    mixed_cuda = (acc.is_cuda and acc.dtype == torch.float32
                  and a.dtype in (torch.float16, torch.bfloat16))
    if mixed_cuda and first:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)
        return
    if mixed_cuda and config.LINEAR_FUSED_ACCUMULATE and _fused_fp32_addmm is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _fused_fp32_addmm = True
            return
        except RuntimeError:  # a torch whose addmm wants self in the matrices' dtype
            if _fused_fp32_addmm:
                raise
            _fused_fp32_addmm = False
    if mixed_cuda:  # a float32 product, then an add: one more (V, D) pass
        product = torch.mm(a, b, out_dtype=torch.float32)
    else:
        # Elsewhere (CPU; mm has no out_dtype there) the chunk's product is rounded once to
        # the input dtype; the sum over chunks still runs in acc's dtype.
        product = torch.mm(a, b)
    if first:
        acc.copy_(product)
    else:
        acc.add_(product)


def head_logits(
    x_c: torch.Tensor,  # (R, D)
    weight: torch.Tensor,  # (V, D)
    bias: torch.Tensor | None,  # (V,)
    out: torch.Tensor,  # (>= R, V) buffer reused for every chunk
) -> torch.Tensor:
    """x_c @ W.T + b written into the first R rows of `out`: (R, V). A reused buffer, since a
    fresh product per chunk would be allocated while the previous chunk is still held."""
    out = out[:x_c.shape[0]]
    w_t = weight.t()  # (D, V) view: no copy
    return (torch.addmm(bias, x_c, w_t, out=out) if bias is not None
            else torch.mm(x_c, w_t, out=out))


# on_chunk(logits (R, V), take) -> the chunk's per-row results, each (R,) (or None).
# `take(t)` gives the chunk's rows of any (N, ...) tensor (a view for contiguous chunks, a
# gather for kept rows; None stays None). With a gradient asked for, on_chunk overwrites
# `logits` with d loss / d logits (already scaled as the loss wants it).
ChunkFn = Callable[[torch.Tensor, Callable], Sequence]


def linear_chunks(
    x: torch.Tensor,  # (N, D) activations
    weight: torch.Tensor,  # (V, D) the head, x's dtype
    bias: torch.Tensor | None,  # (V,), x's dtype
    on_chunk: ChunkFn,
    outputs: Sequence,  # (N,) tensors (or None) that take on_chunk's results, in its order
    *,
    rows: torch.Tensor | None,  # (M,) int64: the only rows to compute (the others keep what
                                # `outputs` held and get a zero gradient); None: all N rows
    chunk_rows: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype,  # of d_W and d_b
) -> tuple:
    """The "rows" schedule: (d_input (N, D) in x's dtype, d_weight (V, D), d_bias (V,) in
    accum_dtype), each None unless asked for, from the gradients of the logits that
    `on_chunk` writes; its per-row results are written into `outputs` at their rows. When
    no gradient is asked for, the driver runs the head and the callback only (the callback
    then writes nothing)."""
    N, D = x.shape
    V = weight.shape[0]
    compute_grad = need_input or need_weight or need_bias
    d_input = (x.new_empty if rows is None else x.new_zeros)((N, D)) if need_input else None
    d_weight = x.new_empty((V, D), dtype=accum_dtype) if need_weight else None
    d_bias = x.new_zeros((V,), dtype=accum_dtype) if need_bias else None

    n_compute = N if rows is None else rows.numel()
    if d_weight is not None and n_compute == 0:
        d_weight.zero_()
    chunk_buf = x.new_empty((min(chunk_rows, n_compute), V))
    for start in range(0, n_compute, chunk_rows):
        stop = min(start + chunk_rows, n_compute)
        sel = None if rows is None else rows[start:stop]

        def take(t, sel=sel, start=start, stop=stop):
            if t is None:
                return None
            return t[start:stop] if sel is None else t.index_select(0, sel)

        x_c = take(x)  # contiguous rows: a view; kept rows: gathered (R x D, beside R x V)
        logits = head_logits(x_c, weight, bias, chunk_buf)  # (R, V)
        results = on_chunk(logits, take)
        for out, c_out in zip(outputs, results):
            if out is None:
                continue
            if sel is None:
                out[start:stop] = c_out
            else:
                out.index_copy_(0, sel, c_out.to(out.dtype))
        if not compute_grad:
            continue

        d_logits = logits  # (R, V): now dloss/dlogits, as on_chunk scaled it
        if need_input and sel is None:
            torch.mm(d_logits, weight, out=d_input[start:stop])
        elif need_input:
            d_input.index_copy_(0, sel, torch.mm(d_logits, weight))
        if need_weight:
            _accumulate_product_(d_weight, d_logits.t(), x_c, first=start == 0)
        if need_bias:
            d_bias.add_(d_logits.sum(0, dtype=accum_dtype))
    return d_input, d_weight, d_bias


class BlockPass(NamedTuple):
    """One pass of the "vocab" schedule over every block of classes."""

    # on_block(logits (M, B), lo, hi): the block of classes lo .. hi - 1 over the kept rows;
    # in the gradient pass it overwrites logits with d loss / d logits
    on_block: Callable[[torch.Tensor, int, int], None]
    # called once after the pass's last block (e.g. to merge the blocks' statistics)
    on_end: Callable[[], None] | None = None


def vocab_blocks(
    x: torch.Tensor,  # (N, D) activations
    weight: torch.Tensor,  # (V, D) the head, x's dtype
    bias: torch.Tensor | None,  # (V,), x's dtype
    passes: Sequence[BlockPass],  # run in order; the last writes d_logits if grads are asked
    *,
    rows: torch.Tensor | None,  # (M,) int64: the only rows to compute; None: all N rows
    block_cols: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype,  # of d_b and of d_x's accumulation (at least float32)
) -> tuple:
    """The "vocab" schedule: (d_input (N, D) in x's dtype (0 on rows not computed),
    d_weight (V, D) in x's dtype, d_bias (V,) in accum_dtype), each None unless asked for.
    Every pass computes the logits of each block of `block_cols` classes over the M kept
    rows (head_logits, so the rows are gathered once, before any GEMM) and hands them to its
    callback; after the last pass's callback has written a block's d_logits, d_W's rows of
    the block come from one GEMM over all M rows (its float32 sum rounded once, to x's
    dtype), and d_x gathers the block's share in a float32 (M, D) buffer."""
    N, D = x.shape
    V = weight.shape[0]
    compute_grad = need_input or need_weight or need_bias
    x_k = x if rows is None else x.index_select(0, rows)  # (M, D)
    M = x_k.shape[0]
    acc = torch.promote_types(accum_dtype, torch.promote_types(torch.float32, x.dtype))
    d_weight = x.new_empty((V, D)) if need_weight else None
    d_bias = x.new_empty((V,), dtype=accum_dtype) if need_bias else None
    d_x = x.new_zeros((M, D), dtype=acc) if need_input else None
    buf = x.new_empty(M * min(block_cols, V))
    for p, block_pass in enumerate(passes):
        grad_pass = compute_grad and p == len(passes) - 1
        for lo in range(0, V, block_cols):
            hi = min(lo + block_cols, V)
            out = buf[:M * (hi - lo)].view(M, hi - lo)  # contiguous, also for the last block
            logits = head_logits(x_k, weight[lo:hi], bias[lo:hi] if bias is not None
                                 else None, out)
            block_pass.on_block(logits, lo, hi)
            if not grad_pass:
                continue
            d_logits = logits  # (M, B)
            if need_weight:
                torch.mm(d_logits.t(), x_k, out=d_weight[lo:hi])
            if need_bias:
                d_bias[lo:hi] = d_logits.sum(0, dtype=accum_dtype)
            if need_input:
                _accumulate_product_(d_x, d_logits, weight[lo:hi], first=False)
        if block_pass.on_end is not None:
            block_pass.on_end()
    if need_weight and M == 0:
        d_weight.zero_()
    if need_bias and M == 0:
        d_bias.zero_()
    d_input = None
    if need_input:
        if rows is None:
            d_input = d_x.to(x.dtype)
        else:
            d_input = x.new_zeros((N, D))
            d_input.index_copy_(0, rows, d_x.to(x.dtype))
    return d_input, d_weight, d_bias
