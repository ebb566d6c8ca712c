"""Benchmark of distillation: forward KL, reverse KL and JSD between a student's and a
teacher's distributions at temperature T, from logits (op distill_<divergence>, D = 0) and
from hidden states through both heads (op linear_distill_<divergence>): median time of
forward + backward (the student's gradient) and peak memory above the inputs, for
triton_xent against the naive PyTorch distillation

    F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
             reduction="batchmean")

(and its reverse-KL and JSD twins, below), the linear op against the same on naive (N, V)
logits of both heads, and Liger's JSD and fused linear JSD where they run (a CUDA GPU: its
Triton kernels have no CPU path). For the linear op, matmul_floor times the four GEMMs any
exact implementation runs (both heads' logits, the student's d_x and d_W), and --variants
adds triton_xent under the chunk driver's choices (bench_linear.py's VARIANTS). Every
measurement runs in a fresh process, so that one provider's freed memory never hides
another's peak (peak RSS on a CPU); --in-process measures all in this one (on a GPU the peak
is the caching allocator's count of one call's allocations, which freed memory cannot hide;
on a CPU the peak is then left empty). One CSV row per (case, provider, mode), bench_xent.py's
columns; the goals are checked at the end.

    python bench/bench_distill.py --cpu     # the CPU cases: bench/results/<cpu>-cpu-distill.csv
    python bench/bench_distill.py --quick   # tiny cases: a smoke test of the script
    python bench/bench_distill.py --shapes 8192,0,128256 --dtypes bf16   # a GPU case
    python bench/bench_distill.py --shapes 8192,0,128256 --dtypes bf16 --in-process
    python bench/bench_distill.py --shapes 8192,4096,128256 --dtypes bf16 \
        --providers triton_xent matmul_floor --variants    # the linear op's choices (GPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Unavailable  # noqa: E402

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
PROVIDERS = ("triton_xent", "torch", "liger")
FLOOR = "matmul_floor"  # the linear op only: its GEMMs alone, not a loss
MODES = ("fwd", "fwd_bwd")
TEMPERATURE = 2.0  # any T != 1 (the divisions are part of the work)
BETA = 0.5  # JSD's
# (N, D, V): D = 0 is the op on logits. The case (N=4096, D=512, V=32000) for both
# ops, and a 128k vocabulary (Llama 3's) with a quarter of the rows for the logits op.
CPU_CASES = ((4096, 0, 32000), (1024, 0, 128256), (4096, 512, 32000))
QUICK_CASES = ((64, 0, 1000), (64, 32, 1000))
CPU_BUDGET_S = 3.0  # seconds of timing per measurement (at least 3 calls)
# The goals: peak memory of ours / the naive one's, per op kind (and faster).
MEMORY_GOALS = {"distill": 0.5, "linear_distill": 0.25}
LOSS_RTOL = 1e-4  # ours against the naive loss, float32: a wrong result is reported


# --- the naive PyTorch distillation ---------------------------------------------------------

def naive_loss(s: torch.Tensor, t: torch.Tensor, divergence: str) -> torch.Tensor:
    """The textbook distillation on (N, V) logits: log-softmaxes of both at temperature T,
    then F.kl_div with reduction "batchmean" (JSD: KL of each to the mixture M)."""
    lp_s = F.log_softmax(s / TEMPERATURE, -1)
    lp_t = F.log_softmax(t / TEMPERATURE, -1)
    if divergence == "forward_kl":  # KL(p_t || p_s)
        return F.kl_div(lp_s, lp_t, log_target=True, reduction="batchmean")
    if divergence == "reverse_kl":  # KL(p_s || p_t)
        return F.kl_div(lp_t, lp_s, log_target=True, reduction="batchmean")
    log_m = torch.logaddexp(lp_t + math.log(BETA), lp_s + math.log(1 - BETA))
    return (BETA * F.kl_div(log_m, lp_t, log_target=True, reduction="batchmean")
            + (1 - BETA) * F.kl_div(log_m, lp_s, log_target=True, reduction="batchmean"))


def make_provider(name: str, op: str, divergence: str, device: torch.device) -> Callable:
    """The provider's loss: f(s, t) on logits, f(x, w, tx, tw) through the heads. Unavailable
    with the reason where it cannot run. "triton_xent[<variant>]": triton_xent under
    bench_linear.VARIANTS[variant]'s config values (the linear op only)."""
    linear = op.startswith("linear")
    if name == FLOOR:
        if not linear:
            raise Unavailable("the GEMM floor is the linear op's")
        return floor_gemms
    if name.startswith("triton_xent["):
        from bench_linear import VARIANTS, config_values

        spec = VARIANTS[name[len("triton_xent["):-1]]
        if not linear or set(spec) != {"config"}:
            raise Unavailable("the variants of the chunk driver's config are the linear op's")
        base = make_provider("triton_xent", op, divergence, device)

        def fn(*inputs):
            with config_values(spec["config"]):
                return base(*inputs)
        return fn
    if name == "triton_xent":
        import triton_xent

        if device.type == "cuda" and not triton_xent.triton_available():
            raise Unavailable("triton is not installed: triton_xent would run its PyTorch "
                              "fallback, not its kernels")
        options = dict(divergence=divergence, beta=BETA, temperature=TEMPERATURE)
        if linear:
            return lambda x, w, tx, tw: triton_xent.linear_distillation_loss(x, w, tx, tw,
                                                                             **options)
        return lambda s, t: triton_xent.distillation_loss(s, t, **options)
    if name == "torch":
        if linear:  # both heads' (N, V) logits, then the naive loss
            return lambda x, w, tx, tw: naive_loss(x @ w.T, tx @ tw.T, divergence)
        return lambda s, t: naive_loss(s, t, divergence)
    if name == "liger":
        if divergence != "jsd":
            raise Unavailable("Liger has JSD (and its fused linear form) only here")
        if device.type != "cuda":  # its import itself fails without a Triton driver
            raise Unavailable("Liger's Triton kernels need a CUDA GPU (no CPU path)")
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD
        except Exception as e:
            raise Unavailable(f"liger-kernel is not importable ({type(e).__name__}: {e})") \
                from None
        if linear:  # its temperature divides both heads' logits, as ours
            fused = LigerFusedLinearJSD(jsd_beta=BETA, temperature=TEMPERATURE)
            return lambda x, w, tx, tw: fused(x, w, tx, tw, None)
        jsd = LigerJSD(beta=BETA)  # takes log-probabilities: the log-softmaxes are its input
        return lambda s, t: jsd(F.log_softmax(s / TEMPERATURE, -1),
                                F.log_softmax(t / TEMPERATURE, -1))
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


