"""Smoke test of the benchmark scripts: `bench/bench_xent.py --quick` and
`bench/bench_linear.py --quick` write well-formed CSVs (the linear one with
op = linear_cross_entropy, D filled in, matmul_floor rows), `bench/plot.py` turns them
into PNGs, and `bench/cpu_report.py --quick` (the CPU cases, peak RSS filled in) writes its
CSVs, PNGs and tables. Nothing here looks at how fast anything is."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import common  # noqa: E402

HEADER = ["device", "torch", "triton", "date", "op", "provider", "mode", "dtype",
          "N", "V", "D", "ms", "gbps", "copy_gbps", "peak_mem_mb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU_PEAK = common.cpu_peak_supported()  # Linux: peak RSS can be reset, so it is measured


def _run(args):
    env = dict(os.environ, MPLBACKEND="Agg")
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"  # so the Triton kernels run (interpreted) on CPU too
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    """The CSV of one quick run (run once for the module)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "quick.csv"
    stdout = _run([os.path.join(BENCH, "bench_xent.py"), "--quick", "--out", str(out)])
    assert "wrote 16 rows" in stdout  # 2 providers x 2 modes x 2 dtypes x 2 V, none skipped
    if not torch.cuda.is_available():
        assert "triton_xent runs Triton kernels through the interpreter" in stdout
    return out


def _assert_png(path):
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), f"{path} is not a PNG"


def test_quick_csv_is_well_formed(quick_csv):
    with open(quick_csv, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == HEADER
    assert list(common.COLUMNS) == HEADER
    rows = common.read_csv(quick_csv)  # parses N/V/D as int and the measurements as float
    assert len(rows) == len(lines) - 1
    seen = set()
    for r in rows:
        assert r["op"] == "cross_entropy"
        assert r["mode"] in ("fwd", "fwd_bwd")
        assert r["dtype"] in ("bfloat16", "float32")
        assert r["N"] == 16 and r["V"] in (1000, 3001) and r["D"] == 0
        assert r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["torch"] == torch.__version__
        assert r["date"].endswith("+00:00")
        if torch.cuda.is_available() or CPU_PEAK:
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
        else:
            assert r["peak_mem_mb"] is None
        seen.add((r["provider"], r["mode"], r["dtype"], r["V"]))
    for provider in ("torch", "triton_xent"):
        for mode in ("fwd", "fwd_bwd"):
            for dtype in ("bfloat16", "float32"):
                for V in (1000, 3001):
                    assert (provider, mode, dtype, V) in seen
    # gbps is the floor's bytes over the median time: N*V*elem (fwd), twice that (fwd_bwd).
    for r in rows:
        elem = 2 if r["dtype"] == "bfloat16" else 4
        nbytes = r["N"] * r["V"] * elem * (1 if r["mode"] == "fwd" else 2)
        assert r["gbps"] == pytest.approx(nbytes / (r["ms"] * 1e-3) / 1e9, rel=1e-3)


def test_plot_writes_pngs(quick_csv, tmp_path):
    stdout = _run([os.path.join(BENCH, "plot.py"), str(quick_csv), "--out-dir", str(tmp_path)])
    _assert_png(tmp_path / "quick_bandwidth.png")
    _assert_png(tmp_path / "quick_speedup.png")
    if torch.cuda.is_available() or CPU_PEAK:
        _assert_png(tmp_path / "quick_memory.png")
    else:
        assert "skipping the memory plot" in stdout
        assert not (tmp_path / "quick_memory.png").exists()


def test_plot_memory_panel_and_append(quick_csv, tmp_path):
    """The memory plot's code path, on a copy of the quick CSV whose rows get a placeholder
    peak_mem_mb and device "synthetic" (not a measurement), appended with CsvWriter."""
    path = tmp_path / "synthetic.csv"
    with common.CsvWriter(path) as out:
        pass
    with common.CsvWriter(path, append=True) as out:
        for r in common.read_csv(quick_csv):
            out.write(**dict(r, device="synthetic", peak_mem_mb=1.0))
    with pytest.raises(ValueError):
        with common.CsvWriter(tmp_path / "bad.csv") as out:
            out.write(device="x")  # rows must carry exactly the columns
    import plot

    written = plot.plot_csv(str(path), str(tmp_path))
    assert [os.path.basename(p) for p in written] == [
        "synthetic_bandwidth.png", "synthetic_speedup.png", "synthetic_memory.png"]
    for p in written:
        _assert_png(tmp_path / os.path.basename(p))


# --- plot.py: what the figures show, on rows made up here (not measurements) ----------------

def _row(provider, V, *, mode="fwd_bwd", dtype="bfloat16", N=64, ms=1.0, copy=100.0,
         op="cross_entropy", D=0):
    return dict(device="synthetic", torch="0", triton="0", date="2026-01-01T00:00:00+00:00",
                op=op, provider=provider, mode=mode, dtype=dtype, N=N, V=V, D=D, ms=ms,
                gbps=10.0 / ms, copy_gbps=copy, peak_mem_mb=1.0)


# The providers bench_xent.py can write (the peers, the long-row paths and some of the
# sweep's variants) and two that plot.py does not know; V sets differ between the panels.
PEERS = ("triton_xent", "triton_xent_entropy", "triton_xent_inplace", "torch", "torch_compile",
         "liger", "quack", "triton_xent[two_pass]", "triton_xent[exchange]", "mystery",
         "mystery_2")
VARIANTS = ("triton_xent[slice2048_w4]", "triton_xent[spin0]", "triton_xent[new_knob]")
PANEL_V = {("bfloat16", 64): (32000, 128256, 256000), ("float32", 32): (10, 1000)}


@pytest.fixture(scope="module")
def sweep_figures():
    """{name: figure} of plot.figures() on rows of every provider above, in both modes."""
    import matplotlib.pyplot as plt
    import plot

    rows = [_row(p, V, mode=m, dtype=d, N=n, ms=1.0 + i / 7, copy=100.0 + n)
            for (d, n), vocab in PANEL_V.items() for V in vocab for m in ("fwd", "fwd_bwd")
            for i, p in enumerate(PEERS + VARIANTS)]
    figs = dict(plot.figures(rows, "synthetic"))
    yield figs
    for fig in figs.values():
        plt.close(fig)


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]


