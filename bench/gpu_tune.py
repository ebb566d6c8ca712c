"""The prepared tuning command for a lent GPU: times every candidate design of the
cross-entropy kernels side by side with eager PyTorch, torch.compile and Liger, in one run on
one device, prints the table and writes one CSV, within a time budget.

    python bench/gpu_tune.py OUT_DIR                     # step "lm": at most ~150 s cold
    python bench/gpu_tune.py OUT_DIR --steps fp32 small options
    python bench/gpu_tune.py OUT_DIR --dry-run           # tiny shapes on a CPU (CI)

Steps (--steps; "lm" by default):
  lm       bf16, N = 16384. First a search at V = 128256, forward + backward: the long-row paths as
           they are configured ("two_pass", the default, and "exchange"), both with big slices
           (16384 columns, 32 warps: 32 KB a program), and the row sweep, whose knobs
           (config.SWEEP_*) are chosen a factor at a time, each factor's best value kept for the
           next (FACTORS below: 14 variants). Then the finals: eager, torch.compile, Liger, the
           default, the best exchange and the best sweep, forward and forward + backward, at
           V = 32000, 128256 and 256000, with the goals of the issue checked against each peer.
           The sweep's chosen knobs go to OUT_DIR/tuned.json for the later steps.
  fp32     float32, N = 16384, V = 128256: the default, the tuned sweep, the peers.
  small    N = 2^20, V = 10 and 1000 (whole rows): the default tile, other tile sizes, the
           peers.
  options  bf16, N = 16384, V = 128256, forward + backward on the default and the tuned sweep, and
           the sweep with the other register choice (REGISTER_CAP): the plain call and each option
           alone (smoothing, class weights, softcap, z-loss, temperature, entropy, row weights,
           argmax), and inplace_backward with its peak memory: each against the plain call's time.
  linear   linear_cross_entropy's chunk-driver choices (bench_linear.tune_step) beside the
           three GEMMs alone, bf16, N = 8192, (D, V) = (2304, 256000) and (4096, 128256),
           into OUT_DIR/gpu_tune-linear.csv.
  distill  distillation from logits, bf16, N = 8192, V = 128256, forward + backward and forward:
           forward KL, reverse KL and JSD (T = 2, beta = 0.5: bench_distill.py's), ours on
           "two_pass" (the stage kernels) and on the sweep (tuned.json's values, else config's; and
           with the other register choice), the naive PyTorch losses and Liger's JSD, each loss
           checked against the float32 naive one; the fraction of the copy bandwidth on the floor's
           bytes (one read of each logits tensor, one write of the gradient) against 0.75, and JSD's
           speed-up over Liger against 2.
Steps run in order and share one budget (--budget-s, 150 s): a measurement that would not
fit what is left is skipped and named, never cut in the middle, and the CSV is written row by
row. The numbers are for config.py: each tuned value there names this command, the device
and the date.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_distill  # noqa: E402
import bench_xent  # noqa: E402
import common  # noqa: E402

BUDGET_S = 150.0
REP_MS = 100  # do_bench's timing budget per measurement (bench_xent uses 500)
# What a measurement costs, for the budget. From the 2026-12-04 H200 check's log (not a
# measurement of this script): its step of 18 measurements (ours, torch.compile, Liger at
# three V, two modes; 500 ms of do_bench each) took 48.5 s, which leaves about 6 s for each
# of torch.compile's six first calls. A Triton compile took 0.3 to 1.5 s in the offline audit.
MEASURE_S = 0.8
TRITON_COMPILE_S = 2.0
INDUCTOR_COMPILE_S = 8.0
# The linear step (bench_linear.tune_step), whole: its two cases at about 10 s each by its
# own docstring's guess, doubled for the variants' compiles (a prediction).
LINEAR_STEP_S = 45.0

# bf16, N = 16384 (the issue's case); the search at Llama 3's vocabulary.
LM_TOKENS = 16384
LM_VOCAB = (128256, 32000, 256000)  # the searched one first: the budget may end the rest
SEARCH_VOCAB = 128256
PEERS = ("torch", "torch_compile", "liger")

# Fixed candidates of the search, as config values: the configured paths and big slices.
PATHS = {
    "two_pass": dict(LONG_ROWS="two_pass"),
    "exchange": dict(LONG_ROWS="exchange"),
    "two_pass_s16384_w32": dict(LONG_ROWS="two_pass", ROW_SLICE_MAX_V=16384,
                                SPLIT_NUM_WARPS=32),
    "exchange_s16384_w32": dict(LONG_ROWS="exchange", ROW_SLICE_MAX_V=16384,
                                SPLIT_NUM_WARPS=32),
}
# ptxas's register cap the search tries (config.SWEEP_MAX_REGISTERS): 2 programs of 16 warps
# an SM, or 4 of 8. The options and distill steps time the sweep under the other choice too:
# the compile audit predicts that some options and divergences (which the search does not
# time) need the cap to keep more than one program an SM (config.py).
REGISTER_CAP = 64

# The sweep's factors, in the order they are chosen; each value is a set of config values.
# First the shape of the work, chosen jointly because its parts trade against each other:
# (columns a step, warps) set the bytes a program has in flight, and the rows between their
# sweeps at once (one a program unless capped by programs per SM or by a share of the L2)
# decide whether the second sweep finds its row in L2 (a bf16 row of V = 128256 is 256 KB:
# 264 rows, two programs an SM of 132, are 67 MB, past an H200's 60 MB). Then how the next
# step's loads go out, the second sweep's direction and the eviction hints.
FACTORS = (
    ("shape", [dict(SWEEP_BLOCK_V=b, SWEEP_NUM_WARPS=w, SWEEP_PROGRAMS_PER_SM=k,
                    SWEEP_L2_FRACTION=f)
               for b, w, k, f in ((8192, 16, None, None), (8192, 16, None, 0.5),
                                  (4096, 8, None, None), (4096, 8, None, 0.5),
                                  (8192, 8, None, None), (16384, 16, None, None),
                                  (16384, 32, 1, None), (16384, 32, None, 0.5))]),
    ("loads", [dict(SWEEP_PREFETCH=p, SWEEP_STAGES=s)
               for p, s in ((True, 1), (False, 1), (False, 2), (False, 3))]),
    ("registers", [dict(SWEEP_MAX_REGISTERS=r) for r in (None, REGISTER_CAP)]),
    ("reverse", [dict(SWEEP_REVERSE=r) for r in (True, False)]),
    ("evict", [dict(SWEEP_EVICT=e) for e in (True, False)]),
)
SHORT = {"SWEEP_BLOCK_V": "b", "SWEEP_NUM_WARPS": "w", "SWEEP_PREFETCH": "pf",
         "SWEEP_STAGES": "st", "SWEEP_PROGRAMS_PER_SM": "pps", "SWEEP_L2_FRACTION": "l2",
         "SWEEP_MAX_REGISTERS": "r", "SWEEP_REVERSE": "rev", "SWEEP_EVICT": "ev"}

# The options step: each option alone, as cross_entropy keyword arguments (weights and
# row weights are made on the device by option_kwargs).
OPTIONS = ("label_smoothing", "weight", "softcap", "lse_square_scale", "temperature",
           "return_entropy", "row_weight", "return_argmax")
SMALL_VOCAB = (10, 1000)
SMALL_TOKENS = 1 << 20
# The small step's whole-row tiles: (config.ROWS_TILE_ELEMENTS, warps a program). One warp
# keeps a row's reductions inside the warp (shuffles, no barrier) at the cost of more
# elements a thread (the offline sm_90 audit: 2048 elements at one warp spill at V = 10);
# today's (2048, 4 for tiles up to 2048 elements) first.
SMALL_TILES = ((2048, 4), (1024, 4), (4096, 4), (1024, 1), (1024, 2), (512, 1))

# The goals, checked in the finals: fraction of the copy bandwidth, and speed-ups.
GOAL_COPY_FRACTION = 0.80
GOAL_SPEEDUP = {"liger": 1.5, "torch_compile": 2.0, "torch": 3.0}

# The distill step (issue 25): distillation from logits at the case, and its goals:
# the fraction of the copy bandwidth on the floor's bytes, and JSD against Liger's.
DISTILL_TOKENS = 8192
DISTILL_VOCAB = 128256
DISTILL_PEERS = ("torch", "liger")  # bench_distill.py's providers
GOAL_DISTILL_COPY_FRACTION = 0.75
GOAL_JSD_OVER_LIGER = 2.0
DISTILL_LOSS_RTOL = 2e-2  # bf16 losses against the float32 naive one

# --dry-run: tiny shapes through the interpreter on a CPU (V above one slice and one block).
DRY_TOKENS = 4
DRY_VOCAB = (300,)
DRY_SMALL = (10, 100)
DRY_PEERS = ("torch",)  # torch.compile: seconds of C++ compile; liger: its interpreter run
DRY_SLICE = 128  # --dry-run's ROW_SLICE_MAX_V: V = 300 is a long row on every path
DRY_DIVERGENCES = ("jsd",)  # the distill step's: three sweeps of the row, and Liger's
DRY_DISTILL_TOKENS = 2  # the interpreter's time grows with rows x blocks x sweeps


def sweep_name(values: dict) -> str:
    """'sweep_b8192_w16_pf1_st1_pps-_l2-_rev1_ev1' from the sweep's config values."""
    def text(v):
        return "-" if v is None else str(int(v)) if isinstance(v, bool) else str(v)
    return "sweep_" + "_".join(f"{SHORT[k]}{text(values[k])}" for k in SHORT)


