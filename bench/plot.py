"""Plots of benchmark CSVs (bench/common.py's columns). For each CSV <stem>.csv:

- cross_entropy rows (bench_xent.py): <stem>_bandwidth.png (gbps against V, the copy
  bandwidth as a dashed line), <stem>_speedup.png (eager "torch" ms / provider ms against V)
  and <stem>_memory.png (peak_mem_mb against V), one panel per dtype x mode x N, one line
  per provider;
- linear_cross_entropy rows (bench_linear.py), a few (N, D, V) cases bound by their GEMMs:
  <stem>_time.png (ms per provider, bars grouped by case, each labelled with its ratio to
  the matmul_floor row of the case) and <stem>_memory.png (peak_mem_mb per provider), one
  panel per dtype x mode.

    python bench/plot.py                       # every CSV in bench/results/
    python bench/plot.py a.csv b.csv --out-dir /tmp/plots
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROVIDER_ORDER = ("triton_xent", "torch", "torch_compile", "torch_chunked", "liger", "cce",
                  "cce_exact", "quack", "triton_xent_inplace", "triton_xent_entropy")
LINEAR_OP = "linear_cross_entropy"
FLOOR = "matmul_floor"  # bench_linear.py's time floor: the op's three GEMMs alone
# One colour per provider in every panel and figure (a provider skipped in one panel must
# not shift the others' colours there); the floor light gray.
COLORS = {p: f"C{i}" for i, p in enumerate(PROVIDER_ORDER)} | {FLOOR: "lightgray"}
COLORS["triton_xent[two_pass]"] = "darkred"  # the exchange-free long rows (config.LONG_ROWS)


def _providers(rows):
    names = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in names] + sorted(names - set(PROVIDER_ORDER))


def _panels(rows):
    """[((dtype, mode, N), rows of that panel)], in a stable order."""
    keys = sorted({(r["dtype"], r["mode"], r["N"]) for r in rows})
    return [(k, [r for r in rows if (r["dtype"], r["mode"], r["N"]) == k]) for k in keys]


def _latest(rows):
    """{(provider, V): row}; where a CSV holds a key twice (appended runs), the last row."""
    return {(r["provider"], r["V"]): r for r in rows}


def _figure(rows, title, ylabel, draw):
    """A grid of panels (rows: dtype x mode, columns: N), each drawn by draw(ax, rows)."""
    panels = _panels(rows)
    lines = sorted({(k[0], k[1]) for k, _ in panels})
    cols = sorted({k[2] for k, _ in panels})
    fig, axes = plt.subplots(len(lines), len(cols), squeeze=False, sharex=True,
                             figsize=(max(7.0, 5.0 * len(cols)), 3.4 * len(lines) + 0.6),
                             layout="constrained")
    for ax in axes.flat:
        ax.set_visible(False)
    for (dtype, mode, N), panel_rows in panels:
        ax = axes[lines.index((dtype, mode)), cols.index(N)]
        ax.set_visible(True)
        draw(ax, panel_rows)
        vocab = sorted({r["V"] for r in panel_rows})
        ax.set_xscale("log")
        ax.set_xticks(vocab, [str(v) for v in vocab], rotation=30, fontsize=7)
        ax.minorticks_off()
        ax.set_title(f"{dtype} {mode} N={N}", fontsize=9)
        ax.set_xlabel("V (classes)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    device = rows[0]["device"]
    fig.suptitle(f"{title}\n{device}, torch {rows[0]['torch']}, triton {rows[0]['triton']}",
                 fontsize=10)
    return fig


def _draw_metric(column):
    def draw(ax, rows):
        latest = _latest(rows)
        for p in _providers(rows):
            pts = sorted((v, r[column]) for (q, v), r in latest.items()
                         if q == p and r[column] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p, color=COLORS.get(p))
    return draw


def _draw_bandwidth(ax, rows):
    _draw_metric("gbps")(ax, rows)
    copies = [r["copy_gbps"] for r in rows if r["copy_gbps"] is not None]
    if copies:
        ax.axhline(statistics.median(copies), color="gray", linestyle="--", label="copy")
    ax.set_ylim(bottom=0)


def _draw_speedup(ax, rows):
    latest = _latest(rows)
    for p in _providers(rows):
        pts = sorted((v, latest[("torch", v)]["ms"] / r["ms"]) for (q, v), r in latest.items()
                     if q == p and ("torch", v) in latest)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=p, color=COLORS.get(p),
                    linestyle=":" if p == "torch" else "-")
    ax.set_yscale("log")  # ratios: 0.5x and 2x equally far from 1


def _case_label(case) -> str:
    N, D, V = case
    return f"N={N}\nD={D}\nV={V}"


def _draw_linear_bars(column, floor_ratio):
    """Grouped bars of `column`: one group per (N, D, V) case, one bar per provider (the
    matmul_floor hatched); with floor_ratio, each bar is labelled with value / the floor's."""
    def draw(ax, rows):
        latest = {(r["provider"], (r["N"], r["D"], r["V"])): r for r in rows
                  if r[column] is not None}
        cases = sorted({case for _, case in latest})
        names = [p for p in _providers(rows) if any((p, c) in latest for c in cases)]
        width = 0.8 / max(len(names), 1)
        for i, p in enumerate(names):
            ks = [k for k, case in enumerate(cases) if (p, case) in latest]
            ys = [latest[(p, cases[k])][column] for k in ks]
            bars = ax.bar([k - 0.4 + (i + 0.5) * width for k in ks], ys, width, label=p,
                          hatch="//" if p == FLOOR else None, color=COLORS.get(p),
                          edgecolor="black", linewidth=0.5)
            if floor_ratio:
                floors = [latest.get((FLOOR, cases[k])) for k in ks]
                labels = [f"{y / floor[column]:.2f}x" if floor else ""
                          for y, floor in zip(ys, floors)]
                ax.bar_label(bars, labels, fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(cases)), [_case_label(c) for c in cases], fontsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the labels
    return draw