def _line_styles(fig):
    """{label: {(colour, marker)}} of every labelled line of the figure's panels."""
    import matplotlib.colors as mcolors

    seen = {}
    for ax in _panels(fig):
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                seen.setdefault(line.get_label(), set()).add(
                    (mcolors.to_hex(line.get_color()), line.get_marker()))
    return seen


def test_plot_figures_of_a_sweep(sweep_figures):
    assert list(sweep_figures) == ["bandwidth", "speedup", "memory", "variants"]


@pytest.mark.parametrize("name", ["bandwidth", "speedup", "memory"])
def test_plot_one_style_per_provider(sweep_figures, name):
    """Each provider: one (colour, marker) in every panel, STYLES' pair where it has one, no
    pair twice in the figure; the providers plot.py does not know get distinct ones too."""
    import plot

    seen = _line_styles(sweep_figures[name])
    assert set(PEERS) <= set(seen)
    for p in PEERS:
        assert len(seen[p]) == 1, (p, seen[p])
    pairs = {p: next(iter(seen[p])) for p in PEERS}
    assert len(set(pairs.values())) == len(PEERS), pairs
    for p, pair in pairs.items():
        if p in plot.STYLES:
            assert pair == plot.STYLES[p], p
    assert len({c for c, _ in pairs.values()}) == len(PEERS)  # the colours alone differ too


def test_plot_styles_never_repeat():
    import plot

    names = [f"unknown_{i}" for i in range(250)] + list(plot.STYLES)
    style = plot.styles(names)
    assert len(style) == len(names) and len(set(style.values())) == len(names)
    assert plot.styles(["torch", "unknown_0"])["torch"] == plot.STYLES["torch"]


