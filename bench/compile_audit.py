"""Static audit of the kernels' compiled code for NVIDIA and AMD GPUs, without a GPU.
Both long-row paths (config.LONG_ROWS) are audited: the "two_pass_*" cases.

Each case calls a launcher of triton_xent/kernels/xent.py (or, for the distill_ cases,
kernels/distill.py, whose student's loads count as `logits_loads`) on CPU tensors of an LM
shape, with the kernels replaced by recorders, so the audit sees exactly the arguments,
constexprs and warps the launcher would launch with. It then specialises them as Triton's JIT does at run
time (an int equal to 1 becomes the constexpr 1; ints divisible by 16 and 16-byte aligned
pointers get the `tt.divisibility` 16 attribute; None becomes a constexpr) and compiles each
launch through the real pipeline for a target (TARGETS: sm_80, sm_90, sm_100, sm_120,
gfx942, gfx950; sm_90 by default): to PTX and a cubin with Triton's bundled ptxas for
NVIDIA, to AMDGCN and a code object for AMD. For every target it reads off:

  compile_s                seconds the compile took on this machine (no cache: a cold start)
  registers, stack_bytes   per thread (cuobjdump; AMD: the VGPRs and the scratch bytes of the
                           code object's metadata); stack or scratch is where spilled
                           registers live

and for the NVIDIA targets whose per-SM limits are in SM_LIMITS (sm_80, sm_90, sm_100), and
from the PTX (every NVIDIA target):

  shared_bytes, programs_per_sm
                           resident programs an SM holds, the least of its limits (on
                           sm_90: 65536 registers allocated per warp in units of 256, 64
                           warps, 32 blocks, 228 KB shared memory with 1 KB reserved per
                           block); `occupancy_limit` names the binding one
  loads, stores            global loads and stores of the PTX by bytes per instruction (16 =
                           ld.global.v4.b32) and `vector_coverage`: the bytes that 16-byte
                           instructions move, over all threads, divided by the bytes of the
                           program's logits tile (1.0: every logit read with vector loads)
  threads_per_row, columns_per_thread, lane_use
                           the layout of the logits tile (from the TTGIR): how many threads
                           share a row, how many adjacent columns each holds, and the share
                           of the loaded lanes that hold a real logit (V / padded width,
                           times replication)
  second_launch_loads      (finish kernel) the fewest global loads on any path of the PTX's
                           control-flow graph from the entry through the deferral flag's
                           load to the exit: what a program that was not deferred reads (1:
                           its flag only)
  timed_wait               (split kernel) whether the wait reads %globaltimer (config.py:
                           SLICE_WAIT_NS); the launcher on CPU tensors says no, so the audit
                           sets it as a launch on an NVIDIA GPU would
  assumed_programs_per_sm  (split kernel) what the launcher's capacity rule assumes of
                           this launch (kernels/xent.py split_programs_per_sm, config.py)
  merge_round_trips        (split kernel) the atomics outside the poll loop plus the basic
                           blocks holding record loads (ld.global.cg): the dependent trips to
                           L2 of a program whose siblings have all arrived; with
                           record_loads_in_loops (record loads inside a loop nested in the
                           grid-stride loop, which would make it grow with P); the LM cases
                           have P = 8, 32 and 63 (V = 32000, 128256, 256000 in slices of
                           4096), so the table shows how it grows with P

and for sm_90, from the SASS (cuobjdump -sass: the order ptxas issues in), on the path one
program takes through one item of work (program_path: a slice, or a row with its sweep
loops run once a block):

  window_bytes             bytes of logits loads (bytes x threads) in flight when the
                           program first waits on one of them, the most over its waits
  bytes_in_flight_per_sm   window_bytes x programs_per_sm: what an SM has asked HBM for
                           when its programs wait (an H200 streams at ~4.2 TB/s x ~1 us /
                           132 SMs = ~32 KB an SM, all the time)
  item_stops, item_barriers, item_instructions
                           the item's waits on global memory (loads first read, GPU-scope
                           fences), bar.syncs and instructions a warp issues
  item_load_bytes, item_store_bytes, item_sweep_trips
                           logits loaded and results stored by the item; the trips of each
                           sweep loop (a row's blocks)
  undeferred_stops, undeferred_instructions
                           (finish kernel) the same for a program that was not deferred

`--liger` adds Liger-Kernel's cross-entropy kernel (its wheel from ../shared/wheels, its
launch on Hopper) as cases liger_*; `--rank` predicts the time of every kernel and path
that the H200 run of 2026-12-04 measured (bench/results/nvidia-h200.csv) from these counts
and prints the predicted ranking beside the measured one (see predict() and bench/README.md).
`--predict` and `--predict-distill` give the same model's predictions for the candidates
no GPU has run (cross-entropy's paths and sweep shapes; distillation's two paths).

    python bench/compile_audit.py                   # a table of every case, for sm_90
    python bench/compile_audit.py --target all      # every case for the six targets
    python bench/compile_audit.py --target sm_100 gfx942 --only lm_V128256_bf16
    python bench/compile_audit.py --json            # one JSON object a launch (the tests)
    python bench/compile_audit.py --liger --only liger_V128256_bf16
    python bench/compile_audit.py --rank            # the H200 ranking, measured and predicted
    python bench/compile_audit.py --predict-distill # distillation's paths, predicted

TRITON_INTERPRET must be unset: under the interpreter @triton.jit gives no compilable kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

try:
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # Triton 3.4 specialises in Python, with the same rules
    from triton.runtime.jit import create_specialize_impl

    _specialize = create_specialize_impl(BaseBackend.get_arg_specialization)

    def native_specialize_impl(backend, arg, is_const, specialize_value, align):
        return _specialize(arg, is_const, specialize_value, align)

from triton_xent import config
from triton_xent.kernels import distill, xent

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# A100, H100/H200, B200, RTX 50xx; MI300X, MI355X. The warp is 32 threads on NVIDIA, a
# wavefront of 64 on these AMD parts.
TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "sm_100": GPUTarget("cuda", 100, 32),
    "sm_120": GPUTarget("cuda", 120, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}
KERNELS = ("_rows_kernel", "_split_kernel", "_finish_kernel", "_two_pass_stats_kernel",
           "_two_pass_finish_kernel", "_sweep_kernel", "_slice_stats_kernel",
           "_slice_grad_kernel", "_scale_rows_kernel")
DISTILL_KERNELS = ("_distill_rows_kernel", "_distill_slice_stats_kernel",
                   "_distill_slice_terms_kernel", "_distill_slice_grad_kernel",
                   "_distill_sweep_kernel")

# Per-SM limits by compute capability (CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"): 65536 registers allocated per warp in units of 256 on all three;
# resident warps, resident blocks, shared memory per SM and the shared memory reserved per
# block. sm_120 is left out until its row of the table is checked against a device.
SM_LIMITS = {
    "sm_80": dict(warps=64, blocks=32, shared=164 * 1024),
    "sm_90": dict(warps=64, blocks=32, shared=228 * 1024),
    "sm_100": dict(warps=64, blocks=32, shared=228 * 1024),
}
SM_REGISTERS = 65536
SM_REGISTER_UNIT = 256  # registers are allocated per warp in units of this many
SM_SHARED_RESERVED = 1024  # per block

ROWS = 16  # rows of each case: a multiple of 16, as a training batch is; few, to stay small


# --- cases: launcher calls at LM shapes ----------------------------------------------------


def _rows_call(V: int, dtype=torch.bfloat16, *, grad=True, prob=False, weight=False,
               smoothing=0.0, softcap=None, zloss=0.0, n_rows=ROWS, rl=False,
               argmax=None, long_rows="exchange") -> Callable[[], None]:
    """xent_rows on (n_rows, V) logits as core.forward calls it (class indices, mean); rl:
    with the RL extras (temperature, entropy, row and entropy weights, and the argmax
    unless argmax=False); long_rows: config.LONG_ROWS for the call."""
    argmax = rl if argmax is None else argmax
    def call():
        saved, config.LONG_ROWS = config.LONG_ROWS, long_rows
        try:
            launch()
        finally:
            config.LONG_ROWS = saved

    def launch():
        x = torch.zeros(n_rows, V, dtype=dtype).unsqueeze(-1)
        t = torch.zeros(n_rows, V, dtype=dtype).unsqueeze(-1) if prob \
            else torch.zeros(n_rows, dtype=torch.int64)
        w = torch.ones(V) if weight else None
        rows = (torch.ones(n_rows), torch.ones(n_rows)) if rl else (None, None)
        xent.xent_rows(x, t, w, torch.ones(2) if not prob else None,
                       torch.empty_like(x) if grad else None, *rows, prob_target=prob,
                       ignore_index=-100, label_smoothing=smoothing, lse_square_scale=zloss,
                       softcap=softcap, temperature=0.8 if rl else 1.0, entropy=rl,
                       argmax=argmax)
    return call


def _with_config(call: Callable[[], None], **values) -> Callable[[], None]:
    """call() with these config values set for its duration (bench_xent.config_values)."""
    def wrapped():
        from bench_xent import config_values

        with config_values(values):
            call()
    return wrapped


def _slice_calls(V_rank: int, n_classes: int, rl=False) -> Callable[[], None]:
    """A vocab-parallel rank's statistics, then its gradient (distributed.py); rl: with the
    RL extras."""
    def call():
        x = torch.zeros(ROWS, V_rank, dtype=torch.bfloat16).unsqueeze(-1)
        t = torch.zeros(ROWS, dtype=torch.int64)
        rows = (torch.ones(ROWS), torch.ones(ROWS)) if rl else (None, None)
        xent.xent_slice_stats(x, t, None, class_offset=V_rank, n_classes=n_classes,
                              ignore_index=-100, label_smoothing=0.1, softcap=None,
                              temperature=0.8 if rl else 1.0, entropy=rl, argmax=rl)
        xent.xent_slice_grad(x, t, None, torch.zeros(ROWS, 5), torch.ones(2),
                             torch.empty_like(x), *rows, class_offset=V_rank,
                             n_classes=n_classes, ignore_index=-100, label_smoothing=0.1,
                             lse_square_scale=1e-4, softcap=None,
                             temperature=0.8 if rl else 1.0)
    return call


def _scale_call(V: int) -> Callable[[], None]:
    def call():
        xent.scale_rows_(torch.zeros(ROWS, V, 1, dtype=torch.bfloat16), torch.ones(ROWS))
    return call


def _distill_call(V: int, divergence: str, n_rows=ROWS, *, sweep=False,
                  grad=True) -> Callable[[], None]:
    """Distillation (kernels/distill.py) on (n_rows, V) bf16 logits with a gradient (unless
    grad=False) and row factors, as distill.distill_rows calls it: whole rows, the row sweep
    (sweep: LONG_ROWS = "sweep"), or the slice kernels' stages (the stats kernel, which does
    not depend on the divergence, in the JSD case only)."""
    def call():
        x = torch.zeros(n_rows, V, dtype=torch.bfloat16)
        options = dict(divergence=divergence, beta=0.5, temperature=0.8)
        scale = torch.ones(n_rows)
        if sweep:
            distill.distill_sweep(x, x, torch.empty_like(x) if grad else None, scale,
                                  **options)
            return
        if V <= config.ROW_SLICE_MAX_V:
            distill.distill_rows(x, x, torch.empty_like(x), scale, **options)
            return
        merged = torch.zeros(n_rows, 6)
        if divergence == "jsd":  # the stats kernel is the same for every divergence
            distill.distill_slice_stats(x, x, temperature=0.8)
            distill.distill_slice_terms(x, x, merged, beta=0.5, temperature=0.8)
        distill.distill_slice_grad(x, x, merged, torch.zeros(n_rows), torch.empty_like(x),
                                   scale, **options)
    return call


def cases() -> dict[str, Callable[[], None]]:
    """name -> a call of the launchers; each launch it makes is compiled and audited."""
    # P = 8, 32 and 63 slices (P_PAD 8, 32, 64): how the merge grows with P.
    out = {f"lm_V{V}_bf16": _rows_call(V) for V in (32000, 128256, 256000)}
    out.update({
        "lm_V128256_fp32": _rows_call(128256, torch.float32),
        "lm_V128256_bf16_forward": _rows_call(128256, grad=False),
        "lm_V128256_every_option": _rows_call(128256, weight=True, smoothing=0.1, softcap=30.0,
                                              zloss=1e-4),
        "lm_V128256_prob_target": _rows_call(128256, prob=True, weight=True, smoothing=0.1),
        "whole_V4096_bf16": _rows_call(4096),
        "whole_V4096_forward": _rows_call(4096, grad=False),
        "vocab_parallel_V32064": _slice_calls(32064, 128256),
        # the RL extras (issue 13)
        "lm_V128256_rl": _rows_call(128256, rl=True),
        "lm_V128256_rl_no_argmax": _rows_call(128256, rl=True, argmax=False),
        "whole_V4096_rl": _rows_call(4096, rl=True),
        "vocab_parallel_V32064_rl": _slice_calls(32064, 128256, rl=True),
        "scale_rows_V128256": _scale_call(128256),
        # LONG_ROWS = "two_pass" (issue 19): no program waits on another
        "two_pass_V256000_bf16": _rows_call(256000, long_rows="two_pass"),
        "two_pass_V128256_forward": _rows_call(128256, grad=False, long_rows="two_pass"),
        "two_pass_V128256_every_option": _rows_call(128256, weight=True, smoothing=0.1,
                                                    softcap=30.0, zloss=1e-4, rl=True,
                                                    long_rows="two_pass"),
        "two_pass_V128256_prob_target": _rows_call(128256, prob=True, weight=True,
                                                   smoothing=0.1, long_rows="two_pass"),
        # LONG_ROWS = "sweep": one program a row, two sweeps in blocks (config.SWEEP_*)
        "sweep_V128256_bf16": _rows_call(128256, long_rows="sweep"),
        "sweep_V256000_bf16": _rows_call(256000, long_rows="sweep"),
        "sweep_V128256_fp32": _rows_call(128256, torch.float32, long_rows="sweep"),
        "sweep_V128256_forward": _rows_call(128256, grad=False, long_rows="sweep"),
        "sweep_V128256_every_option": _rows_call(128256, weight=True, smoothing=0.1,
                                                 softcap=30.0, zloss=1e-4, rl=True,
                                                 long_rows="sweep"),
        # the register cap (config.SWEEP_MAX_REGISTERS): options that take more alone
        "sweep_V128256_options_64_registers": _with_config(
            _rows_call(128256, weight=True, zloss=1e-4, argmax=True, long_rows="sweep"),
            SWEEP_MAX_REGISTERS=64),
    })
    # Short rows at a classifier's batch (enough rows for full tiles).
    for V in (2, 10, 100, 1000):
        out[f"small_V{V}_bf16"] = _rows_call(V, n_rows=4096)
    # distillation (issue 20): whole rows, short rows, and the slice stages of long rows
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out[f"distill_{divergence}_V4096_bf16"] = _distill_call(4096, divergence)
        out[f"distill_{divergence}_V128256_bf16"] = _distill_call(128256, divergence)
    out["distill_jsd_V1000_bf16"] = _distill_call(1000, "jsd", n_rows=4096)
    # the distillation's row sweep (LONG_ROWS = "sweep"), with and without a gradient
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out[f"distill_sweep_{divergence}_V128256_bf16"] = _distill_call(128256, divergence,
                                                                        sweep=True)
    out["distill_sweep_jsd_V128256_forward"] = _distill_call(128256, "jsd", sweep=True,
                                                             grad=False)
    return out


# --- Liger-Kernel's cross-entropy, for comparison ------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGER_WHEELS = os.path.join(ROOT, "..", "shared", "wheels")  # the wheels the GPU run used
_LIGER: dict = {}  # the loaded module, its version and the unpacked wheel's directory


def load_liger(wheel: str | None = None):
    """(liger_kernel.ops.cross_entropy, version), or (None, why not): from `wheel`, else the
    newest liger_kernel-*.whl in LIGER_WHEELS, else an installed liger_kernel. A wheel is
    a zip of the installed files: it is unpacked into a temporary directory (nothing is
    installed). Its kernel is then recorded as ours are (EXTERNAL_KERNELS)."""
    if "module" in _LIGER:
        return _LIGER["module"], _LIGER["version"]
    if wheel is None and os.path.isdir(LIGER_WHEELS):
        found = sorted(f for f in os.listdir(LIGER_WHEELS)
                       if f.startswith("liger_kernel-") and f.endswith(".whl"))
        wheel = os.path.join(LIGER_WHEELS, found[-1]) if found else None
    if wheel is not None:
        if not os.path.isfile(wheel):
            return None, f"no Liger wheel at {wheel}"
        import zipfile

        _LIGER["dir"] = tempfile.TemporaryDirectory(prefix="compile_audit_liger_")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(_LIGER["dir"].name)
        sys.path.insert(0, _LIGER["dir"].name)
    try:
        import liger_kernel.ops.cross_entropy as module
        from importlib.metadata import version
    except Exception as e:  # noqa: BLE001 - any failure means: no Liger here
        return None, (f"liger_kernel is not importable ({type(e).__name__}: {e}); no wheel "
                      f"in {LIGER_WHEELS}")
    # The launch Liger makes on Hopper, whatever GPU (or none) this machine has: its warps
    # depend on the device's architecture (32 on sm_90 for every dtype).
    module.infer_device_arch = lambda *args: "hopper"
    EXTERNAL_KERNELS.append((module, "liger_cross_entropy_kernel"))
    _LIGER.update(module=module, version=version("liger_kernel"))
    return module, _LIGER["version"]


def _liger_call(V: int, dtype=torch.bfloat16, *, grad=True,
                n_rows=ROWS) -> Callable[[], None]:
    """liger_cross_entropy(x, t) on (n_rows, V) logits with its defaults (mean, no ignored
    rows), as bench_xent's `liger` provider calls it: with a gradient (written over the
    logits in the forward) or without."""
    def call():
        module, _ = load_liger()
        x = torch.zeros(n_rows, V, dtype=dtype, requires_grad=grad)
        t = torch.zeros(n_rows, dtype=torch.int64)
        module.LigerCrossEntropyFunction.apply(x, t, None, -100, 0.0, 0.0, "mean", None,
                                               False, False, False)
    return call


def liger_cases() -> dict[str, Callable[[], None]]:
    """Liger's kernel at the LM shapes (call load_liger first)."""
    out = {f"liger_V{V}_bf16": _liger_call(V) for V in (32000, 128256, 256000)}
    out["liger_V128256_bf16_forward"] = _liger_call(128256, grad=False)
    out["liger_V128256_fp32"] = _liger_call(128256, torch.float32)
    return out


