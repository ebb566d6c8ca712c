"""Benchmark of fused linear + cross-entropy, loss = cross_entropy(x @ W.T, t) with x (N, D),
W (V, D), class-index targets and mean reduction: median time of forward + backward (the loss,
then the gradients of x and W) and peak memory above the inputs, for triton_xent and the other
implementations that are installed, with three plain matmuls of the same shapes as the time
floor. Writes one CSV row per (case, provider, mode), bench_xent.py's columns with
op = linear_cross_entropy and D filled in; see bench/README.md.

    python bench/bench_linear.py               # full run (GPU)
    python bench/bench_linear.py --quick       # tiny CPU smoke test of the script
    python bench/bench_linear.py --cpu         # the CPU cases (bench/cpu_report.py runs it)
    python bench/bench_linear.py --variants    # also the chunk driver's choices (VARIANTS)
    python bench/bench_linear.py --tune        # the linear step of gpu_tune.py (tune_step)
    python bench/bench_linear.py --tune --dry-run   # the same on tiny shapes, CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_xent import (  # noqa: E402  (same conventions as the cross-entropy benchmark)
    DTYPES, GRAD_TOL, HEADROOM_BYTES, TOL, config_values, dtype_name)
from common import Unavailable  # noqa: E402
from bench_xent import default_out as _xent_default_out  # noqa: E402

OP = "linear_cross_entropy"
FLOOR = "matmul_floor"  # not a loss: the three GEMMs alone, see measure_floor
PROVIDERS = ("triton_xent", "torch", "torch_chunked", "cce", "cce_exact", "liger")
QUICK_PROVIDERS = ("triton_xent", "torch", "torch_chunked")
MODES = ("fwd", "fwd_bwd")
# (N, D, V): Gemma-2 2B's head on 8192 tokens (the Cut Cross-Entropy paper's table) and
# Llama-3 8B's on as many (issue 24's two cases).
CASES = ((8192, 2304, 256000), (8192, 4096, 128256))
QUICK_CASES = ((16, 37, 1000), (16, 37, 3001))  # odd D and V: the kernels' masked edges
# --cpu: fp32, fwd_bwd, beside torch's chunked and unfused ops; (N, D, V) of the CPU
# case and a 128k vocabulary (Llama 3's) with as many logits as 4096 x 32000.
CPU_CASES = ((4096, 512, 32000), (1024, 512, 128256))
CPU_QUICK_CASES = ((64, 32, 1000),)
CPU_PROVIDERS = ("triton_xent", "torch", "torch_chunked")
CPU_BUDGET_S = 3.0  # seconds of timing per measurement with --cpu (at least 3 calls)
CHECK_ROWS = 16  # rows of d_x compared with the reference (and as many classes of d_W)

# --- the chunk driver's choices (--variants, --tune) ---------------------------------------

# triton_xent with values of triton_xent/config.py (and its accum_dtype argument) set while
# it runs, one provider each, named "triton_xent[<name>]": the choices of the chunk driver
# (chunks.py) that config.py marks "not yet measured". Everything is read in the forward
# call (for "mean" the gradients are computed there; backward only scales them). The plain
# "triton_xent" row of the same run is the default configuration.
VARIANTS = {
    # "rows": row chunks, d_W accumulated over them in float32; rows per chunk on a GPU
    "rows512": dict(config=dict(LINEAR_GPU_CHUNK_ROWS=512)),
    "rows1024": dict(config=dict(LINEAR_GPU_CHUNK_ROWS=1024)),
    "rows2048": dict(config=dict(LINEAR_GPU_CHUNK_ROWS=2048)),
    # the first GPU run's accumulation: a float32 product per chunk, then an add
    "mm_add": dict(config=dict(LINEAR_FUSED_ACCUMULATE=False)),
    # d_W accumulated over the chunks in bf16 (cuBLAS's beta = 1 in float32, rounded per
    # chunk), as Liger and torch's chunked op do: no float32 (V, D) buffer
    "acc_bf16": dict(accum_dtype=torch.bfloat16),
    "acc_bf16_rows1024": dict(accum_dtype=torch.bfloat16,
                              config=dict(LINEAR_GPU_CHUNK_ROWS=1024)),
    # "vocab": blocks of classes over all rows, 4 GEMMs, no (V, D) accumulator; the block's
    # bytes (B = 2048, 4096, 8192 classes for 8192 bf16 rows)
    "vocab32M": dict(config=dict(LINEAR_SCHEDULE=dict(cuda="vocab", cpu="vocab"),
                                 LINEAR_VOCAB_BLOCK_BYTES=32 << 20)),
    "vocab64M": dict(config=dict(LINEAR_SCHEDULE=dict(cuda="vocab", cpu="vocab"),
                                 LINEAR_VOCAB_BLOCK_BYTES=64 << 20)),
    "vocab128M": dict(config=dict(LINEAR_SCHEDULE=dict(cuda="vocab", cpu="vocab"),
                                  LINEAR_VOCAB_BLOCK_BYTES=128 << 20)),
}
# What each variant is a candidate for, once measured (tune_step prints it for the fastest).
VARIANT_SETTINGS = {
    "rows512": "LINEAR_GPU_CHUNK_ROWS = 512",
    "rows1024": "LINEAR_GPU_CHUNK_ROWS = 1024",
    "rows2048": "LINEAR_GPU_CHUNK_ROWS = 2048",
    "mm_add": "LINEAR_FUSED_ACCUMULATE = False",
    "acc_bf16": "(accum_dtype=torch.bfloat16 is the caller's choice: see its accuracy)",
    "acc_bf16_rows1024": "(accum_dtype=torch.bfloat16 with LINEAR_GPU_CHUNK_ROWS = 1024)",
    "vocab32M": 'LINEAR_SCHEDULE["cuda"] = "vocab", LINEAR_VOCAB_BLOCK_BYTES = 32 << 20',
    "vocab64M": 'LINEAR_SCHEDULE["cuda"] = "vocab", LINEAR_VOCAB_BLOCK_BYTES = 64 << 20',
    "vocab128M": 'LINEAR_SCHEDULE["cuda"] = "vocab", LINEAR_VOCAB_BLOCK_BYTES = 128 << 20',
}


def variant_provider(variant: str, device: torch.device, backend: str = "auto") -> Provider:
    """triton_xent under VARIANTS[variant], named triton_xent[<variant>]."""
    spec = VARIANTS[variant]
    make_provider("triton_xent", device)  # raises Unavailable where triton_xent is
    import triton_xent

    kwargs = {k: v for k, v in spec.items() if k != "config"}
    kwargs["backend"] = backend

    def fn(x, w, t):
        with config_values(spec.get("config", {})):
            return triton_xent.linear_cross_entropy(x, w, t, **kwargs)
    return Provider(f"triton_xent[{variant}]", fn)


def base_provider(name: str) -> str:
    """'triton_xent[rows1024]' -> 'triton_xent'."""
    return name.split("[", 1)[0]


# torch_chunked: torch's F.linear_cross_entropy falls back to its unfused reference path, with
# this warning, for options it does not support; such a run is not the chunked op.
TORCH_FALLBACK_WARNING = "``options`` ignored"


class WrongResult(Exception):
    """A provider whose result disagrees with the float32 reference."""


@dataclass
class Provider:
    name: str
    fn: Callable  # (x (N, D), W (V, D), t (N,)) -> mean loss, differentiable in x and W
    reject_warning: str | None = None  # a warning that means "this is not the provider"


def make_provider(name: str, device: torch.device, backend: str = "auto") -> Provider:
    """The provider's loss function, or Unavailable with the reason. `backend`: triton_xent's
    (tune_step's dry run takes "torch": the chunk driver without interpreted kernels)."""
    if name == "triton_xent":
        import triton_xent

        if device.type == "cuda" and not triton_xent.triton_available():
            raise Unavailable("triton is not installed: triton_xent would run its PyTorch "
                              "fallback, not its kernels")
        return Provider(name, lambda x, w, t: triton_xent.linear_cross_entropy(
            x, w, t, backend=backend))
    if name == "torch":
        # Unfused: the (N, V) logits in the input dtype, then F.cross_entropy on them.
        return Provider(name, lambda x, w, t: F.cross_entropy(x @ w.T, t))
    if name == "torch_chunked":
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if not hasattr(F, "linear_cross_entropy") or options_cls is None:
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy with "
                              "LinearCrossEntropyOptions (torch >= 2.13)")
        # options=None would be the unfused reference path; LinearCrossEntropyOptions() is
        # the chunked op with its "auto" chunking and accumulation policy for the device.
        options = options_cls()
        return Provider(name, lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options),
                        reject_warning=TORCH_FALLBACK_WARNING)
    if name in ("cce", "cce_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except Exception as e:  # ImportError, or its Triton kernels failing to load
            raise Unavailable(f"cut-cross-entropy is not importable "
                              f"({type(e).__name__}: {e})") from None
        if device.type != "cuda":
            raise Unavailable("Cut Cross-Entropy's Triton kernels need a CUDA GPU")
        if name == "cce":  # its defaults: gradient filtering, filter_eps="high"
            return Provider(name, lambda x, w, t: cce_lce(x, w, t))
        # filter_eps=None: no gradient block is skipped, the same computation as the others.
        return Provider(name, lambda x, w, t: cce_lce(x, w, t, filter_eps=None))
    if name == "liger":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as e:
            raise Unavailable(f"liger-kernel is not importable ({type(e).__name__}: {e})") \
                from None
        if device.type != "cuda":
            raise Unavailable("liger's fused linear cross-entropy needs a CUDA GPU")
        # Its defaults: accum_dtype=None, i.e. d_W accumulated over chunks in W's dtype.
        return Provider(name, lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t))
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS + (FLOOR,)}")