def make_inputs(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device, *,
                requires_grad: bool, teacher_d: int | None = None):
    """Logits (s, t) (N, V) at scale 3 (D = 0), else hidden states and heads (x (N, D),
    w (V, D), tx (N, Dt), tw (V, Dt)) scaled so the logits have about unit scale; only the
    student's tensors require grad. The same values on every call."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    if D == 0:
        return randn(N, V, scale=3.0).requires_grad_(requires_grad), randn(N, V, scale=3.0)
    dt = teacher_d or D
    return (randn(N, D).requires_grad_(requires_grad),
            randn(V, D, scale=D ** -0.5).requires_grad_(requires_grad),
            randn(N, dt), randn(V, dt, scale=dt ** -0.5))


def floor_gemms(x, w, tx, tw, d_logits=None):
    """The GEMMs of the linear op: both heads' logits (fwd), and with a random (N, V)
    d_logits the student's d_x = d_logits @ W and d_W = d_logits.T @ x (fwd_bwd)."""
    out = (x @ w.T, tx @ tw.T)
    if d_logits is not None:
        out += (d_logits @ w, d_logits.T @ x)
    return out


def measure_one(provider: str, op: str, N: int, D: int, V: int, dtype: torch.dtype,
                mode: str, device: torch.device, cpu_budget_s: float,
                fn: Callable | None = None, cpu_min_calls: int = 3) -> dict:
    """{ms, peak_mem_mb, loss} of one provider, op and mode on fresh inputs (run in a fresh
    process by main, or in main's own with --in-process). matmul_floor: its ms only. fn: the
    loss to measure instead of the named provider's (bench/gpu_tune.py: ours under config
    values). cpu_*: common.median_ms's."""
    divergence = op.split("_distill_")[-1] if op.startswith("linear") else \
        op.removeprefix("distill_")
    if fn is None:
        fn = make_provider(provider, op, divergence, device)
    if provider == FLOOR:
        inputs = make_inputs(N, D, V, dtype, device, requires_grad=False)
        g = torch.Generator(device=device).manual_seed(1)
        d_logits = (torch.randn(N, V, generator=g, device=device).to(dtype)
                    if mode == "fwd_bwd" else None)
        ms = common.median_ms(lambda: fn(*inputs, d_logits), device,
                              cpu_budget_s=cpu_budget_s)
        return dict(ms=ms, peak_mem_mb=None, loss=float("nan"))
    inputs = make_inputs(N, D, V, dtype, device, requires_grad=mode == "fwd_bwd")
    grads = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        def step():
            fn(*inputs).backward()
    with torch.no_grad():
        loss = float(fn(*inputs))  # also the warm-up (compilation, caches)
    ms = common.median_ms(step, device, grad_to_none=grads, cpu_budget_s=cpu_budget_s,
                          cpu_min_calls=cpu_min_calls)
    peak = common.peak_mem_mb(step, device, grad_to_none=grads)
    return dict(ms=ms, peak_mem_mb=peak, loss=loss)


