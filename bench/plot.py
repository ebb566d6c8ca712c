"""Figures of benchmark CSVs (the columns of csvio.py). For each CSV <stem>.csv:

- cross_entropy rows (bench_xent.py): one panel per dtype x N x mode, V on a log axis with a
  tick labelled at every measured V, one line per provider:
  <stem>_bandwidth.png  floor bytes / median time, with the run's copy bandwidth drawn as
                        the ceiling (right axis: the fraction of it);
  <stem>_speedup.png    eager "torch" ms / provider ms;
  <stem>_memory.png     peak memory above the inputs;
  these three compare triton_xent with its peers. The config sweep's variants
  (triton_xent[<variant>]) are left out of them, except the two long-row paths
  (LONG_ROWS_PATHS: a user picks one with TRITON_XENT_LONG_ROWS), and drawn apart in
  <stem>_variants.png   median ms of each variant beside plain triton_xent, one panel per
                        case x mode, each bar labelled with its ratio to plain triton_xent;
- linear_cross_entropy rows (bench_linear.py), a few (N, D, V) cases bound by their GEMMs:
  <stem>_time.png (ms, bars grouped by case, labelled with ms and their ratio to the
  case's matmul_floor row) and <stem>_memory.png (peak memory), one panel per dtype x mode;
- distillation rows (bench_distill.py, ops distill_* and linear_distill_*): the same two
  figures, the time bars labelled in ms; from logits (D = 0) a dashed floor marks the time
  that one read of both logits and one write of the gradient take at the copy bandwidth.

Every provider keeps one colour and marker in every figure (STYLES, below); a provider not
in STYLES gets a pair that no other line of its figure has. Legends sit outside the panels.

    python bench/plot.py                       # every CSV in bench/results/
    python bench/plot.py a.csv b.csv --out-dir /tmp/plots
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import statistics
import sys

import matplotlib
import matplotlib.colors

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

# csvio, not common: common imports torch, which took seconds of the GPU check's plot step.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import csvio  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LINEAR_OP = "linear_cross_entropy"
FLOOR = "matmul_floor"  # bench_linear.py's time floor: the op's three GEMMs alone
BASE = "triton_xent"  # what the sweep's variants are compared with
LONG_ROWS_PATHS = ("triton_xent[exchange]", "triton_xent[two_pass]")  # drawn with the peers
DPI = 110

# provider -> (colour, marker), fixed so that a provider looks the same in every figure.
# Ours in warm colours (triton_xent red), the peers in cool ones; the sweep's variants
# (bench_xent.py's SWEEP) in families: slice widths blue, persistent purple, spin and wait
# green and gray, whole-row tiles brown.
STYLES = {
    "triton_xent": ("#d62728", "o"),
    "triton_xent[exchange]": ("#7f0000", "*"),
    "triton_xent[two_pass]": ("#ff7f0e", "s"),
    "triton_xent_inplace": ("#bcbd22", "P"),
    "triton_xent_entropy": ("#ff9896", "d"),
    "torch": ("#1f77b4", "^"),
    "torch_compile": ("#17becf", "v"),
    "torch_chunked": ("#9467bd", "<"),
    "liger": ("#2ca02c", "D"),
    "quack": ("#e377c2", "X"),
    "cce": ("#8c564b", "p"),
    "cce_exact": ("#c49c94", "h"),
    FLOOR: ("#b0b0b0", "_"),
    "triton_xent[slice8192_w16]": ("#08519c", "^"),
    "triton_xent[slice4096_w8]": ("#3182bd", "v"),
    "triton_xent[slice2048_w4]": ("#6baed6", "<"),
    "triton_xent[slice2048_w8]": ("#9ecae1", ">"),
    "triton_xent[persistent2]": ("#756bb1", "p"),
    "triton_xent[persistent4]": ("#bcbddc", "h"),
    "triton_xent[spin1k]": ("#31a354", "D"),
    "triton_xent[spin0]": ("#a1d99b", "d"),
    "triton_xent[wait5us]": ("#636363", "X"),
    "triton_xent[wait100us]": ("#bdbdbd", "P"),
    "triton_xent[tile1024]": ("#8c6d31", "H"),
    "triton_xent[tile4096]": ("#e7ba52", "8"),
}
# For providers not in STYLES: colours and markers not taken by the known ones' first
# choices, combined so that a figure runs out of pairs only past 200 unknown providers.
EXTRA_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3",
                "#8ca252", "#bd9e39", "#ad494a", "#a55194", "#6b6ecf", "#b5cf6b",
                "#e7969c", "#de9ed6", "#000000", "#17becf", "#9467bd", "#2ca02c",
                "#e377c2", "#7f7f7f")
EXTRA_MARKERS = ("o", "s", "^", "v", "D", "p", "h", "*", "X", "P")
SPEEDUP_TICKS = [m * 10.0 ** e for e in range(-3, 4) for m in (1, 1.5, 2, 3, 5, 7)]  # 0.001x ..
MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward + backward"}


# --- styles -----------------------------------------------------------------------------------

def ordered(names) -> list[str]:
    """The providers in STYLES order, the unknown ones after them, sorted."""
    names = set(names)
    return [p for p in STYLES if p in names] + sorted(names - set(STYLES))


def styles(names) -> dict[str, tuple[str, str]]:
    """{provider: (colour, marker)} for the providers of one figure: STYLES' pair where it has
    one, otherwise the first pair whose colour and marker no other provider here uses (or,
    once those run out, the first pair not used), so no two providers share a pair."""
    names = ordered(names)
    out = {p: STYLES[p] for p in names if p in STYLES}
    pairs = list(itertools.product(EXTRA_COLORS, EXTRA_MARKERS))
    for p in names:
        if p in out:
            continue
        taken = set(out.values())
        colours, markers = {c for c, _ in taken}, {m for _, m in taken}
        free = [(c, m) for c, m in pairs if c not in colours and m not in markers]
        free = free or [pair for pair in pairs if pair not in taken] or _more_pairs(taken)
        out[p] = free[0]
    return out


def _more_pairs(taken):
    """Past EXTRA_COLORS x EXTRA_MARKERS: hues 0.618 of a turn apart, until one is free."""
    hsv = matplotlib.colormaps["hsv"]
    for k in itertools.count():
        pair = (matplotlib.colors.to_hex(hsv(k * 0.618034 % 1.0)),
                EXTRA_MARKERS[k % len(EXTRA_MARKERS)])
        if pair not in taken:
            return [pair]


def is_variant(provider: str) -> bool:
    """A config-sweep provider drawn apart from the peers (not a long-row path)."""
    return provider.startswith(f"{BASE}[") and provider not in LONG_ROWS_PATHS


def _variant_name(provider: str) -> str:
    """The bar label of the sweep's figure: 'slice2048_w4', 'two_pass (LONG_ROWS)',
    'triton_xent (default)'."""
    if provider == BASE:
        return f"{BASE} (default)"
    name = provider[len(BASE) + 1:-1]
    return f"{name} (LONG_ROWS)" if provider in LONG_ROWS_PATHS else name


def _ms(ms: float) -> str:
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


# --- common pieces ----------------------------------------------------------------------------

def _latest(rows, key):
    """{key(row): row}; where a CSV holds a key twice (appended runs), the last row."""
    return {key(r): r for r in rows}


def _suptitle(fig, rows, title):
    first = rows[0]
    dates = sorted({r["date"][:10] for r in rows})
    fig.suptitle(f"{title}\n{first['device']}, torch {first['torch']}, triton "
                 f"{first['triton'] or '-'}, {' to '.join(dict.fromkeys((dates[0], dates[-1])))}",
                 fontsize=10)


def _legend(fig, axes, names):
    """One legend for the figure, right of the panels: the providers in `names` order, then
    any other labelled line (the copy bandwidth)."""
    handles = {}
    for ax in axes:
        for artist in (*ax.get_lines(), *ax.containers):
            label = artist.get_label()
            if label and not label.startswith("_"):
                handles.setdefault(label, artist)
    keys = [n for n in names if n in handles] + [k for k in handles if k not in names]
    fig.legend([handles[k] for k in keys], keys, loc="outside right upper", fontsize=8,
               frameon=False)


# --- cross_entropy: lines against V -----------------------------------------------------------

def _line_figure(rows, title, ylabel, draw):
    """A grid of panels (rows: dtype x N, columns: mode), each drawn by
    draw(ax, panel rows, styles); x: V on a log axis, a labelled tick at each measured V."""
    keys = sorted({(r["dtype"], r["N"], r["mode"]) for r in rows})
    lines = sorted({k[:2] for k in keys})
    cols = sorted({k[2] for k in keys})
    style = styles(r["provider"] for r in rows)
    fig, axes = plt.subplots(len(lines), len(cols), squeeze=False, layout="constrained",
                             figsize=(4.6 * len(cols) + 2.4, 3.0 * len(lines) + 0.8))
    used = []
    for ax in axes.flat:
        ax.set_visible(False)
    for dtype, N, mode in keys:
        ax = axes[lines.index((dtype, N)), cols.index(mode)]
        ax.set_visible(True)
        used.append(ax)
        panel = [r for r in rows if (r["dtype"], r["N"], r["mode"]) == (dtype, N, mode)]
        draw(ax, panel, style)
        vocab = sorted({r["V"] for r in panel})
        ax.set_xscale("log")
        ax.set_xlim(vocab[0] / 1.6, vocab[-1] * 1.6)
        ax.set_xticks(vocab, [str(v) for v in vocab], fontsize=8,
                      rotation=30 if len(vocab) > 4 else 0)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{dtype}, {MODE_NAMES.get(mode, mode)}, N={N}", fontsize=9)
        ax.set_xlabel("V (classes)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, alpha=0.3)
    _legend(fig, used, list(style))
    _suptitle(fig, rows, title)
    return fig


def _provider_lines(ax, rows, style, value):
    """One line per provider through (V, value(row, latest)) where value is not None."""
    latest = _latest(rows, lambda r: (r["provider"], r["V"]))
    for p in ordered(r["provider"] for r in rows):
        pts = sorted((v, value(r, latest)) for (q, v), r in latest.items() if q == p)
        pts = [(v, y) for v, y in pts if y is not None]
        if pts:
            colour, marker = style[p]
            # hollow markers: two providers on the same point both show
            ax.plot(*zip(*pts), color=colour, marker=marker, label=p, markersize=7,
                    markerfacecolor="none", markeredgewidth=1.5, linewidth=1.5,
                    linestyle=":" if p == "torch" else "-")


def _draw_bandwidth(ax, rows, style):
    _provider_lines(ax, rows, style, lambda r, _: r["gbps"])
    copies = [r["copy_gbps"] for r in rows if r["copy_gbps"] is not None]
    top = max(r["gbps"] for r in rows)
    if copies:
        ceiling = statistics.median(copies)
        ax.axhline(ceiling, color="black", linestyle="--", linewidth=1.2,
                   label="copy bandwidth (ceiling)")
        ax.text(0.99, ceiling, f"copy {ceiling:.0f} GB/s", transform=ax.get_yaxis_transform(),
                ha="right", va="bottom", fontsize=8)
        right = ax.secondary_yaxis("right", functions=(lambda y: y / ceiling,
                                                       lambda f: f * ceiling))
        right.set_ylabel("fraction of copy", fontsize=8)
        right.tick_params(labelsize=7)
        top = max(top, ceiling)
    ax.set_ylim(0, top * 1.12)


def _draw_speedup(ax, rows, style):
    _provider_lines(ax, rows, style, lambda r, latest: (
        latest[("torch", r["V"])]["ms"] / r["ms"] if ("torch", r["V"]) in latest else None))
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_yscale("log")  # ratios: 0.5x and 2x equally far from 1
    ax.yaxis.set_major_locator(FixedLocator(SPEEDUP_TICKS))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))


def _draw_memory(ax, rows, style):
    _provider_lines(ax, rows, style, lambda r, _: r["peak_mem_mb"])
    ax.set_yscale("symlog", linthresh=1.0)  # from a few KB (0 to 1 MB linear) to tens of GB
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)


# --- cross_entropy: the config sweep ----------------------------------------------------------

def _variants_figure(rows):
    """Horizontal bars of median ms: per case (dtype, N, V) and mode, plain triton_xent (the
    last such row of the case) and each variant measured there, labelled with ms and the
    ratio to plain triton_xent (a dashed line at its time). The bars are named on the y axis,
    so this figure has no legend."""
    variant_rows = [r for r in rows if is_variant(r["provider"])]
    cases = sorted({(r["dtype"], r["N"], r["V"]) for r in variant_rows})
    modes = sorted({r["mode"] for r in variant_rows})
    latest = _latest(rows, lambda r: (r["provider"], r["dtype"], r["mode"], r["N"], r["V"]))
    panel_names = {}
    for (p, dtype, mode, N, V) in latest:
        if (dtype, N, V) in cases and (p == BASE or p.startswith(f"{BASE}[")):
            panel_names.setdefault((dtype, N, V, mode), []).append(p)
    heights = [max(len(panel_names.get((*c, m), ())) for m in modes) for c in cases]
    names = ordered(p for ps in panel_names.values() for p in ps)
    style = styles(names)
    fig, axes = plt.subplots(len(cases), len(modes), squeeze=False, layout="constrained",
                             figsize=(5.6 * len(modes) + 1.2, 0.32 * sum(heights)
                                      + 1.0 * len(cases) + 1.0),
                             gridspec_kw={"height_ratios": [h + 2 for h in heights]})
    for i, (dtype, N, V) in enumerate(cases):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            panel = ordered(panel_names.get((dtype, N, V, mode), ()))
            if not panel:
                ax.set_visible(False)
                continue
            base = latest.get((BASE, dtype, mode, N, V))
            for k, p in enumerate(panel):
                ms = latest[(p, dtype, mode, N, V)]["ms"]
                bar = ax.barh(k, ms, color=style[p][0], edgecolor="black", linewidth=0.5,
                              label=p, hatch="//" if p == BASE else None)
                text = _ms(ms) + (f", {ms / base['ms']:.2f}x" if base else "")
                ax.bar_label(bar, [text], fontsize=7, padding=2)
            if base:
                ax.axvline(base["ms"], color="gray", linestyle="--", linewidth=0.8, zorder=0)
            ax.set_yticks(range(len(panel)), [_variant_name(p) for p in panel], fontsize=8)
            ax.invert_yaxis()  # plain triton_xent on top
            ax.set_xlim(0, ax.get_xlim()[1] * 1.35)  # room for the labels
            ax.set_title(f"{dtype}, {MODE_NAMES.get(mode, mode)}, N={N}, V={V}", fontsize=9)
            ax.set_xlabel("median ms (label: ratio to plain triton_xent)", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(True, axis="x", alpha=0.3)
    _suptitle(fig, rows, "Config sweep: triton_xent with config.py values changed "
              "(bench_xent.py --sweep), lower is better")
    return fig


def _xent_figures(rows, source):
    peers = [r for r in rows if not is_variant(r["provider"])]
    if peers:
        yield "bandwidth", _line_figure(
            peers, "Achieved bandwidth (floor bytes / median time), higher is better",
            "GB/s", _draw_bandwidth)
        if any(r["provider"] == "torch" for r in peers):
            yield "speedup", _line_figure(
                peers, 'Speed-up over eager "torch" (torch ms / provider ms)',
                "speed-up (x)", _draw_speedup)
        else:
            print(f"{source}: no eager 'torch' rows, skipping the speed-up plot")
        mem_rows = _memory_rows(source, peers)
        if mem_rows:
            yield "memory", _line_figure(mem_rows, "Peak memory above the inputs",
                                         "MB (1e6 bytes)", _draw_memory)
    if len(peers) < len(rows):
        yield "variants", _variants_figure(rows)


def _memory_rows(source, rows):
    """The rows with a peak memory; none (with a message) for a CPU run."""
    mem_rows = [r for r in rows if r["peak_mem_mb"] is not None]
    if not mem_rows:
        print(f"{source}: peak_mem_mb is empty (CPU run), skipping the memory plot")
    return mem_rows


# --- linear and distillation: bars per case ---------------------------------------------------

def _case(r):
    return (r["op"], r["N"], r["D"], r["V"])


def _case_label(case, ops) -> str:
    op, N, D, V = case
    head = f"{op}\n" if len(ops) > 1 else ""
    return f"{head}N={N}" + (f" D={D}" if D else "") + f"\nV={V}"


def _draw_bars(ax, rows, style, column, label, floor_ms=None):
    """Grouped bars of `column`: one group per case, one bar per provider (the matmul_floor
    hatched), each labelled with label(row, case rows); floor_ms(case rows), where given and
    not None, a dashed line across the case's group."""
    latest = _latest([r for r in rows if r[column] is not None],
                     lambda r: (r["provider"], _case(r)))
    cases = sorted({case for _, case in latest})
    ops = {case[0] for case in cases}
    names = [p for p in ordered(p for p, _ in latest)]
    width = 0.8 / max(len(names), 1)
    for i, p in enumerate(names):
        ks = [k for k, case in enumerate(cases) if (p, case) in latest]
        bars = ax.bar([k - 0.4 + (i + 0.5) * width for k in ks],
                      [latest[(p, cases[k])][column] for k in ks], width, label=p,
                      color=style[p][0], hatch="//" if p == FLOOR else None,
                      edgecolor="black", linewidth=0.5)
        texts = [label(latest[(p, cases[k])], [r for r in rows if _case(r) == cases[k]])
                 for k in ks]
        ax.bar_label(bars, texts, fontsize=7, rotation=90, padding=2)
    for k, case in enumerate(cases):
        floor = floor_ms([r for r in rows if _case(r) == case]) if floor_ms else None
        if floor is not None:
            ax.hlines(floor, k - 0.45, k + 0.45, color="black", linestyle="--", linewidth=1.2,
                      label="copy-bandwidth floor" if k == 0 else None)
            ax.text(k + 0.45, floor, f"floor {_ms(floor)}", ha="right", va="bottom",
                    fontsize=7, bbox=dict(facecolor="white", edgecolor="none", pad=1))
    ax.set_xticks(range(len(cases)), [_case_label(c, ops) for c in cases], fontsize=8)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the labels


