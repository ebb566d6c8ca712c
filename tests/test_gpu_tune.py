"""bench/gpu_tune.py --dry-run: the tuning command's plumbing on a CPU (tiny shapes, the
Triton interpreter). The search tries every fixed path and each of the sweep's factors, the
finals put the peers beside our candidates, the choice is saved for the later steps (the
distill step times it and "two_pass" beside the naive losses), and a budget too small for a
measurement skips it by name instead of running over."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import gpu_tune  # noqa: E402


def _run_here(out, monkeypatch, *args):
    """gpu_tune.main(--dry-run) in this process, under the interpreter conftest set (main
    would start itself again without it); returns the names of our kernels it launched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the dry run runs the kernels through Triton's interpreter")
    from triton_xent.kernels import distill, xent

    launched = set()

    class Spy:
        def __init__(self, module, name):
            self.name, self.kernel = name, getattr(module, name)

        def __getitem__(self, grid):
            launched.add(self.name)
            return self.kernel[grid]

    for module in (xent, distill):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Spy(module, name))
    assert gpu_tune.main([str(out), "--dry-run", *args]) == 0
    return launched


def _run(out, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_tune.py"),
                          str(out), "--dry-run", *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def test_dry_run_searches_every_candidate_and_times_the_finals_beside_the_peers(
        tmp_path, monkeypatch, capsys):
    launched = _run_here(tmp_path, monkeypatch, "--steps", "lm", "distill")
    stdout = capsys.readouterr().out
    # every long-row path ran (V = 300 is a long row under --dry-run), whole rows never
    assert {"_sweep_kernel", "_two_pass_stats_kernel", "_split_kernel",
            "_distill_sweep_kernel", "_distill_slice_stats_kernel"} <= launched, launched
    assert "_rows_kernel" not in launched and "_distill_rows_kernel" not in launched
    rows = common.read_csv(tmp_path / "gpu_tune.csv")
    providers = {r["provider"] for r in rows}
    assert {f"triton_xent[{name}]" for name in gpu_tune.PATHS} <= providers
    sweeps = {r["provider"] for r in rows
              if r["provider"].startswith("triton_xent[sweep_") and not r["op"].startswith(
                  "distill")}
    # every value of every factor was timed: the defaults, then each factor's other values
    _, factors = gpu_tune.dry_plan(gpu_tune.PATHS, gpu_tune.FACTORS)
    distinct = [{json.dumps(c, sort_keys=True) for c in choices} for _, choices in factors]
    assert len(sweeps) == 1 + sum(len(d) - 1 for d in distinct)
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["LONG_ROWS"] == "sweep" and set(gpu_tune.SHORT) <= set(tuned)
    finals = {(r["provider"], r["mode"]) for r in rows if r["mode"] == "fwd"}
    assert ("torch", "fwd") in finals
    assert (f"triton_xent[{gpu_tune.sweep_name(tuned)}]", "fwd") in finals
    assert "forward + backward: ms (fraction of the" in stdout and "skipped 0" in stdout
    # The distill step (JSD only under --dry-run, gpu_tune.DRY_DIVERGENCES): ours on
    # "two_pass", on the sweep the lm step chose and on that sweep with the other register
    # choice, beside the naive loss, both modes, each loss checked first.
    other = gpu_tune.sweep_name(gpu_tune.other_registers(tuned))
    for provider in ("triton_xent[two_pass]", f"triton_xent[{gpu_tune.sweep_name(tuned)}]",
                     f"triton_xent[{other}]", "torch"):
        for mode in ("fwd_bwd", "fwd"):
            assert any(r["op"] == "distill_jsd" and r["provider"] == provider
                       and r["mode"] == mode for r in rows), (provider, mode)
    assert "copy on the floor's bytes" in stdout and "distill_jsd copy" in stdout
    assert "wrong result" not in stdout


def test_a_budget_too_small_skips_measurements_by_name(tmp_path):
    stdout = _run(tmp_path, "--budget-s", "0", "--steps", "fp32")
    assert "skip torch fwd_bwd float32" in stdout
    assert "skipped 0" not in stdout


def test_sweep_names_spell_every_knob():
    values = dict(LONG_ROWS="sweep", SWEEP_BLOCK_V=8192, SWEEP_NUM_WARPS=16,
                  SWEEP_PREFETCH=True, SWEEP_STAGES=1, SWEEP_PROGRAMS_PER_SM=None,
                  SWEEP_L2_FRACTION=0.5, SWEEP_MAX_REGISTERS=64, SWEEP_REVERSE=False,
                  SWEEP_EVICT=True)
    assert gpu_tune.sweep_name(values) == "sweep_b8192_w16_pf1_st1_pps-_l20.5_r64_rev0_ev1"
