"""The one prepared GPU check: correctness, sanitizers and the benchmarks in one command,
every step inside 7 minutes (TOTAL_S) from a cold start on an H100/H200.

    python bench/gpu_check.py OUT_DIR            # on the GPU machine
    python bench/gpu_check.py OUT_DIR --dry-run  # on a CPU: tiny shapes, the same plumbing
    python bench/gpu_check.py --plan             # the steps, their expected times and limits

Before it runs on the GPU machine, copy the liger-kernel and cut-cross-entropy wheels into
the checkout's git-ignored .wheels/ folder (from ../shared/wheels): the machine has no
network, and the check installs them with `pip --no-deps --no-index`.

Steps, each in its own subprocess with its own time limit, so that a hang (of the exchange,
say) costs its step and no more: the log is written as each step ends, the CSVs row by row.
  1. device and versions (python, torch, triton, the GPU);
  2. pip-install the wheels in .wheels/ (liger's and CCE's kernels for the benchmarks);
  3. the exchange-free long rows first (LONG_ROWS = "two_pass": its split-row tests and
     the parity subset's long rows), then the cuda tests of CUDA_TESTS and the GPU parity
     subset (PARITY_TESTS: split rows on all three long-row paths, the sweep's among them),
     chosen for few kernel variants (`python bench/compile_count.py` counts them all,
     bench/README.md);
  4. compute-sanitizer memcheck and racecheck on a small split-row case: "two_pass", then
     both launches of the exchange, once with the configured spin limit, once with spin
     limit 0 so that the early slices are deferred and the finish launch does the work;
  5. bench_xent.py with do_bench's rep at REP_MS, its cases LM (bf16, N = 16384,
     V = 32000, 128256, 256000), FP32 (N = 16384, V = 128256) and SMALL (bf16, N = 2^20,
     V = 10, 1000), one process per group of providers: the exchange-free ones first
     ("two_pass" and eager torch), torch.compile and Liger on every case in one process
     (torch.compile's start-up and Liger's import paid once), triton_xent (two_pass, the
     default), torch and the tile1024 variant on SMALL, the row sweep beside the default on
     LM and FP32, and at bf16 V = 128256 the exchange's variants of SPLIT_SWEEP;
  6. bench_linear.py at N = 8192 in bf16, (D, V) = (2304, 256000) and (4096, 128256);
  7. bench_distill.py at N = 8192, V = 128256 in bf16: forward KL and JSD from logits and
     through both heads (D = 4096), triton_xent against the naive PyTorch distillation and
     Liger's JSD and fused linear JSD, every measurement in one process (--in-process);
  8. plot.py on both cross-entropy CSVs.
OUT_DIR receives at most 10 files: gpu_check.log (the plan, then every step's command,
output, time and expected time), the three CSVs (named after the device) and the PNGs of
the cross-entropy CSV (bandwidth, speed-up, memory, the config sweep) and of the linear
one (time, memory).

The budget. Every step has an expected time (Cost: what it was measured to take in the
first run's log, H200, 2026-12-04, or the work it counts: processes x START_S +
compilations x COMPILE_S + measurements x (do_bench's warmup + rep + 8 calls + MEASURE_S),
and any start-up it names) and a limit (limit_for: 1.5 x expected, at least 10 s more,
rounded up to 5 s). The expected times must leave SLACK of TOTAL_S free
(tests/test_gpu_check.py): room for a new kernel variant's tests and measurements, or a
slower machine. While it runs, a step gets min(its limit, the time to the deadline less
the later steps' expected times), so an overrun eats the slack and no later step's time.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

START = time.monotonic()  # the deadline counts from here: the whole command is in TOTAL_S
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
WHEELS = os.path.join(ROOT, ".wheels")
TOTAL_S = 420  # the whole check, from a cold start
SLACK = 0.15  # of TOTAL_S, never planned: a new kernel variant's steps, a slower machine
DRY_LIMIT_S = 60  # the least limit of a step in --dry-run (a loaded 2-core CPU)

# What things cost on the GPU machine, fitted to the first run's log (H200, 2026-12-04;
# bench/README.md, "The GPU check", has the arithmetic). Fits, not measurements of each.
START_S = 6.7  # a process that imports torch and triton_xent, opens the GPU and measures
#                the copy bandwidth: fitted, with MEASURE_S, to the two_pass and config-sweep
#                steps (22.0 s with 12 measurements and 8 compilations, 35.0 s with 20 and 18)
COMPILE_S = 0.5  # one Triton compilation, with the test or call around it: the three pytest
#                  steps' own time over their compilations, 21.5 s / 44, 10.0 / 20, 30.2 / 64
MEASURE_S = 0.36  # a measurement beyond do_bench's warmup, rep and its calls: the inputs,
#                   the memory checks, the garbage collection, do_bench's own overhead
COMPETITORS_S = 22.0  # torch.compile's first graph in a process (inductor's import and its
#                       compile workers) and Liger's import: what the bf16 LM and float32
#                       steps took beyond the above, 20.0 s with 6 graphs and 23.3 s with 2
GRAPH_S = 1.0  # an inductor graph beyond the 6 of that fit: a prediction (it cannot tell)
LIGER_S = 5.0  # Liger's import (transformers) alone: a prediction, part of COMPETITORS_S
REP_MS = 100  # do_bench's rep in the cross-entropy steps (triton.testing's own default):
#               from 3 timed calls of 28 ms to hundreds of 0.1 ms there; 500 ms by default
DISTILL_REP_MS = 200  # bench_distill's: at least 2 timed calls of the linear op's ~100 ms

# The small split-row case of the sanitizers: 3 slices (the last one short) of 4 rows.
SANITIZE_ROWS = 4

# The tests marked `cuda` that step 3 runs: each compiles its own kernel variants, and a cold
# start has to fit them (bench/compile_count.py counts them).
CUDA_TESTS = [
    # bf16 at the largest P, fp32 at Llama 3's vocabulary (the other two pairs add compiles
    # and no new case)
    "tests/test_cuda.py::test_real_lm_vocabularies[bf16-gemma_256000]",
    "tests/test_cuda.py::test_real_lm_vocabularies[fp32-llama3_128256]",
    "tests/test_cuda.py::test_offsets_past_2_31_in_bf16",
    "tests/test_cuda.py::test_unchecked_bad_target_gives_nan_row_without_sync_or_crash",
    "tests/test_cuda.py::test_auto_backend_runs_the_kernels_on_cuda",
    "tests/test_cuda.py::test_cuda_graph_captures_a_training_step_without_host_sync",
]
# The GPU parity subset: split rows, row tiles and every shape of test_shape_plain in bf16
# (its float32 and float16 cases would add about 30 compiles).
PARITY_TESTS = ["tests/test_split_rows.py", "tests/test_row_tiles.py", "tests/test_parity.py",
                "-k", "split or tiles or row_align or (shape_plain and bf16)"]

# bench_xent's cases (DTYPE,N,V), and the dry run's stand-ins.
LM = ["bf16,16384,32000", "bf16,16384,128256", "bf16,16384,256000"]
FP32 = ["fp32,16384,128256"]
SMALL = [f"bf16,{1 << 20},10", f"bf16,{1 << 20},1000"]
SWEEP_CASE = "bf16,16384,128256"  # the split-row variants' case
DRY_LM, DRY_FP32, DRY_SMALL = ["bf16,4,100"], ["fp32,4,100"], ["bf16,32,10"]
# The exchange's variants the check measures (the exchange itself is no longer the default):
# the fastest split row of the 2026-12-04 sweep (11.3 ms against 13.6 fwd_bwd), the
# persistent schedule (the faster backward there), slices of 16384 columns at 32 warps (32 KB
# of bf16 in flight a program: the big slices), and persistent4, whose NaN loss there
# the timed wait's fix should end (config.py; measuring checks the loss and gradient first).
# The wait and spin variants, which changed nothing there, and the other slice widths are
# for the tuning command (bench/gpu_tune.py).
SPLIT_SWEEP = ["slice2048_w4", "persistent2", "exchange_s16384_w32", "persistent4"]
# The whole-row tile variant of the small vocabularies (the faster at V = 1000 there;
# tile4096 and persistent2 were slower at both V).
TILE_SWEEP = ["tile1024"]
LINEAR_SHAPES = ["8192,2304,256000", "8192,4096,128256"]  # N,D,V: Gemma-2 2B's, Llama-3 8B's
DISTILL_SHAPES = ["8192,0,128256", "8192,4096,128256"]  # from logits, through both heads


@dataclass
class Cost:
    """A step's expected time on the GPU machine, in seconds, and what it is based on:
    a time measured in the 2026-12-04 log (measured_s, covering its start-up) or START_S per
    process, plus the work counted on top."""

    measured_s: float | None = None  # the step's time in the 2026-12-04 log
    measured_compiles: int = 0  # the compilations in that time (compile_count.py's count)
    processes: int = 0  # processes started, START_S each (when not measured)
    compiles: int = 0  # Triton compilations new to the step beyond those (compile_count.py)
    measurements: int = 0  # do_bench measurements, counted from the command
    rep_ms: float = 0.0  # do_bench's rep of those
    call_ms: float = 0.0  # the step's mean call time (the 2026-12-04 rows, or a prediction)
    extra_s: float = 0.0
    extra: str = ""  # what extra_s pays for

    def measurement_s(self) -> float:
        """One measurement: do_bench's warmup and rep (each at least one call), five calls
        to estimate, its first, the check's and the peak-memory call, and MEASURE_S."""
        import common

        t = self.call_ms
        return MEASURE_S + (8 * t + max(self.rep_ms, t)
                            + max(common.DO_BENCH_WARMUP_MS, t)) / 1000

    @property
    def expected_s(self) -> float:
        base = self.measured_s if self.measured_s is not None else self.processes * START_S
        return (base + self.compiles * COMPILE_S + self.measurements * self.measurement_s()
                + self.extra_s)

    def basis(self) -> str:
        with_compiles = f" with {self.measured_compiles} compiles" \
            if self.measured_compiles else ""
        parts = ([f"measured {self.measured_s:g} s{with_compiles}"]
                 if self.measured_s is not None else
                 [f"{self.processes} start" if self.processes else ""])
        if self.compiles:
            parts.append(f"{self.compiles} compiles")
        if self.measurements:
            parts.append(f"{self.measurements} x {self.measurement_s():.2f} s (rep "
                         f"{self.rep_ms:g} ms, calls ~{self.call_ms:g} ms)")
        if self.extra_s:
            parts.append(f"{self.extra_s:g} s {self.extra}")
        return " + ".join(p for p in parts if p)