# --- recording and specialising launches ---------------------------------------------------


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


# (module, name) of other projects' kernels to record too (load_liger adds Liger's).
EXTERNAL_KERNELS: list = []


@contextlib.contextmanager
def recording():
    """Replaces the kernels of kernels/xent.py and kernels/distill.py (and EXTERNAL_KERNELS)
    by recorders; yields the list of launches. A kernel the imported triton_xent lacks is
    left out (an older commit's, audited with this file: bench/README.md)."""
    launches: list = []
    saved = {(module, name): getattr(module, name) for module, names in
             ((xent, KERNELS), (distill, DISTILL_KERNELS)) for name in names
             if hasattr(module, name)}
    saved.update({(module, name): getattr(module, name) for module, name in EXTERNAL_KERNELS})
    for (module, name), kernel in saved.items():
        setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


def specialise(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) as the JIT would compile this launch with."""
    names = list(inspect.signature(kernel.fn).parameters)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, options, bound


# --- reading the compiled code --------------------------------------------------------------

_MEM = re.compile(r"\b(ld|st)((?:\.volatile)?)\.global((?:\.[\w:]+)*)")
_ATOM = re.compile(r"\batom\.global")
_BLOCK = re.compile(r"^(?:(\$L__BB\d+_\d+):|// %bb\.\d+:)")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_DEPTH = re.compile(r"Depth=(\d+)")


def _access_bytes(suffixes: str) -> int:
    parts = suffixes.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfus]\d+", p)), 32)
    return vec * bits // 8


def _is_record_load(ins: str) -> bool:
    m = _MEM.search(ins)
    return bool(m) and m.group(1) == "ld" and "cg" in m.group(3).split(".")


def _is_load(ins: str) -> bool:
    m = _MEM.search(ins)
    return bool(m) and m.group(1) == "ld"


def pointer_sources(ptx: str) -> list[tuple[str, set]]:
    """Each global memory instruction with the kernel parameters its address derives from
    (by following registers from each `ld.param` through the arithmetic to the address)."""
    body = [ins for b in control_flow(ptx) for ins in b["ins"]]
    taint: dict[str, set] = {}
    changed = True
    while changed:  # registers of loop-carried values are written more than once
        changed = False
        for ins in body:
            op = re.sub(r"^@!?%\w+\s+", "", ins)
            if op.startswith("ld.param"):
                param = int(re.search(r"_param_(\d+)\]", op).group(1))
                dest, new = re.findall(r"%\w+", op)[0], {param}
            elif _MEM.search(op) or _ATOM.search(op) or op.startswith(("st.", "bra", "ret")):
                continue  # a load's result is data, not derived from its address
            else:
                regs = re.findall(r"%\w+", op)
                if not regs:
                    continue
                dest = regs[0]
                new = set().union(*(taint.get(r, set()) for r in regs[1:]))
            if not new <= taint.get(dest, set()):
                taint[dest] = taint.get(dest, set()) | new
                changed = True
    out = []
    for ins in body:
        if _MEM.search(ins) or _ATOM.search(ins):
            address = re.search(r"\[\s*(%\w+)", ins)
            out.append((ins, taint.get(address.group(1), set()) if address else set()))
    return out


def memory_ops(ptx: str, logits_param: int, grad_param: int) -> dict:
    """Global loads and stores by bytes per instruction: those of the logits (addresses from
    parameter logits_param) and of the gradient (grad_param) apart, record loads (.cg) and
    atomics (an atomic add of 0 with acquire compiles to ld.global.gpu.acquire: a load)."""
    out = dict(loads={}, stores={}, logits_loads={}, grad_stores={}, record_loads=0,
               atomics=0)
    for ins, params in pointer_sources(ptx):
        if _ATOM.search(ins):
            out["atomics"] += 1
        elif _is_record_load(ins):
            out["record_loads"] += 1
        else:
            m = _MEM.search(ins)
            kind = "loads" if m.group(1) == "ld" else "stores"
            if kind == "loads" and logits_param in params:
                kind = "logits_loads"
            elif kind == "stores" and grad_param in params:
                kind = "grad_stores"
            size = _access_bytes(m.group(3))
            out[kind][size] = out[kind].get(size, 0) + 1
    return out


def control_flow(ptx: str) -> list[dict]:
    """The kernel's basic blocks in text order: {ins, succ, depth}, depth being the loop
    depth LLVM writes beside each block (0 outside loops)."""
    blocks = [dict(label=None, ins=[], depth=0)]
    for raw in ptx[ptx.index(".entry"):].splitlines():
        line = raw.strip()
        start = _BLOCK.match(line)
        if start:
            blocks.append(dict(label=start.group(1), ins=[], depth=0))
        if "Depth=" in line and (start or line.startswith("//")):
            blocks[-1]["depth"] = max(blocks[-1]["depth"], int(_DEPTH.search(line).group(1)))
        if start or not line or line.startswith(("//", ".loc")):
            continue
        ins = line.split("//")[0].strip()
        blocks[-1]["ins"].append(ins)
        if _BRANCH.search(ins) or ins.startswith("ret"):
            blocks.append(dict(label=None, ins=[], depth=blocks[-1]["depth"]))
    index = {b["label"]: i for i, b in enumerate(blocks) if b["label"]}
    for i, block in enumerate(blocks):
        last = block["ins"][-1] if block["ins"] else ""
        branch = _BRANCH.search(last)
        block["succ"] = [index[branch.group(1)]] if branch else []
        falls = not last.startswith("ret") and (not branch or last.startswith("@"))
        if falls and i + 1 < len(blocks):
            block["succ"].append(i + 1)
    return blocks


def _loads(block: dict) -> int:
    return sum(map(_is_load, block["ins"]))


def _fewest_loads(blocks, start: int, cost_at_start: int, avoid: int | None = None) -> dict:
    """Fewest global loads from `start` to each block, never entering `avoid`."""
    best = {start: cost_at_start}
    changed = True
    while changed:  # a relaxation loop: a few hundred blocks at most
        changed = False
        for i in list(best):
            for j in blocks[i]["succ"]:
                if j == avoid:
                    continue
                c = best[i] + _loads(blocks[j])
                if c < best.get(j, 1 << 30):
                    best[j], changed = c, True
    return best


def second_launch_loads(ptx: str) -> int:
    """Fewest global loads on a path from the entry through the deferral flag's load (the
    kernel's one volatile load) to the exit, the flag's block passed once (one item)."""
    blocks = control_flow(ptx)
    flag = next(i for i, b in enumerate(blocks)
                if any((m := _MEM.search(x)) and m.group(2) for x in b["ins"]))
    to_flag = _fewest_loads(blocks, 0, _loads(blocks[0]))[flag]
    after = _fewest_loads(blocks, flag, 0, avoid=flag)
    exits = [i for i, b in enumerate(blocks) if b["ins"] and b["ins"][-1].startswith("ret")]
    return to_flag + min(after[i] for i in exits if i in after)


def merge_trips(ptx: str) -> dict:
    """The split kernel's merge: atomics and blocks of record loads at the grid-stride loop's
    depth (the loop over a program's slices), and record loads in deeper loops."""
    blocks = control_flow(ptx)
    outer = min(b["depth"] for b in blocks if _loads(b))
    trips = in_loops = 0
    for b in blocks:
        records = sum(map(_is_record_load, b["ins"]))
        if b["depth"] > outer:
            in_loops += records
        else:
            trips += sum(1 for x in b["ins"] if _ATOM.search(x)) + (records > 0)
    return dict(merge_round_trips=trips, record_loads_in_loops=in_loops)


def sweep_loop_sync(ptx: str) -> dict:
    """A row sweep's loops (blocks nested below the loop over rows): their barriers
    (bar.sync, bar.red) and warp shuffles, which the lanes' own statistics are to avoid."""
    blocks = control_flow(ptx)
    outer = min(b["depth"] for b in blocks if _loads(b))  # the loop over rows
    inner = [x for b in blocks if b["depth"] > outer for x in b["ins"]]
    return dict(loop_barriers=sum(1 for x in inner if x.startswith(("bar.sync", "bar.red",
                                                                     "barrier."))),
                loop_shuffles=sum(1 for x in inner if x.startswith("shfl.")))


def tile_layout(ttgir: str, rows: int, block_v: int, n_cols: int) -> dict:
    """threads_per_row, columns_per_thread and lane_use of the logits tile's load."""
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*?)\}>", ttgir, re.M))
    shape = f"{rows}x{block_v}x"
    for line in ttgir.splitlines():
        m = re.search(r"tt\.load .*: tensor<" + shape + r"!tt\.ptr<(?:bf16|f32|f16)>, (#\w+)>",
                      line)
        if m and m.group(1) in layouts:
            fields = {k: [int(v) for v in vals.split(",")] for k, vals in
                      re.findall(r"(\w+) = \[([\d, ]+)\]", layouts[m.group(1)])}
            per, lanes, warps = (fields["sizePerThread"], fields["threadsPerWarp"],
                                 fields["warpsPerCTA"])
            cover_rows = per[0] * lanes[0] * warps[0]
            cover_cols = per[1] * lanes[1] * warps[1]
            use = (min(n_cols, block_v) / max(block_v, cover_cols)) * (rows / max(rows, cover_rows))
            return dict(threads_per_row=lanes[1] * warps[1], columns_per_thread=per[1],
                        lane_use=round(use, 3))
    return {}