def _linear_figure(rows, title, ylabel, draw):
    """One panel per (dtype, mode), stacked."""
    keys = sorted({(r["dtype"], r["mode"]) for r in rows})
    cases = {(r["N"], r["D"], r["V"]) for r in rows}
    fig, axes = plt.subplots(len(keys), 1, squeeze=False, layout="constrained",
                             figsize=(max(6.0, 2.2 * len(cases) + 3.0), 3.6 * len(keys) + 0.6))
    for ax, (dtype, mode) in zip(axes.flat, keys):
        draw(ax, [r for r in rows if (r["dtype"], r["mode"]) == (dtype, mode)])
        ax.set_title(f"{dtype} {mode}", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{title}\n{rows[0]['device']}, torch {rows[0]['torch']}, "
                 f"triton {rows[0]['triton']}", fontsize=10)
    return fig


def _memory_rows(path, rows):
    """The rows with a peak memory; none (with a message) for a CPU run."""
    mem_rows = [r for r in rows if r["peak_mem_mb"] is not None]
    if not mem_rows:
        print(f"{path}: peak_mem_mb is empty (CPU run), skipping the memory plot")
    return mem_rows


def _xent_plots(path, rows):
    plots = [("bandwidth", "Achieved bandwidth (floor bytes / median time)", "GB/s",
              _figure, _draw_bandwidth, rows)]
    if any(r["provider"] == "torch" for r in rows):
        plots.append(("speedup", 'Speed-up over eager "torch" (torch ms / provider ms)',
                      "speed-up (x)", _figure, _draw_speedup, rows))
    else:
        print(f"{path}: no eager 'torch' rows, skipping the speed-up plot")
    mem_rows = _memory_rows(path, rows)
    if mem_rows:
        plots.append(("memory", "Peak memory above the inputs", "MB (1e6 bytes)", _figure,
                      _draw_metric("peak_mem_mb"), mem_rows))
    return plots


def _linear_plots(path, rows):
    plots = [("time", "Linear + cross-entropy: median time (label: ratio to the "
              f"{FLOOR} row, the three GEMMs alone)", "ms", _linear_figure,
              _draw_linear_bars("ms", floor_ratio=True), rows)]
    mem_rows = _memory_rows(path, rows)
    if mem_rows:
        plots.append(("memory", "Linear + cross-entropy: peak memory above the inputs "
                      "(x, W, targets)", "MB (1e6 bytes)", _linear_figure,
                      _draw_linear_bars("peak_mem_mb", floor_ratio=False), mem_rows))
    return plots


def plot_csv(path: str, out_dir: str | None = None) -> list[str]:
    """Writes the PNGs of one CSV; returns their paths. Plots without data are skipped with
    a message (peak memory on CPU, speed-up without eager torch rows). A CSV that holds
    both ops prefixes each plot's name with its op."""
    rows = common.read_csv(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    if not rows:
        print(f"{path}: no rows, nothing to plot")
        return []
    ops = sorted({r["op"] for r in rows})
    written = []
    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        plots = (_linear_plots if op == LINEAR_OP else _xent_plots)(path, op_rows)
        prefix = f"{op}_" if len(ops) > 1 else ""
        for name, title, ylabel, figure, draw, plot_rows in plots:
            fig = figure(plot_rows, title, ylabel, draw)
            png = os.path.join(out_dir, f"{stem}_{prefix}{name}.png")
            fig.savefig(png, dpi=110)
            plt.close(fig)
            written.append(png)
            print(f"wrote {png}")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="*", help="CSV files; default: bench/results/*.csv")
    p.add_argument("--out-dir", help="where the PNGs go; default: next to each CSV")
    args = p.parse_args(argv)
    paths = args.csv or sorted(glob.glob(os.path.join(RESULTS, "*.csv")))
    if not paths:
        print(f"no CSV given and none in {RESULTS}")
        return 1
    for path in paths:
        plot_csv(path, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
