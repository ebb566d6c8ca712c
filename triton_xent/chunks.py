"""The chunk driver of the linear ops: a loss of the logits x @ W.T + b, with its gradients
for x, W and b, without ever holding the (N, V) logits.

Rows are taken `chunk_rows` at a time. For one chunk of R rows:

    logits  = x_c @ W.T + b            (R, V), input dtype, fp32 accumulation in the GEMM
    out_c   = on_chunk(logits, take)   per-row results; d_logits written over the logits
    d_x_c   = d_logits @ W             (R, D), one write per row, no accumulation
    d_W    += d_logits.T @ x_c         (V, D), accumulated in `accum_dtype`
    d_b    += sum_rows d_logits        (V,),   accumulated in `accum_dtype`

so the memory beyond the inputs is one (R, V) chunk (and whatever the callback holds: the
teacher's chunk for distillation) plus the gradient accumulators, whatever N is. The loss is
the callback's: linear.py's cross-entropy (the row functions of core.row_fns) and
linear_distill.py's divergences both run through `linear_chunks`. No @triton.jit code here:
all the per-element work is the callback's and the GEMMs' (cuBLAS).

Bytes per chunk: the logits are written once by the GEMM, read and overwritten once by the
callback, then read once by each of the (up to) two gradient GEMMs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import config


def plan_chunk_rows(
    n_rows: int,  # rows that will be computed (ignored rows already dropped)
    n_classes: int,  # V
    itemsize: int,  # bytes per logit (the input dtype's)
    *,
    chunk_size: int | None,
    memory_budget_bytes: int | None,
    cpu: bool,  # the rows live on a CPU
) -> int:
    """Rows per chunk: `chunk_size` if given; else budget / (V * itemsize) rows for the
    `memory_budget_bytes` given, rounded down to a multiple of LINEAR_CHUNK_ROW_MULTIPLE;
    else the device's default: LINEAR_CPU_CHUNK_ROWS rows on a CPU (where the head's gradient
    update per chunk, not the chunk's bytes, sets the size), the LINEAR_CHUNK_BUDGET_BYTES
    budget elsewhere. Then evened out so that the last chunk is not a sliver (N rows in
    ceil(N / rows) chunks of about equal size). Always >= 1."""
    if chunk_size is not None:
        return chunk_size
    multiple = config.LINEAR_CHUNK_ROW_MULTIPLE
    if cpu and memory_budget_bytes is None:
        rows = config.LINEAR_CPU_CHUNK_ROWS
    else:
        budget = memory_budget_bytes or config.LINEAR_CHUNK_BUDGET_BYTES
        rows = max(1, budget // max(1, n_classes * itemsize))
        if rows >= multiple:
            rows -= rows % multiple
    if n_rows <= rows:
        return max(1, n_rows)
    n_chunks = -(-n_rows // rows)
    even = -(-n_rows // n_chunks)
    rounded = -(-even // multiple) * multiple
    return rounded if rounded <= rows else even


def _add_product_(
    acc: torch.Tensor,  # (V, D) accumulator, updated in place
    a: torch.Tensor,  # (V, R)
    b: torch.Tensor,  # (R, D)
) -> None:
    """acc += a @ b, with the sum kept in acc's dtype (which may be wider than a's)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif (acc.is_cuda and acc.dtype == torch.float32
          and a.dtype in (torch.float16, torch.bfloat16)):
        # cuBLAS accumulates in fp32 and stores fp32: the chunk's product is never rounded.
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        # Elsewhere (CPU; mm has no out_dtype there) the chunk's product is rounded once to
        # the input dtype; the sum over chunks still runs in acc's dtype.
        acc.add_(torch.mm(a, b))


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
    """(d_input (N, D) in x's dtype, d_weight (V, D), d_bias (V,) in accum_dtype), each None
    unless asked for, from the gradients of the logits that `on_chunk` writes; its per-row
    results are written into `outputs` at their rows. When no gradient is asked for, the
    driver runs the head and the callback only (the callback then writes nothing)."""
    N, D = x.shape
    V = weight.shape[0]
    compute_grad = need_input or need_weight or need_bias
    d_input = (x.new_empty if rows is None else x.new_zeros)((N, D)) if need_input else None
    d_weight = x.new_zeros((V, D), dtype=accum_dtype) if need_weight else None
    d_bias = x.new_zeros((V,), dtype=accum_dtype) if need_bias else None

    n_compute = N if rows is None else rows.numel()
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
            _add_product_(d_weight, d_logits.t(), x_c)
        if need_bias:
            d_bias.add_(d_logits.sum(0, dtype=accum_dtype))
    return d_input, d_weight, d_bias