def other_registers(values: dict) -> dict:
    """The sweep's values with the other register choice (capped or not)."""
    cap = values.get("SWEEP_MAX_REGISTERS")
    return dict(values, SWEEP_MAX_REGISTERS=None if cap else REGISTER_CAP)


def sweep_defaults() -> dict:
    from triton_xent import config

    return {k: getattr(config, k) for k in SHORT}


class Budget:
    """Seconds left of the run's budget, and what was skipped for lack of them."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, label: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.skipped.append(label)
        print(f"  skip {label}: {self.left():.0f} s left, about {estimate_s:.0f} s needed")
        return False


class Tuner:
    """Measures providers and config variants, writes each row, remembers each time."""

    def __init__(self, out_csv: str, device: torch.device, budget: Budget, dry: bool):
        self.device, self.budget, self.dry = device, budget, dry
        self.info = common.run_info(device)
        self.writer = common.CsvWriter(out_csv, append=True)
        self.copy = common.run_copy_gbps(device, quick=dry, cpu_budget_s=0.2)
        self.times: dict[tuple, float] = {}  # (provider, mode, dtype, N, V) -> ms
        self.refs: dict[tuple, tuple] = {}
        self.compiled: set = set()  # what was run once: its compiles are done
        self.cpu_min_calls = 1 if dry else 3  # a dry run's times are only plumbing

    def reference(self, N: int, V: int, dtype: torch.dtype, option: str | None = None):
        """(mean loss, gradient of the first rows) that bench_xent.check compares with:
        F.cross_entropy's in float32, or with an option our PyTorch backend's (the readable
        statement of the semantics, tested against float64 on CPU; rows a chunk at a time)."""
        key = (N, V, dtype, option)
        if key not in self.refs:
            x, t = bench_xent.make_inputs(N, V, dtype, self.device,
                                          requires_grad=option is not None)
            if option is None:
                self.refs[key] = bench_xent.reference(x, t)
            else:
                import triton_xent

                out = triton_xent.cross_entropy(x, t, backend="torch",
                                                **option_kwargs(option, N, V, self.device))
                loss = out if isinstance(out, torch.Tensor) else out.loss
                loss.backward()
                rows = min(N, bench_xent.CHECK_ROWS)
                self.refs[key] = float(loss), x.grad[:rows].float()
            del x, t
        return self.refs[key]

    def estimate_s(self, name: str, mode: str, V: int, dtype: torch.dtype) -> float:
        """Seconds a measurement is expected to take: the check, REP_MS of timing and the
        peak-memory call (MEASURE_S), plus a compile the first time: a Triton variant's for
        each mode and dtype (the three LM V specialise alike), torch.compile's for each V and
        mode. The figures are guesses from the 2026-12-04 H200 log, not measurements."""
        if self.dry:
            return 1.0
        if name == "torch_compile":
            first = (name, mode, dtype, V) not in self.compiled
            return MEASURE_S + (INDUCTOR_COMPILE_S if first else 0.0)
        first = (name, mode, dtype) not in self.compiled
        return MEASURE_S + (TRITON_COMPILE_S if first else 0.0)

    def time(self, provider: bench_xent.Provider, mode: str, N: int, V: int,
             dtype: torch.dtype, option: str | None = None) -> float | None:
        """Median ms of the provider (checked first against the reference, with `option`
        if it takes one), written to the CSV; None if skipped."""
        label = f"{provider.name} {mode} {bench_xent.dtype_name(dtype)} N={N} V={V}"
        if not self.budget.allows(label, self.estimate_s(provider.name, mode, V, dtype)):
            return None
        result = bench_xent.measure(provider, mode, N, V, dtype, self.device,
                                    self.reference(N, V, dtype, option), cpu_budget_s=0.2,
                                    cpu_min_calls=self.cpu_min_calls)
        self.compiled.update({(provider.name, mode, dtype, V), (provider.name, mode, dtype)})
        if result is None:
            return None
        ms, peak = result
        elem = torch.finfo(dtype).bits // 8
        nbytes = N * V * elem * (1 if mode == "fwd" else 2)
        gbps = nbytes / (ms * 1e-3) / common.GB
        self.writer.write(**self.info, op="cross_entropy", provider=provider.name, mode=mode,
                          dtype=bench_xent.dtype_name(dtype), N=N, V=V, D=0, ms=ms, gbps=gbps,
                          copy_gbps=self.copy, peak_mem_mb=peak)
        mem = f"{peak:9.1f} MB" if peak is not None else "        -"
        print(f"  {provider.name:58s} {mode:7s} {ms:9.3f} ms {gbps / self.copy:6.2f} of copy"
              f"  peak {mem}", flush=True)
        self.times[(provider.name, mode, dtype, N, V)] = ms
        return ms

    def time_distill(self, name: str, fn, divergence: str, mode: str, N: int, V: int,
                     dtype: torch.dtype, ref_loss: float) -> float | None:
        """Median ms of a distillation loss fn(student, teacher) on bench_distill's inputs
        (its measure_one), written to the CSV with the floor's GB/s; None if skipped or if
        its loss is not within DISTILL_LOSS_RTOL of ref_loss."""
        op = f"distill_{divergence}"
        label = f"{name} {op} {mode} {bench_xent.dtype_name(dtype)} N={N} V={V}"
        first = (name, op, mode, dtype) not in self.compiled
        estimate = 1.0 if self.dry else MEASURE_S + (TRITON_COMPILE_S if first else 0.0)
        if not self.budget.allows(label, estimate):
            return None
        try:
            r = bench_distill.measure_one(name, op, N, 0, V, dtype, mode, self.device,
                                          cpu_budget_s=0.2, fn=fn,
                                          cpu_min_calls=self.cpu_min_calls)
        except Exception as e:  # a provider that cannot run this case (OOM, unsupported)
            why = str(e).splitlines()[0] if str(e) else ""
            print(f"  skip {label}: {type(e).__name__}: {why}")
            return None
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.compiled.add((name, op, mode, dtype))
        if abs(r["loss"] - ref_loss) > DISTILL_LOSS_RTOL * abs(ref_loss) + 1e-6:
            print(f"  skip {label}: wrong result, loss {r['loss']:.6g} against {ref_loss:.6g}")
            return None
        ms = r["ms"]
        gbps = distill_floor_bytes(N, V, dtype, mode) / (ms * 1e-3) / common.GB
        self.writer.write(**self.info, op=op, provider=name, mode=mode,
                          dtype=bench_xent.dtype_name(dtype), N=N, V=V, D=0, ms=ms, gbps=gbps,
                          copy_gbps=self.copy, peak_mem_mb=r["peak_mem_mb"])
        peak = r["peak_mem_mb"]
        mem = f"{peak:9.1f} MB" if peak is not None else "        -"
        print(f"  {name:58s} {mode:7s} {ms:9.3f} ms {gbps / self.copy:6.2f} of copy"
              f"  peak {mem}", flush=True)
        self.times[(name, op, mode, dtype, N, V)] = ms
        return ms

    def variant(self, name: str, values: dict, fn=None) -> bench_xent.Provider:
        """triton_xent under config `values` (fn: the call, cross_entropy(x, t) by default)."""
        import triton_xent

        call = fn or (lambda x, t: triton_xent.cross_entropy(x, t))

        def run(x, t):
            with bench_xent.config_values(values):
                return call(x, t)
        return bench_xent.Provider(f"triton_xent[{name}]", run)

    def peer(self, name: str) -> bench_xent.Provider | None:
        try:
            return bench_xent.make_provider(name, self.device)
        except common.Unavailable as e:
            print(f"  skip provider {name}: {e}")
            return None


# --- the steps ----------------------------------------------------------------------------

def search(tuner: Tuner, N: int, V: int, dtype: torch.dtype, paths: dict,
           factors) -> tuple[dict, str]:
    """The sweep's config values, chosen one factor at a time by forward + backward time,
    and the fastest of the fixed `paths`; every candidate timed is a CSV row."""
    print(f"search: {bench_xent.dtype_name(dtype)} N={N} V={V}, fwd_bwd")
    path_ms = {}
    for name, values in paths.items():
        ms = tuner.time(tuner.variant(name, values), "fwd_bwd", N, V, dtype)
        if ms is not None:
            path_ms[name] = ms
    best = dict(LONG_ROWS="sweep", **sweep_defaults())
    timed: dict[str, float] = {}
    for factor, choices in factors:
        scores = {}
        for choice in choices:
            values = {**best, **choice}
            name = sweep_name(values)
            if name not in timed:
                ms = tuner.time(tuner.variant(name, values), "fwd_bwd", N, V, dtype)
                timed[name] = ms if ms is not None else float("inf")
            scores[name] = (timed[name], choice)
        name, (ms, choice) = min(scores.items(), key=lambda item: item[1][0])
        if ms < float("inf"):
            best.update(choice)
            print(f"  {factor}: {name} ({ms:.3f} ms)")
    best_path = min(path_ms, key=path_ms.get) if path_ms else "two_pass"
    return best, best_path


def finals(tuner: Tuner, N: int, vocab, dtype: torch.dtype, candidates: dict, peers,
           modes=("fwd_bwd", "fwd")) -> None:
    """Peers and our candidates side by side at each V, both modes; then the goals."""
    providers = [p for p in (tuner.peer(name) for name in peers) if p is not None]
    providers += [tuner.variant(name, values) for name, values in candidates.items()]
    for V in vocab:
        print(f"case {bench_xent.dtype_name(dtype)} N={N} V={V}")
        for provider in providers:
            provider.new_case()
            for mode in modes:
                tuner.time(provider, mode, N, V, dtype)
    report(tuner, N, sorted(vocab), dtype, [p.name for p in providers], peers)


def report(tuner: Tuner, N: int, vocab, dtype: torch.dtype, names: list[str], peers) -> None:
    """The table: ms and fraction of the copy bandwidth per provider and V (fwd_bwd), and
    for each of ours its speed-up over each peer against the issue's goals."""
    ours = [n for n in names if n.startswith("triton_xent")]
    print(f"\n{bench_xent.dtype_name(dtype)} N={N}, forward + backward: ms (fraction of the "
          f"{tuner.copy:.0f} GB/s copy)")
    print(f"{'provider':58s} " + " ".join(f"{'V=' + str(V):>16s}" for V in vocab))
    elem = torch.finfo(dtype).bits // 8
    for name in names:
        cells = []
        for V in vocab:
            ms = tuner.times.get((name, "fwd_bwd", dtype, N, V))
            frac = 2 * N * V * elem / (ms * 1e-3) / common.GB / tuner.copy if ms else None
            cells.append(f"{ms:8.3f} ({frac:.2f})" if ms else f"{'-':>16s}")
        print(f"{name:58s} " + " ".join(cells))
    for name in ours:
        for V in vocab:
            ms = tuner.times.get((name, "fwd_bwd", dtype, N, V))
            if not ms:
                continue
            frac = 2 * N * V * elem / (ms * 1e-3) / common.GB / tuner.copy
            goals = [f"copy {frac:.2f} {'>=' if frac >= GOAL_COPY_FRACTION else '<'} "
                     f"{GOAL_COPY_FRACTION}"]
            for peer in peers:
                theirs = tuner.times.get((peer, "fwd_bwd", dtype, N, V))
                if theirs:
                    x = theirs / ms
                    goal = GOAL_SPEEDUP.get(peer)
                    mark = "" if goal is None else (" met" if x >= goal else f" < {goal}")
                    goals.append(f"{x:.2f}x {peer}{mark}")
            print(f"  {name} V={V}: " + ", ".join(goals))