def _bar_figure(rows, title, ylabel, column, label, floor_ms=None, note=""):
    """One panel per (dtype, mode), stacked, bars drawn by _draw_bars; `note` (what the bar
    labels say) ends each panel's title."""
    keys = sorted({(r["dtype"], r["mode"]) for r in rows})
    cases = {_case(r) for r in rows}
    providers = {r["provider"] for r in rows}
    style = styles(providers)
    fig, axes = plt.subplots(len(keys), 1, squeeze=False, layout="constrained",
                             figsize=(max(6.5, (0.35 * len(providers) + 0.6) * len(cases))
                                      + 2.2, 3.6 * len(keys) + 0.8))
    for ax, (dtype, mode) in zip(axes.flat, keys):
        _draw_bars(ax, [r for r in rows if (r["dtype"], r["mode"]) == (dtype, mode)], style,
                   column, label, floor_ms)
        ax.set_title(f"{dtype}, {MODE_NAMES.get(mode, mode)}{note}", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    _legend(fig, axes.flat, list(style))
    _suptitle(fig, rows, title)
    return fig


def _mb_label(r, _):
    return f"{r['peak_mem_mb']:.0f}"


def _linear_figures(rows, source):
    def ratio(r, case_rows):
        floor = [f for f in case_rows if f["provider"] == FLOOR]
        return _ms(r["ms"]) + (f", {r['ms'] / floor[-1]['ms']:.2f}x" if floor else "")

    yield "time", _bar_figure(rows, "Linear + cross-entropy: median time, lower is better",
                              "ms", "ms", ratio,
                              note=f"; label: ms, ratio to {FLOOR} (the three GEMMs alone)")
    mem_rows = _memory_rows(source, rows)
    if mem_rows:
        yield "memory", _bar_figure(mem_rows, "Linear + cross-entropy: peak memory above the "
                                    "inputs (x, W, targets)", "MB (1e6 bytes)", "peak_mem_mb",
                                    _mb_label, note="; label: MB")


def _copy_floor_ms(case_rows):
    """From logits (D = 0): the bytes behind gbps (both logits read, the gradient written) at
    the copy bandwidth; through the heads the op is bound by its GEMMs: None."""
    r = case_rows[-1]
    if r["D"] or not r["copy_gbps"]:
        return None
    return r["ms"] * r["gbps"] / r["copy_gbps"]


def _distill_figures(rows, source):
    yield "time", _bar_figure(rows, "Distillation: median time, lower is better", "ms", "ms",
                              lambda r, _: _ms(r["ms"]), _copy_floor_ms,
                              note="; floor: the logits read and the gradient written at the "
                                   "copy bandwidth")
    mem_rows = _memory_rows(source, rows)
    if mem_rows:
        yield "memory", _bar_figure(mem_rows, "Distillation: peak memory above the inputs",
                                    "MB (1e6 bytes)", "peak_mem_mb", _mb_label,
                                    note="; label: MB")


# --- files ------------------------------------------------------------------------------------

def _family(op: str) -> str:
    if op == LINEAR_OP:
        return "linear"
    if op.startswith(("distill_", "linear_distill_")):
        return "distill"
    return op  # cross_entropy, or an op this script does not know: drawn as cross_entropy


def figures(rows, source: str = "CSV"):
    """(name, figure) pairs for the rows of one CSV, made one at a time; a CSV that holds
    several families of ops (cross_entropy, linear, distill) prefixes each name with its
    family. Plots without data are skipped with a message naming `source`."""
    families = sorted({_family(r["op"]) for r in rows})
    draw = {"linear": _linear_figures, "distill": _distill_figures}
    for family in families:
        family_rows = [r for r in rows if _family(r["op"]) == family]
        prefix = f"{family}_" if len(families) > 1 else ""
        for name, fig in draw.get(family, _xent_figures)(family_rows, source):
            yield prefix + name, fig


def plot_csv(path: str, out_dir: str | None = None) -> list[str]:
    """Writes the PNGs of one CSV; returns their paths."""
    rows = csvio.read_csv(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    if not rows:
        print(f"{path}: no rows, nothing to plot")
        return []
    written = []
    for name, fig in figures(rows, path):
        png = os.path.join(out_dir, f"{stem}_{name}.png")
        fig.savefig(png, dpi=DPI)
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
