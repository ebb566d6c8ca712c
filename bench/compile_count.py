"""Counts the distinct kernel compilations that bench/gpu_check.py triggers, without a GPU, and
estimates their time on a cold start (an empty Triton cache) from the offline compile.

Triton compiles a @triton.jit kernel once per specialisation: the constexprs, the type of
each argument (a tensor's dtype, an int's width), the run-time specialisations (an int equal
to 1 becomes a constant; ints divisible by 16 and 16-byte aligned pointers are marked so) and
the launch options (warps, fp fusion). Its on-disk cache is shared by every process on the
machine, so across the check's steps each distinct (kernel, specialisation) compiles once.

This script runs gpu_check.py's own plan with each step's command replaced by one that counts
instead (gpu_check.Runner.run is swapped, so the steps are gpu_check's, not a copy):
  pytest steps     the same pytest command on the CPU under TRITON_INTERPRET=1, with this file
                   as a plugin (`-p compile_count`): every launch of a kernel is recorded, then
                   run by the interpreter, so the tests pass as they do on a GPU;
  the cuda tests   (marked `cuda`, skipped without a GPU) are not run: CUDA_TESTS holds, for
                   each test gpu_check runs, the calls it makes (same shapes, dtypes and
                   options), which are recorded without running the kernels;
  sanitizer cases  gpu_check.py --sanitize-case on the CPU, recorded and interpreted;
  benchmarks       the same bench command with N = BENCH_TOKENS rows (in --tokens or --cases;
                   D = 64 for the linear ops,
                   triton_xent providers only; bench_distill's cases are called here, since
                   it measures in child processes), recorded without running the kernels: only
                   the first call of each case matters (the rest hit the cache), and a
                   specialisation does not depend on N beyond N % 16 == 0, N > 1 and the tile
                   of short rows (ROWS <= 128 <= BENCH_TOKENS);
  other steps      (wheels, plots) launch no kernel of ours.
A launched kernel is a @triton.jit function of triton_xent.kernels whose name ends in
`_kernel` (the helpers they call are compiled into them). Kernels added later (the two-pass
long rows' statistics and gradient kernels, any other family) are counted without a change
here, as long as they follow that name.

The estimate is the sum over the distinct launches of the mean compile time of their kernel
in the sm_90 audit (bench/compile_audit.py, run here from an empty cache; a kernel the audit
has no case for gets the mean of all). It is this CPU's time for triton.compile; the GPU
machine's CPU, Triton's own launch overhead, torch.compile's inductor (the torch_compile
provider) and the time the steps take to run are not in it.

    python bench/compile_count.py                # the table per step and the estimate
    python bench/compile_count.py --json OUT     # also the distinct launches, as JSON lines
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import pkgutil
import runpy
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT_ENV = "COMPILE_COUNT_OUT"  # the file the launches are appended to
BENCH_TOKENS = 256  # rows of the benchmarks' cases here (the check's: 16384 and 2^20)


# --- recording launches -----------------------------------------------------------------------


def launch_key(name: str, fn, args: tuple, kwargs: dict) -> str:
    """The JIT's specialisation of one launch, as a string: what makes Triton compile anew."""
    from triton.backends.compiler import BaseBackend

    from compile_audit import native_specialize_impl  # with Triton 3.4's fallback

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    spec = []
    for pname, param in params.items():
        value = bound.get(pname, param.default)
        if "constexpr" in str(param.annotation):
            spec.append(f"{pname}={value!r}")
        else:
            kind, special = native_specialize_impl(BaseBackend, value, False, True, True)
            spec.append(f"{pname}:{kind}{special if isinstance(special, str) else repr(special)}")
    options = sorted((k, v) for k, v in kwargs.items() if k not in params)
    return json.dumps(dict(kernel=name, spec=spec, options=options), default=repr)


class Counting:
    """Stands in for a launched kernel: `kernel[grid](...)` records the launch's key, then runs
    the kernel (mode "run") or not (mode "record")."""

    def __init__(self, name: str, kernel, mode: str, out):
        self.name, self.kernel, self.mode, self.out = name, kernel, mode, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.write(launch_key(self.name, self.kernel.fn, args, kwargs) + "\n")
            self.out.flush()
            if self.mode == "run":
                return self.kernel[grid](*args, **kwargs)
        return launch

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