def dry_plan(paths: dict, factors):
    """--dry-run's candidates: big slices of 256 columns at 4 warps (twice main's DRY_SLICE)
    and sweep blocks of at most DRY_SLICE, so that V = 300 is a long row for every one of
    them (two full blocks and a tail)."""
    small = {name: dict(v, ROW_SLICE_MAX_V=2 * DRY_SLICE, SPLIT_NUM_WARPS=4)
             if "ROW_SLICE_MAX_V" in v else v for name, v in paths.items()}
    return small, tuple((f, [dict(c, SWEEP_BLOCK_V=min(c["SWEEP_BLOCK_V"], DRY_SLICE),
                                  SWEEP_NUM_WARPS=4) if "SWEEP_BLOCK_V" in c else c
                             for c in choices])
                        for f, choices in factors)


def step_lm(tuner: Tuner, out_dir: str, dry: bool) -> None:
    N = DRY_TOKENS if dry else LM_TOKENS
    vocab = DRY_VOCAB if dry else LM_VOCAB
    search_v = vocab[0] if dry else SEARCH_VOCAB
    dtype = torch.bfloat16
    paths, factors = dry_plan(PATHS, FACTORS) if dry else (PATHS, FACTORS)
    best, best_path = search(tuner, N, search_v, dtype, paths, factors)
    save_tuned(out_dir, best)
    candidates = {"two_pass": paths["two_pass"], sweep_name(best): best}
    exchanges = [n for n in paths if n.startswith("exchange")]
    fastest_exchange = min(exchanges, key=lambda n: tuner.times.get(
        (f"triton_xent[{n}]", "fwd_bwd", dtype, N, search_v), float("inf")))
    candidates[fastest_exchange] = paths[fastest_exchange]
    candidates.setdefault(best_path, paths[best_path])
    finals(tuner, N, vocab, dtype, candidates, DRY_PEERS if dry else PEERS)