@pytest.mark.parametrize("name", ["bandwidth", "speedup", "memory"])
def test_plot_ticks_at_each_measured_v(sweep_figures, name):
    panels = _panels(sweep_figures[name])
    assert len(panels) == 4  # (dtype, N) x mode
    for ax in panels:
        (vocab,) = [v for (d, n), v in PANEL_V.items() if ax.get_title().startswith(d)
                    and ax.get_title().endswith(f"N={n}")]
        assert list(ax.get_xticks()) == list(vocab), ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(v) for v in vocab]
        assert not len(ax.xaxis.get_minorticklocs())


def test_plot_variants_on_their_own_figure(sweep_figures):
    """The peer figures show the peers and both long-row paths, none of the other variants;
    the sweep's figure shows each variant and plain triton_xent, no peer."""
    for name in ("bandwidth", "speedup", "memory"):
        providers = set(_line_styles(sweep_figures[name]))
        assert set(PEERS) <= providers and not providers & set(VARIANTS), name
    bars = {c.get_label() for ax in _panels(sweep_figures["variants"]) for c in ax.containers}
    assert set(VARIANTS) | {"triton_xent"} <= bars
    assert not bars & {"torch", "torch_compile", "liger", "quack", "mystery"}


def test_plot_bandwidth_has_the_copy_ceiling(sweep_figures):
    fig = sweep_figures["bandwidth"]
    for ax in _panels(fig):
        n = 64 if ax.get_title().endswith("N=64") else 32
        (ceiling,) = [line for line in ax.get_lines() if line.get_label().startswith("copy")]
        assert list(ceiling.get_ydata()) == [100.0 + n] * 2
        assert ax.get_ylim()[1] > 100.0 + n
    assert any(t.get_text().startswith("copy") for t in fig.legends[0].get_texts())


def test_plot_reads_without_torch():
    """plot.py reads CSVs through csvio.py: importing it loads neither torch nor triton (a
    CUDA build of torch took seconds of the GPU check's plot step)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import plot; "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, BENCH], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, MPLBACKEND="Agg"))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plot_the_committed_h200_csvs():
    """The committed H200 CSVs draw the figures the README links: the sweep apart, the
    distillation's copy-bandwidth floor from logits."""
    import matplotlib.pyplot as plt
    import plot

    results = os.path.join(BENCH, "results")
    expected = {"nvidia-h200.csv": ["bandwidth", "speedup", "memory", "variants"],
                "nvidia-h200-linear.csv": ["time", "memory"],
                "nvidia-h200-distill.csv": ["time", "memory"]}
    for csv_name, names in expected.items():
        figs = dict(plot.figures(common.read_csv(os.path.join(results, csv_name)), csv_name))
        try:
            assert list(figs) == names, csv_name
            if csv_name.endswith("-distill.csv"):
                labels = [c.get_label() for c in _panels(figs["time"])[0].collections]
                assert len(labels) == 2 and labels[0] == "copy-bandwidth floor", labels
        finally:
            for fig in figs.values():
                plt.close(fig)


def test_slug_and_default_out():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    import bench_xent

    cpu = bench_xent.default_out(torch.device("cpu"), quick=True)
    assert os.path.basename(cpu).endswith("-cpu-quick.csv")
    assert os.path.dirname(cpu) == os.path.join(BENCH, "results")


# --- bench_linear.py ---------------------------------------------------------------------

LINEAR_QUICK_CASES = {(16, 37, 1000), (16, 37, 3001)}  # (N, D, V)
HAS_TORCH_CHUNKED = (hasattr(F, "linear_cross_entropy")
                     and hasattr(torch.nn, "LinearCrossEntropyOptions"))
LINEAR_PROVIDERS = ("triton_xent", "torch", "matmul_floor") + (
    ("torch_chunked",) if HAS_TORCH_CHUNKED else ())


