"""Benchmark of cross-entropy on (N, V) logits with class-index targets, mean reduction:
median time of the forward (loss only) and of forward + backward (loss and input gradient),
achieved bandwidth and peak memory, for triton_xent and the other implementations that are
installed. Writes one CSV row per (case, provider, mode); see bench/README.md.

    python bench/bench_xent.py                 # full run (GPU)
    python bench/bench_xent.py --quick         # tiny CPU smoke test of the script
    python bench/bench_xent.py --cpu           # the CPU cases (bench/cpu_report.py runs it)
    python bench/bench_xent.py --small-vocab   # classifier rows: V = 2 .. 1000, N = 2^20
    python bench/bench_xent.py --sweep         # also triton_xent with config values changed
    python bench/bench_xent.py --cases bf16,16384,128256 fp32,16384,128256   # these cases only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Unavailable  # noqa: E402

# triton_xent_entropy: the same loss with return_entropy=True, the entropy's statistic in the
# same pass (issue 13's overhead goal: under 5% over triton_xent at N=16384, V=128256, bf16).
PROVIDERS = ("triton_xent", "triton_xent_entropy", "torch", "torch_compile", "liger", "quack")
INPLACE = "triton_xent_inplace"  # triton_xent with inplace_backward=True (fwd_bwd only)
QUICK_PROVIDERS = ("triton_xent", "torch")  # torch_compile: seconds of C++ compile per shape
# --cpu: the CPU fallback beside F.cross_entropy, (dtype, N, V) with 256 MiB of logits each.
CPU_PROVIDERS = ("triton_xent", INPLACE, "torch")
CPU_CASES = (("float32", 2048, 32000), ("bfloat16", 4096, 32000),
             ("float32", 512, 128256), ("bfloat16", 1024, 128256))
CPU_QUICK_CASES = (("float32", 64, 1000), ("bfloat16", 64, 4099))
CPU_BUDGET_S = 3.0  # seconds of timing per measurement with --cpu (at least 3 calls)
MODES = ("fwd", "fwd_bwd")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp32": torch.float32}
VOCAB = (32000, 50304, 128256, 151936, 256000)
TOKENS = (4096, 16384)
QUICK_VOCAB = (1000, 3001)  # odd, within one slice: the interpreter runs split rows slowly
QUICK_TOKENS = (16,)
# --small-vocab: an image classifier's rows, many and short.
SMALL_VOCAB = (2, 10, 100, 1000)
SMALL_TOKENS = (1 << 20,)

# Extra memory a provider needs beyond the logits, in units of the logits' size (N*V*elem),
# used to skip what would not fit before allocating anything. Estimates from what each one
# allocates: eager torch keeps log_softmax's output, builds a dense grad for it in backward
# and then the input gradient; triton_xent and quack write one gradient; liger writes the
# gradient into the logits.
WORKSPACE = {
    "triton_xent": {"fwd": 0, "fwd_bwd": 1},
    "triton_xent_entropy": {"fwd": 0, "fwd_bwd": 1},
    INPLACE: {"fwd": 0, "fwd_bwd": 0},
    "torch": {"fwd": 1, "fwd_bwd": 3},
    "torch_compile": {"fwd": 1, "fwd_bwd": 2},
    "liger": {"fwd": 0, "fwd_bwd": 0},
    "quack": {"fwd": 0, "fwd_bwd": 1},
}
# Fixed headroom: do_bench's 256 MB L2-flush buffer, small per-row tensors, the allocator.
HEADROOM_BYTES = 1 << 30

# Loss (relative) and gradient (relative to its largest entry) tolerances of the check that
# precedes the timing. bf16 losses are rounded to 8 bits of mantissa by most providers.
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
GRAD_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
CHECK_ROWS = 16  # gradient rows compared with the reference


@dataclass
class Provider:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> mean loss
    new_case: Callable[[], None] = lambda: None  # called before each case (torch_compile)
    modes: tuple[str, ...] = MODES  # the modes it is measured in


def make_provider(name: str, device: torch.device) -> Provider:
    """The provider's loss function, or Unavailable with the reason."""
    if name in ("triton_xent", INPLACE, "triton_xent_entropy"):
        import triton_xent

        if device.type == "cuda" and not triton_xent.triton_available():
            raise Unavailable("triton is not installed: triton_xent would run its PyTorch "
                              "fallback, not its kernels")
        if name == INPLACE:
            # The gradient is written into the logits: after the check call the timed calls
            # run on overwritten logits (as liger's); the forward alone is triton_xent's.
            return Provider(name, lambda x, t: triton_xent.cross_entropy(
                x, t, inplace_backward=True), modes=("fwd_bwd",))
        if name == "triton_xent_entropy":
            return Provider(name, lambda x, t: triton_xent.cross_entropy(
                x, t, return_entropy=True).loss)
        return Provider(name, lambda x, t: triton_xent.cross_entropy(x, t))
    if name == "torch":
        return Provider(name, lambda x, t: F.cross_entropy(x, t))
    if name == "torch_compile":
        import torch._dynamo

        # dynamic=False: one static graph per shape, as a training loop with fixed shapes gets.
        # The dynamo cache is reset before each case so the recompile limit is never reached
        # (past it torch.compile would silently run eager code).
        compiled = torch.compile(F.cross_entropy, dynamic=False)
        return Provider(name, lambda x, t: compiled(x, t), new_case=torch._dynamo.reset)
    if name == "liger":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except Exception as e:  # ImportError, or its Triton kernels failing to load
            raise Unavailable(f"liger-kernel is not importable ({type(e).__name__}: {e})") \
                from None
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("liger's Triton kernels need a GPU (or TRITON_INTERPRET=1)")
        # Note: with a gradient, liger writes it into the logits during the forward.
        return Provider(name, lambda x, t: liger_cross_entropy(x, t))
    if name == "quack":
        try:
            from quack.cross_entropy import cross_entropy as quack_ce
        except Exception as e:  # ImportError, or its CUDA DSL failing to load
            raise Unavailable(f"quack is not importable ({type(e).__name__}: {e})") from None
        if device.type != "cuda":
            raise Unavailable("quack's kernels need a CUDA GPU")
        if "reduction" in inspect.signature(quack_ce).parameters:
            return Provider(name, lambda x, t: quack_ce(x, t, reduction="mean"))
        # Older quack returns per-row losses; their mean is the mean reduction (no ignores).
        return Provider(name, lambda x, t: quack_ce(x, t).mean())
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS + (INPLACE,)}")