# --- command line ---------------------------------------------------------------------------

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _shape(text: str) -> tuple[int, int, int]:
    N, D, V = (int(v) for v in text.split(","))
    return N, D, V


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU cases (fwd_bwd, float32)")
    p.add_argument("--quick", action="store_true", help="tiny cases: a smoke test")
    p.add_argument("--out", help="CSV path; default bench/results/<device>[-quick]-distill.csv")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                   choices=PROVIDERS + (FLOOR,),
                   help=f"default: {' '.join(PROVIDERS)} ({FLOOR}: the linear op's GEMMs)")
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help="also triton_xent[<variant>] for these of bench_linear.py's VARIANTS "
                        "that only set config values (all of them without a name): the "
                        "linear op's chunk-driver choices")
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    p.add_argument("--modes", nargs="+", default=["fwd_bwd"], choices=MODES)
    p.add_argument("--shapes", nargs="+", type=_shape,
                   help="cases N,D,V (D = 0: the op on logits); default: the CPU cases")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on a CPU (one: the machine may be shared, and many "
                        "small parallel regions suffer most from oversubscribed cores)")
    p.add_argument("--report", metavar="CSV",
                   help="only print the table and the goals of a CSV (its last row per case)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process, not one fresh process each (start-up "
                        "paid once; on a CPU peak_mem_mb is then left empty)")
    p.add_argument("--rep-ms", type=float, default=common.DO_BENCH_REP_MS,
                   help="triton.testing.do_bench's timed milliseconds per measurement on a "
                        f"GPU (default {common.DO_BENCH_REP_MS})")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a JSON measurement, in a child process
    args = p.parse_args(argv)
    if args.variants is not None:
        from bench_linear import VARIANTS

        config_only = [v for v, spec in VARIANTS.items() if set(spec) == {"config"}]
        unknown = set(args.variants) - set(config_only)
        if unknown:
            p.error(f"--variants: choose from {', '.join(config_only)}; got "
                    f"{', '.join(sorted(unknown))}")
        args.providers = args.providers + [f"triton_xent[{v}]"
                                           for v in (args.variants or config_only)]
    return args