def install(mode: str, path: str) -> None:
    """Replaces every launched kernel of triton_xent.kernels by a Counting that appends to
    `path`."""
    import triton_xent.kernels as kernels

    out = open(path, "a")
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn") and callable(obj.fn):
                setattr(module, name, Counting(name, obj, mode, out))


_plugin_out: list = []


def pytest_configure(config):
    """As a pytest plugin (`-p compile_count`): record and run every launch of the session."""
    if os.environ.get(OUT_ENV):
        install("run", os.environ[OUT_ENV])
        _plugin_out.append(open(os.environ[OUT_ENV], "a"))


def pytest_runtest_setup(item):
    """A line `# <node id>` before each test's launches (what each test adds)."""
    for out in _plugin_out:
        out.write(f"# {item.nodeid}\n")
        out.flush()


# --- the cuda tests gpu_check runs, as the calls they make -----------------------------------

def _xent(V, dtype="float32", N=64, backward="backward()", **options):
    return (N, V, dtype, backward, options)


# node id -> the cross_entropy calls of the test: (N, V, dtype, how the test calls backward or
# None, options). Read off the tests; test_compile_count.py checks that these are the cuda
# tests gpu_check runs. What the kernels' specialisation sees is what must match: shapes but
# N (N % 16, N > 1), dtypes, options, the reduction and grad_output's stride.
CUDA_TESTS = {
    "tests/test_cuda.py::test_real_lm_vocabularies[bf16-gemma_256000]": [
        _xent(256000, "bfloat16", backend="triton", **opts) for opts in (
            {}, dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0))],
    "tests/test_cuda.py::test_real_lm_vocabularies[fp32-llama3_128256]": [
        _xent(128256, "float32", backend="triton", **opts) for opts in (
            {}, dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0))],
    "tests/test_cuda.py::test_offsets_past_2_31_in_bf16": [
        # 16800 rows on the GPU, 64 here: N % 16 == 0 both
        _xent(128256, "bfloat16", N=64, reduction="none", backend="triton",
              backward="backward(ones_like)")],
    "tests/test_cuda.py::test_unchecked_bad_target_gives_nan_row_without_sync_or_crash": [
        _xent(50000, N=4, reduction="none", check_targets=False, backend="triton",
              backward="sum().backward()")],
    "tests/test_cuda.py::test_auto_backend_runs_the_kernels_on_cuda": [
        _xent(1000, N=8, backward=None)],
    "tests/test_cuda.py::test_cuda_graph_captures_a_training_step_without_host_sync": [
        _xent(V, check_targets=False, label_smoothing=0.1) for V in (32000, 128256)],
}


def record_cuda_tests(node_ids: list[str]) -> None:
    """Records the launches of CUDA_TESTS[node_id] for each node id, on CPU tensors."""
    import torch

    import triton_xent

    for node in node_ids:
        for N, V, dtype, backward, options in CUDA_TESTS[node]:
            x = torch.zeros(N, V, dtype=getattr(torch, dtype), requires_grad=bool(backward))
            t = torch.zeros(N, dtype=torch.int64)
            loss = triton_xent.cross_entropy(x, t, **options)
            if backward == "backward()":
                loss.backward()
            elif backward == "backward(ones_like)":
                loss.backward(torch.ones_like(loss))
            elif backward == "sum().backward()":
                loss.sum().backward()


# --- gpu_check's steps, counted --------------------------------------------------------------


def _replace(cmd: list[str], flag: str, values: list[str]) -> list[str]:
    """cmd with the values after `flag` (up to the next flag) replaced by `values`."""
    if flag not in cmd:
        return cmd + [flag, *values]
    i = cmd.index(flag) + 1
    j = i
    while j < len(cmd) and not cmd[j].startswith("--"):
        j += 1
    return cmd[:i] + values + cmd[j:]