# --- memory estimates ----------------------------------------------------------------------

def extra_bytes(name: str, N: int, D: int, V: int, elem: int) -> int:
    name = base_provider(name)
    """What a provider (or the floor) allocates beyond the inputs x, W, t, in bytes, for
    fwd_bwd (also used for fwd, where it over-estimates): generous estimates from what each
    one keeps, so that a case that cannot fit is skipped before anything is allocated."""
    logits = N * V * elem
    grads = (N + V) * D * elem  # x.grad and W.grad, left alive after the call
    acc = (N + V) * D * 4  # float32 accumulators of d_x and d_W (cast to elem at the end)
    chunk = 2 * N * D * 4  # a chunk of logits about the size of x, in float32 (+ its grad)
    if name == "torch":  # logits, log_softmax's saved output, its grad, the logits' grad
        return 3 * logits + grads
    if name == FLOOR:  # the (N, V) d_logits input, the (N, V) product, d_x and d_W
        return 2 * logits + grads
    if name == "triton_xent":  # + a chunk of logits (at most 2048 rows: the variants) and
        return acc + grads + 3 * max(256 << 20, 2048 * V * elem)  # a float32 temporary
    return acc + grads + chunk  # torch_chunked, cce, cce_exact, liger


# --- inputs and the reference ---------------------------------------------------------------