def occupancy(registers: int, num_warps: int, shared: int,
              target: str = "sm_90") -> tuple[int, str]:
    """(programs an SM holds, the name of the binding limit) on an NVIDIA target."""
    sm = SM_LIMITS[target]
    per_warp = -(-registers * 32 // SM_REGISTER_UNIT) * SM_REGISTER_UNIT
    limits = {
        "registers": SM_REGISTERS // per_warp // num_warps,
        "warps": sm["warps"] // num_warps,
        "blocks": sm["blocks"],
        "shared": sm["shared"] // (shared + SM_SHARED_RESERVED),
    }
    name = min(limits, key=limits.get)
    return limits[name], name


def cuda_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage",
                                f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    field = lambda key: int(line.split(key + ":")[1].split()[0])  # noqa: E731
    return field("REG"), field("STACK")


def hip_resources(amdgcn: str) -> tuple[int, int]:
    """(VGPRs, scratch bytes) per work item, from the AMDGCN's code-object metadata."""
    field = lambda key: int(re.search(r"\.%s:\s+(\d+)" % key, amdgcn).group(1))  # noqa: E731
    return field("vgpr_count"), field("private_segment_fixed_size")


# --- bytes in flight: one program's path through its SASS ----------------------------------
#
# HBM streams only with enough bytes in flight: Little's law, bandwidth = bytes in flight /
# latency, so about 4.2 TB/s x 1 us = 4 MB over an H200's 132 SMs, 32 KB an SM at all
# times. A program that loads, waits, reduces and loads again has bytes in flight only
# while it waits on its loads. The SASS (the code ptxas scheduled, in the order a warp
# issues it) says both: how many bytes a program has asked for when it first waits on one
# of them (its window), and how often it waits on global memory per item of work (its
# stops). The walk below follows one program's path through one item of work.

_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_SASS_REG = re.compile(r"(?<![\w.])(U?R)(\d+)((?:\.\w+)*)")
_CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
_PRED_OPERAND = re.compile(r"^!?U?P(?:\d+|T)$")
SASS_PARAM_BASE = 0x210  # sm_90's constant bank offset of the first kernel parameter
_NO_DEST = {"STG", "STS", "ST", "STL", "RED", "REDG", "BAR", "BRA", "EXIT", "MEMBAR", "ERRBAR",
            "CGAERRBAR", "CCTL", "NOP", "BSSY", "BSYNC", "WARPSYNC", "CALL", "RET", "DEPBAR",
            "FENCE", "YIELD", "LDGDEPBAR", "BPT", "JMP", "BRX"}
_GLOBAL_LOADS = {"LDG", "LD", "ATOMG", "ATOM", "LDGSTS"}
_GLOBAL_STORES = {"STG", "ST", "RED", "REDG"}


def _sass(cubin: bytes) -> list[dict]:
    """The instructions of a cubin's one kernel (parse_sass of cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return parse_sass(subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass",
                                          f.name], capture_output=True, text=True,
                                         check=True).stdout)


def parse_sass(text: str) -> list[dict]:
    """{addr, pred, op, base, operands} of each `/*0830*/ @P2 LDG.E.64 R32, [R10.64] ;`."""
    out = []
    for addr, body in _SASS.findall(text):
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, rest = body.partition(" ")
        operands = [x.strip() for x in rest.split(",")] if rest.strip() else []
        out.append(dict(addr=int(addr, 16), pred=pred, op=op, base=op.split(".")[0],
                        operands=operands))
    return out


def _size_bytes(op: str) -> int:
    """Bytes per thread of a memory instruction's data (LDG.E.128: 16, .64: 8, .U16: 2)."""
    parts = set(op.split("."))
    for size, names in ((16, {"128"}), (8, {"64"}), (2, {"U16", "S16"}), (1, {"U8", "S8"})):
        if parts & names:
            return size
    return 4


def _size_words(op: str) -> int:
    """32-bit registers of a memory instruction's data (.128: 4, .64: 2, else 1)."""
    return max(1, _size_bytes(op) // 4)


def _regs(operand: str, words: int = 1) -> set:
    """Registers an operand names ("R4.64": R4 and R5), outside a desc[...] descriptor."""
    operand = re.sub(r"desc\[[^\]]*\]", "", operand)
    out = set()
    for kind, n, suffix in _SASS_REG.findall(operand):
        width = 2 if ".64" in suffix else words
        out.update(f"{kind}{int(n) + k}" for k in range(width))
    return out


def _dest_and_sources(ins: dict) -> tuple[set, set]:
    """(registers written, registers read) of an instruction."""
    ops = ins["operands"]
    base = ins["base"]
    i = 0
    while i < len(ops) and _PRED_OPERAND.match(ops[i]):
        i += 1  # predicate results (ISETP's, ATOMG's PT)
    if base in _NO_DEST or base.endswith("SETP") or base in ("PLOP3", "UPLOP3", "R2P") \
            or i == len(ops):
        words = _size_words(ins["op"]) if base in _GLOBAL_STORES | {"STS", "STL"} else 1
        return set(), set().union(*(_regs(x, words) for x in ops)) if ops else set()
    words = 1
    if base in _GLOBAL_LOADS | {"LDS", "LDC", "ULDC", "LDL", "ATOMS"}:
        words = _size_words(ins["op"])
    elif base == "CS2R" and ".32" not in ins["op"] or ".WIDE" in ins["op"] or base[0] == "D":
        words = 2
    dest = _regs(ops[i], words)
    sources = set().union(set(), *(_regs(x, 2 if ".WIDE" in ins["op"] and k == 3 else 1)
                                   for k, x in enumerate(ops[i + 1:], start=1)))
    return dest, sources


def _param_offsets(ptx: str) -> list[tuple[int, int]]:
    """(constant bank offset, bytes) of each kernel parameter, from the PTX's .entry."""
    head = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    out, offset = [], SASS_PARAM_BASE
    for kind in re.findall(r"\.param \.(\w+)", head):
        size = int(re.sub(r"\D", "", kind)) // 8
        offset = -(-offset // size) * size
        out.append((offset, size))
        offset += size
    return out


def _address_params(instrs: list[dict], params: list[tuple[int, int]]) -> list[set]:
    """For each instruction, the kernel parameters its registers or constants derive from
    (its memory address's, for a load or store): registers followed forward in issue
    order, twice, so that a loop's values reach its header; a load's result derives from
    no parameter (it is data)."""
    def from_constants(ins):
        found = set()
        for off in _CBANK.findall(" ".join(ins["operands"])):
            off = int(off, 16)
            found.update(k for k, (start, size) in enumerate(params)
                         if start <= off < start + size)
        return found

    taint: dict[str, set] = {}
    out = [set() for _ in instrs]
    for _ in range(2):
        for k, ins in enumerate(instrs):
            dest, sources = _dest_and_sources(ins)
            if ins["base"] in _GLOBAL_LOADS | _GLOBAL_STORES:
                out[k] = set().union(set(), *(taint.get(r, set()) for r in _address(ins)))
                for r in dest if ins["base"] in _GLOBAL_LOADS else ():
                    taint[r] = set()
                continue
            derived = from_constants(ins).union(*(taint.get(r, set()) for r in sources))
            for r in dest:
                taint[r] = derived
    return out


def _address(ins: dict) -> set:
    """The registers of a memory instruction's address (not of its descriptor)."""
    operand = next((x for x in ins["operands"] if "[" in x), "")
    return _regs(re.sub(r"desc\[[^\]]*\]", "", operand))


def memory_kinds(instrs: list[dict], params: list[tuple[int, int]], logits: set,
                 outputs: set) -> list[str | None]:
    """Per instruction: "stream_load" (a global load whose address derives from a parameter
    in `logits`), "load" (another global load or an atomic), "stream_store" (a global store
    to a parameter in `outputs`), "store", or None."""
    out = []
    for ins, derived in zip(instrs, _address_params(instrs, params)):
        kind = None
        if ins["base"] in _GLOBAL_LOADS:
            kind = "stream_load" if derived & logits else "load"
        elif ins["base"] in _GLOBAL_STORES:
            kind = "stream_store" if derived & outputs else "store"
        out.append(kind)
    return out


def program_path(instrs: list[dict], kinds: list, threads: int, row_bytes: int,
                 stream_work: bool = True) -> dict:
    """One program's path through one item of work (an iteration of the grid-stride loop,
    or the whole program), walked in issue order:
      - a conditional forward branch is taken unless the code it skips does the item's
        streaming work (loads logits, stores results) or publishes to other programs (an
        atomic or a GPU-scope fence: the one thread that arrives for a whole program); so
        the walk skips slice 0's loss, the deferral flag, the wait of a program whose
        siblings have all arrived (the last one; the others poll at least once more) and an
        early return that loads no logits (Liger's ignored rows). With stream_work=False
        only the atomics and fences are kept: the path of a program with nothing to
        stream (the exchange's second launch for a program that was not deferred);
      - a loop whose body loads logits (a sweep over a row) runs ceil(row_bytes / its bytes
        per iteration) times, other loops once; an unconditional backward branch (the
        grid-stride loop's) or an EXIT ends the item;
    and counts on it:
      instructions   issued per warp (NOPs excluded)
      stops          waits on global memory: the first instruction that reads a register a
                     global load or atomic has not filled yet, and each MEMBAR at GPU scope
                     (it waits for the program's stores); at a stop every load then in
                     flight counts as arrived
      window_bytes   the most bytes of logits loads in flight at a stop
      barriers       bar.sync on the path: the program's phases between its loads
      load_bytes, store_bytes   logits loaded and results stored
    Bytes are bytes x threads of each instruction whose address depends on the thread's
    index on the path walked (a tile's), its bytes once where it does not (every thread
    reads the same logit). A tile
    narrower than the program's threads (a short row) is loaded by replicated lanes: the
    count then exceeds the bytes that reach the SM (compile_audit's lane_use says by how
    much for our kernels).
    A load issued in one iteration and first read in the next (a software prefetch) stays
    in flight across the back edge and counts in the next iteration's window."""
    index = {ins["addr"]: k for k, ins in enumerate(instrs)}
    deps = [_dest_and_sources(ins) for ins in instrs]
    per_thread: set = set()  # registers derived from the thread's index on the path walked

    def streams(lo, hi):
        return any(kinds[k] == "stream_load" for k in range(lo, hi))

    def needed(lo, hi):  # the item's own work in code a forward branch would skip
        if stream_work and streams(lo, hi):
            return True
        if any(x["base"] == "EXIT" and x["pred"] is None for x in instrs[lo:hi]):
            return False  # an early return (an ignored row) that loads no logits
        work = ("stream_store",) if stream_work else ()
        return any(kinds[j] in work or instrs[j]["base"] in ("ATOMG", "ATOM", "MEMBAR")
                   for j in range(lo, hi))

    out = dict(instructions=0, stops=0, window_bytes=0, barriers=0, load_bytes=0,
               store_bytes=0, sweep_trips=[])
    pending: dict[str, float] = {}  # register -> logits bytes of the load filling it
    left: dict[int, int] = {}  # loop latch -> iterations still to walk
    k = 0
    while k < len(instrs):
        ins, kind = instrs[k], kinds[k]
        dest, sources = deps[k]
        if ins["base"] != "NOP":
            out["instructions"] += 1
        gpu_fence = ins["base"] == "MEMBAR" and (".GPU" in ins["op"] or ".SYS" in ins["op"])
        if gpu_fence or sources & pending.keys():
            out["stops"] += 1
            out["window_bytes"] = max(out["window_bytes"], sum(pending.values()))
            pending.clear()
        lanes = threads if _address(ins) & per_thread else 1
        size = _size_bytes(ins["op"]) * lanes
        if kind in ("stream_load", "load"):
            streamed = size if kind == "stream_load" else 0
            out["load_bytes"] += streamed
            for r in dest:
                pending[r] = streamed / len(dest)
        elif kind == "stream_store":
            out["store_bytes"] += size
        if kind in ("stream_load", "load") or not (
                sources & per_thread or any(x.startswith(("SR_TID", "SR_LANEID"))
                                            for x in ins["operands"])):
            per_thread -= dest
        else:
            per_thread |= dest
        if ins["base"] == "BAR":
            out["barriers"] += 1
        if ins["base"] == "EXIT" and ins["pred"] is None:
            break
        if ins["base"] == "BRA":
            target = index[int(ins["operands"][-1], 16)]
            conditional = ins["pred"] is not None or len(ins["operands"]) > 1
            if target > k:
                if not conditional or not needed(k + 1, target):
                    k = target
                    continue
            elif not conditional:
                break  # the grid-stride loop's back edge: the item ends
            elif streams(target, k + 1):
                if k not in left:
                    per_iteration = sum(_size_bytes(instrs[j]["op"]) * threads
                                        for j in range(target, k + 1)
                                        if kinds[j] == "stream_load")
                    left[k] = -(-row_bytes // per_iteration) - 1
                    out["sweep_trips"].append(left[k] + 1)
                if left[k] > 0:
                    left[k] -= 1
                    k = target
                    continue
                del left[k]
        k += 1
    out["window_bytes"] = int(out["window_bytes"])
    return out


# The parameters whose loads are the logits a kernel streams, and those its streamed results
# go to, by name: ours, distillation's (student and teacher) and Liger's (X_ptr: it writes
# the gradient over the logits). A kernel with none of the first (the gradient scaling)
# streams the second.
LOGITS_PARAMS = ("logits_ptr", "student_ptr", "teacher_ptr", "X_ptr")
OUTPUT_PARAMS = ("grad_ptr", "X_ptr")


def flight(compiled, runtime: list, bound: dict, warps: int, target: str,
           programs_per_sm: int | None) -> dict:
    """program_path's counts for one launch, and bytes_in_flight_per_sm = its window times
    the programs an SM holds (sm_90 only: SASS_PARAM_BASE is sm_90's)."""
    if target != "sm_90":
        return {}
    logits = {runtime.index(n) for n in LOGITS_PARAMS if n in runtime}
    outputs = {runtime.index(n) for n in OUTPUT_PARAMS if n in runtime}
    instrs = _sass(compiled.asm["cubin"])
    kinds = memory_kinds(instrs, _param_offsets(compiled.asm["ptx"]), logits or outputs,
                         outputs)
    # A row's bytes over every tensor the loops stream: the student's and the teacher's for
    # distillation (a sweep's iteration loads both), else the logits (or the gradient).
    streamed = ([bound[n] for n in LOGITS_PARAMS if isinstance(bound.get(n), torch.Tensor)]
                or [next(bound[n] for n in OUTPUT_PARAMS
                         if isinstance(bound.get(n), torch.Tensor))])
    row_bytes = bound["n_cols"] * sum(x.element_size() for x in streamed) * bound.get("ROWS", 1)
    path = program_path(instrs, kinds, 32 * warps, row_bytes)
    out = {"window_bytes": path.pop("window_bytes")}
    if programs_per_sm is not None:
        out["bytes_in_flight_per_sm"] = programs_per_sm * out["window_bytes"]
    out.update({f"item_{k}": v for k, v in path.items()})
    if "sync_ptr" in runtime and "spin_limit" not in runtime:  # the exchange's second launch
        idle = program_path(instrs, kinds, 32 * warps, row_bytes, stream_work=False)
        out.update(undeferred_stops=idle["stops"], undeferred_instructions=idle["instructions"])
    return out


def audit(kernel, grid, args, kwargs, target: str = "sm_90") -> dict:
    if "TIMED_WAIT" in kwargs:  # the launcher saw CPU tensors; NVIDIA has %globaltimer
        kwargs = dict(kwargs, TIMED_WAIT=TARGETS[target].backend == "cuda")
    signature, constexprs, attrs, options, bound = specialise(kernel, args, kwargs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                              target=TARGETS[target], options=options)
    seconds = time.perf_counter() - start
    warps = options.get("num_warps", 4)
    out = dict(kernel=kernel.fn.__name__, target=target, compile_s=round(seconds, 3),
               grid=list(grid), num_warps=warps,
               enable_fp_fusion=options.get("enable_fp_fusion"))  # None: Triton's default
    constants = {k: v for k, v in bound.items() if k.isupper()}
    out["constexprs"] = {k: v for k, v in constants.items() if isinstance(v, (bool, int))}
    if TARGETS[target].backend == "hip":
        out["registers"], out["stack_bytes"] = hip_resources(compiled.asm["amdgcn"])
        out["shared_bytes"] = compiled.metadata.shared
        return out
    regs, stack = cuda_resources(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    out.update(registers=regs, stack_bytes=stack, shared_bytes=shared)
    if target in SM_LIMITS:
        out["programs_per_sm"], out["occupancy_limit"] = occupancy(regs, warps, shared, target)
    ptx = compiled.asm["ptx"]
    runtime = [n for n in signature if signature[n] != "constexpr"]  # the PTX's parameters
    position = lambda name: runtime.index(name) if name in runtime else -1  # noqa: E731
    logits = next((n for n in LOGITS_PARAMS if n in runtime), None)  # distill's: student_ptr
    grad = "grad_ptr" if "grad_ptr" in runtime else "X_ptr"  # Liger's: over the logits
    mem = memory_ops(ptx, position(logits), position(grad))
    out.update(mem)
    block_v = constants.get("BLOCK_V")
    if block_v and "logits_ptr" in bound:
        x = bound["logits_ptr"]
        tile_rows = constants.get("ROWS", 1)
        tile_bytes = tile_rows * block_v * x.element_size()
        moved = sum(size * n for size, n in mem["logits_loads"].items()) * 32 * warps
        out["logits_coverage"] = round(moved / tile_bytes, 3)
        out.update(tile_layout(compiled.asm["ttgir"], tile_rows, block_v, x.shape[1]))
    out.update(flight(compiled, runtime, bound, warps, target, out.get("programs_per_sm")))
    if kernel.fn.__name__ == "_finish_kernel":
        out["second_launch_loads"] = second_launch_loads(ptx)
    if kernel.fn.__name__ in ("_sweep_kernel", "_distill_sweep_kernel"):
        out.update(sweep_loop_sync(ptx))
    if kernel.fn.__name__ == "_split_kernel":
        out.update(merge_trips(ptx))
        out["timed_wait"] = "%globaltimer" in ptx
        out["assumed_programs_per_sm"] = xent.split_programs_per_sm(
            bound["logits_ptr"].element_size(), out["constexprs"])
    return out


def run_case(name: str, call: Callable[[], None], targets=("sm_90",)) -> list[dict]:
    with recording() as launches:
        call()
    return [dict(case=name, **audit(*launch, target=target))
            for launch in launches for target in targets]


def line(r: dict) -> str:
    """One launch's row of the table."""
    text = (f"{r['case']:25s} {r['kernel']:19s} {r['target']:6s} {r['compile_s']:5.1f}s "
            f"warps={r['num_warps']:2d} regs={r['registers']:3d} stack={r['stack_bytes']}B "
            f"smem={r['shared_bytes']}B")
    if "programs_per_sm" in r:
        text += f" per_sm={r['programs_per_sm']}({r['occupancy_limit']})"
    if "logits_loads" in r:
        text += (f" logits_loads={r['logits_loads']} grad_stores={r['grad_stores']} "
                 f"other={r['loads']}/{r['stores']}")
    if "window_bytes" in r:
        text += f" window={r['window_bytes'] / 1024:.4g}KB"
        if "bytes_in_flight_per_sm" in r:
            text += f" in_flight/SM={r['bytes_in_flight_per_sm'] / 1024:.4g}KB"
        text += (f" item: stops={r['item_stops']} barriers={r['item_barriers']} "
                 f"instructions={r['item_instructions']}")
        if r["item_sweep_trips"]:
            text += f" sweeps={r['item_sweep_trips']}"
    return text + "".join(f" {k}={r[k]}" for k in (
        "logits_coverage", "threads_per_row", "columns_per_thread", "lane_use",
        "second_launch_loads", "merge_round_trips", "record_loads_in_loops", "timed_wait",
        "loop_barriers", "loop_shuffles")
        if k in r)


# --- the figure against the H200 run of 2026-12-04 -----------------------------------------
#
# A launch's time, predicted from its compiled code as the largest of three floors (each in
# seconds, for `items` items of work, `P` programs resident an SM):
#   t_bw    = (logits loaded + results stored) / the run's copy bandwidth        HBM's rate
#   t_lat   = items / (SMs x P) x stops x L                                      the waits
#   t_issue = items x instructions x warps / (SMs x 4 schedulers x clock)        issue slots
# t_lat is Little's law with the stop-and-go: each round of P programs an SM waits `stops`
# times on global memory, L each. Bytes in flight alone (the issue's figure) predicts
#   t_flight = logits loaded / (SMs x bytes_in_flight_per_sm / L),
# the time if every SM always had its programs' windows in flight: no stops between them,
# no instruction limit. A path of several launches is predicted as the sum of its launches.
# The constants are the H200's and the diagnosis's, fixed before any comparison:
H200 = dict(sms=132, schedulers=4, clock_hz=1.98e9, latency_s=1e-6)
H200_COPY_GBPS = 4236.0  # the copy bandwidth the 2026-12-04 run measured
H200_CSV = os.path.join(ROOT, "bench", "results", "nvidia-h200.csv")
RANK_N = 16384  # the rows of the run's LM cases (the profiled ones among them)
# ms a launch, torch.profiler's CUDA time of cross_entropy(x, t).backward(), bf16,
# N = 16384, V = 128256, check_targets=False, mean of 3 steps (gpu-2026-12-04/kernel_profile.log)
H200_KERNEL_MS = {("triton_xent", "_split_kernel"): 11.088,
                  ("triton_xent", "_finish_kernel"): 1.836,
                  ("triton_xent[two_pass]", "_two_pass_stats_kernel"): 3.791,
                  ("triton_xent[two_pass]", "_two_pass_finish_kernel"): 5.154}
# Our providers in the run besides the default (triton_xent): bench_xent.py's config
# variants (SWEEP).
RANK_VARIANTS = ("two_pass", "slice8192_w16", "slice4096_w8", "slice2048_w4", "slice2048_w8",
                 "persistent2", "spin1k", "spin0", "wait5us", "wait100us", "tile1024",
                 "tile4096")
# Measured times closer than this are one rank: the run's own spread for one compiled code
# (the spin and wait variants, 13.04 to 13.77 ms, differ only in run-time arguments).
RANK_TIE = 0.06


def _provider_call(provider: str, V: int, dtype, grad: bool, n_rows: int):
    """(call, config values, persistent programs per SM or None) of a provider's launches
    on (n_rows, V) logits."""
    if provider == "liger":
        return _liger_call(V, dtype, grad=grad, n_rows=n_rows), {}, None
    from bench_xent import SWEEP

    values = dict(LONG_ROWS="exchange")  # the default on an NVIDIA GPU
    if provider != "triton_xent":
        values.update(SWEEP[provider[len("triton_xent["):-1]])
    persistent = values.get("PERSISTENT_PROGRAMS_PER_SM") if values.get("PERSISTENT") else None
    # The same kernels as a launch of one program an item: `grid` counts the items.
    values["PERSISTENT"] = False
    call = _rows_call(V, dtype, grad=grad, n_rows=n_rows, long_rows=values["LONG_ROWS"])
    return call, values, persistent


def predict(r: dict, items: float, resident: int, copy_bytes_per_s: float, h=H200) -> dict:
    """The floors above, in ms, for `items` items of launch `r` (its audit) with `resident`
    programs an SM. The exchange's second launch counts a program that was not deferred."""
    stops = r.get("undeferred_stops", r["item_stops"])
    instructions = r.get("undeferred_instructions", r["item_instructions"])
    loads = 0 if "undeferred_stops" in r else r["item_load_bytes"]
    stores = 0 if "undeferred_stops" in r else r["item_store_bytes"]
    t = dict(bw=items * (loads + stores) / copy_bytes_per_s,
             lat=items / (h["sms"] * resident) * stops * h["latency_s"],
             issue=items * instructions * r["num_warps"]
             / (h["sms"] * h["schedulers"] * h["clock_hz"]))
    in_flight = resident * r["window_bytes"]
    out = {k: v * 1e3 for k, v in t.items()}
    out["flight"] = 1e3 * items * loads / (h["sms"] * in_flight / h["latency_s"]) \
        if loads else None
    out["ms"] = max(out["bw"], out["lat"], out["issue"])
    out["bound"] = max(("bw", "lat", "issue"), key=out.get)
    return out


def _measured(csv_path: str) -> dict:
    """(provider, mode, dtype, N, V) -> (ms, copy GB/s) of the CSV's rows (the last of
    repeated rows, as plot.py draws them)."""
    import csv

    with open(csv_path, newline="") as f:
        return {(row["provider"], row["mode"], row["dtype"], int(row["N"]), int(row["V"])):
                (float(row["ms"]), float(row["copy_gbps"])) for row in csv.DictReader(f)}


def _in_groups(group: tuple, groups) -> bool:
    """Whether (mode, dtype, N, V) or ("kernel", ...) is one of `groups`: "kernel" or
    (mode, dtype, V) tuples; None is every group."""
    return groups is None or group[0] in groups or (group[0], group[1], group[3]) in groups


def rank_rows(csv_path: str = H200_CSV, latency_s: float = H200["latency_s"],
              groups=None) -> list[dict]:
    """Every row of the run that we can compile (ours, our config variants and Liger's
    cross-entropy), predicted: one dict a (group, name), group being (mode, dtype, N, V)
    for a provider's time and ("kernel", dtype, N, V) for a profiled launch (H200_KERNEL_MS;
    Liger's one launch by its provider's time)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_xent import config_values

    h = dict(H200, latency_s=latency_s)
    liger, _ = load_liger()
    ours = ("triton_xent", *(f"triton_xent[{v}]" for v in RANK_VARIANTS))
    compiled: dict = {}  # the specialisation's key -> its audit: variants share kernels
    rows = []
    for (provider, mode, dtype_name, N, V), (ms, copy_gbps) in _measured(csv_path).items():
        if provider not in ours and (provider != "liger" or liger is None):
            continue
        group = (mode, dtype_name, N, V)
        profile = ("kernel", dtype_name, N, V)
        profiled = (dtype_name, N, V) == ("bfloat16", RANK_N, 128256) and (
            provider == "liger" or (mode == "fwd_bwd" and any(
                p == provider for p, _ in H200_KERNEL_MS)))
        if not (_in_groups(group, groups) or profiled and _in_groups(profile, groups)):
            continue
        dtype = getattr(torch, dtype_name)
        # Short rows are tiles of up to 128 of them: record enough rows to fill a tile.
        recorded = 4096 if V <= config.ROW_SLICE_MAX_V else ROWS
        call, values, persistent = _provider_call(provider, V, dtype, mode == "fwd_bwd",
                                                  recorded)
        with config_values(values), recording() as launches:
            call()
        kernels = []
        for kernel, grid, args, kwargs in launches:
            kwargs = dict(kwargs, TIMED_WAIT=True) if "TIMED_WAIT" in kwargs else kwargs
            signature, constexprs, attrs, options, bound = specialise(kernel, args, kwargs)
            # (the row's length sets the trips of a sweep loop: it is part of the path)
            key = (kernel.fn.__name__, repr(signature), repr(constexprs), repr(attrs),
                   repr(sorted(options.items())), bound.get("n_cols"))
            if key not in compiled:
                compiled[key] = audit(kernel, grid, args, kwargs)
            r = compiled[key]
            items = grid[0] * N / recorded
            resident = min(r["programs_per_sm"], persistent or r["programs_per_sm"])
            undeferred = "undeferred_stops" in r
            kernels.append(dict(
                kernel=r["kernel"], items=items, resident=resident,
                loaded=0 if undeferred else items * r["item_load_bytes"],
                window_bytes=r["window_bytes"], registers=r["registers"],
                stops=r["undeferred_stops" if undeferred else "item_stops"],
                instructions=r["undeferred_instructions" if undeferred else "item_instructions"],
                barriers=0 if undeferred else r["item_barriers"],
                **predict(r, items, resident, copy_gbps * 1e9, h)))
            launch_ms = H200_KERNEL_MS.get((provider, r["kernel"]))
            if profiled and launch_ms is not None:
                rows.append(dict(group=profile, name=f"{provider} {r['kernel']}",
                                 measured_ms=launch_ms, **kernels[-1]))
        total = {k: sum(x[k] or 0 for x in kernels)
                 for k in ("ms", "flight", "bw", "lat", "issue")}
        logits = N * V * dtype.itemsize
        rows.append(dict(group=group, name=provider, measured_ms=ms, kernels=kernels,
                         reads=round(sum(x["loaded"] for x in kernels) / logits, 2), **total))
        if profiled and provider == "liger":  # one launch: the provider's time is its own
            rows.append(dict(rows[-1], group=profile, name=f"liger {kernels[0]['kernel']} "
                             f"({mode})"))
    return [r for r in rows if _in_groups(r["group"], groups)]


def concordance(rows: list[dict], key: str) -> dict:
    """Pairs of one group's rows ordered alike by measured_ms and by `key`: concordant,
    discordant (listed), and the pairs not counted: measured within RANK_TIE of each other,
    or predicted equal (to 0.1%: the figure does not tell them apart; listed). Rows whose
    `key` is None (bytes in flight of a launch that loads no logits) are left out."""
    out = dict(concordant=0, discordant=[], measured_ties=0, unresolved=[])
    rows = [r for r in rows if r[key]]
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            m = b["measured_ms"] - a["measured_ms"]
            p = b[key] - a[key]
            if abs(m) <= RANK_TIE * min(a["measured_ms"], b["measured_ms"]):
                out["measured_ties"] += 1
            elif abs(p) <= 1e-3 * min(a[key], b[key]):
                out["unresolved"].append((a["name"], b["name"]))
            elif (m > 0) == (p > 0):
                out["concordant"] += 1
            else:
                out["discordant"].append((a["name"], b["name"]))
    return out


def _ranks(values: list) -> list:
    """1 for the smallest; None stays None."""
    order = sorted((i for i, v in enumerate(values) if v), key=values.__getitem__)
    out: list = [None] * len(values)
    for rank, i in enumerate(order, start=1):
        out[i] = rank
    return out


def rank_report(rows: list[dict]) -> str:
    """Each group's measured and predicted ranking, each launch's figures, and the pairs
    that disagree."""
    def ms(value, rank):
        return f"{value:7.2f} {rank:2d}" if value else f"{'-':>7s}   "

    lines = []
    for group in sorted({r["group"] for r in rows}, key=lambda g: (g[0] != "kernel", g)):
        members = sorted((r for r in rows if r["group"] == group),
                         key=lambda r: r["measured_ms"])
        measured = _ranks([r["measured_ms"] for r in members])
        predicted = _ranks([r["ms"] for r in members])
        flight = _ranks([r["flight"] for r in members])
        what = "one launch (kernel_profile.log)" if group[0] == "kernel" else group[0]
        lines.append(f"\n{what}, {group[1]}, N = {group[2]}, V = {group[3]}; ms and rank:")
        if group[3] <= config.ROW_SLICE_MAX_V:
            lines.append("  (short rows: outside what the figure models. A row narrower than a "
                         "program's threads is loaded by\n  replicated lanes, which bytes x "
                         "threads counts; ptxas unrolls Liger's short sweep behind guards the "
                         "walk\n  does not follow; targets and losses, not counted, "
                         "outweigh V = 10's logits. Shown, not trusted.)")
        lines.append(f"  {'':46s} {'measured':>10s} {'predicted':>10s} {'bound':>11s} "
                     f"{'in flight alone':>15s}")
        for r, m, p, f in zip(members, measured, predicted, flight):
            kernels = r.get("kernels", [r])
            bound = "+".join(k["bound"] for k in kernels)
            lines.append(f"  {r['name']:46s} {ms(r['measured_ms'], m)} {ms(r['ms'], p)} "
                         f"{bound:>11s}      {ms(r['flight'], f)}"
                         + (f"   {r['reads']:g} reads" if "reads" in r else ""))
            for k in kernels:
                lines.append(
                    f"      {k['kernel']}: {k['resident']}/SM x {k['window_bytes'] / 1024:.4g} KB"
                    f" = {k['resident'] * k['window_bytes'] / 1024:.4g} KB in flight, "
                    f"{k['stops']} stops, {k['barriers']} barriers, {k['instructions']} "
                    f"instructions an item; bw {k['bw']:.2f} lat {k['lat']:.2f} "
                    f"issue {k['issue']:.2f}")
        for key, label in (("ms", "predicted"), ("flight", "in flight alone")):
            c = concordance(members, key)
            lines.append(f"  {label}: {c['concordant']} pairs in the measured order, "
                         f"{len(c['discordant'])} reversed"
                         + "".join(f"\n      reversed: {a} / {b}" for a, b in c["discordant"])
                         + f"\n      not counted: {c['measured_ties']} pairs measured within "
                         f"{RANK_TIE:.0%}, {len(c['unresolved'])} predicted equal")
    return "\n".join(lines)


def rank_main(args) -> int:
    """--rank: the ranking table (or with --json, one object a row)."""
    if not os.path.isfile(args.csv):
        print(f"no measured CSV at {args.csv}", file=sys.stderr)
        return 2
    module, why = load_liger(args.liger or None)
    if module is None:
        print(f"skip liger: {why}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="compile_audit_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        groups = None
        if args.rank:
            groups = {g if g == "kernel" else (*g.split("/")[:2], int(g.split("/")[2]))
                      for g in args.rank}
        rows = rank_rows(args.csv, args.latency_us * 1e-6, groups)
    if args.json:
        for r in rows:
            print(json.dumps(dict(r, group=list(r["group"]))))
        return 0
    print(f"triton {triton.__version__}; liger_kernel {why if module else '-'}; "
          f"L = {args.latency_us:g} us; {H200['sms']} SMs x {H200['schedulers']} schedulers "
          f"at {H200['clock_hz'] / 1e9:g} GHz")
    print(rank_report(rows))
    return 0


# --predict: the candidates bench/gpu_tune.py times, none of them measured yet: the fixed
# long-row paths and the sweep's shapes (its FACTORS' first), at bf16 N = RANK_N.
PREDICT_VOCAB = (32000, 128256, 256000)


def predict_candidates(vocab=PREDICT_VOCAB, copy_gbps: float = H200_COPY_GBPS,
                       latency_s: float = H200["latency_s"]) -> list[dict]:
    """Each candidate's predicted forward + backward time on the H200 by the --rank model
    (its floors with the 2026-12-04 run's copy bandwidth), one dict a (candidate, V). The
    sweep's second read is the open question: `ms` counts it from HBM, as the model does
    for every load; `ms_l2` from L2 (its bytes out of the bandwidth floor)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_xent import config_values
    from gpu_tune import FACTORS, PATHS, sweep_defaults, sweep_name

    h = dict(H200, latency_s=latency_s)
    candidates = dict(PATHS)
    base = dict(LONG_ROWS="sweep", **sweep_defaults())
    for choice in dict(FACTORS)["shape"]:
        values = {**base, **choice}
        candidates[sweep_name(values)] = values
    rows = []
    for name, values in candidates.items():
        for V in vocab:
            with config_values(values), recording() as launches:
                _rows_call(V, long_rows=values["LONG_ROWS"])()
            total = dict(ms=0.0, ms_l2=0.0, flight=0.0)
            kernels = []
            for kernel, grid, args, kwargs in launches:
                kwargs = dict(kwargs, TIMED_WAIT=True) if "TIMED_WAIT" in kwargs else kwargs
                r = audit(kernel, grid, args, kwargs)
                # one program a row (or a slice); a capped sweep grid walks the rows
                items = (grid[0] if r["kernel"] != "_sweep_kernel" else ROWS) * RANK_N / ROWS
                resident = r["programs_per_sm"]
                if r["kernel"] == "_sweep_kernel":
                    cap = values.get("SWEEP_PROGRAMS_PER_SM")
                    fraction = values.get("SWEEP_L2_FRACTION")
                    programs = items
                    if cap:
                        programs = min(programs, h["sms"] * cap)
                    if fraction:
                        programs = min(programs, 60e6 * fraction // (V * 2))
                    resident = max(1, min(resident, int(programs // h["sms"]) or 1))
                p = predict(r, items, resident, copy_gbps * 1e9, h)
                l2 = dict(r, item_load_bytes=r["item_load_bytes"] / 2) \
                    if r["kernel"] == "_sweep_kernel" else r
                p_l2 = predict(l2, items, resident, copy_gbps * 1e9, h)
                total["ms"] += p["ms"]
                total["ms_l2"] += p_l2["ms"]
                total["flight"] += p["flight"] or 0.0
                kernels.append(f"{r['kernel']}: {resident}/SM x {r['window_bytes'] / 1024:.3g} KB, "
                               f"{r['item_stops']} stops, {r['item_instructions']} instr, "
                               f"{r['registers']} regs, bound {p['bound']}/{p_l2['bound']}")
            floor = 2 * RANK_N * V * 2 / (copy_gbps * 1e9) * 1e3
            rows.append(dict(name=name, V=V, floor_ms=floor, kernels=kernels, **total))
    return rows


def predict_main(args) -> int:
    """--predict: the candidates' predicted times, one table a V."""
    with tempfile.TemporaryDirectory(prefix="compile_audit_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = predict_candidates(latency_s=args.latency_us * 1e-6)
    print(f"PREDICTIONS (no GPU has run these): triton {triton.__version__}, bf16, "
          f"N = {RANK_N}, forward + backward, the --rank model with L = {args.latency_us:g} us; "
          "ms_l2: the sweep's second read from L2")
    for V in sorted({r["V"] for r in rows}):
        members = sorted((r for r in rows if r["V"] == V), key=lambda r: r["ms"])
        floor = members[0]["floor_ms"]
        print(f"\nV = {V}: floor (one read, one write at the copy bandwidth) {floor:.2f} ms")
        for r in members:
            print(f"  {r['name']:48s} {r['ms']:7.2f} ms ({floor / r['ms']:.2f} of copy)"
                  f"  l2 {r['ms_l2']:7.2f} ms ({floor / r['ms_l2']:.2f})")
            for k in r["kernels"]:
                print(f"      {k}")
    return 0


# --predict-distill: distillation from logits at bench_distill.py's shape, bf16, forward +
# backward (the backward's scaling skips rows whose factor is 1, as loss.backward()'s is).
DISTILL_N, DISTILL_V = 8192, 128256
H200_DISTILL_CSV = os.path.join(ROOT, "bench", "results", "nvidia-h200-distill.csv")


def _distill_launches(V: int, divergence: str, path: str) -> list:
    """The kernel launches of distillation's forward (which writes the gradient) on (ROWS, V)
    bf16 logits at bench_distill.py's T = 2 and beta = 0.5: the stages ("two_pass":
    statistics, JSD's terms, gradient; the merges between them are torch ops on (ROWS, P, 6)
    floats, left out) or the row sweep."""
    x = torch.zeros(ROWS, V, dtype=torch.bfloat16)
    options = dict(divergence=divergence, beta=0.5, temperature=2.0)
    with recording() as launches:
        if path == "sweep":
            distill.distill_sweep(x, x, torch.empty_like(x), torch.ones(ROWS), **options)
        else:
            merged = torch.zeros(ROWS, 6)
            distill.distill_slice_stats(x, x, temperature=2.0)
            if divergence == "jsd":
                distill.distill_slice_terms(x, x, merged, beta=0.5, temperature=2.0)
            kl_s = None if divergence == "forward_kl" else torch.zeros(ROWS)
            distill.distill_slice_grad(x, x, merged, kl_s, torch.empty_like(x),
                                       torch.ones(ROWS), **options)
    return launches


def predict_distill(paths=("two_pass", "sweep"), copy_gbps: float = H200_COPY_GBPS,
                    latency_s: float = H200["latency_s"]) -> list[dict]:
    """Each (path, divergence)'s predicted forward + backward time on the H200 by the --rank
    model at N = DISTILL_N, V = DISTILL_V; for the sweep also `ms_l2`, its later sweeps'
    reads from L2 (out of the bandwidth floor), as --predict does for cross-entropy."""
    if "sweep" in paths and config.SWEEP_STAGES > 1:
        # The pipeliner's asynchronous copies are no loads the walk counts: no prediction.
        raise ValueError("--predict-distill models SWEEP_STAGES = 1 only")
    h = dict(H200, latency_s=latency_s)
    rows = []
    for path in paths:
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            total = dict(ms=0.0, ms_l2=0.0)
            kernels = []
            for kernel, grid, args, kwargs in _distill_launches(DISTILL_V, divergence, path):
                r = audit(kernel, grid, args, kwargs)
                sweep = r["kernel"] == "_distill_sweep_kernel"
                items = (ROWS if sweep else grid[0] * grid[1]) * DISTILL_N / ROWS
                resident = r["programs_per_sm"]
                p = predict(r, items, resident, copy_gbps * 1e9, h)
                sweeps = len(r["item_sweep_trips"]) or 1
                l2 = dict(r, item_load_bytes=r["item_load_bytes"] / sweeps) if sweep else r
                p_l2 = predict(l2, items, resident, copy_gbps * 1e9, h)
                total["ms"] += p["ms"]
                total["ms_l2"] += p_l2["ms"]
                kernels.append(f"{r['kernel']}: {resident}/SM, {r['item_stops']} stops, "
                               f"{r['item_instructions']} instr, {r['registers']} regs; "
                               f"bw {p['bw']:.2f} lat {p['lat']:.2f} issue {p['issue']:.2f}"
                               f" ms")
            rows.append(dict(path=path, divergence=divergence, kernels=kernels, **total))
    return rows


def predict_distill_main(args) -> int:
    """--predict-distill: the table, with the run's measured times where it has them (they
    ran the stages of commit 1d92434: compare those with that commit's kernels)."""
    measured = {}
    if os.path.exists(H200_DISTILL_CSV):
        import csv

        with open(H200_DISTILL_CSV, newline="") as f:
            for row in csv.DictReader(f):
                if row["provider"] == "triton_xent" and row["mode"] == "fwd_bwd":
                    measured[row["op"][len("distill_"):]] = float(row["ms"])
    with tempfile.TemporaryDirectory(prefix="compile_audit_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = predict_distill(args.predict_distill or ("two_pass", "sweep"),
                               latency_s=args.latency_us * 1e-6)
    # both logits read, the gradient written, at the copy bandwidth
    floor = DISTILL_N * DISTILL_V * 2 * 3 / (H200_COPY_GBPS * 1e9) * 1e3
    print(f"PREDICTIONS: triton {triton.__version__}, distillation, bf16, N = {DISTILL_N}, "
          f"V = {DISTILL_V}, forward + backward, the --rank model with L = "
          f"{args.latency_us:g} us; floor {floor:.2f} ms; ms_l2: the sweep's later reads "
          "from L2; measured: the 2026-12-04 H200 run (commit 1d92434's stages)")
    for r in rows:
        seen = measured.get(r["divergence"]) if r["path"] == "two_pass" else None
        print(f"  {r['path']:9s} {r['divergence']:10s} {r['ms']:6.2f} ms "
              f"({floor / r['ms']:.2f} of copy)  l2 {r['ms_l2']:6.2f} ms"
              + (f"  measured {seen:.2f} ms" if seen else ""))
        for k in r["kernels"]:
            print(f"      {k}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per launch")
    parser.add_argument("--only", nargs="*", help="case names to compile (default: all)")
    parser.add_argument("--target", nargs="+", default=["sm_90"],
                        choices=[*TARGETS, "all"], help="targets to compile for (default: "
                        "sm_90; all: " + ", ".join(TARGETS) + ")")
    parser.add_argument("--liger", nargs="?", const="", metavar="WHEEL",
                        help="also Liger-Kernel's cross-entropy kernel, from WHEEL (default: "
                        "liger_kernel-*.whl in ../shared/wheels, else an installed "
                        "liger_kernel); skipped with a message if neither is there")
    parser.add_argument("--rank", nargs="*", metavar="GROUP",
                        help="rank the kernels and paths of the H200 run of 2026-12-04 "
                        "(bench/results/nvidia-h200.csv, Liger's from its wheel) by the "
                        "predicted time and by bytes in flight alone, beside the measured; "
                        "GROUPs (default: all): kernel (the profiled launches) or "
                        "MODE/DTYPE/V, e.g. fwd_bwd/bfloat16/128256")
    parser.add_argument("--predict", action="store_true",
                        help="predict, by --rank's model, the forward + backward time of the "
                        "candidates bench/gpu_tune.py times (no GPU has run them)")
    parser.add_argument("--predict-distill", nargs="*", choices=["two_pass", "sweep"],
                        help="predict distillation's paths the same way (default: both)")
    parser.add_argument("--csv", default=H200_CSV, help="--rank: the measured CSV")
    parser.add_argument("--latency-us", type=float, default=H200["latency_s"] * 1e6,
                        help="--rank: L, the latency of a global round trip under load "
                        "(default %(default)s)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter gives no compilable kernels",
              file=sys.stderr)
        return 2
    if args.rank is not None:
        return rank_main(args)
    if args.predict:
        return predict_main(args)
    if args.predict_distill is not None:
        return predict_distill_main(args)
    targets = list(TARGETS) if "all" in args.target else args.target
    known = cases()
    if args.liger is not None:
        module, why = load_liger(args.liger or None)
        if module is None:
            print(f"skip liger: {why}", file=sys.stderr)
        else:
            print(f"liger_kernel {why}", file=sys.stderr)
            known.update(liger_cases())
    unknown = set(args.only or ()) - set(known)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; the cases are {sorted(known)}")
    # An empty cache of our own: every launch is compiled (compile_s is a cold start's).
    with tempfile.TemporaryDirectory(prefix="compile_audit_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        total = n = 0
        for name, call in known.items():
            if args.only and name not in args.only:
                continue
            for r in run_case(name, call, targets):
                total, n = total + r["compile_s"], n + 1
                print(json.dumps(r) if args.json else line(r), flush=True)
    if not args.json:
        print(f"{n} compiles in {total:.1f} s ({total / max(n, 1):.2f} s each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
