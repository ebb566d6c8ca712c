"""The one prepared GPU check: correctness, sanitizers and the benchmarks in one command,
sized for at most 7 minutes on a fresh H100/H200 (start-up aside).

    python bench/gpu_check.py OUT_DIR            # on the GPU machine
    python bench/gpu_check.py OUT_DIR --dry-run  # on a CPU: tiny shapes, the same plumbing

Before it runs on the GPU machine, copy the liger-kernel and cut-cross-entropy wheels into
the checkout's git-ignored .wheels/ folder (from ../shared/wheels): the machine has no
network, and the check installs them with `pip --no-deps --no-index`.

Steps, each in its own subprocess with its own time limit, all inside one overall budget
(TOTAL_S), so that a hang (of the exchange, say) costs its step and no more: the log is
written as each step ends, and the CSVs row by row:
  1. device and versions (python, torch, triton, the GPU);
  2. pip-install the wheels in .wheels/ (liger's and CCE's kernels for the benchmarks);
  3. the exchange-free long rows first (LONG_ROWS = "two_pass": its split-row tests and
     the parity subset's long rows), then the cuda tests of CUDA_TESTS and the GPU parity
     subset (PARITY_TESTS) on the default path, the exchange, chosen for few kernel
     variants (`python bench/compile_count.py` counts them all, bench/README.md);
  4. compute-sanitizer memcheck and racecheck on a small split-row case: "two_pass", then
     both launches of the exchange, once with the configured spin limit, once with spin
     limit 0 so that the early slices are deferred and the finish launch does the work;
  5. bench_xent.py: bf16 N = 16384 at V = 32000, 128256, 256000, first "two_pass" (the
     sweep's provider triton_xent[two_pass]) and torch, then triton_xent (the exchange),
     torch_compile and liger; the config sweep at V = 128256; one float32 case; the small
     vocabularies V = 10 and 1000 at N = 2^20 with the whole-row tile variants;
  6. bench_linear.py at N = 8192, D = 2304, V = 256000 in bf16;
  7. bench_distill.py at N = 8192, V = 128256 in bf16: forward KL and JSD from logits and
     through both heads (D = 4096), triton_xent against the naive PyTorch distillation and
     Liger's JSD and fused linear JSD (one fresh process per measurement);
  8. plot.py on both cross-entropy CSVs.
OUT_DIR receives at most 10 files: gpu_check.log (every step's command, output and time),
the three CSVs (named after the device) and the PNGs of the cross-entropy CSV (bandwidth,
speed-up, memory, the config sweep) and of the linear one (time, memory).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
WHEELS = os.path.join(ROOT, ".wheels")
TOTAL_S = 420  # the whole check; each step also has its own limit below
RESERVE_S = 10  # kept back for every step still to come (the plots must always run)

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


class Log:
    """Prints and writes to OUT_DIR/gpu_check.log."""

    def __init__(self, path: str):
        self.file = open(path, "w")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


class Steps:
    """Runs commands one after another, each limited to min(its limit, what the budget can
    spare), and records how each ended."""

    def __init__(self, log: Log, steps_left: int, total_s: float):
        self.log, self.left, self.deadline = log, steps_left, time.monotonic() + total_s
        self.results: list[tuple[str, str]] = []

    def run(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> bool:
        self.left -= 1
        spare = self.deadline - time.monotonic() - RESERVE_S * self.left
        limit = max(1.0, min(limit_s, spare))
        self.log(f"\n=== {name} (limit {limit:.0f} s)\n$ {' '.join(cmd)}")
        start = time.monotonic()
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=limit)
            text, status = out.stdout, ("ok" if out.returncode == 0
                                        else f"failed (exit {out.returncode})")
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            status = f"timed out after {limit:.0f} s"
        self.log(text.rstrip())
        self.log(f"--- {name}: {status} in {time.monotonic() - start:.1f} s")
        self.results.append((name, status))
        return status == "ok"

    def note(self, name: str, status: str) -> None:
        self.left -= 1
        self.log(f"\n=== {name}: {status}")
        self.results.append((name, status))


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
        if not smoothing and abs(float(loss) - float(ref)) > 2e-2 * max(1.0, abs(float(ref))):
            print(f"{path}, spin {spin}: loss {float(loss)} differs from {float(ref)}")
            return 1
        print(f"{path}, spin limit {spin}: loss {float(loss):.5f}, grad norm "
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="folder for the log, CSVs and PNGs")
    p.add_argument("--dry-run", action="store_true",
                   help="on a CPU: tiny shapes and the Triton interpreter, the same steps")
    p.add_argument("--sanitize-case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sanitize_case:
        return sanitize_case()
    if not args.out_dir:
        p.error("the output folder is required")
    os.makedirs(args.out_dir, exist_ok=True)
    log = Log(os.path.join(args.out_dir, "gpu_check.log"))
    dry = args.dry_run
    log(f"gpu_check{' --dry-run' if dry else ''}: {ROOT}")
    slug = versions(log)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["TRITON_INTERPRET"] = "1"
    py = sys.executable
    xent_csv = os.path.join(args.out_dir, f"{slug}.csv")
    linear_csv = os.path.join(args.out_dir, f"{slug}-linear.csv")
    steps = Steps(log, steps_left=16, total_s=TOTAL_S)

    # 2. The other kernels' wheels.
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    if wheels:
        steps.run("install wheels", [py, "-m", "pip", "install", "--no-deps", "--no-index",
                                     *(["--dry-run"] if dry else []), *wheels], 60, env)
    else:
        steps.note("install wheels", f"skipped: no wheels in {WHEELS} (copy them there from "
                                     "../shared/wheels)")

    # 3. Correctness on the device: the exchange-free path first.
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    two_pass = (["tests/test_split_rows.py", "-k", "two_pass and not exchange and V33"] if dry
                else ["tests/test_split_rows.py", "tests/test_parity.py", "-k",
                      "(two_pass and not exchange) or (test_parity and split)"])
    steps.run("GPU parity subset, two_pass", pytest + two_pass, 50,
              dict(env, TRITON_XENT_LONG_ROWS="two_pass"))
    steps.run("pytest -m cuda", pytest + ["-m", "cuda", *(["tests/test_cuda.py"] if dry
                                                          else CUDA_TESTS)], 40, env)
    parity = ["tests/test_row_tiles.py", "-k", "row_align"] if dry else PARITY_TESTS
    steps.run("GPU parity subset", pytest + parity, 70, env)

    # 4. Sanitizers on both launches of a split row.
    tool = sanitizer()
    for check in ("memcheck", "racecheck"):
        if dry or tool is None:
            steps.note(f"compute-sanitizer {check}", "skipped: " + (
                "dry run (no GPU)" if dry else "compute-sanitizer not found"))
            continue
        steps.run(f"compute-sanitizer {check}",
                  [tool, "--tool", check, "--error-exitcode", "1", py,
                   os.path.join(BENCH, "gpu_check.py"), "--sanitize-case"], 30,
                  dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"))

    # 5. The cross-entropy benchmark, into one CSV.
    bench = [py, os.path.join(BENCH, "bench_xent.py"), "--out", xent_csv]
    # Dry run: no torch_compile (tens of seconds of C++ compiling on a CPU), forward only.
    others = ["--providers", "triton_xent", "torch"] + ([] if dry else ["torch_compile",
                                                                         "liger"])
    tiny = ["--quick", "--modes", "fwd"] if dry else []
    lm, small = (["--tokens", "4", "--vocab", "100"],
                 ["--tokens", "32", "--vocab", "10"]) if dry else (
        ["--tokens", "16384", "--vocab", "32000", "128256", "256000"],
        ["--tokens", str(1 << 20), "--vocab", "10", "1000"])
    split_sweep = ["spin0"] if dry else ["slice8192_w16", "slice4096_w8", "slice2048_w4",
                                         "slice2048_w8", "persistent2", "persistent4",
                                         "spin1k", "spin0", "wait5us", "wait100us"]
    tile_sweep = ["tile1024"] if dry else ["tile1024", "tile4096", "persistent2"]
    # The exchange-free path and torch first, so that a hang of the exchange loses neither.
    steps.run("bench_xent bf16 LM vocabularies, two_pass",
              bench + tiny + ["--dtypes", "bf16"] + lm + ["--providers", "torch", "--sweep",
                                                          "two_pass"], 40, env)
    steps.run("bench_xent bf16 LM vocabularies",
              bench + tiny + ["--append", "--dtypes", "bf16"] + lm
              + [p for p in others if p != "torch"], 80, env)
    steps.run("bench_xent config sweep",
              bench + tiny + ["--append", "--dtypes", "bf16"] + (lm if dry else [
                  "--tokens", "16384", "--vocab", "128256"]) + ["--providers", "triton_xent",
                                                                "--sweep"] + split_sweep,
              40, env)
    steps.run("bench_xent float32",
              bench + tiny + ["--append", "--dtypes", "fp32"] + (lm if dry else [
                  "--tokens", "16384", "--vocab", "128256"]) + others, 40, env)
    steps.run("bench_xent small vocabularies",
              bench + tiny + ["--append", "--dtypes", "bf16"] + small + others + ["--sweep"]
              + tile_sweep, 60, env)

    # 6. The linear + cross-entropy benchmark.
    shape = "4,16,100" if dry else "8192,2304,256000"
    steps.run("bench_linear", [py, os.path.join(BENCH, "bench_linear.py"), *tiny[:1],
                               "--dtypes", "bf16", "--shapes", shape, "--out", linear_csv]
              + (["--providers", "triton_xent", "torch"] if dry else []), 45, env)

    # 7. Distillation: both ops, the naive PyTorch losses and Liger's JSD.
    # Dry run: one divergence and our provider against torch's, --quick (a fresh process per
    # measurement costs seconds of imports on a CPU; the plumbing is the same).
    distill = ["--quick", "--shapes", "4,0,100", "4,16,100", "--divergences", "jsd",
               "--providers", "triton_xent", "torch"] if dry else [
        "--shapes", "8192,0,128256", "8192,4096,128256", "--divergences", "forward_kl", "jsd"]
    steps.run("bench_distill", [py, os.path.join(BENCH, "bench_distill.py"), "--dtypes", "bf16",
                                *distill, "--out",
                                os.path.join(args.out_dir, f"{slug}-distill.csv")], 60, env)

    # 8. Plots.
    csvs = [c for c in (xent_csv, linear_csv) if os.path.exists(c)]
    steps.run("plot", [py, os.path.join(BENCH, "plot.py"), *csvs, "--out-dir", args.out_dir],
              30, env)

    log("\n=== summary")
    for name, status in steps.results:
        log(f"{name:34s} {status}")
    files = sorted(os.listdir(args.out_dir))
    log(f"{len(files)} files in {args.out_dir}: {' '.join(files)}")
    failed = [n for n, s in steps.results if not (s == "ok" or s.startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