def make_inputs(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device, *,
                requires_grad: bool, seed: int = 0):
    """x (N, D) ~ N(0, 1), W (V, D) ~ N(0, 1/D) (so the logits are about N(0, 1)) and uniform
    random class targets t (N,); the same values on every call (fresh, identical inputs for
    each provider and mode)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, D, dtype=dtype, device=device, generator=g)
    w = torch.randn(V, D, dtype=dtype, device=device, generator=g).mul_(D ** -0.5)
    t = torch.randint(0, V, (N,), device=device, generator=g)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), t


def reference_bytes(N: int, D: int, V: int) -> int:
    """Memory of reference(): float32 copies of W and x, one 256 MB chunk of float32 logits
    (and its softmax), the (N, 2 * CHECK_ROWS) slice of the d_W reference."""
    return (V + N) * D * 4 + 2 * (1 << 28) + N * 2 * CHECK_ROWS * 4


def reference(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> dict:
    """float32 reference of cross_entropy(x @ w.T, t), mean: the loss over all N rows (row
    chunks of about 256 MB of float32 logits), d_x of the first CHECK_ROWS rows, and d_W of
    `classes`, the first rows' target classes and the first CHECK_ROWS classes (over all
    rows). Everything in float32 from the inputs' values (TF32 off), so the check's tolerance
    only has to cover the provider's rounding."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the reference's GEMMs
    try:
        return _reference(x, w, t)
    finally:
        torch.set_float32_matmul_precision(precision)