# --- config sweep (--sweep) -------------------------------------------------------------------

# triton_xent with triton_xent/config.py values overridden, one provider each, named
# "triton_xent[<name>]" in the CSV: the candidates for the values config.py marks "not yet
# measured" (slice width and warps of split rows, persistent or not, the exchange's wait,
# whole-row tile size), and the three long-row paths side by side: "exchange" (which still
# takes "two_pass" on a device too small for a row's slices, see config.py), "two_pass"
# and "sweep" (its own knobs: bench/gpu_tune.py searches them); the first two also with
# slices of 16384 columns at 32 warps (32 KB of bf16 a program). The slice and persistent
# variants name the exchange, as they did when the H200 measured them (2026-12-04), when
# the exchange was the default.
# spin0 makes every early slice wait for the finish launch: its cost.
SWEEP = {
    "exchange": dict(LONG_ROWS="exchange"),
    "two_pass": dict(LONG_ROWS="two_pass"),
    "sweep": dict(LONG_ROWS="sweep"),
    "exchange_s16384_w32": dict(LONG_ROWS="exchange", ROW_SLICE_MAX_V=16384,
                                SPLIT_NUM_WARPS=32),
    "two_pass_s16384_w32": dict(LONG_ROWS="two_pass", ROW_SLICE_MAX_V=16384,
                                SPLIT_NUM_WARPS=32),
    "slice8192_w16": dict(ROW_SLICE_MAX_V=8192, SPLIT_NUM_WARPS=16, LONG_ROWS="exchange"),
    "slice4096_w8": dict(ROW_SLICE_MAX_V=4096, SPLIT_NUM_WARPS=8, LONG_ROWS="exchange"),
    "slice2048_w4": dict(ROW_SLICE_MAX_V=2048, SPLIT_NUM_WARPS=4, LONG_ROWS="exchange"),
    "slice2048_w8": dict(ROW_SLICE_MAX_V=2048, SPLIT_NUM_WARPS=8, LONG_ROWS="exchange"),
    "persistent2": dict(PERSISTENT=True, PERSISTENT_PROGRAMS_PER_SM=2, LONG_ROWS="exchange"),
    "persistent4": dict(PERSISTENT=True, PERSISTENT_PROGRAMS_PER_SM=4, LONG_ROWS="exchange"),
    "spin1k": dict(SLICE_SPIN_LIMIT=1 << 10, LONG_ROWS="exchange"),
    "spin0": dict(SLICE_SPIN_LIMIT=0, LONG_ROWS="exchange"),
    "wait5us": dict(SLICE_WAIT_NS=5_000, LONG_ROWS="exchange"),
    "wait100us": dict(SLICE_WAIT_NS=100_000, LONG_ROWS="exchange"),
    "tile1024": dict(ROWS_TILE_ELEMENTS=1024),
    "tile4096": dict(ROWS_TILE_ELEMENTS=4096),
}