def limit_for(expected_s: float) -> float:
    """A step's limit: 1.5 x its expected time, at least 10 s more, rounded up to 5 s."""
    return 5 * math.ceil(max(1.5 * expected_s, expected_s + 10) / 5)


@dataclass
class Step:
    name: str
    cmd: list[str]  # what runs (the dry run's command in --dry-run)
    cost: Cost  # on the GPU machine, for its own command
    env: dict | None = None
    skip: str = ""  # why it does not run here, if it does not
    optional: tuple[str, ...] = ()  # files in cmd left out when an earlier step wrote none
    limit_s: float = field(init=False)

    def __post_init__(self):
        self.limit_s = limit_for(self.cost.expected_s)


def xent_measurements(cmd: list[str]) -> int:
    """The measurements of a bench_xent.py command: cases x (providers + variants) x modes."""
    import bench_xent

    a = bench_xent.parse_args(cmd[2:])
    return len(a.cases) * (len(a.providers) + len(a.sweep)) * len(a.modes)


def linear_measurements(cmd: list[str], cases: int) -> int:
    """The measurements of the last `cases` shapes of a bench_linear.py command (every
    listed provider counts; torch_chunked is skipped on torch < 2.13)."""
    import bench_linear

    a = bench_linear.parse_args(cmd[2:])
    return len(a.dtypes) * cases * len(a.modes) * len(a.providers)