def _reference(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> dict:
    N, D = x.shape
    V = w.shape[0]
    wf = w.detach().float()
    xf = x.detach().float()
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    chunk = max(1, (1 << 26) // V)
    for i in range(0, N, chunk):
        logits = xf[i:i + chunk] @ wf.T
        lse[i:i + chunk] = torch.logsumexp(logits, dim=-1)
        total += (lse[i:i + chunk] - logits.gather(1, t[i:i + chunk, None]).squeeze(1)).sum()
        del logits
    r = min(N, CHECK_ROWS)
    p = torch.softmax(xf[:r] @ wf.T, dim=-1)
    p[torch.arange(r, device=x.device), t[:r]] -= 1.0
    d_x = (p @ wf) / N
    del p
    classes = torch.unique(torch.cat([t[:r], torch.arange(min(V, r), device=x.device)]))
    p = torch.exp(xf @ wf[classes].T - lse[:, None])  # (N, K): these classes' softmax
    p -= (t[:, None] == classes[None, :]).float()
    d_w = (p.T @ xf) / N
    return {"loss": float(total) / N, "d_x": d_x, "classes": classes, "d_w": d_w}


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> float | None:
    """The largest absolute error if it exceeds tol * the largest reference entry, else None."""
    err = float((got.float() - ref).abs().max())
    return err if not err <= tol * float(ref.abs().max()) else None


def check(provider: Provider, mode: str, x, w, t, ref) -> None:
    """Runs the provider once on the full case (its warm-up) and raises WrongResult when the
    loss, d_x's first rows or d_W's reference classes disagree with the float32 reference."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "fwd":
            with torch.no_grad():
                loss = provider.fn(x, w, t)
        else:
            loss = provider.fn(x, w, t)
            loss.backward()
    for warning in caught:
        if provider.reject_warning and provider.reject_warning in str(warning.message):
            raise WrongResult(f"it fell back to another path: {warning.message}")
        warnings.showwarning(warning.message, warning.category, warning.filename,
                             warning.lineno)
    if loss.dim() != 0:
        raise WrongResult(f"loss has shape {tuple(loss.shape)}, expected a scalar")
    tol = TOL[x.dtype]
    value = float(loss.detach())
    if not abs(value - ref["loss"]) <= tol * max(1.0, abs(ref["loss"])):
        raise WrongResult(f"loss {value:.6g} differs from the float32 reference's "
                          f"{ref['loss']:.6g}")
    if mode == "fwd_bwd":
        for name, grad, shape in (("x", x.grad, x.shape), ("W", w.grad, w.shape)):
            if grad is None or grad.shape != shape:
                raise WrongResult(f"no gradient of {name}'s shape")
        err = _close(x.grad[:ref["d_x"].shape[0]], ref["d_x"], GRAD_TOL[x.dtype])
        if err is not None:
            raise WrongResult(f"d_x differs from the reference (max abs error {err:.3g})")
        err = _close(w.grad[ref["classes"]], ref["d_w"], GRAD_TOL[x.dtype])
        if err is not None:
            raise WrongResult(f"d_W differs from the reference (max abs error {err:.3g})")
        x.grad = w.grad = None


# --- measurements ---------------------------------------------------------------------------

def _fits(label: str, need: int, device: torch.device) -> bool:
    free = common.free_bytes(device)
    if need > free:
        print(f"  skip {label}: needs about {need / common.GB:.1f} GB, "
              f"{free / common.GB:.1f} GB free")
        return False
    return True


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(provider: Provider, mode: str, N: int, D: int, V: int, dtype: torch.dtype,
            device: torch.device, ref, cpu_budget_s: float):
    """(median ms, peak MB or None) of one provider and mode on fresh inputs; None, with a
    printed message, when the provider is skipped for this case."""
    label = f"{provider.name} {mode} {dtype_name(dtype)} N={N} D={D} V={V}"
    elem = torch.finfo(dtype).bits // 8
    inputs = (N + V) * D * elem + N * 8
    if not _fits(label, inputs + extra_bytes(provider.name, N, D, V, elem) + HEADROOM_BYTES,
                 device):
        return None
    x = w = t = grads = None
    try:
        x, w, t = make_inputs(N, D, V, dtype, device, requires_grad=mode == "fwd_bwd")
        check(provider, mode, x, w, t, ref)
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    return provider.fn(x, w, t)
        else:
            def step():
                provider.fn(x, w, t).backward()
        grads = [x, w] if mode == "fwd_bwd" else None
        # check() ran the provider once on these inputs: that was the warm-up (compilation).
        ms = common.median_ms(step, device, grad_to_none=grads, cpu_budget_s=cpu_budget_s,
                              warmup=False)
        peak = common.peak_mem_mb(step, device, grad_to_none=grads)
        return ms, peak
    except WrongResult as e:
        print(f"  skip {label}: wrong result, {e}")
        return None
    except Exception as e:  # a provider that cannot run this case (OOM, unsupported shape)
        print(f"  skip {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    finally:
        x = w = t = grads = None  # also empties the closure `step`
        _release(device)


def measure_floor(mode: str, N: int, D: int, V: int, dtype: torch.dtype,
                  device: torch.device, cpu_budget_s: float):
    """Median ms of the GEMMs that any implementation must run, timed as one call:
    fwd: x @ W.T (N, V); fwd_bwd: that, d_logits @ W (N, D) and d_logits.T @ x (V, D), with a
    random (N, V) d_logits made beforehand. None, with a message, if it does not fit."""
    label = f"{FLOOR} {mode} {dtype_name(dtype)} N={N} D={D} V={V}"
    elem = torch.finfo(dtype).bits // 8
    need = (N + V) * D * elem + extra_bytes(FLOOR, N, D, V, elem) + HEADROOM_BYTES
    if not _fits(label, need, device):
        return None
    x = w = d_logits = None
    try:
        x, w, _ = make_inputs(N, D, V, dtype, device, requires_grad=False)
        if mode == "fwd":
            def step():
                return x @ w.T
        else:
            d_logits = torch.randn(N, V, dtype=dtype, device=device,
                                   generator=torch.Generator(device=device).manual_seed(1))

            def step():
                return x @ w.T, d_logits @ w, d_logits.T @ x
        return common.median_ms(step, device, cpu_budget_s=cpu_budget_s)
    except Exception as e:
        print(f"  skip {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    finally:
        x = w = d_logits = None
        _release(device)


def counted_bytes(mode: str, N: int, D: int, V: int, elem: int) -> int:
    """The bytes behind gbps: x and W read once (fwd), and d_x and d_W written once (fwd_bwd).
    Targets, the loss and any (N, V) intermediate are not counted."""
    return (N + V) * D * elem * (1 if mode == "fwd" else 2)


def gemm_flops(mode: str, N: int, D: int, V: int) -> int:
    """2*N*D*V per GEMM: one (the logits) in fwd, three in fwd_bwd."""
    return 2 * N * D * V * (1 if mode == "fwd" else 3)


# --- command line ---------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, d, v = (int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,D,V (e.g. 8192,2304,256000), got "
                                         f"{text!r}") from None
    if min(n, d, v) < 1:
        raise argparse.ArgumentTypeError(f"N, D and V must be >= 1, got {text!r}")
    return n, d, v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke-test cases (N, D, V) in {QUICK_CASES}, providers "
                        f"{QUICK_PROVIDERS} and {FLOOR}, both modes, short CPU timing "
                        "(flags below still override); with --tune: its quick form")
    p.add_argument("--cpu", action="store_true",
                   help=f"the CPU cases (N, D, V) {CPU_CASES} (with --quick: "
                        f"{CPU_QUICK_CASES}) in float32, fwd_bwd, providers {CPU_PROVIDERS} "
                        f"and {FLOOR}, {CPU_BUDGET_S} s of timing per measurement")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS + (FLOOR,),
                   help=f"default: all, and {FLOOR}")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, metavar="VARIANT",
                   help="also triton_xent under these chunk-driver choices (all without a "
                        f"name), as providers triton_xent[<variant>]: {', '.join(VARIANTS)}")
    p.add_argument("--tune", action="store_true",
                   help="gpu_tune.py's linear step (tune_step): matmul_floor, triton_xent "
                        "and every variant, bf16 fwd_bwd, at N=8192 and both heads (--quick: "
                        "Gemma 2's only), a ranking per case at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="with --tune: the same step on tiny shapes on a CPU, in seconds")
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32", "bf16", "fp32"),
                   help="default: bfloat16")
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help="default: fwd_bwd (--quick: fwd fwd_bwd)")
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="N,D,V",
                   help=f"cases as N,D,V; default {' '.join(','.join(map(str, c)) for c in CASES)}")
    p.add_argument("--out", help="CSV path; default "
                                 "bench/results/<device-slug>[-cpu][-quick]-linear.csv")
    p.add_argument("--append", action="store_true",
                   help="add rows to an existing --out CSV instead of overwriting it")
    args = p.parse_args(argv)
    if args.dry_run and not args.tune:
        p.error("--dry-run goes with --tune")
    args.variants = list(VARIANTS) if args.variants == [] else (args.variants or [])
    if args.cpu:
        args.providers = args.providers or CPU_PROVIDERS + (FLOOR,)
        args.dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtypes or ("float32",))]
        args.modes = args.modes or ("fwd_bwd",)
        args.shapes = args.shapes or (CPU_QUICK_CASES if args.quick else CPU_CASES)
        return args
    args.providers = args.providers or ((QUICK_PROVIDERS if args.quick else PROVIDERS)
                                        + (FLOOR,))
    args.dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtypes or ("bfloat16",))]
    args.modes = args.modes or (MODES if args.quick else ("fwd_bwd",))
    args.shapes = args.shapes or (QUICK_CASES if args.quick else CASES)
    return args


def default_out(device: torch.device, quick: bool) -> str:
    """bench_xent's default name with '-linear': e.g. bench/results/nvidia-h100-80gb-hbm3-
    linear.csv, bench/results/<cpu>-cpu-quick-linear.csv."""
    return _xent_default_out(device, quick).removesuffix(".csv") + "-linear.csv"


def run_cases(providers: list, floor: bool, shapes, dtypes, modes, device: torch.device,
              writer, info: dict, copy: float, cpu_budget_s: float) -> list[dict]:
    """Measures every (dtype, case, mode) for the floor (if `floor`) and each provider,
    writing one CSV row per measurement; returns the rows written."""
    rows = []

    def write(name, mode, dtype, N, D, V, ms, peak):
        elem = torch.finfo(dtype).bits // 8
        gbps = counted_bytes(mode, N, D, V, elem) / (ms * 1e-3) / common.GB
        row = dict(**info, op=OP, provider=name, mode=mode, dtype=dtype_name(dtype), N=N, V=V,
                   D=D, ms=ms, gbps=gbps, copy_gbps=copy, peak_mem_mb=peak)
        writer.write(**row)
        rows.append(row)
        tflops = gemm_flops(mode, N, D, V) / (ms * 1e-3) / 1e12
        mem = f"{peak:.1f} MB" if peak is not None else "-"
        print(f"  {name:30s} {mode:7s} {ms:10.4f} ms {gbps:8.1f} GB/s "
              f"{tflops:8.2f} TFLOP/s  peak {mem}", flush=True)

    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for N, D, V in shapes:
            case = f"{dtype_name(dtype)} N={N} D={D} V={V}"
            # The inputs and the float32 reference, plus headroom.
            need = (N + V) * D * elem + reference_bytes(N, D, V) + HEADROOM_BYTES
            free = common.free_bytes(device)
            if need > free:
                print(f"skip case {case}: needs about {need / common.GB:.1f} GB, "
                      f"{free / common.GB:.1f} GB free")
                continue
            print(f"case {case}", flush=True)
            x, w, t = make_inputs(N, D, V, dtype, device, requires_grad=False)
            ref = reference(x, w, t)
            del x, w, t
            _release(device)
            for mode in modes:
                if floor:
                    ms = measure_floor(mode, N, D, V, dtype, device, cpu_budget_s)
                    if ms is not None:
                        # A time floor only: its memory (an (N, V) product) is no floor.
                        write(FLOOR, mode, dtype, N, D, V, ms, None)
                for provider in providers:
                    result = measure(provider, mode, N, D, V, dtype, device, ref,
                                     cpu_budget_s)
                    if result is not None:
                        write(provider.name, mode, dtype, N, D, V, *result)
            del ref
            _release(device)
    return rows


# --- gpu_tune.py's linear step ----------------------------------------------------------------

# N = 8192 and both heads of issue 24; --quick: Gemma 2's alone (the larger V, where the
# choices differ most). The dry run: a tiny case that every variant splits into several
# chunks or blocks.
TUNE_CASES = CASES
TUNE_QUICK_CASES = CASES[:1]
TUNE_DRY_CASES = ((300, 37, 3001),)


def tune_step(out_csv: str, quick: bool = False, *, dry_run: bool = False,
              append: bool = True) -> list[dict]:
    """gpu_tune.py's linear step: matmul_floor, triton_xent (the defaults) and triton_xent
    under every VARIANTS entry, bf16, fwd_bwd, at TUNE_CASES (quick: TUNE_QUICK_CASES), each
    row appended to `out_csv` (bench_xent's columns, op = linear_cross_entropy); then, per
    case, the rows ranked by time with their ratio to the floor and their peak memory, and
    the setting of config.py that the fastest variant stands for. Returns the rows.

    On an H200 about 10 s per case (one reference, then per provider one checked call, 0.5 s
    of timing and one call for the peak), a prediction. dry_run: TUNE_DRY_CASES on the CPU
    with short timing and triton_xent's PyTorch backend (the chunk driver is the same; the
    interpreted kernels would take minutes), about 15 s; there the variants that choose GPU
    chunk rows run as the plain row schedule does."""
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    shapes = TUNE_DRY_CASES if dry_run else (TUNE_QUICK_CASES if quick else TUNE_CASES)
    info = common.run_info(device)
    names = ["triton_xent"] + [f"triton_xent[{v}]" for v in VARIANTS]
    common.announce(info, device, out_csv, names + [FLOOR])
    backend = "torch" if dry_run else "auto"
    providers = common.available_providers(
        names, lambda name: (make_provider(name, device, backend) if name == "triton_xent"
                             else variant_provider(name[len("triton_xent["):-1], device,
                                                   backend)))
    cpu_budget_s = 0.02 if dry_run else 1.0
    copy = common.run_copy_gbps(device, quick=True, cpu_budget_s=cpu_budget_s)
    with common.CsvWriter(out_csv, append=append) as writer:
        rows = run_cases(providers, True, shapes, (torch.bfloat16,), ("fwd_bwd",), device,
                         writer, info, copy, cpu_budget_s)
    print_ranking(rows)
    return rows


def print_ranking(rows: list[dict]) -> None:
    """Per case, the rows by time: ms, ratio to the case's matmul_floor, peak MB."""
    cases = {}
    for r in rows:
        cases.setdefault((r["dtype"], r["N"], r["D"], r["V"], r["mode"]), []).append(r)
    for (dtype, N, D, V, mode), case_rows in cases.items():
        floor = next((r["ms"] for r in case_rows if r["provider"] == FLOOR), None)
        print(f"\nranking {dtype} N={N} D={D} V={V} {mode} (floor "
              f"{floor if floor is None else f'{floor:.3f} ms'}):")
        ranked = sorted((r for r in case_rows if r["provider"] != FLOOR), key=lambda r: r["ms"])
        for r in ranked:
            ratio = f"{r['ms'] / floor:.3f}x" if floor else "-"
            mem = f"{r['peak_mem_mb']:.0f} MB" if r["peak_mem_mb"] is not None else "-"
            print(f"  {r['provider']:30s} {r['ms']:10.3f} ms  {ratio:>7s} floor  peak {mem}")
        if ranked:
            best = ranked[0]["provider"]
            variant = best[len("triton_xent["):-1] if best.endswith("]") else None
            setting = VARIANT_SETTINGS.get(variant, "the defaults") if variant else \
                "the defaults"
            print(f"  fastest: {best} -> {setting}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tune:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run
                              else "cpu")
        out = args.out or default_out(device, args.quick or args.dry_run).removesuffix(
            ".csv") + "-tune.csv"
        rows = tune_step(out, args.quick, dry_run=args.dry_run, append=args.append)
        print(f"wrote {len(rows)} rows to {out}")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = common.run_info(device)
    out = args.out or default_out(device, args.quick)
    variants = {f"triton_xent[{v}]": v for v in args.variants}
    common.announce(info, device, out, [*args.providers, *variants])

    providers = common.available_providers([p for p in args.providers if p != FLOOR],
                                           lambda name: make_provider(name, device))
    providers += common.available_providers(
        variants, lambda name: variant_provider(variants[name], device))

    cpu_budget_s = 0.2 if args.quick else (CPU_BUDGET_S if args.cpu else 1.0)
    copy = common.run_copy_gbps(device, quick=args.quick, cpu_budget_s=cpu_budget_s)

    with common.CsvWriter(out, append=args.append) as writer:
        rows = run_cases(providers, FLOOR in args.providers, args.shapes, args.dtypes,
                         args.modes, device, writer, info, copy, cpu_budget_s)
    if variants:
        print_ranking(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