def _child(spec: str) -> int:
    """Runs one measurement described by `spec` (JSON) and prints its result as JSON."""
    a = json.loads(spec)
    device = torch.device(a["device"])
    if device.type == "cpu":
        torch.set_num_threads(a["threads"])
    common.DO_BENCH_REP_MS = a["rep_ms"]
    try:
        result = measure_one(a["provider"], a["op"], a["N"], a["D"], a["V"],
                             getattr(torch, a["dtype"]), a["mode"], device, a["budget"])
    except Unavailable as e:
        result = dict(skip=str(e))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _in_this_process(spec: dict) -> dict:
    """measure_one here; a provider that fails (out of memory, say) is a skip, as a crashed
    child is. On a CPU the peak is left empty: earlier measurements' freed pages hide it."""
    device = torch.device(spec["device"])
    try:
        result = measure_one(spec["provider"], spec["op"], spec["N"], spec["D"], spec["V"],
                             getattr(torch, spec["dtype"]), spec["mode"], device,
                             spec["budget"])
    except Exception as e:  # reported as the row's skip reason
        first = str(e).splitlines()[0] if str(e) else ""
        result = dict(skip=f"failed: {type(e).__name__}: {first}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cpu" and "peak_mem_mb" in result:
        result["peak_mem_mb"] = None
    return result


def _in_fresh_process(spec: dict) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # on a CPU: the PyTorch fallback, not interpreted kernels
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                         env=env, capture_output=True, text=True)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(skip=f"failed: {tail}")