def step_fp32(tuner: Tuner, out_dir: str, dry: bool) -> None:
    N = DRY_TOKENS if dry else LM_TOKENS
    V = DRY_VOCAB[0] if dry else SEARCH_VOCAB
    best = load_tuned(out_dir, dry)
    finals(tuner, N, (V,), torch.float32, {"two_pass": PATHS["two_pass"], sweep_name(best): best},
           DRY_PEERS if dry else PEERS)


def step_small(tuner: Tuner, out_dir: str, dry: bool) -> None:
    N = DRY_TOKENS * 64 if dry else SMALL_TOKENS
    vocab = DRY_SMALL if dry else SMALL_VOCAB
    candidates = {f"tile{n}_w{w}": dict(ROWS_TILE_ELEMENTS=n, NUM_WARPS_BY_BLOCK=((1 << 62, w),))
                  for n, w in SMALL_TILES}
    finals(tuner, N, vocab, torch.bfloat16, candidates,
           DRY_PEERS if dry else ("torch", "torch_compile"))


def option_kwargs(name: str, N: int, V: int, device: torch.device) -> dict:
    """cross_entropy's keyword arguments for one option alone."""
    g = torch.Generator(device=device).manual_seed(1)
    return {
        "label_smoothing": dict(label_smoothing=0.1),
        "weight": dict(weight=torch.rand(V, device=device, generator=g) + 0.5),
        "softcap": dict(softcap=30.0),
        "lse_square_scale": dict(lse_square_scale=1e-4),
        "temperature": dict(temperature=0.7),
        "return_entropy": dict(return_entropy=True),
        "row_weight": dict(row_weight=torch.rand(N, device=device, generator=g)),
        "return_argmax": dict(return_argmax=True),
    }[name]