@contextlib.contextmanager
def config_values(values: dict):
    """triton_xent.config with `values` set, restored on exit."""
    from triton_xent import config

    saved = {k: getattr(config, k) for k in values}  # AttributeError names a stale entry
    try:
        for k, v in values.items():
            setattr(config, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def sweep_provider(variant: str, device: torch.device) -> Provider:
    """triton_xent under SWEEP[variant]; the values are read when the kernels launch, all in
    the forward (the backward only scales the saved gradient)."""
    values = SWEEP[variant]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("config variants need the Triton kernels (a GPU or "
                          "TRITON_INTERPRET=1); here triton_xent runs its PyTorch fallback")
    import triton_xent

    def fn(x, t):
        with config_values(values):
            return triton_xent.cross_entropy(x, t)
    return Provider(f"triton_xent[{variant}]", fn)


def base_provider(name: str) -> str:
    """'triton_xent[persistent2]' -> 'triton_xent'."""
    return name.split("[", 1)[0]


# --- inputs and the reference ---------------------------------------------------------------

def make_inputs(N: int, V: int, dtype: torch.dtype, device: torch.device, *,
                requires_grad: bool, seed: int = 0):
    """The case's logits (N, V) ~ N(0, 1) and uniform random class targets (N,); the same
    values on every call, so each provider and mode gets fresh but identical inputs."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, V, dtype=dtype, device=device, generator=g)
    t = torch.randint(0, V, (N,), device=device, generator=g)
    return x.requires_grad_(requires_grad), t


def reference(x: torch.Tensor, t: torch.Tensor):
    """(mean loss, gradient of the first CHECK_ROWS rows), from F.cross_entropy in float32
    over chunks of rows (about 256 MB of float32 each), so a large case needs no full copy."""
    N, V = x.shape
    chunk = max(1, (1 << 26) // V)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, N, chunk):
        total += F.cross_entropy(x[i:i + chunk].float(), t[i:i + chunk], reduction="sum")
    r = min(N, CHECK_ROWS)
    grad = torch.softmax(x[:r].float(), dim=-1)
    grad[torch.arange(r, device=x.device), t[:r]] -= 1.0
    return float(total) / N, grad / N


def check(provider: Provider, mode: str, x, t, ref) -> str | None:
    """Runs the provider once (its warm-up) and returns why its result is wrong, or None."""
    ref_loss, ref_grad = ref
    if mode == "fwd":
        with torch.no_grad():
            loss = provider.fn(x, t)
    else:
        loss = provider.fn(x, t)
        loss.backward()
    if loss.dim() != 0:
        return f"loss has shape {tuple(loss.shape)}, expected a scalar"
    tol = TOL[x.dtype]
    value = float(loss.detach())
    if not abs(value - ref_loss) <= tol * max(1.0, abs(ref_loss)):
        return f"loss {value:.6g} differs from F.cross_entropy's {ref_loss:.6g}"
    if mode == "fwd_bwd":
        if x.grad is None or x.grad.shape != x.shape:
            return "no input gradient of the logits' shape"
        grad = x.grad[:ref_grad.shape[0]].float()
        err = float((grad - ref_grad).abs().max())
        if not err <= GRAD_TOL[x.dtype] * float(ref_grad.abs().max()):
            return f"gradient differs from F.cross_entropy's (max abs error {err:.3g})"
        x.grad = None
    return None


# --- one measurement ------------------------------------------------------------------------

def measure(provider: Provider, mode: str, N: int, V: int, dtype: torch.dtype,
            device: torch.device, ref, cpu_budget_s: float, cpu_min_calls: int = 3):
    """(median ms, peak MB or None) of one provider and mode on fresh inputs; None, with a
    printed message, when the provider is skipped for this case. cpu_*: common.median_ms's."""
    label = f"{provider.name} {mode} {dtype_name(dtype)} N={N} V={V}"
    elem = torch.finfo(dtype).bits // 8
    need = N * V * elem * (1 + WORKSPACE[base_provider(provider.name)][mode]) + HEADROOM_BYTES
    free = common.free_bytes(device)
    if need > free:
        print(f"  skip {label}: needs about {need / common.GB:.1f} GB, "
              f"{free / common.GB:.1f} GB free")
        return None
    x = t = grads = None
    try:
        x, t = make_inputs(N, V, dtype, device, requires_grad=mode == "fwd_bwd")
        problem = check(provider, mode, x, t, ref)
        if problem is not None:
            print(f"  skip {label}: wrong result, {problem}")
            return None
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    return provider.fn(x, t)
        else:
            def step():
                provider.fn(x, t).backward()
        grads = [x] if mode == "fwd_bwd" else None
        # check() ran the provider once on these inputs: that was the warm-up (compilation).
        ms = common.median_ms(step, device, grad_to_none=grads, cpu_budget_s=cpu_budget_s,
                              cpu_min_calls=cpu_min_calls, warmup=False)
        peak = common.peak_mem_mb(step, device, grad_to_none=grads)
        return ms, peak
    except Exception as e:  # a provider that cannot run this case (OOM, unsupported shape)
        print(f"  skip {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    finally:
        x = t = grads = None  # also empties the closure `step`
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- command line ---------------------------------------------------------------------------

def _case(text: str) -> tuple[str, int, int]:
    """'bf16,16384,128256' -> ('bf16', 16384, 128256)."""
    try:
        dtype, n, v = text.split(",")
        n, v = int(n), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DTYPE,N,V (e.g. bf16,16384,128256), got "
                                         f"{text!r}") from None
    if dtype not in DTYPES or min(n, v) < 1:
        raise argparse.ArgumentTypeError(f"DTYPE must be one of {', '.join(DTYPES)} and N, V "
                                         f">= 1, got {text!r}")
    return dtype, n, v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke-test cases: N={QUICK_TOKENS}, V={QUICK_VOCAB}, providers "
                        f"{QUICK_PROVIDERS}, short CPU timing (flags below still override)")
    p.add_argument("--cpu", action="store_true",
                   help=f"the CPU cases (dtype, N, V) {CPU_CASES} (with --quick: "
                        f"{CPU_QUICK_CASES}), providers {CPU_PROVIDERS}, {CPU_BUDGET_S} s "
                        "of timing per measurement (--quick: 0.2 s); --dtypes, --vocab and "
                        "--tokens do not apply")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS + (INPLACE,),
                   help=f"default: all but {INPLACE} (--cpu: {CPU_PROVIDERS})")
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32", "bf16", "fp32"),
                   help="default: bfloat16 float32")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: fwd fwd_bwd")
    p.add_argument("--vocab", nargs="+", type=int, help=f"V values; default {VOCAB}")
    p.add_argument("--tokens", nargs="+", type=int, help=f"N values; default {TOKENS}")
    p.add_argument("--cases", nargs="+", type=_case, metavar="DTYPE,N,V",
                   help="exactly these cases, in this order, instead of the product of "
                        "--dtypes, --tokens and --vocab (which it excludes)")
    p.add_argument("--rep-ms", type=float, default=common.DO_BENCH_REP_MS,
                   help="triton.testing.do_bench's timed milliseconds per measurement on a "
                        f"GPU (default {common.DO_BENCH_REP_MS}; at least one timed call)")
    p.add_argument("--small-vocab", action="store_true",
                   help=f"classifier cases: V={SMALL_VOCAB}, N={SMALL_TOKENS} (--vocab and "
                        "--tokens still override)")
    p.add_argument("--sweep", nargs="*", choices=SWEEP, metavar="VARIANT",
                   help="also time triton_xent with config values overridden (bare: every "
                        f"variant): {', '.join(SWEEP)}")
    p.add_argument("--out", help="CSV path; default bench/results/<device-slug>[-cpu][-quick].csv")
    p.add_argument("--append", action="store_true",
                   help="add rows to an existing --out CSV instead of overwriting it")
    args = p.parse_args(argv)
    args.sweep = list(SWEEP) if args.sweep == [] else (args.sweep or [])
    if args.cases and (args.dtypes or args.vocab or args.tokens or args.small_vocab):
        p.error("--cases names the cases: no --dtypes, --vocab, --tokens or --small-vocab")
    if args.cpu:
        if args.dtypes or args.vocab or args.tokens or args.cases:
            p.error("--cpu has its own cases: no --dtypes, --vocab, --tokens or --cases")
        args.cases = [(DTYPES[d], n, v) for d, n, v in
                      (CPU_QUICK_CASES if args.quick else CPU_CASES)]
        args.providers = args.providers or CPU_PROVIDERS
        args.modes = args.modes or MODES
        return args
    args.providers = args.providers or (QUICK_PROVIDERS if args.quick else PROVIDERS)
    args.modes = args.modes or MODES
    if args.cases:
        args.cases = [(DTYPES[d], N, V) for d, N, V in args.cases]
        return args
    args.dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtypes or ("bfloat16", "float32"))]
    args.vocab = args.vocab or (SMALL_VOCAB if args.small_vocab else
                                QUICK_VOCAB if args.quick else VOCAB)
    args.tokens = args.tokens or (SMALL_TOKENS if args.small_vocab else
                                  QUICK_TOKENS if args.quick else TOKENS)
    args.cases = [(dtype, N, V) for dtype in args.dtypes for N in args.tokens
                  for V in args.vocab]
    return args


