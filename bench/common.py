"""What every benchmark script of this repository shares: the CSV format (from csvio.py), the
device and version information of a run, timing and peak-memory helpers, and the
device-to-device copy that gives each run its bandwidth ceiling.

Units, everywhere: ms = milliseconds (median), GB = 1e9 bytes, MB = 1e6 bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable

import torch

# The CSV format: csvio.py, without torch for plot.py; the scripts reach it through here.
from csvio import COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, CsvWriter, read_csv  # noqa: F401

try:  # triton is optional on CPU-only installs; do_bench is only needed on CUDA
    import triton
    import triton.testing
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

GB = 1e9  # bytes
MB = 1e6  # bytes

# triton.testing.do_bench budgets, ms. It times max(1, rep / estimated call time) calls:
# 500 ms gives 8 calls of 60 ms (eager float32 fwd_bwd at N=16384, V=256000), 500 of 1 ms.
# A measurement takes about warmup + rep + 8 calls (five to estimate, the first, the check
# and the peak-memory call). median_ms reads DO_BENCH_REP_MS on each call: bench_xent.py's
# and bench_distill.py's --rep-ms set it (bench/gpu_check.py's shorter measurements).
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 500


# --- device and versions ------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name() on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_info(device: torch.device) -> dict:
    """The columns that are the same on every row of one run: device, versions, UTC date."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__ if triton is not None else "",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def announce(info: dict, device: torch.device, out: str, providers: Iterable[str]) -> None:
    """Prints what a run measures and where it writes; on a CPU, what its numbers are."""
    print(f"device: {info['device']} ({device.type}); torch {info['torch']}, "
          f"triton {info['triton'] or '-'}; writing {out}")
    if device.type == "cpu":
        mem = ("peak RSS above the RSS before the call" if cpu_peak_supported()
               else "left empty (no /proc/self/clear_refs here)")
        print(f"note: CPU run; peak_mem_mb: {mem}")
        if "triton_xent" in providers:
            path = ("Triton kernels through the interpreter"
                    if os.environ.get("TRITON_INTERPRET") == "1" else "its PyTorch fallback")
            print(f"note: triton_xent runs {path} on CPU tensors")


def free_bytes(device: torch.device) -> int:
    """Memory that new tensors can still take: free GPU memory (after returning the caching
    allocator's unused blocks), or MemAvailable of the host."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- timing and memory --------------------------------------------------------------------

def _clear_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def median_ms(fn: Callable[[], object], device: torch.device, *,
              grad_to_none: list[torch.Tensor] | None = None,
              cpu_budget_s: float = 1.0, cpu_min_calls: int = 3,
              warmup: bool = True) -> float:
    """Median wall time of fn() in ms, after a warm-up call (warmup=False: the caller has
    already run fn, e.g. to check its result); gradients in `grad_to_none` are
    cleared before every call (outside the timed region) so backward never accumulates.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed before each call), or plain CUDA
    events when triton is missing. CPU: time.perf_counter around each call, at least
    `cpu_min_calls` (3) and at most 100 calls, stopping after about `cpu_budget_s` seconds.
    """
    if warmup:
        _clear_grads(grad_to_none)
        fn()  # compilation, autotuning, allocator caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if triton is not None:
            # do_bench clears grad_to_none only before its timed calls; its estimation and
            # warm-up calls would pile up gradients (one more (N, V) each), so clear them in
            # every call too (freeing a tensor is host-side work only).
            def cleared():
                _clear_grads(grad_to_none)
                return fn()

            return float(triton.testing.do_bench(cleared, warmup=DO_BENCH_WARMUP_MS,
                                                 rep=DO_BENCH_REP_MS,
                                                 grad_to_none=grad_to_none,
                                                 return_mode="median"))
        times = []
        for _ in range(20):
            _clear_grads(grad_to_none)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(times) < 100 and (len(times) < cpu_min_calls or time.perf_counter() < deadline):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    raise OSError(f"no {key} in /proc/self/status")


def cpu_peak_supported() -> bool:
    """Whether this process can reset its peak RSS (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM in /proc/self/status to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
    except OSError:
        return False
    return True


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _release_freed_memory() -> None:
    """Hands memory that is free but still mapped back to the OS (glibc's malloc_trim), so
    the next call's allocations show in RSS instead of reusing pages RSS already counts."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak RSS of one call of fn() above the RSS just before it, in MB (Linux), after
    returning freed memory to the OS and resetting the peak (cpu_peak_supported). What the
    call leaves alive counts. None where the peak cannot be reset."""
    _release_freed_memory()
    if not cpu_peak_supported():
        return None
    before = _proc_status_bytes("VmRSS")
    out = fn()
    peak = _proc_status_bytes("VmHWM")
    del out
    return (peak - before) / MB


def peak_mem_mb(fn: Callable[[], object], device: torch.device, *,
                grad_to_none: list[torch.Tensor] | None = None) -> float | None:
    """Peak memory of one call of fn() above what was allocated just before it (the inputs),
    in MB. CUDA: (torch.cuda.max_memory_allocated() after reset_peak_memory_stats() - the
    memory_allocated() before the call) / 1e6. CPU: cpu_peak_mb, the peak RSS above the RSS
    before the call (None where it cannot be measured). Gradients in `grad_to_none` are
    cleared first; whatever the call leaves behind (the input's .grad after a backward)
    counts."""
    if device.type != "cuda":
        _clear_grads(grad_to_none)
        peak = cpu_peak_mb(fn)
        _clear_grads(grad_to_none)
        return peak
    _clear_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    _clear_grads(grad_to_none)
    return (peak - before) / MB


def copy_gbps(device: torch.device, nbytes: int, *, cpu_budget_s: float = 1.0) -> float:
    """Bandwidth of dst.copy_(src) for two `nbytes` buffers on `device`, in GB/s, counting
    one read and one write: 2 * nbytes / median time / 1e9."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, cpu_budget_s=cpu_budget_s)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / GB  # bytes: n * 4 read + n * 4 written


class Unavailable(Exception):
    """A provider that is not installed or cannot run on this device."""


def available_providers(names: Iterable[str], make: Callable[[str], object]) -> list:
    """make(name) for each name, in order and once; a provider that raises Unavailable is
    left out with a printed 'skip provider' line, never replaced by anything."""
    providers = []
    for name in dict.fromkeys(names):
        try:
            providers.append(make(name))
        except Unavailable as e:
            print(f"skip provider {name}: {e}")
    return providers


def run_copy_gbps(device: torch.device, *, quick: bool, cpu_budget_s: float) -> float:
    """copy_gbps with the buffers a run uses, printed: 1 GiB on a GPU (far past L2), 16 MiB
    (quick) or 256 MiB on CPU, at most a quarter of the free memory."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 24 if quick else 1 << 28)
    nbytes = min(nbytes, free_bytes(device) // 4)
    gbps = copy_gbps(device, nbytes, cpu_budget_s=cpu_budget_s)
    print(f"copy: {nbytes / GB:.3g} GB buffers, {gbps:.1f} GB/s")
    return gbps