@pytest.fixture(scope="module")
def linear_quick_run(tmp_path_factory):
    """(CSV path, stdout) of one quick run (run once for the module)."""
    out = tmp_path_factory.mktemp("bench_linear") / "quick-linear.csv"
    stdout = _run([os.path.join(BENCH, "bench_linear.py"), "--quick", "--out", str(out)])
    # providers x 2 modes x 2 shapes, one dtype (bfloat16), none skipped
    assert f"wrote {len(LINEAR_PROVIDERS) * 2 * 2} rows" in stdout, stdout
    if not torch.cuda.is_available():
        assert "triton_xent runs Triton kernels through the interpreter" in stdout
    if not HAS_TORCH_CHUNKED:
        assert "skip provider torch_chunked" in stdout
    return out, stdout


def test_linear_quick_csv_is_well_formed(linear_quick_run):
    path, stdout = linear_quick_run
    assert "skip " not in stdout.replace("skip provider torch_chunked", "")
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == HEADER
    rows = common.read_csv(path)  # parses N/V/D as int and the measurements as float
    assert len(rows) == len(lines) - 1
    seen = set()
    for r in rows:
        assert r["op"] == "linear_cross_entropy"
        assert r["provider"] in LINEAR_PROVIDERS
        assert r["mode"] in ("fwd", "fwd_bwd")
        assert r["dtype"] == "bfloat16"
        assert (r["N"], r["D"], r["V"]) in LINEAR_QUICK_CASES and r["D"] > 0
        assert r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["torch"] == torch.__version__
        assert r["date"].endswith("+00:00")
        if (torch.cuda.is_available() or CPU_PEAK) and r["provider"] != "matmul_floor":
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
        else:  # no peak to reset on this CPU; the floor is a time floor only
            assert r["peak_mem_mb"] is None
        seen.add((r["provider"], r["mode"], r["N"], r["D"], r["V"]))
        # gbps: x and W read (N + V) * D * elem bytes once, d_x and d_W written once (fwd_bwd)
        nbytes = (r["N"] + r["V"]) * r["D"] * 2 * (1 if r["mode"] == "fwd" else 2)
        assert r["gbps"] == pytest.approx(nbytes / (r["ms"] * 1e-3) / 1e9, rel=1e-3)
    assert seen == {(p, m, *case) for p in LINEAR_PROVIDERS for m in ("fwd", "fwd_bwd")
                    for case in LINEAR_QUICK_CASES}


def test_linear_plot_writes_time_bars(linear_quick_run, tmp_path):
    path, _ = linear_quick_run
    stdout = _run([os.path.join(BENCH, "plot.py"), str(path), "--out-dir", str(tmp_path)])
    _assert_png(tmp_path / "quick-linear_time.png")
    assert not (tmp_path / "quick-linear_bandwidth.png").exists()  # the GEMMs bound this op
    if torch.cuda.is_available() or CPU_PEAK:
        _assert_png(tmp_path / "quick-linear_memory.png")
    else:
        assert "skipping the memory plot" in stdout
        assert not (tmp_path / "quick-linear_memory.png").exists()


def test_linear_memory_plot(linear_quick_run, tmp_path):
    """The linear memory plot's code path, on a copy of the quick CSV whose provider rows
    get a placeholder peak_mem_mb and device "synthetic" (not a measurement)."""
    import plot

    path = tmp_path / "synthetic-linear.csv"
    with common.CsvWriter(path) as out:
        for r in common.read_csv(linear_quick_run[0]):
            peak = None if r["provider"] == "matmul_floor" else 1.0
            out.write(**dict(r, device="synthetic", peak_mem_mb=peak))
    written = plot.plot_csv(str(path), str(tmp_path))
    assert [os.path.basename(p) for p in written] == [
        "synthetic-linear_time.png", "synthetic-linear_memory.png"]
    for p in written:
        _assert_png(tmp_path / os.path.basename(p))