def default_out(device: torch.device, quick: bool) -> str:
    name = common.slug(common.device_name(device))
    name += "-cpu" if device.type == "cpu" else ""
    name += "-quick" if quick else ""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".csv")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = common.run_info(device)
    out = args.out or default_out(device, args.quick)
    common.announce(info, device, out, args.providers)

    providers = common.available_providers(args.providers,
                                           lambda name: make_provider(name, device))
    variants = dict((f"triton_xent[{v}]", v) for v in args.sweep)
    providers += common.available_providers(variants,
                                            lambda name: sweep_provider(variants[name], device))

    cpu_budget_s = 0.2 if args.quick else (CPU_BUDGET_S if args.cpu else 1.0)
    cpu_min_calls = 1 if args.quick else 3  # --quick: the script's smoke test, not a timing
    common.DO_BENCH_REP_MS = args.rep_ms  # read by common.median_ms on each measurement
    if device.type == "cuda":
        print(f"do_bench: warmup {common.DO_BENCH_WARMUP_MS} ms, rep {args.rep_ms:g} ms")
    copy = common.run_copy_gbps(device, quick=args.quick, cpu_budget_s=cpu_budget_s)

    rows = 0
    with common.CsvWriter(out, append=args.append) as writer:
        for dtype, N, V in args.cases:
            elem = torch.finfo(dtype).bits // 8
            case = f"{dtype_name(dtype)} N={N} V={V}"
            # Floor of any fwd_bwd: the logits and one gradient, plus headroom.
            need = 2 * N * V * elem + HEADROOM_BYTES
            free = common.free_bytes(device)
            if need > free:
                print(f"skip case {case}: needs about {need / common.GB:.1f} GB, "
                      f"{free / common.GB:.1f} GB free")
                continue
            print(f"case {case}")
            x, t = make_inputs(N, V, dtype, device, requires_grad=False)
            ref = reference(x, t)
            del x, t
            for provider in providers:
                provider.new_case()
                for mode in args.modes:
                    if mode not in provider.modes:
                        continue
                    result = measure(provider, mode, N, V, dtype, device, ref, cpu_budget_s,
                                     cpu_min_calls)
                    if result is None:
                        continue
                    ms, peak = result
                    # Bytes of the floor: fwd reads the logits once (N*V*elem); fwd_bwd
                    # also writes the gradient once (2*N*V*elem).
                    nbytes = N * V * elem * (1 if mode == "fwd" else 2)
                    gbps = nbytes / (ms * 1e-3) / common.GB
                    writer.write(**info, op="cross_entropy", provider=provider.name,
                                 mode=mode, dtype=dtype_name(dtype), N=N, V=V, D=0, ms=ms,
                                 gbps=gbps, copy_gbps=copy, peak_mem_mb=peak)
                    rows += 1
                    mem = f"{peak:.1f} MB" if peak is not None else "-"
                    print(f"  {provider.name:19s} {mode:7s} {ms:10.4f} ms "
                          f"{gbps:8.1f} GB/s  peak {mem}")
    print(f"wrote {rows} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