def step_options(tuner: Tuner, out_dir: str, dry: bool) -> None:
    import triton_xent

    N = DRY_TOKENS if dry else LM_TOKENS
    V = DRY_VOCAB[0] if dry else SEARCH_VOCAB
    dtype = torch.bfloat16
    best = load_tuned(out_dir, dry)
    print(f"options: {bench_xent.dtype_name(dtype)} N={N} V={V}, fwd_bwd")
    other = other_registers(best)
    for path, values in (("two_pass", PATHS["two_pass"]), (sweep_name(best), best),
                         (sweep_name(other), other)):
        plain = tuner.time(tuner.variant(path, values), "fwd_bwd", N, V, dtype)
        for option in OPTIONS:
            kwargs = option_kwargs(option, N, V, tuner.device)

            def call(x, t, kwargs=kwargs):
                out = triton_xent.cross_entropy(x, t, **kwargs)
                return out if isinstance(out, torch.Tensor) else out.loss
            ms = tuner.time(tuner.variant(f"{path}+{option}", values, call), "fwd_bwd", N,
                            V, dtype, option)
            if ms and plain:
                print(f"    {option}: {ms / plain - 1:+.1%} over the plain call")
        inplace = tuner.variant(f"{path}+inplace_backward", values, lambda x, t: (
            triton_xent.cross_entropy(x, t, inplace_backward=True)))
        ms = tuner.time(inplace, "fwd_bwd", N, V, dtype)
        if ms and plain:
            print(f"    inplace_backward: {ms / plain - 1:+.1%} over the plain call")


