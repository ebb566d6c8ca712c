"""Compile the row kernels for the H100 (sm_90) without a GPU and report their register use.

Triton's interpreter runs the kernels' Python, not Triton's compiler, so it misses what only
the compiler rejects (a non-constexpr global, a Python `or` on a tensor, a type that changes
in a loop). This script sends each kernel variant through the real pipeline to a cubin for
sm_90 with Triton's bundled ptxas and reads the registers and local-memory stack (where
spilled registers live) of each with cuobjdump. It needs no GPU, only the triton package.

    python bench/sm90_compile.py            # a table of every variant
    python bench/sm90_compile.py --json     # one JSON object per line (tests/test_compile_sm90.py)

TRITON_INTERPRET must be unset: under the interpreter @triton.jit gives no compilable kernel.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton_xent import config
from triton_xent.kernels import xent

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SM90 = GPUTarget("cuda", 90, 32)
POINTERS = dict(logits_ptr="*bf16", grad_ptr="*bf16", target_ptr="*i64", weight_ptr="*fp32",
                scale_ptr="*fp32", ce_ptr="*fp32", lse_ptr="*fp32", record_ptr="*fp32",
                sync_ptr="*i32", stats_ptr="*fp32", grad_out_ptr="*bf16", entropy_ptr="*fp32",
                argmax_ptr="*i64", row_weight_ptr="*fp32", entropy_weight_ptr="*fp32")
FLOATS = ("label_smoothing", "lse_square_scale", "softcap", "inv_temperature")


def switches(**overrides) -> dict:
    """A row kernel's option constexprs: an LM row (class indices, mean, nothing else)."""
    base = dict(PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False,
                HAS_ZLOSS=False, HAS_SCALE=True, COMPUTE_GRAD=True, ENTROPY=False,
                ARGMAX=False, HAS_ROW_WEIGHT=False, HAS_ENTROPY_WEIGHT=False)
    base.update(overrides)
    return base


EVERY = dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, HAS_ZLOSS=True)
# The RL extras (issue 13): the entropy and its gradient, row weights, the argmax.
RL = dict(ENTROPY=True, ARGMAX=True, HAS_ROW_WEIGHT=True, HAS_ENTROPY_WEIGHT=True)


def variants() -> dict[str, tuple]:
    """name -> (kernel, constexprs, num_warps): every switch on and off at least once, both
    launches of a split row, and the blocks the tuning table gives an LM row."""
    rows = dict(ROWS=4, BLOCK_V=256)
    split = dict(BLOCK_V=config.ROW_SLICE_MAX_V, P_PAD=32)
    split_warps = config.num_warps_for(config.ROW_SLICE_MAX_V)
    out = {
        "plain": (xent._rows_kernel, switches(**rows), 4),
        "no_grad": (xent._rows_kernel, switches(COMPUTE_GRAD=False, **rows), 4),
        "every_option": (xent._rows_kernel, switches(**EVERY, **rows), 4),
        "prob_target": (xent._rows_kernel, switches(PROB_TARGET=True, HAS_WEIGHT=True,
                                                    HAS_SCALE=False, **rows), 4),
        "split": (xent._split_kernel, switches(HAS_SMOOTHING=True, HAS_ZLOSS=True, **split),
                  split_warps),
        "split_finish": (xent._finish_kernel, switches(HAS_SOFTCAP=True, **split), split_warps),
        "split_no_grad_finish": (xent._finish_kernel, switches(COMPUTE_GRAD=False, **split),
                                 split_warps),
        "rl_rows": (xent._rows_kernel, switches(**RL, **rows), 4),
        "rl_split": (xent._split_kernel, switches(**RL, **split), split_warps),
        "rl_split_finish": (xent._finish_kernel, switches(**RL, HAS_SOFTCAP=True, **split),
                            split_warps),
        "slice_stats": (xent._slice_stats_kernel, dict(HAS_WEIGHT=True, HAS_SMOOTHING=True,
                                                       HAS_SOFTCAP=False, ENTROPY=False,
                                                       ARGMAX=False, ROWS=1, BLOCK_V=4096), 8),
        "rl_slice_stats": (xent._slice_stats_kernel, dict(HAS_WEIGHT=False,
                                                          HAS_SMOOTHING=False,
                                                          HAS_SOFTCAP=False, ENTROPY=True,
                                                          ARGMAX=True, ROWS=1, BLOCK_V=4096),
                           8),
        "slice_grad": (xent._slice_grad_kernel, dict(HAS_WEIGHT=False, HAS_SMOOTHING=True,
                                                     HAS_SOFTCAP=False, HAS_ZLOSS=True,
                                                     HAS_SCALE=True, HAS_ROW_WEIGHT=False,
                                                     HAS_ENTROPY_WEIGHT=False, ROWS=1,
                                                     BLOCK_V=4096), 8),
        "rl_slice_grad": (xent._slice_grad_kernel, dict(HAS_WEIGHT=False, HAS_SMOOTHING=False,
                                                        HAS_SOFTCAP=False, HAS_ZLOSS=False,
                                                        HAS_SCALE=True, HAS_ROW_WEIGHT=True,
                                                        HAS_ENTROPY_WEIGHT=True, ROWS=1,
                                                        BLOCK_V=4096), 8),
        "scale_rows": (xent._scale_rows_kernel, dict(BLOCK_V=config.SCALE_BLOCK_V),
                       config.SCALE_NUM_WARPS),
    }
    for block in (1024, 4096, config.ROW_SLICE_MAX_V):
        out[f"tuned_block{block}_split0"] = (xent._rows_kernel,
                                             switches(ROWS=1, BLOCK_V=block),
                                             config.num_warps_for(block))
        out[f"tuned_block{block}_split1"] = (xent._split_kernel,
                                             switches(BLOCK_V=block, P_PAD=32),
                                             config.num_warps_for(block))
    return out


def compile_sm90(kernel, constexprs: dict, num_warps: int) -> dict:
    """Compiles one variant to a cubin for sm_90; returns its registers and stack bytes."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else
                 POINTERS.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    values = {(names.index(k),): v for k, v in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=values), target=SM90,
                              options=dict(num_warps=num_warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage",
                                f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    field = lambda key: int(line.split(key + ":")[1].split()[0])  # noqa: E731
    return dict(registers=field("REG"), stack_bytes=field("STACK"), num_warps=num_warps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--only", nargs="*", help="variant names to compile (default: all)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter gives no compilable kernels",
              file=sys.stderr)
        return 2
    for name, (kernel, constexprs, warps) in variants().items():
        if args.only and name not in args.only:
            continue
        result = dict(variant=name, **compile_sm90(kernel, constexprs, warps))
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{name:28s} warps={warps:2d} registers={result['registers']:3d} "
                  f"stack={result['stack_bytes']}B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
