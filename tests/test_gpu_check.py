"""bench/gpu_check.py --dry-run: the GPU check's plumbing on a CPU (tiny shapes, the Triton
interpreter): every step runs or says why not (the exchange-free path's among them), and the
output folder holds the log, the three CSVs (cross-entropy with the two long-row paths', the
sweep's and the small vocabularies' rows; linear; distillation) and the cross-entropy plots,
at most 10 files; and the plan on the GPU machine: every step's expected time inside the
budget with the slack kept, its limit above it, the cases the issues ask for."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import gpu_check  # noqa: E402


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
    for step in gpu_check.plan(sys.executable, str(out), "x", {}, dry=True):
        assert step.name in summary, summary
    assert "=== plan" in log and "expected" in summary
    csvs = [f for f in files if f.endswith(".csv")]
    xent = common.read_csv(out / next(f for f in csvs if not f.endswith(("-linear.csv",
                                                                         "-distill.csv"))))
    providers = {r["provider"] for r in xent}
    assert {"triton_xent", "torch", "triton_xent[two_pass]", "triton_xent[sweep]",
            "triton_xent[persistent4]", "triton_xent[tile1024]"} <= providers
    assert {r["V"] for r in xent} == {100, 10} and {r["dtype"] for r in xent} == {
        "bfloat16", "float32"}
    assert sum(f.endswith(".png") for f in files) >= 3
    distill = common.read_csv(out / next(f for f in csvs if f.endswith("-distill.csv")))
    assert {(r["op"], r["provider"]) for r in distill} >= {
        ("distill_jsd", "triton_xent"), ("linear_distill_jsd", "torch")}


def _gpu_plan():
    return {s.name: s for s in gpu_check.plan(sys.executable, "OUT", "DEVICE", {}, dry=False)}


def test_the_gpu_plan_keeps_the_slack_and_every_limit_above_its_expected_time():
    steps = _gpu_plan()
    expected = gpu_check.START_S + sum(s.cost.expected_s for s in steps.values())
    assert expected <= (1 - gpu_check.SLACK) * gpu_check.TOTAL_S, gpu_check.plan_table(
        list(steps.values()))
    for step in steps.values():
        e = step.cost.expected_s
        assert step.limit_s >= max(1.5 * e, e + 10), (step.name, e, step.limit_s)
        assert step.cost.basis(), step.name


def test_the_gpu_plan_runs_the_linear_and_distillation_cases():
    steps = _gpu_plan()
    linear = steps["bench_linear"].cmd
    i = linear.index("--shapes") + 1
    assert linear[i:i + 2] == ["8192,2304,256000", "8192,4096,128256"]
    distill = steps["bench_distill"].cmd
    assert "--in-process" in distill and "--providers" not in distill  # ours, torch, Liger
    i = distill.index("--shapes") + 1
    assert distill[i:i + 2] == ["8192,0,128256", "8192,4096,128256"]
    i = distill.index("--divergences") + 1
    assert distill[i:i + 2] == ["forward_kl", "jsd"]
    assert distill[distill.index("--dtypes") + 1] == "bf16"
    # counted from the commands: 2 shapes x (2 forward KL + 3 JSD) and 2 x 7 providers
    assert steps["bench_distill"].cost.measurements == 10
    assert steps["bench_linear"].cost.measurements == 7  # the second shape's
