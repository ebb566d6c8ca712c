"""Plots of benchmark CSVs (bench/common.py's columns): for each CSV <stem>.csv, PNGs
<stem>_bandwidth.png (gbps against V, the copy bandwidth as a dashed line),
<stem>_speedup.png (eager "torch" ms / provider ms against V) and <stem>_memory.png
(peak_mem_mb against V), one panel per dtype x mode x N, one line per provider.

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
PROVIDER_ORDER = ("triton_xent", "torch", "torch_compile", "liger", "quack")


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
                ax.plot(*zip(*pts), marker="o", label=p)
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
            ax.plot(*zip(*pts), marker="o", label=p,
                    linestyle=":" if p == "torch" else "-")
    ax.set_yscale("log")  # ratios: 0.5x and 2x equally far from 1


def plot_csv(path: str, out_dir: str | None = None) -> list[str]:
    """Writes the PNGs of one CSV; returns their paths. Plots without data are skipped with
    a message (peak memory on CPU, speed-up without eager torch rows)."""
    rows = common.read_csv(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    if not rows:
        print(f"{path}: no rows, nothing to plot")
        return []
    plots = [("bandwidth", "Achieved bandwidth (floor bytes / median time)", "GB/s",
              _draw_bandwidth, rows)]
    if any(r["provider"] == "torch" for r in rows):
        plots.append(("speedup", 'Speed-up over eager "torch" (torch ms / provider ms)',
                      "speed-up (x)", _draw_speedup, rows))
    else:
        print(f"{path}: no eager 'torch' rows, skipping the speed-up plot")
    mem_rows = [r for r in rows if r["peak_mem_mb"] is not None]
    if mem_rows:
        plots.append(("memory", "Peak memory above the inputs", "MB (1e6 bytes)",
                      _draw_metric("peak_mem_mb"), mem_rows))
    else:
        print(f"{path}: peak_mem_mb is empty (CPU run), skipping the memory plot")
    written = []
    for name, title, ylabel, draw, plot_rows in plots:
        fig = _figure(plot_rows, title, ylabel, draw)
        png = os.path.join(out_dir, f"{stem}_{name}.png")
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