def counting_command(cmd: list[str], env: dict | None, keys: str):
    """(command, env) that records the launches of gpu_check's `cmd`, or None if it launches
    no kernel of ours; and the cuda test node ids it runs (recorded from CUDA_TESTS)."""
    py = sys.executable
    env = dict(env or os.environ, TRITON_INTERPRET="1", **{OUT_ENV: keys})
    env["PYTHONPATH"] = os.pathsep.join([ROOT, BENCH, env.get("PYTHONPATH", "")])
    if cmd[1:3] == ["-m", "pytest"]:
        return [*cmd[:3], "-p", "compile_count", *cmd[3:]], env
    if cmd[-1] == "--sanitize-case":
        return [py, __file__, "--run", os.path.join(BENCH, "gpu_check.py"), "--sanitize-case"], env
    script = os.path.basename(cmd[1]) if len(cmd) > 1 else ""
    if script == "bench_xent.py":
        if "--cases" in cmd:  # DTYPE,N,V each
            args = [a if a.count(",") != 2 else _xent_case(a) for a in cmd[2:]]
        else:
            args = _replace(cmd[2:], "--tokens", [str(BENCH_TOKENS)])
        if "--providers" in args:  # torch where none of ours is left (--sweep adds them)
            i = j = args.index("--providers") + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            ours = [p for p in args[i:j] if p.startswith("triton_xent")]
            if not ours and "--sweep" not in args:
                return None  # others' kernels only (torch.compile, Liger)
            args = _replace(args, "--providers", ours or ["torch"])
        return [py, __file__, "--record", cmd[1], *args], env
    if script == "bench_linear.py":
        i = j = cmd.index("--shapes") + 1
        while j < len(cmd) and not cmd[j].startswith("--"):
            j += 1
        args = _replace(cmd[2:], "--shapes", [f"{BENCH_TOKENS},64,{shape.split(',')[2]}"
                                               for shape in cmd[i:j]])
        args = _replace(args, "--providers", ["triton_xent"])
        return [py, __file__, "--record", cmd[1], *args], env
    if script == "bench_distill.py":  # it measures in child processes: call the ops here
        args = [a if "," not in a else _distill_shape(a) for a in cmd[2:]]
        return [py, __file__, "--record-distill", *args], env
    return None


def _xent_case(case: str) -> str:
    """A bench_xent case DTYPE,N,V with N = BENCH_TOKENS."""
    dtype, _, V = case.split(",")
    return f"{dtype},{BENCH_TOKENS},{V}"


def _distill_shape(shape: str) -> str:
    """A bench_distill shape N,D,V with N = BENCH_TOKENS (and D = 64 through the heads)."""
    _, D, V = shape.split(",")
    return f"{BENCH_TOKENS},{64 if int(D) else 0},{V}"


def record_distill(argv: list[str]) -> None:
    """The launches of bench_distill.py's triton_xent provider for its cases, forward and
    backward once each (the benchmark's warm-up compiles the same), on CPU tensors."""
    import torch

    import bench_distill

    args = bench_distill.parse_args(argv)
    for (N, D, V), dtype in ((c, d) for d in args.dtypes for c in args.shapes):
        for divergence in args.divergences:
            op = f"linear_distill_{divergence}" if D else f"distill_{divergence}"
            fn = bench_distill.make_provider("triton_xent", op, divergence,
                                             torch.device("cpu"))
            inputs = bench_distill.make_inputs(N, D, V, getattr(torch, bench_distill.DTYPES[
                dtype]), torch.device("cpu"), requires_grad=True)
            fn(*inputs).backward()


def cuda_test_ids(cmd: list[str]) -> list[str]:
    """The cuda test node ids of a `pytest -m cuda` step's command (its explicit node ids)."""
    return [a for a in cmd if "::" in a] if "-m" in cmd[3:] and "cuda" in cmd else []