def default_out(device: torch.device, quick: bool) -> str:
    name = common.slug(common.device_name(device)) + ("-cpu" if device.type == "cpu" else "")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        name + ("-quick" if quick else "") + "-distill.csv")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return _child(args.one)
    if args.report:
        rows = {(r["op"], r["dtype"], r["N"], r["D"], r["V"], r["mode"], r["provider"]): r
                for r in common.read_csv(args.report)}
        first = next(iter(rows.values()), {})
        print(f"{args.report}: {first.get('device')}, torch {first.get('torch')}, "
              f"{first.get('date')}\n")
        return report(rows, goals=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    info = common.run_info(device)
    out = args.out or default_out(device, args.quick)
    common.announce(info, device, out, args.providers)
    if device.type == "cpu":
        print(f"note: {args.threads} torch thread(s) per measurement, "
              f"{os.cpu_count()} cores", flush=True)
    if args.in_process:
        print("note: every measurement in this process" + (
            "; peak_mem_mb left empty (freed pages would hide a peak RSS)"
            if device.type == "cpu" else ""), flush=True)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
    cases = args.shapes or (QUICK_CASES if args.quick else CPU_CASES)
    budget = 0.2 if args.quick else CPU_BUDGET_S
    common.DO_BENCH_REP_MS = args.rep_ms  # read by common.median_ms on each measurement
    if device.type == "cuda":
        print(f"do_bench: warmup {common.DO_BENCH_WARMUP_MS} ms, rep {args.rep_ms:g} ms")
    copy = common.run_copy_gbps(device, quick=args.quick, cpu_budget_s=budget)
    measure = _in_this_process if args.in_process else _in_fresh_process
    results = {}
    with common.CsvWriter(out, append=args.append) as writer:
        for (N, D, V), dtype in ((case, DTYPES[d]) for d in args.dtypes for case in cases):
            for divergence in args.divergences:
                op = f"linear_distill_{divergence}" if D else f"distill_{divergence}"
                print(f"case {op} {dtype} N={N} D={D} V={V}", flush=True)
                for mode in args.modes:
                    for provider in args.providers:
                        try:  # what cannot run here is skipped without a process
                            make_provider(provider, op, divergence, device)
                        except Unavailable as e:
                            print(f"  skip {provider}: {e}")
                            continue
                        spec = dict(provider=provider, op=op, N=N, D=D, V=V, dtype=dtype,
                                    mode=mode, device=device.type, budget=budget,
                                    threads=args.threads, rep_ms=args.rep_ms)
                        r = measure(spec)
                        if "skip" in r:
                            print(f"  skip {provider}: {r['skip']}")
                            continue
                        results[op, dtype, N, D, V, mode, provider] = r
                        # bytes behind gbps: both logits read (D = 0) or both heads' inputs
                        # read, and the student's gradient written once (fwd_bwd)
                        elem = 2 if dtype == "bfloat16" else 4
                        read = 2 * N * V * elem if D == 0 else 2 * (N + V) * D * elem
                        wrote = (N * V if D == 0 else (N + V) * D) * elem
                        moved = read + (wrote if mode == "fwd_bwd" else 0)
                        writer.write(**info, op=op, provider=provider, mode=mode,
                                     dtype=dtype, N=N, V=V, D=D, ms=r["ms"],
                                     gbps=moved / (r["ms"] * 1e-3) / common.GB,
                                     copy_gbps=copy, peak_mem_mb=r["peak_mem_mb"])
                        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB"
                        print(f"  {provider:24s} {mode:7s} {r['ms']:10.1f} ms  peak {mem}  "
                              f"loss {r['loss']:.6g}", flush=True)
    print(f"wrote {len(results)} rows to {out}\n")
    return report(results, goals=not args.quick)


def report(results: dict, goals: bool) -> int:
    """Prints ours / naive (time and peak memory) per case and, with `goals`, whether the
    issue's goals are met (not for the quick cases, too small to measure anything)."""
    missed = []
    print("| op | dtype | N | D | V | mode | time: naive / ours | peak MB: ours / naive |")
    print("|---|---|---|---|---|---|---|---|")
    for (op, dtype, N, D, V, mode, provider), ours in results.items():
        naive = results.get((op, dtype, N, D, V, mode, "torch"))
        if provider != "triton_xent" or naive is None:
            continue
        label = f"{op} {dtype} N={N} D={D} V={V} {mode}"
        tol = LOSS_RTOL if dtype == "float32" else 2e-2
        if "loss" in ours and not math.isclose(ours["loss"], naive["loss"], rel_tol=tol,
                                               abs_tol=1e-6):
            missed.append(f"{label}: loss {ours['loss']:.7g} != naive {naive['loss']:.7g}")
        speed = naive["ms"] / ours["ms"]
        if speed <= 1.0:
            missed.append(f"{label}: {speed:.2f}x naive's speed")
        mem = "-"
        if ours["peak_mem_mb"] is not None and naive["peak_mem_mb"]:
            ratio = ours["peak_mem_mb"] / naive["peak_mem_mb"]
            mem = f"{ratio:.3f}x ({ours['peak_mem_mb']:.0f} / {naive['peak_mem_mb']:.0f})"
            goal = MEMORY_GOALS["linear_distill" if D else "distill"]
            if ratio > goal:
                missed.append(f"{label}: memory {ratio:.3f}x naive's > {goal}x")
        print(f"| {op} | {dtype} | {N} | {D} | {V} | {mode} | {speed:.2f}x ({naive['ms']:.0f} / "
              f"{ours['ms']:.0f} ms) | {mem} |")
    floors = {key[:6]: r["ms"] for key, r in results.items() if key[6] == FLOOR}
    if floors:  # the linear op's time against its four GEMMs' (issue 24: at most 1.10x)
        print("\n| op | dtype | N | D | V | mode | provider | ms | / matmul_floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, r in results.items():
            if key[:6] in floors and key[6].startswith("triton_xent"):
                print(f"| {' | '.join(map(str, key[:6]))} | {key[6]} | {r['ms']:.2f} | "
                      f"{r['ms'] / floors[key[:6]]:.3f}x |")
    if goals:
        print("\ngoals: " + ("all met" if not missed else
                             "NOT met:\n  " + "\n  ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
