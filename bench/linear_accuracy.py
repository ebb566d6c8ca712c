"""Accuracy of the head's gradient d_W = d_logits.T @ x under the chunk driver's choices of
where it accumulates, against float64, on a CPU: the numbers behind config.py's
LINEAR_SCHEDULE and accum_dtype notes (bench/README.md, "Linear cross-entropy: notes").

The GPU's rounding points are reproduced on the CPU, not run on a GPU: cuBLAS multiplies bf16
operands exactly and sums in float32, then rounds once to its output dtype (for beta = 1,
once after adding C). So each design is emulated with float32 GEMMs on the bf16 values:

    logits    bf16(x @ W.T)                          the logits GEMM's bf16 output
    d_logits  bf16((softmax(logits) - onehot) / N)   what the loss kernel writes (mean)
    fp32      acc32 += g_c.T @ x_c per chunk of R rows, bf16(acc32) at the end ("rows" with
              the float32 accumulator: torch.addmm(out_dtype=float32) on CUDA)
    bf16      acc16 = bf16(acc16 + g_c.T @ x_c) per chunk (accum_dtype=torch.bfloat16:
              cuBLAS's beta = 1 into a bf16 C, rounded once per chunk; Liger's and torch's
              chunked op's default)
    fp32_rounded  acc32 += bf16(g_c.T @ x_c) (the CPU path of "rows": a bf16 product per
              chunk, summed in float32)
    vocab     bf16(g.T @ x) over all N rows in one GEMM ("vocab": no accumulation across
              chunks; equal to fp32 up to the order of the sum)

Errors are against float64 of the same math on the same bf16 inputs (exact softmax, no
rounding of the logits or d_logits): |error|_max / |ref|_max and ||error||_F / ||ref||_F,
and the same against float64 of the bf16 d_logits (the accumulation's own error).

    python bench/linear_accuracy.py                       # N=8192, D=256, V=32768
    python bench/linear_accuracy.py --shape 8192,256,4096 --rows 128 512 1024
"""

from __future__ import annotations

import argparse
import time

import torch

DESIGNS = ("fp32", "bf16", "fp32_rounded", "vocab")


def make_inputs(N: int, D: int, V: int, seed: int = 0):
    """bench_linear.py's inputs: x ~ N(0, 1), W ~ N(0, 1/D) in bf16, uniform targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g)
    return x, w, t


def _d_logits(x_c, w, t_c, N: int, dtype: torch.dtype, rounded: bool) -> torch.Tensor:
    """(R, V) gradient of the mean loss: from the bf16 logits, written in bf16 (rounded), or
    exact in `dtype` (not rounded)."""
    logits = x_c.to(dtype) @ w.to(dtype).T
    if rounded:
        logits = logits.to(torch.bfloat16).to(dtype)
    g = torch.softmax(logits, dim=1)
    g[torch.arange(g.shape[0]), t_c] -= 1.0
    g /= N
    return g.to(torch.bfloat16) if rounded else g


def measure(N: int, D: int, V: int, rows: list[int]) -> list[dict]:
    """One dict per (design, rows per chunk): the errors described in the module docstring."""
    x, w, t = make_inputs(N, D, V)
    x32, x64 = x.float(), x.double()
    exact = torch.zeros(V, D, dtype=torch.float64)  # exact math on the bf16 inputs
    same_g = torch.zeros(V, D, dtype=torch.float64)  # float64 sum of the bf16 d_logits
    g_all = []  # the bf16 d_logits of every row, for "vocab" (one GEMM over all rows)
    step = 1024
    for s in range(0, N, step):
        exact += _d_logits(x[s:s + step], w, t[s:s + step], N, torch.float64, False).T \
            @ x64[s:s + step]
        g = _d_logits(x[s:s + step], w, t[s:s + step], N, torch.float32, True)
        same_g += g.double().T @ x64[s:s + step]
        g_all.append(g)
    g_all = torch.cat(g_all)
    results = []
    for R in rows:
        acc32 = torch.zeros(V, D)
        acc16 = torch.zeros(V, D, dtype=torch.bfloat16)
        acc32r = torch.zeros(V, D)
        for s in range(0, N, R):
            product = g_all[s:s + R].float().T @ x32[s:s + R]  # exact products, fp32 sum
            acc32 += product
            acc16 = (acc16.float() + product).to(torch.bfloat16)
            acc32r += product.to(torch.bfloat16).float()
        got = {"fp32": acc32.to(torch.bfloat16), "bf16": acc16,
               "fp32_rounded": acc32r.to(torch.bfloat16)}
        if R == rows[0]:
            got["vocab"] = (g_all.float().T @ x32).to(torch.bfloat16)
        for design, value in got.items():
            row = dict(design=design, rows=R if design != "vocab" else N,
                       chunks=-(-N // R) if design != "vocab" else 1)
            for name, ref in (("exact", exact), ("same_g", same_g)):
                err = value.double() - ref
                row[f"max_{name}"] = float(err.abs().max() / ref.abs().max())
                row[f"fro_{name}"] = float(err.norm() / ref.norm())
            results.append(row)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192,256,32768", help="N,D,V")
    p.add_argument("--rows", nargs="+", type=int, default=[128, 512, 1024],
                   help="rows per chunk of the row schedule")
    args = p.parse_args(argv)
    N, D, V = (int(v) for v in args.shape.split(","))
    start = time.perf_counter()
    results = measure(N, D, V, args.rows)
    print(f"N={N} D={D} V={V}, bf16 inputs, torch {torch.__version__}, CPU emulation of "
          f"cuBLAS's rounding points ({time.perf_counter() - start:.0f} s)\n")
    print("| design | rows per chunk | chunks | max err / max ref | frobenius rel. err | "
          "max, accumulation only | frobenius, accumulation only |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['design']} | {r['rows']} | {r['chunks']} | {r['max_exact']:.3e} | "
              f"{r['fro_exact']:.3e} | {r['max_same_g']:.3e} | {r['fro_same_g']:.3e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
