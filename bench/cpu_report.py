"""The whole CPU measurement in one command: bench_xent.py --cpu and bench_linear.py --cpu
(each in a fresh process, triton_xent on its PyTorch fallback), plot.py on their CSVs, and
the README's CPU tables printed from the CSVs, with the issue's goals checked against them.

    python bench/cpu_report.py            # -> bench/results/<cpu-slug>-cpu.csv, -cpu-linear.csv
    python bench/cpu_report.py --quick    # tiny cases, a smoke test (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
OURS, INPLACE, TORCH = "triton_xent", "triton_xent_inplace", "torch"
CHUNKED, FLOOR = "torch_chunked", "matmul_floor"
# The goals (F.cross_entropy time / ours; ours' peak memory / the other's).
XENT_SPEEDUP_GOALS = {("fwd", OURS): 1.3, ("fwd_bwd", OURS): 1.2, ("fwd_bwd", INPLACE): 1.5}
LINEAR_MEMORY_GOAL = 0.75  # ours / torch_chunked


def _run(script: str, out: str, quick: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU fallback, not the interpreted kernels
    cmd = [sys.executable, os.path.join(BENCH, script), "--cpu", "--out", out]
    cmd += ["--quick"] if quick else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def _index(rows):
    """{(case, mode, provider): row} with case = (dtype, N, D, V); the last row wins."""
    return {((r["dtype"], r["N"], r["D"], r["V"]), r["mode"], r["provider"]): r for r in rows}


def _mem(row) -> str:
    return "-" if row is None or row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"


def xent_table(rows) -> tuple[list[str], list[str]]:
    """(markdown lines, goals not met) of bench_xent --cpu rows."""
    idx = _index(rows)
    cases = list(dict.fromkeys(k[0] for k in idx))
    lines = ["| case (logits MB) | forward | forward+backward | f+b, `inplace_backward` "
             "| peak MB above inputs, fwd: F / ours | f+b: F / ours / inplace |",
             "|---|---|---|---|---|---|"]
    missed = []
    for case in cases:
        dtype, N, _, V = case
        elem = 2 if dtype == "bfloat16" else 4
        cells = []
        for (mode, name), goal in XENT_SPEEDUP_GOALS.items():
            ref, ours = idx.get((case, mode, TORCH)), idx.get((case, mode, name))
            if ref is None or ours is None:
                cells.append("-")
                missed.append(f"{dtype} N={N} V={V} {name} {mode}: not measured")
                continue
            speedup = ref["ms"] / ours["ms"]
            cells.append(f"{speedup:.2f}x ({ref['ms']:.0f} / {ours['ms']:.0f} ms)")
            if speedup < goal:
                missed.append(f"{dtype} N={N} V={V} {name} {mode}: {speedup:.2f}x < {goal}x")
        for mode, names in (("fwd", (OURS,)), ("fwd_bwd", (OURS, INPLACE))):
            ref = idx.get((case, mode, TORCH))
            for name in names:
                ours = idx.get((case, mode, name))
                if (ref is not None and ours is not None and ref["peak_mem_mb"] is not None
                        and ours["peak_mem_mb"] is not None
                        and ours["peak_mem_mb"] > ref["peak_mem_mb"]):
                    missed.append(f"{dtype} N={N} V={V} {name} {mode}: peak "
                                  f"{ours['peak_mem_mb']:.1f} MB > F's "
                                  f"{ref['peak_mem_mb']:.1f} MB")
        fwd = " / ".join(_mem(idx.get((case, "fwd", p))) for p in (TORCH, OURS))
        fb = " / ".join(_mem(idx.get((case, "fwd_bwd", p))) for p in (TORCH, OURS, INPLACE))
        lines.append(f"| {dtype} N={N} V={V} ({N * V * elem / common.MB:.0f}) | "
                     + " | ".join(cells) + f" | {fwd} | {fb} |")
    return lines, missed


def linear_table(rows) -> tuple[list[str], list[str]]:
    """(markdown lines, goals not met) of bench_linear --cpu rows (fwd_bwd)."""
    idx = _index(rows)
    cases = list(dict.fromkeys(k[0] for k in idx))
    lines = ["| case | time s: ours / torch chunked / unfused / 3 GEMMs "
             "| peak MB above inputs: ours / chunked / unfused | ours / chunked: time, memory |",
             "|---|---|---|---|"]
    missed = []
    for case in cases:
        dtype, N, D, V = case
        get = {p: idx.get((case, "fwd_bwd", p)) for p in (OURS, CHUNKED, TORCH, FLOOR)}
        times = " / ".join("-" if r is None else f"{r['ms'] / 1e3:.2f}" for r in get.values())
        mems = " / ".join(_mem(get[p]) for p in (OURS, CHUNKED, TORCH))
        ours, chunked = get[OURS], get[CHUNKED]
        label = f"{dtype} N={N} D={D} V={V}"
        if ours is None or chunked is None:
            ratios = "-"
            missed.append(f"{label}: ours or torch_chunked not measured")
        else:
            t_ratio = ours["ms"] / chunked["ms"]
            if t_ratio > 1.0:
                missed.append(f"{label}: ours {t_ratio:.2f}x torch_chunked's time")
            m_ratio = None
            if ours["peak_mem_mb"] is not None and chunked["peak_mem_mb"]:
                m_ratio = ours["peak_mem_mb"] / chunked["peak_mem_mb"]
                if m_ratio > LINEAR_MEMORY_GOAL:
                    missed.append(f"{label}: ours {m_ratio:.2f}x torch_chunked's memory")
            ratios = f"{t_ratio:.2f}x, " + ("-" if m_ratio is None else f"{m_ratio:.2f}x")
        lines.append(f"| {label} | {times} | {mems} | {ratios} |")
    return lines, missed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny cases: a smoke test")
    p.add_argument("--out-dir", help=f"where the CSVs and PNGs go; default {RESULTS}")
    args = p.parse_args(argv)
    out_dir = args.out_dir or RESULTS
    stem = common.slug(common.cpu_model()) + "-cpu" + ("-quick" if args.quick else "")
    xent_csv = os.path.join(out_dir, stem + ".csv")
    linear_csv = os.path.join(out_dir, stem + "-linear.csv")
    _run("bench_xent.py", xent_csv, args.quick)
    _run("bench_linear.py", linear_csv, args.quick)
    subprocess.run([sys.executable, os.path.join(BENCH, "plot.py"), xent_csv, linear_csv],
                   check=True)

    xent_rows, linear_rows = common.read_csv(xent_csv), common.read_csv(linear_csv)
    info = xent_rows[0] if xent_rows else {"device": common.cpu_model(), "torch": "?"}
    print(f"\nMeasured on {info['device']}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {info['torch']}, "
          f"{info.get('date', '')}: median time of one call; peak RSS above the inputs.\n")
    x_lines, x_missed = xent_table(xent_rows)
    l_lines, l_missed = linear_table(linear_rows)
    print("cross_entropy, speed-up over F.cross_entropy (its ms / ours):\n")
    print("\n".join(x_lines))
    print("\nlinear_cross_entropy, fwd_bwd:\n")
    print("\n".join(l_lines))
    missed = x_missed + l_missed
    print("\ngoals: " + ("all met" if not missed else "NOT met:\n  " + "\n  ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
