"""bench/gpu_check.py --dry-run: the GPU check's plumbing on a CPU (tiny shapes, the Triton
interpreter): every step runs or says why not (the exchange-free path's among them), and the
output folder holds the log, the three CSVs (cross-entropy with the two long-row paths', the
sweep's and the small vocabularies' rows; linear; distillation) and the cross-entropy plots,
at most 10 files."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402


def test_dry_run_writes_the_log_csvs_and_plots(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                          str(out), "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 10 and "gpu_check.log" in files, files
    log = (out / "gpu_check.log").read_text()
    summary = log[log.index("=== summary"):]
    for step in ("install wheels", "GPU parity subset, two_pass", "pytest -m cuda",
                 "GPU parity subset", "memcheck",
                 "racecheck", "bench_xent bf16", "bench_xent config sweep", "float32",
                 "small vocabularies", "bench_linear", "bench_distill", "plot"):
        assert step in summary, summary
    csvs = [f for f in files if f.endswith(".csv")]
    xent = common.read_csv(out / next(f for f in csvs if not f.endswith(("-linear.csv",
                                                                         "-distill.csv"))))
    providers = {r["provider"] for r in xent}
    assert {"triton_xent", "torch", "triton_xent[two_pass]", "triton_xent[spin0]",
            "triton_xent[tile1024]"} <= providers
    assert {r["V"] for r in xent} == {100, 10} and {r["dtype"] for r in xent} == {
        "bfloat16", "float32"}
    assert sum(f.endswith(".png") for f in files) >= 3
    distill = common.read_csv(out / next(f for f in csvs if f.endswith("-distill.csv")))
    assert {(r["op"], r["provider"]) for r in distill} >= {
        ("distill_jsd", "triton_xent"), ("linear_distill_jsd", "torch")}