def step_linear(tuner: Tuner, out_dir: str, dry: bool) -> None:
    """bench_linear.tune_step: the chunk driver's choices (bench_linear.VARIANTS) beside the
    three GEMMs alone at issue 24's two heads, into OUT_DIR/gpu_tune-linear.csv. It runs
    whole or not at all: LINEAR_STEP_S is its budget."""
    import bench_linear

    if tuner.budget.allows("step linear (bench_linear.tune_step)", 1.0 if dry else LINEAR_STEP_S):
        bench_linear.tune_step(os.path.join(out_dir, "gpu_tune-linear.csv"), dry_run=dry)



def distill_floor_bytes(N: int, V: int, dtype: torch.dtype, mode: str) -> int:
    """The floor's bytes: one read of the student's and the teacher's (N, V) logits, and
    with a gradient one write of it."""
    elem = torch.finfo(dtype).bits // 8
    return N * V * elem * (3 if mode == "fwd_bwd" else 2)


def distill_reference(N: int, V: int, dtype: torch.dtype, device: torch.device,
                      divergence: str) -> float:
    """The naive loss (bench_distill.naive_loss) on bench_distill's inputs, in float32."""
    s, t = bench_distill.make_inputs(N, 0, V, dtype, device, requires_grad=False)
    with torch.no_grad():
        loss = float(bench_distill.naive_loss(s.float(), t.float(), divergence))
    del s, t
    return loss


