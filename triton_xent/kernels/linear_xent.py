"""The chunked linear + cross-entropy driver: loss and gradients of
cross_entropy(x @ W.T + b, target) without ever holding the (N, V) logits.

Rows are taken `chunk_rows` at a time. For one chunk of R rows:

    logits  = x_c @ W.T + b                       (R, V), input dtype, fp32 accumulation in the GEMM
    ce, lse, d_logits = row kernel(logits)        d_logits written over the logits (in place)
    d_x_c   = d_logits @ W                        (R, D), one write per row, no accumulation
    d_W    += d_logits.T @ x_c                    (V, D), accumulated in `accum_dtype`
    d_b    += sum_rows d_logits                   (V,),   accumulated in `accum_dtype`

so the memory beyond the inputs is one (R, V) chunk plus the gradient accumulators, whatever
N is. The row kernel is either backend's (core.row_fns): kernels.xent.xent_rows or
reference.xent_rows_torch, so this file is the CPU fallback as well; it holds no @triton.jit
code of its own: all the per-element work is the row kernel's and the GEMMs' (cuBLAS).

Bytes per chunk: the logits are written once by the GEMM, read and overwritten once by the
row kernel, then read once by each of the (up to) two gradient GEMMs.
"""

from __future__ import annotations

import torch

from .. import config, core

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


def linear_xent_chunks(
    x: torch.Tensor,  # (N, D) activations
    linear_weight: torch.Tensor,  # (V, D) classifier head, x's dtype
    linear_bias: torch.Tensor | None,  # (V,), x's dtype
    target: torch.Tensor,  # (N,) class indices, or (N, V) class probabilities
    weight: torch.Tensor | None,  # (V,) class weights; float32 and contiguous for the kernels
    problem: core.Problem,
    *,
    rows: torch.Tensor | None,  # (M,) int64: the only rows to compute (the others are
                                # ignored: loss 0, gradient 0); None: all N rows
    chunk_rows: int,
    scale: torch.Tensor | None,  # (2,) "mean" factors of the CE and z-loss gradients, or None
    row_weight: torch.Tensor | None,  # (N,) factor of each row's CE gradient, or None
    entropy_weight: torch.Tensor | None,  # (N,) factor of each row's dH in the gradient
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype,  # of d_W and d_b
    rows_fn=None,  # the row function (core.row_fns' by default; distributed.sliced_rows')
) -> tuple:
    """(ce, lse, H, argmax, d_input, d_weight, d_bias) of cross_entropy(x @ W.T + b, target)
    per row.

    ce (N,): the unreduced cross-entropy without the z-loss; lse (N,): the logsumexp of each
    row (after softcap and temperature); H (N,): the entropy if the row function is asked
    for it (`problem.entropy`, or an entropy_weight), else None; all float32 (float64 for
    float64 x) and 0 on rows not computed; argmax (N,) int64 if `problem.argmax`, -1 on rows
    not computed. d_input (N, D) in x's dtype, d_weight (V, D) and d_bias (V,) in
    accum_dtype, each None unless asked for. When none is asked for, the row kernel computes
    no gradient at all.
    """
    N, D = x.shape
    V = linear_weight.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    computed = rows is None
    new = x.new_empty if computed else x.new_zeros
    entropy = problem.entropy or entropy_weight is not None
    ce = new(N, dtype=stat_dtype)
    lse = new(N, dtype=stat_dtype)
    H = new(N, dtype=stat_dtype) if entropy else None
    idx = None
    if problem.argmax:
        idx = (x.new_empty(N, dtype=torch.int64) if computed
               else x.new_full((N,), -1, dtype=torch.int64))
    d_input = new((N, D)) if need_input else None
    d_weight = x.new_zeros((V, D), dtype=accum_dtype) if need_weight else None
    d_bias = x.new_zeros((V,), dtype=accum_dtype) if need_bias else None
    compute_grad = need_input or need_weight or need_bias
    rows_fn = rows_fn or core.row_fns(problem.use_triton)[0]
    row_kwargs = problem.row_kwargs()
    row_kwargs["entropy"] = entropy
    w_t = linear_weight.t()  # (D, V) view: no copy

    def chunk_of(t, idx_c, start, stop):
        if t is None or not compute_grad:
            return None
        return t[start:stop] if idx_c is None else t.index_select(0, idx_c)

    n_compute = N if rows is None else rows.numel()
    # One (chunk_rows, V) buffer for every chunk's logits (and then their gradient): a fresh
    # product per chunk would be allocated while the previous chunk is still referenced.
    chunk_buf = x.new_empty((min(chunk_rows, n_compute), V))
    for start in range(0, n_compute, chunk_rows):
        stop = min(start + chunk_rows, n_compute)
        if rows is None:  # contiguous rows: views, and results written straight into place
            sel = None
            x_c = x[start:stop]
            t_c = target[start:stop]
        else:  # only the rows that count: gathered (R x D, small beside the R x V logits)
            sel = rows[start:stop]
            x_c = x.index_select(0, sel)
            t_c = target.index_select(0, sel)

        out = chunk_buf[:stop - start]
        logits = (torch.addmm(linear_bias, x_c, w_t, out=out) if linear_bias is not None
                  else torch.mm(x_c, w_t, out=out))  # (R, V)
        logits3 = logits.unsqueeze(-1)  # (R, V, 1): the row kernel's (N, V, D) view
        results = rows_fn(
            logits3, t_c.unsqueeze(-1) if problem.prob_target else t_c, weight, scale,
            logits3 if compute_grad else None,  # the gradient overwrites the logits
            chunk_of(row_weight, sel, start, stop), chunk_of(entropy_weight, sel, start, stop),
            **row_kwargs)
        for out, c_out in zip((ce, lse, H, idx), results):
            if out is None:
                continue
            if sel is None:
                out[start:stop] = c_out
            else:
                out.index_copy_(0, sel, c_out.to(out.dtype))
        if not compute_grad:
            continue

        d_logits = logits  # (R, V): now dloss/dlogits, times `scale` and the row factors
        if need_input and sel is None:
            torch.mm(d_logits, linear_weight, out=d_input[start:stop])
        elif need_input:
            d_input.index_copy_(0, sel, torch.mm(d_logits, linear_weight))
        if need_weight:
            _add_product_(d_weight, d_logits.t(), x_c)
        if need_bias:
            d_bias.add_(d_logits.sum(0, dtype=accum_dtype))
    return ce, lse, H, idx, d_input, d_weight, d_bias
