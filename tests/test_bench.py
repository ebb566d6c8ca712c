"""Smoke test of the benchmark scripts: `bench/bench_xent.py --quick` writes a well-formed CSV
and `bench/plot.py` turns it into PNGs. Nothing here looks at how fast anything is."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import common  # noqa: E402

HEADER = ["device", "torch", "triton", "date", "op", "provider", "mode", "dtype",
          "N", "V", "D", "ms", "gbps", "copy_gbps", "peak_mem_mb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        assert r["N"] == 64 and r["V"] in (1000, 4099) and r["D"] == 0
        assert r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["torch"] == torch.__version__
        assert r["date"].endswith("+00:00")
        if torch.cuda.is_available():
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
        else:
            assert r["peak_mem_mb"] is None
        seen.add((r["provider"], r["mode"], r["dtype"], r["V"]))
    for provider in ("torch", "triton_xent"):
        for mode in ("fwd", "fwd_bwd"):
            for dtype in ("bfloat16", "float32"):
                for V in (1000, 4099):
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
    if torch.cuda.is_available():
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


def test_slug_and_default_out():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    import bench_xent

    cpu = bench_xent.default_out(torch.device("cpu"), quick=True)
    assert os.path.basename(cpu).endswith("-cpu-quick.csv")
    assert os.path.dirname(cpu) == os.path.join(BENCH, "results")