def step_distill(tuner: Tuner, out_dir: str, dry: bool) -> None:
    import triton_xent

    N = DRY_DISTILL_TOKENS if dry else DISTILL_TOKENS
    V = DRY_VOCAB[0] if dry else DISTILL_VOCAB
    dtype = torch.bfloat16
    sweep = load_tuned(out_dir, dry)
    other = other_registers(sweep)
    ours = {"two_pass": dict(LONG_ROWS="two_pass"), sweep_name(sweep): sweep,
            sweep_name(other): other}
    peers = DRY_PEERS if dry else DISTILL_PEERS
    names = [f"triton_xent[{name}]" for name in ours] + list(peers)
    print(f"distill: {bench_xent.dtype_name(dtype)} N={N} V={V}, from logits")
    divergences = DRY_DIVERGENCES if dry else bench_distill.DIVERGENCES
    for divergence in divergences:
        op = f"distill_{divergence}"
        ref = distill_reference(N, V, dtype, tuner.device, divergence)
        providers = {}
        for name, values in ours.items():  # read in the forward: the backward only scales
            def fn(s, t, values=values, divergence=divergence):
                with bench_xent.config_values(values):
                    return triton_xent.distillation_loss(
                        s, t, divergence=divergence, beta=bench_distill.BETA,
                        temperature=bench_distill.TEMPERATURE)
            providers[f"triton_xent[{name}]"] = fn
        for peer in peers:
            try:
                providers[peer] = bench_distill.make_provider(peer, op, divergence,
                                                              tuner.device)
            except common.Unavailable as e:
                print(f"  skip provider {peer} for {divergence}: {e}")
        print(f"case {op}")
        for name, fn in providers.items():
            for mode in ("fwd_bwd", "fwd"):
                tuner.time_distill(name, fn, divergence, mode, N, V, dtype, ref)
    report_distill(tuner, N, V, dtype, names, divergences)


