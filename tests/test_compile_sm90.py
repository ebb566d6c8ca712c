"""The kernels compile for the H100 (sm_90) without a GPU, and the tuned blocks do not spill.

The interpreter that runs the other tests on CPU never calls Triton's compiler, which
rejects things the interpreter accepts; bench/sm90_compile.py sends every kernel variant
through the real pipeline to a cubin (in a subprocess, since this test session has
TRITON_INTERPRET=1 set) and reports its registers and local-memory stack.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.fixture(scope="module")
def report():
    if not os.path.exists(PTXAS):
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sm90_compile.py"),
                          "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["variant"]: r for r in map(json.loads, out.stdout.splitlines())}


def test_every_variant_compiles_to_a_cubin(report):
    expected = {"plain", "no_grad", "every_option", "prob_target", "split", "split_finish",
                "split_no_grad_finish", "slice_stats", "slice_grad", "scale_rows"}
    assert expected <= set(report)
    assert all(r["registers"] > 0 for r in report.values())


def test_tuned_lm_blocks_do_not_spill(report):
    tuned = {k: r for k, r in report.items() if k.startswith("tuned_")}
    assert len(tuned) == 6
    spilled = {k: r["stack_bytes"] for k, r in tuned.items() if r["stack_bytes"]}
    assert not spilled, f"register spills (stack bytes) at the tuned block sizes: {spilled}"
