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

    python bench/compile_audit.py                   # a table of every case, for sm_90
    python bench/compile_audit.py --target all      # every case for the six targets
    python bench/compile_audit.py --target sm_100 gfx942 --only lm_V128256_bf16
    python bench/compile_audit.py --json            # one JSON object a launch (the tests)

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
           "_two_pass_finish_kernel", "_slice_stats_kernel", "_slice_grad_kernel",
           "_scale_rows_kernel")
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


# --- recording and specialising launches ---------------------------------------------------


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def recording():
    """Replaces the kernels of kernels/xent.py and kernels/distill.py by recorders; yields
    the list of launches."""
    launches: list = []
    saved = {(module, name): getattr(module, name) for module, names in
             ((xent, KERNELS), (distill, DISTILL_KERNELS)) for name in names}
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
    logits = "logits_ptr" if "logits_ptr" in runtime else "student_ptr"  # distill's
    mem = memory_ops(ptx, position(logits), position("grad_ptr"))
    out.update(mem)
    block_v = constants.get("BLOCK_V")
    if block_v and "logits_ptr" in bound:
        x = bound["logits_ptr"]
        tile_rows = constants.get("ROWS", 1)
        tile_bytes = tile_rows * block_v * x.element_size()
        moved = sum(size * n for size, n in mem["logits_loads"].items()) * 32 * warps
        out["logits_coverage"] = round(moved / tile_bytes, 3)
        out.update(tile_layout(compiled.asm["ttgir"], tile_rows, block_v, x.shape[1]))
    if kernel.fn.__name__ == "_finish_kernel":
        out["second_launch_loads"] = second_launch_loads(ptx)
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
    return text + "".join(f" {k}={r[k]}" for k in (
        "logits_coverage", "threads_per_row", "columns_per_thread", "lane_use",
        "second_launch_loads", "merge_round_trips", "record_loads_in_loops", "timed_wait")
        if k in r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per launch")
    parser.add_argument("--only", nargs="*", help="case names to compile (default: all)")
    parser.add_argument("--target", nargs="+", default=["sm_90"],
                        choices=[*TARGETS, "all"], help="targets to compile for (default: "
                        "sm_90; all: " + ", ".join(TARGETS) + ")")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter gives no compilable kernels",
              file=sys.stderr)
        return 2
    targets = list(TARGETS) if "all" in args.target else args.target
    known = cases()
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