def report_distill(tuner: Tuner, N: int, V: int, dtype: torch.dtype, names: list[str],
                   divergences) -> None:
    """The table: ms and fraction of the copy bandwidth on the floor's bytes per provider
    and divergence, both modes; then the goals for each of ours."""
    print(f"\ndistillation {bench_xent.dtype_name(dtype)} N={N} V={V} from logits: ms "
          f"(fraction of the {tuner.copy:.0f} GB/s copy on the floor's bytes)")
    ops = [f"distill_{d}" for d in divergences]
    print(f"{'provider':58s} {'mode':7s} " + " ".join(f"{op:>22s}" for op in ops))
    for name in names:
        for mode in ("fwd_bwd", "fwd"):
            cells = []
            for op in ops:
                ms = tuner.times.get((name, op, mode, dtype, N, V))
                frac = (distill_floor_bytes(N, V, dtype, mode) / (ms * 1e-3) / common.GB
                        / tuner.copy if ms else None)
                cells.append(f"{ms:12.3f} ({frac:.2f})" if ms else f"{'-':>22s}")
            print(f"{name:58s} {mode:7s} " + " ".join(cells))
    for name in (n for n in names if n.startswith("triton_xent")):
        goals = []
        for op in ops:
            ms = tuner.times.get((name, op, "fwd_bwd", dtype, N, V))
            if not ms:
                continue
            frac = distill_floor_bytes(N, V, dtype, "fwd_bwd") / (ms * 1e-3) / common.GB \
                / tuner.copy
            mark = ">=" if frac >= GOAL_DISTILL_COPY_FRACTION else "<"
            goals.append(f"{op} copy {frac:.2f} {mark} {GOAL_DISTILL_COPY_FRACTION}")
        ms = tuner.times.get((name, "distill_jsd", "fwd_bwd", dtype, N, V))
        liger = tuner.times.get(("liger", "distill_jsd", "fwd_bwd", dtype, N, V))
        if ms and liger:
            x = liger / ms
            goals.append(f"jsd {x:.2f}x liger" + (" met" if x >= GOAL_JSD_OVER_LIGER
                                                  else f" < {GOAL_JSD_OVER_LIGER}"))
        print(f"  {name} fwd_bwd: " + (", ".join(goals) or "nothing measured"))


STEPS = {"lm": step_lm, "fp32": step_fp32, "small": step_small, "options": step_options,
         "linear": step_linear, "distill": step_distill}


# --- plumbing -----------------------------------------------------------------------------

def save_tuned(out_dir: str, best: dict) -> None:
    with open(os.path.join(out_dir, "tuned.json"), "w") as f:
        json.dump(best, f, indent=1)
    print(f"sweep chosen: {sweep_name(best)} (written to tuned.json)")


def load_tuned(out_dir: str, dry: bool) -> dict:
    """The sweep's values chosen by a step "lm" into out_dir, else config's (--dry-run: in
    blocks of DRY_SLICE columns)."""
    path = os.path.join(out_dir, "tuned.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    values = dict(LONG_ROWS="sweep", **sweep_defaults())
    return dict(values, SWEEP_BLOCK_V=DRY_SLICE, SWEEP_NUM_WARPS=4) if dry else values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for gpu_tune.csv (appended to) and tuned.json")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=["lm"],
                   help="steps to run, in this order (default: lm)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"seconds for all the steps (default {BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on a CPU, through Triton's interpreter")
    return p.parse_args(argv)


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when Triton is imported (bench/common.py imports it).
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  dict(os.environ, TRITON_INTERPRET="1"))
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no GPU: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    common.DO_BENCH_REP_MS = REP_MS
    budget = Budget(args.budget_s - (time.monotonic() - start))
    out_csv = os.path.join(args.out_dir, "gpu_tune.csv")
    tuner = Tuner(out_csv, device, budget, args.dry_run)
    print(f"device: {tuner.info['device']}; torch {tuner.info['torch']}, triton "
          f"{tuner.info['triton']}; writing {out_csv}; budget {args.budget_s:.0f} s")
    # --dry-run: slices of DRY_SLICE columns, so that V = 300 is a long row on every path
    with bench_xent.config_values(dict(ROW_SLICE_MAX_V=DRY_SLICE) if args.dry_run else {}):
        for step in args.steps:
            print(f"\n=== step {step} ({budget.left():.0f} s left)")
            STEPS[step](tuner, args.out_dir, args.dry_run)
    tuner.writer.close()
    print(f"\ndone in {time.monotonic() - start:.0f} s; skipped {len(budget.skipped)}"
          + "".join(f"\n  {s}" for s in budget.skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