def distill_measurements(cmd: list[str]) -> int:
    """The measurements of a bench_distill.py command (Liger's only for JSD)."""
    import bench_distill

    a = bench_distill.parse_args(cmd[2:])
    providers = sum(len(a.providers) - ("liger" in a.providers and d != "jsd")
                    for d in a.divergences)
    return len(a.dtypes) * len(a.shapes) * len(a.modes) * providers


class Log:
    """Prints and writes to OUT_DIR/gpu_check.log."""

    def __init__(self, path: str):
        self.file = open(path, "w")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


class Runner:
    """Runs the steps one after another, each limited to min(its limit, the time to the
    deadline less the later steps' expected times), and records how each ended."""

    def __init__(self, log: Log, steps: list[Step], *, dry: bool, total_s: float = TOTAL_S):
        self.log, self.steps, self.dry = log, steps, dry
        self.deadline = START + total_s
        self.results: list[tuple[Step, str, float | None]] = []  # (step, status, seconds)

    def run_all(self) -> None:
        for i, step in enumerate(self.steps):
            later = sum(s.cost.expected_s for s in self.steps[i + 1:] if not s.skip)
            if step.skip:
                self.log(f"\n=== {step.name}: skipped: {step.skip}")
                self.results.append((step, f"skipped: {step.skip}", None))
                continue
            self.run(step, self.deadline - time.monotonic() - later)

    def run(self, step: Step, spare_s: float) -> bool:
        limit = max(step.limit_s, DRY_LIMIT_S) if self.dry else step.limit_s
        limit = max(1.0, min(limit, spare_s))
        cmd = [a for a in step.cmd if a not in step.optional or os.path.exists(a)]
        self.log(f"\n=== {step.name} (limit {limit:.0f} s, expected "
                 f"{step.cost.expected_s:.0f} s)\n$ {' '.join(cmd)}")
        start = time.monotonic()
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=step.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=limit)
            text, status = out.stdout, ("ok" if out.returncode == 0
                                        else f"failed (exit {out.returncode})")
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            status = f"timed out after {limit:.0f} s"
        seconds = time.monotonic() - start
        self.log(text.rstrip())
        self.log(f"--- {step.name}: {status} in {seconds:.1f} s (expected "
                 f"{step.cost.expected_s:.0f} s)")
        self.results.append((step, status, seconds))
        return status == "ok"