def test_linear_default_out_and_shapes():
    import bench_linear

    cpu = bench_linear.default_out(torch.device("cpu"), quick=True)
    assert os.path.basename(cpu).endswith("-cpu-quick-linear.csv")
    assert os.path.dirname(cpu) == os.path.join(BENCH, "results")
    args = bench_linear.parse_args([])
    assert args.shapes == ((8192, 2304, 256000), (8192, 4096, 128256))
    assert args.modes == ("fwd_bwd",) and args.dtypes == [torch.bfloat16]
    assert "matmul_floor" in args.providers
    args = bench_linear.parse_args(["--shapes", "8,16,32", "4x5x6"])
    assert args.shapes == [(8, 16, 32), (4, 5, 6)]


def test_linear_tune_dry_run(tmp_path):
    """gpu_tune.py's linear step on tiny shapes: the floor, the defaults and every variant
    of the chunk driver, each checked against the float32 reference before it is timed (a
    variant that computed a wrong gradient would be skipped, and fail this test), then the
    ranking."""
    import bench_linear

    out = tmp_path / "tune.csv"
    stdout = _run([os.path.join(BENCH, "bench_linear.py"), "--tune", "--dry-run", "--out",
                   str(out)])
    assert "skip" not in stdout, stdout
    names = {"matmul_floor", "triton_xent"} | {f"triton_xent[{v}]"
                                               for v in bench_linear.VARIANTS}
    rows = common.read_csv(out)
    assert {r["provider"] for r in rows} == names
    assert {(r["N"], r["D"], r["V"], r["mode"], r["dtype"]) for r in rows} == {
        (*case, "fwd_bwd", "bfloat16") for case in bench_linear.TUNE_DRY_CASES}
    assert "ranking bfloat16" in stdout and "fastest: " in stdout


def test_linear_check_rejects_a_wrong_provider(capsys):
    """The float32 check that precedes the timing skips a provider whose loss or gradients
    are off (here: the loss scaled by 1.05, and a gradient added to W's first rows), or that
    warned that it fell back to another path (torch_chunked's "options ignored")."""
    import warnings

    import bench_linear as bl

    device = torch.device("cpu")
    N, D, V = 32, 24, 300
    x, w, t = bl.make_inputs(N, D, V, torch.float32, device, requires_grad=False)
    ref = bl.reference(x, w, t)
    good = bl.Provider("good", lambda x, w, t: F.cross_entropy(x @ w.T, t))
    scaled = bl.Provider("scaled", lambda x, w, t: F.cross_entropy(x @ w.T, t) * 1.05)
    d_w_off = bl.Provider("d_w_off", lambda x, w, t: F.cross_entropy(x @ w.T, t)
                          + (w[:4] - w[:4].detach()).sum() * 1e-2)

    def fell_back(x, w, t):
        warnings.warn(f"linear_cross_entropy: {bl.TORCH_FALLBACK_WARNING}; ...")
        return F.cross_entropy(x @ w.T, t)

    fallback = bl.Provider("fallback", fell_back, reject_warning=bl.TORCH_FALLBACK_WARNING)
    assert bl.measure(good, "fwd_bwd", N, D, V, torch.float32, device, ref, 0.01) is not None
    for bad, why in ((scaled, "wrong result, loss"), (d_w_off, "wrong result, d_W differs"),
                     (fallback, "wrong result, it fell back")):
        capsys.readouterr()
        assert bl.measure(bad, "fwd_bwd", N, D, V, torch.float32, device, ref, 0.01) is None
        out = capsys.readouterr().out
        assert f"skip {bad.name} fwd_bwd" in out and why in out, out


# --- the CPU report (bench/cpu_report.py) -----------------------------------------------


def test_cpu_peak_mb_sees_an_allocation():
    """The CPU peak is the RSS high-water mark above the RSS before the call: 64 MB written
    inside the call show, what was allocated before it does not."""
    if not CPU_PEAK:
        pytest.skip("peak RSS cannot be reset here (no /proc/self/clear_refs)")
    before = torch.ones(16 * 2**20)  # 64 MiB, alive before the call
    peak = common.cpu_peak_mb(lambda: torch.ones(16 * 2**20).sum())
    assert 60 < peak < 100, peak
    assert common.cpu_peak_mb(lambda: before.sum()) < 30
    del before


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """(output folder, stdout) of one `cpu_report.py --quick` run."""
    out = tmp_path_factory.mktemp("cpu_report")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "cpu_report.py"), "--quick",
                           "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"cpu_report failed:\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout


def test_cpu_report_quick(cpu_report):
    """The CPU quick run: both CSVs with the CPU cases and providers (the fallback, not the
    interpreter), a peak for every provider, the PNGs, and the two tables with one line per
    case and the goals line. The figures themselves are not looked at."""
    import bench_linear
    import bench_xent

    MODES = ("fwd", "fwd_bwd")
    out, stdout = cpu_report
    stem = common.slug(common.cpu_model()) + "-cpu-quick"
    assert "triton_xent runs its PyTorch fallback on CPU tensors" in stdout
    assert "skip " not in stdout.replace("skip provider torch_chunked", "")
    xent = common.read_csv(out / f"{stem}.csv")
    expected = {(p, m, d, n, v) for d, n, v in bench_xent.CPU_QUICK_CASES
                for p, modes in (("triton_xent", MODES), ("torch", MODES),
                                 (bench_xent.INPLACE, ("fwd_bwd",)))
                for m in modes}
    assert {(r["provider"], r["mode"], r["dtype"], r["N"], r["V"]) for r in xent} == expected
    linear = common.read_csv(out / f"{stem}-linear.csv")
    providers = {"triton_xent", "torch", "matmul_floor"} | (
        {"torch_chunked"} if HAS_TORCH_CHUNKED else set())
    assert {(r["provider"], r["mode"], r["dtype"], r["N"], r["D"], r["V"]) for r in linear} == {
        (p, "fwd_bwd", "float32", *case) for p in providers
        for case in bench_linear.CPU_QUICK_CASES}
    for r in xent + linear:
        assert r["device"] == common.cpu_model() and r["ms"] > 0
        if CPU_PEAK and r["provider"] != "matmul_floor":
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
    for name in ("bandwidth", "speedup", "memory"):
        _assert_png(out / f"{stem}_{name}.png")
    _assert_png(out / f"{stem}-linear_time.png")
    assert f"Measured on {common.cpu_model()}" in stdout
    for d, n, v in bench_xent.CPU_QUICK_CASES:
        assert sum(line.startswith(f"| {d} N={n} V={v} (") for line in stdout.splitlines()) == 1
    for n, d, v in bench_linear.CPU_QUICK_CASES:
        assert sum(line.startswith(f"| float32 N={n} D={d} V={v} |")
                   for line in stdout.splitlines()) == 1
    assert "\ngoals: " in stdout


# --- bench_distill.py ----------------------------------------------------------------------

@pytest.mark.parametrize("op, D", [("distill_jsd", 0), ("linear_distill_reverse_kl", 8)])
def test_distill_measurements_agree_and_report(op, D, capsys):
    """One measurement of ours and of the naive loss in this process (the script runs each
    in a fresh one), their losses equal, and the report's table row; Liger is skipped on a
    CPU with its reason."""
    import bench_distill

    cpu = torch.device("cpu")
    results = {}
    for provider in ("triton_xent", "torch"):
        r = bench_distill.measure_one(provider, op, 6, D, 50, torch.float32, "fwd_bwd", cpu,
                                      cpu_budget_s=0.01)
        assert r["ms"] > 0 and (r["peak_mem_mb"] is not None) == CPU_PEAK
        results[op, "float32", 6, D, 50, "fwd_bwd", provider] = r
    mine, naive = (results[op, "float32", 6, D, 50, "fwd_bwd", p]["loss"]
                   for p in ("triton_xent", "torch"))
    assert abs(mine - naive) <= 1e-5 * abs(naive)
    bench_distill.report(results, goals=False)
    assert f"| {op} | float32 | 6 | {D} | 50 | fwd_bwd |" in capsys.readouterr().out
    with pytest.raises(common.Unavailable, match="CUDA GPU"):
        bench_distill.make_provider("liger", op, "jsd", cpu)
