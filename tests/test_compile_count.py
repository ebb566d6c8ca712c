"""bench/compile_count.py, which counts the kernel compilations of the GPU check: the cuda
tests it stands in for are the ones gpu_check.py runs, and the specialisation it records does
not depend on the number of rows beyond what it claims (so its benchmarks may run at
BENCH_TOKENS rows instead of the check's 16384 and 2^20)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compile_count  # noqa: E402
from triton_xent import config  # noqa: E402
import gpu_check  # noqa: E402


def test_the_cuda_tests_counted_are_those_the_check_runs_and_exist():
    assert list(compile_count.CUDA_TESTS) == gpu_check.CUDA_TESTS
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *gpu_check.CUDA_TESTS], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    collected = [x for x in out.stdout.splitlines() if "::" in x]
    assert out.returncode == 0, out.stdout[-2000:]  # 4 if a node id names no test
    for node in gpu_check.CUDA_TESTS:
        assert any(c == node or c.startswith(node + "[") for c in collected), node


# Launches of cross_entropy (forward and backward) at several row counts, recorded, not run.
RECORD = """
import json, sys, torch
import compile_count, triton_xent
compile_count.install("record", sys.argv[1])
for N, V in json.loads(sys.argv[2]):
    x = torch.zeros(N, V, dtype=torch.bfloat16, requires_grad=True)
    t = torch.zeros(N, dtype=torch.int64)
    triton_xent.cross_entropy(x, t, label_smoothing=0.1).backward()
    with open(sys.argv[1], "a") as f:
        f.write("# end\\n")
"""


def keys_by_case(tmp_path, cases):
    path = tmp_path / "keys.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "bench")]))
    subprocess.run([sys.executable, "-c", RECORD, str(path), json.dumps(cases)], env=env,
                   check=True, timeout=120)
    out, current = [], set()
    for line in path.read_text().splitlines():
        if line == "# end":
            out.append(current)
            current = set()
        else:
            current.add(line)
    return out


def test_a_launch_specialises_alike_at_the_benchmarks_row_counts_and_not_at_4_rows(tmp_path):
    # Short rows (V = 10: 128 rows a tile), one whole row (V = 1000) and split rows
    # (V = 5000, two slices) at the check's row counts' stand-in and at a multiple of 16 more.
    n = compile_count.BENCH_TOKENS
    cases = [[n, 10], [4 * n, 10], [n, 1000], [4 * n, 1000], [n, 5000], [4 * n, 5000], [4, 5000]]
    keys = keys_by_case(tmp_path, cases)
    assert len(keys) == len(cases) and all(keys)
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[4] == keys[5]
    assert keys[6] != keys[4]  # 4 rows: not a multiple of 16, another specialisation
    kernels = {json.loads(k)["kernel"] for k in keys[4]}
    assert SPLIT_KERNELS[config.LONG_ROWS] <= kernels


# The kernels of a split row under each long-row path (config.LONG_ROWS, the default here).
SPLIT_KERNELS = {"exchange": {"_split_kernel", "_finish_kernel"},
                 "two_pass": {"_two_pass_stats_kernel", "_two_pass_finish_kernel"},
                 "sweep": {"_sweep_kernel"}}