def plan_table(steps: list[Step]) -> str:
    """The steps' expected times and limits on the GPU machine, their basis, and the sum
    against TOTAL_S."""
    lines = [f"{'step':52s} {'expected':>8s} {'limit':>6s}  basis",
             f"{'start-up (device and versions)':52s} {START_S:7.0f}s {'':6s}  "
             f"1 start (a prediction: the log has no time for it)"]
    for step in steps:
        lines.append(f"{step.name:52s} {step.cost.expected_s:7.0f}s {step.limit_s:5.0f}s  "
                     f"{step.cost.basis()}")
    expected = START_S + sum(s.cost.expected_s for s in steps)
    lines.append(f"expected {expected:.0f} s of {TOTAL_S} s ({expected / TOTAL_S:.0%}), "
                 f"slack {TOTAL_S - expected:.0f} s (at least {SLACK:.0%} kept: "
                 f"{TOTAL_S * SLACK:.0f} s); times for the GPU machine, fitted to or "
                 "measured in the 2026-12-04 log (H200) where named, else predictions")
    return "\n".join(lines)


def sanitizer() -> str | None:
    """compute-sanitizer from PATH, CUDA_HOME or /usr/local/cuda, else None."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and os.path.exists(os.path.join(home, "bin",
                                                              "compute-sanitizer")):
            found = os.path.join(home, "bin", "compute-sanitizer")
    return found


def sanitize_case() -> int:
    """The small split-row case (run under compute-sanitizer): both launches, with and
    without forced deferral, forward + backward, checked against float64."""
    import torch

    import triton_xent
    from triton_xent import config

    V = 2 * config.ROW_SLICE_MAX_V + 5
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: compile_count.py
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(SANITIZE_ROWS, V, device=device, generator=g).to(torch.bfloat16)
    t = torch.randint(0, V, (SANITIZE_ROWS,), device=device, generator=g)
    ref = torch.nn.functional.cross_entropy(x.double(), t)
    for path, spin in (("two_pass", 0), ("exchange", config.SLICE_SPIN_LIMIT),
                       ("exchange", 0)):
        config.LONG_ROWS, config.SLICE_SPIN_LIMIT = path, spin
        smoothing = 0.1 if spin else 0.0
        xg = x.clone().requires_grad_(True)
        loss = triton_xent.cross_entropy(xg, t, label_smoothing=smoothing)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        value = float(loss.detach())
        if not smoothing and abs(value - float(ref)) > 2e-2 * max(1.0, abs(float(ref))):
            print(f"{path}, spin {spin}: loss {value} differs from {float(ref)}")
            return 1
        print(f"{path}, spin limit {spin}: loss {value:.5f}, grad norm "
              f"{float(xg.grad.float().norm()):.5f}")
    return 0


def versions(log: Log) -> str:
    """Logs python, torch, triton and the device; returns the device's file-name slug."""
    import torch

    sys.path.insert(0, BENCH)
    import common

    log(f"python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        log(f"triton {triton.__version__}")
    except ImportError:
        log("triton: not installed")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = common.device_name(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        log(f"device {name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
            f"CUDA {torch.version.cuda}")
    else:
        log(f"device {name} (no GPU)")
    return common.slug(name)


def plan(py: str, out_dir: str, slug: str, env: dict, *, dry: bool) -> list[Step]:
    """The check's steps: each one's command (the dry run's with `dry`) and its cost, counted
    from the GPU machine's command."""
    def pick(gpu, tiny):
        return tiny if dry else gpu

    def bench(script, gpu_args, dry_args):
        path = os.path.join(BENCH, script)
        return [py, path, *pick(gpu_args, dry_args)], [py, path, *gpu_args]

    steps = []

    # 2. The other kernels' wheels: measured 0.9 s where they were installed already; a
    # bare machine unpacks two pure-Python wheels (a prediction).
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    steps.append(Step("install wheels", [py, "-m", "pip", "install", "--no-deps", "--no-index",
                                         *(["--dry-run"] if dry else []), *wheels],
                      Cost(measured_s=0.9, extra_s=2, extra="to install them"), env,
                      skip="" if wheels else f"no wheels in {WHEELS} (copy them there from "
                                             "../shared/wheels)"))

    # 3. Correctness on the device: the exchange-free path first.
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    two_pass = pick(["tests/test_split_rows.py", "tests/test_parity.py", "-k",
                     "(two_pass and not exchange) or (test_parity and split)"],
                    ["tests/test_split_rows.py", "-k", "two_pass and not exchange and V33"])
    # Their compilations as compile_count.py counted them for the measured code (2026-12-01;
    # the parity subset's 71 are 64 on a GPU): a new kernel variant's adds to `compiles`.
    steps.append(Step("GPU parity subset, two_pass", pytest + two_pass,
                      Cost(measured_s=32.4, measured_compiles=44),
                      dict(env, TRITON_XENT_LONG_ROWS="two_pass")))
    steps.append(Step("pytest -m cuda", pytest + ["-m", "cuda", *pick(CUDA_TESTS, [
        "tests/test_cuda.py"])], Cost(measured_s=23.7, measured_compiles=20), env))
    steps.append(Step("GPU parity subset", pytest + pick(PARITY_TESTS, [
        "tests/test_row_tiles.py", "-k", "row_align"]),
        Cost(measured_s=44.8, measured_compiles=71), env))

    # 4. Sanitizers on both launches of a split row.
    tool = sanitizer()
    for check, seconds, compiles in (("memcheck", 12.4, 2), ("racecheck", 11.6, 0)):
        steps.append(Step(f"compute-sanitizer {check}",
                          [tool or "compute-sanitizer", "--tool", check, "--error-exitcode",
                           "1", py, os.path.join(BENCH, "gpu_check.py"), "--sanitize-case"],
                          Cost(measured_s=seconds, measured_compiles=compiles),
                          dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"),
                          skip="dry run (no GPU)" if dry else
                          "" if tool else "compute-sanitizer not found"))

    # 5. The cross-entropy benchmark, into one CSV. Dry run: forward only, no torch_compile
    # (tens of seconds of C++ compiling on a CPU; eager torch stands in for it).
    xent_csv = os.path.join(out_dir, f"{slug}.csv")
    out = ["--out", xent_csv, "--rep-ms", str(REP_MS)]
    tiny = ["--quick", "--modes", "fwd"]

    def xent(name, cases, dry_cases, providers, dry_providers, sweep, cost, first=False):
        more = out + ([] if first else ["--append"])
        run, gpu = bench("bench_xent.py",
                         more + ["--cases", *cases, "--providers", *providers, *sweep],
                         more + tiny + ["--cases", *dry_cases, "--providers", *dry_providers,
                                        *sweep])
        cost.measurements = xent_measurements(gpu)
        steps.append(Step(name, run, cost, env))

    # Mean call times: of the same rows of the 2026-12-04 log, or as noted.
    xent("bench_xent two_pass, torch: bf16 LM, float32", LM + FP32,
         DRY_LM + DRY_FP32, ["torch"], ["torch"], ["--sweep", "two_pass"],
         # two_pass in float32 was not run: ~triton_xent's 7.6 and 22.5 ms (a prediction)
         Cost(processes=1, compiles=11, rep_ms=REP_MS, call_ms=8.9), first=True)
    xent("bench_xent torch.compile, Liger: every case", LM + FP32 + SMALL,
         DRY_LM + DRY_FP32 + DRY_SMALL, ["torch_compile", "liger"], ["torch", "liger"], [],
         Cost(processes=1, rep_ms=REP_MS, call_ms=4.2, extra_s=COMPETITORS_S + 6 * GRAPH_S,
              extra="torch.compile's start and Liger's import, 12 graphs"))
    xent("bench_xent small vocabularies: triton_xent, torch, tile1024", SMALL, DRY_SMALL,
         ["triton_xent", "torch"], ["triton_xent", "torch"], ["--sweep", *TILE_SWEEP],
         Cost(processes=1, compiles=10, rep_ms=REP_MS, call_ms=2.5))
    # The row sweep (LONG_ROWS = "sweep", not yet measured: calls taken as two_pass's, a
    # prediction) beside the default on the long rows.
    xent("bench_xent sweep: bf16 LM, float32", LM + FP32, DRY_LM + DRY_FP32, ["triton_xent"],
         ["triton_xent"], ["--sweep", "sweep"],
         Cost(processes=1, compiles=8, rep_ms=REP_MS, call_ms=8.9))
    xent("bench_xent config sweep: the exchange at bf16 V = 128256", [SWEEP_CASE], DRY_LM,
         ["torch"], ["torch"], ["--sweep", *SPLIT_SWEEP],
         Cost(processes=1, compiles=10, rep_ms=REP_MS, call_ms=10.0))

    # 6. The linear + cross-entropy benchmark at the default rep (calls of 42 to 166 ms:
    # 3 to 12 timed). Measured: the first shape, 45.2 s with its 6 rows written (its
    # providers' start-up and CCE's and Liger's compiles among them); the second shape
    # counted on top, with 4 compilations of the others' kernels (a prediction; ours are
    # compiled by then).
    linear_csv = os.path.join(out_dir, f"{slug}-linear.csv")
    run, gpu = bench("bench_linear.py", ["--dtypes", "bf16", "--shapes", *LINEAR_SHAPES,
                                         "--out", linear_csv],
                     ["--quick", "--dtypes", "bf16", "--shapes", "4,16,100", "--out",
                      linear_csv, "--providers", "triton_xent", "torch"])
    import common

    steps.append(Step("bench_linear", run, Cost(
        measured_s=45.2, measurements=linear_measurements(gpu, len(LINEAR_SHAPES) - 1),
        rep_ms=common.DO_BENCH_REP_MS, call_ms=86, extra_s=4 * COMPILE_S,
        extra="CCE's and Liger's compiles"), env))

    # 7. Distillation: both ops, the naive PyTorch losses and Liger's JSD, in one process.
    # Dry run: one divergence, ours against torch's (the plumbing is the same).
    distill_csv = os.path.join(out_dir, f"{slug}-distill.csv")
    run, gpu = bench("bench_distill.py",
                     ["--dtypes", "bf16", "--shapes", *DISTILL_SHAPES, "--divergences",
                      "forward_kl", "jsd", "--in-process", "--rep-ms", str(DISTILL_REP_MS),
                      "--out", distill_csv],
                     ["--dtypes", "bf16", "--quick", "--shapes", "4,0,100", "4,16,100",
                      "--divergences", "jsd", "--providers", "triton_xent", "torch",
                      "--in-process", "--out", distill_csv])
    # Calls: from logits 4.2 to 40.8 ms (the log's README run), through the heads ~100 ms
    # (a prediction: four GEMMs of 8.6 TFLOP); our 4 compilations, Liger's import and its 3
    # (a prediction).
    steps.append(Step("bench_distill", run, Cost(
        processes=1, compiles=4, measurements=distill_measurements(gpu),
        rep_ms=DISTILL_REP_MS, call_ms=58.5, extra_s=LIGER_S + 3 * COMPILE_S,
        extra="Liger's import and compiles"), env))

    # 8. Plots: measured 9.9 s for its 5 figures (cut at 10 s, the PNGs written), and its
    # exit (a prediction).
    steps.append(Step("plot", [py, os.path.join(BENCH, "plot.py"), xent_csv, linear_csv,
                               "--out-dir", out_dir],
                      Cost(measured_s=9.9, extra_s=2, extra="its exit"), env,
                      optional=(xent_csv, linear_csv)))
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="folder for the log, CSVs and PNGs")
    p.add_argument("--dry-run", action="store_true",
                   help="on a CPU: tiny shapes and the Triton interpreter, the same steps")
    p.add_argument("--plan", action="store_true",
                   help="print the GPU machine's steps, expected times and limits, and exit")
    p.add_argument("--sanitize-case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sanitize_case:
        return sanitize_case()
    sys.path.insert(0, BENCH)
    py = sys.executable
    if args.plan:
        print(plan_table(plan(py, "OUT", "DEVICE", dict(os.environ), dry=False)))
        return 0
    if not args.out_dir:
        p.error("the output folder is required")
    os.makedirs(args.out_dir, exist_ok=True)
    log = Log(os.path.join(args.out_dir, "gpu_check.log"))
    dry = args.dry_run
    log(f"gpu_check{' --dry-run' if dry else ''}: {ROOT}")
    slug = versions(log)
    log(f"start-up: {time.monotonic() - START:.1f} s")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["TRITON_INTERPRET"] = "1"
    steps = plan(py, args.out_dir, slug, env, dry=dry)
    log("\n=== plan" + (" (the GPU machine's; the dry run's steps run with limits of at "
                        f"least {DRY_LIMIT_S} s)" if dry else ""))
    log(plan_table(steps))
    runner = Runner(log, steps, dry=dry)
    runner.run_all()

    log("\n=== summary")
    for step, status, seconds in runner.results:
        took = f"{seconds:6.1f}s" if seconds is not None else "      -"
        log(f"{step.name:52s} {took} of {step.cost.expected_s:3.0f}s expected, limit "
            f"{step.limit_s:3.0f}s  {status}")
    log(f"total {time.monotonic() - START:.1f} s of {TOTAL_S} s")
    files = sorted(os.listdir(args.out_dir))
    log(f"{len(files)} files in {args.out_dir}: {' '.join(files)}")
    failed = [s.name for s, status, _ in runner.results
              if not (status == "ok" or status.startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