def audit_seconds() -> dict[str, float]:
    """Mean compile seconds per kernel from the sm_90 audit (every case, an empty cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(BENCH, "compile_audit.py"), "--json"],
                         env=env, capture_output=True, text=True, check=True)
    times = collections.defaultdict(list)
    for r in map(json.loads, out.stdout.splitlines()):
        times[r["kernel"]].append(r["compile_s"])
        times["*"].append(r["compile_s"])
    return {k: sum(v) / len(v) for k, v in times.items()}


def count(workdir: str) -> list[dict]:
    """Runs gpu_check's plan with each step counted; returns one dict a step: name, limit,
    the compilations its cost assumes, keys (the step's distinct launches)."""
    sys.path.insert(0, BENCH)
    import gpu_check

    steps: list[dict] = []
    keys_dir = os.path.join(workdir, "keys")
    os.makedirs(keys_dir)

    def run(self, step, spare_s):
        path = os.path.join(keys_dir, f"{len(steps):02d}.jsonl")
        open(path, "w").close()
        counted = counting_command(step.cmd, step.env, path)
        status = "no kernels of ours"
        if counted is not None:
            start = time.monotonic()
            out = subprocess.run(counted[0], cwd=ROOT, env=counted[1], capture_output=True,
                                 text=True)
            status = f"exit {out.returncode} in {time.monotonic() - start:.0f} s"
            if out.returncode != 0:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        nodes = cuda_test_ids(step.cmd)
        if nodes:
            subprocess.run([sys.executable, __file__, "--cuda-tests", *nodes], cwd=ROOT,
                           env=counting_command(["", "-m", "pytest"], step.env, path)[1],
                           check=True)
        keys = {line for line in open(path) if line.strip() and not line.startswith("#")}
        failed = counted is not None and out.returncode != 0
        steps.append(dict(name=step.name, limit_s=step.limit_s, keys=keys, status=status,
                          failed=failed, expected_s=step.cost.expected_s,
                          assumed=step.cost.measured_compiles + step.cost.compiles))
        print(f"{step.name:52s} {len(keys):4d} launches ({status})", flush=True)
        self.results.append((step, "ok", 0.0))
        return True

    gpu_check.Runner.run = run
    gpu_check.sanitizer = lambda: "compute-sanitizer"
    # gpu_check's own log to its file only: its times here are the counting's, not a check's
    gpu_check.Log.__call__ = lambda self, text="": (self.file.write(text + "\n"),
                                                    self.file.flush())
    gpu_check.main([os.path.join(workdir, "check")])
    return steps


def report(steps: list[dict], seconds: dict[str, float]) -> tuple[int, float]:
    """The table per step: its limit and expected time (gpu_check's), the compilations new
    to it, their estimated time on this CPU, and the count its cost assumes; a step whose
    count exceeds that is named with the seconds to add (gpu_check.COMPILE_S each)."""
    import gpu_check

    seen: set = set()
    total_s = 0.0
    kinds = collections.Counter()
    short = []
    print(f"\n{'step':52s} {'limit':>6s} {'expect':>6s} {'new':>4s} {'est. s':>7s} "
          f"{'assumed':>7s}")
    for step in steps:
        new = step["keys"] - seen
        seen |= new
        est = sum(seconds.get(json.loads(k)["kernel"], seconds["*"]) for k in new)
        total_s += est
        kinds.update(json.loads(k)["kernel"] for k in new)
        print(f"{step['name']:52s} {step['limit_s']:5.0f}s {step['expected_s']:5.0f}s "
              f"{len(new):4d} {est:7.1f} {step['assumed']:7d}")
        if len(new) > step["assumed"]:
            short.append(f"{step['name']}: {len(new) - step['assumed']} more than its cost "
                         f"assumes, about {(len(new) - step['assumed']) * gpu_check.COMPILE_S:.1f}"
                         " s more on the GPU machine")
    print(f"\n{len(seen)} distinct compilations, about {total_s:.0f} s of compiling on this "
          f"CPU ({seconds['*']:.2f} s a compile on average in the sm_90 audit)")
    print("by kernel: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print("compilations beyond gpu_check's costs: " + ("none" if not short else
                                                        "\n  " + "\n  ".join(short)))
    return len(seen), total_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the distinct launches here")
    p.add_argument("--run", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--record", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--cuda-tests", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--record-distill", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run or args.record:
        script, *rest = args.run or args.record
        install("run" if args.run else "record", os.environ[OUT_ENV])
        sys.argv = [script, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            return e.code or 0
        return 0
    if args.record_distill is not None:
        install("record", os.environ[OUT_ENV])
        sys.path.insert(0, BENCH)
        record_distill(args.record_distill)
        return 0
    if args.cuda_tests:
        install("record", os.environ[OUT_ENV])
        record_cuda_tests(args.cuda_tests)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the audit's compile times need Triton's compiler",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="compile_count_") as workdir:
        steps = count(workdir)
        seconds = audit_seconds()
        report(steps, seconds)
        failed = [s["name"] for s in steps if s["failed"]]
        if failed:
            print(f"counting failed in: {', '.join(failed)} (their output is above)",
                  file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                for key in sorted(set().union(*(s["keys"] for s in steps))):
                    f.write(key if key.endswith("\n") else key + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
