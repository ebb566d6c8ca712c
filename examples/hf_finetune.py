"""Fine-tune a tiny Hugging Face Llama on Shakespeare, with and without triton_xent's patch,
and compare peak memory, time per step and the losses.

Run it from the repository root (needs transformers: pip install -e ".[hf]"):

    python examples/hf_finetune.py                  # CPU, and CUDA too when a GPU is present
    python examples/hf_finetune.py --device cuda --vocab 128256 --seq-len 1024
    python examples/hf_finetune.py --device cpu --steps 10

The model is transformers.LlamaForCausalLM built from a LlamaConfig (2 layers, hidden 64),
randomly initialised: nothing is downloaded. Its tokens are the bytes of
examples/data/shakespeare.txt (ids 0-255); the head has --vocab outputs (default 32000, the
Llama-2 tokenizer's size), as a real tokenizer's vocabulary would give it, so that the logits
weigh what they weigh in practice. Only the byte ids ever occur as targets.

For each device, the same training run (same seed, same batches, AdamW) is made twice, each in
a fresh process: once as transformers computes the loss (logits (B, T, V), then
ForCausalLMLoss) and once patched with triton_xent.integrations.hf.patch_causal_lm (the loss
from the last hidden states by triton_xent.linear_cross_entropy, no logits). It prints, per
run, the time per step (mean after --warmup steps), the peak memory above what the process
held before training (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident set size,
from /proc and getrusage, so Linux only: it includes the AdamW state and the allocator's
caching, the same for both runs) and the first and last losses; then the largest difference
between the two runs' losses over all steps. It exits with status 1 if the losses disagree
(beyond --loss-rtol) or the loss did not fall.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import time

DATA = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare.txt"
VARIANTS = {"hf": "transformers (logits)", "patched": "triton_xent patch (no logits)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a tiny HF Llama with and without triton_xent's patch; compare "
                    "peak memory, time per step and losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cpu, then cuda as well when a GPU is present")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the time per step")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--vocab", type=int, default=32000, help="outputs of the head (>= 256)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the model's dtype; auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="memory_budget_bytes of the patch, in MiB: the size of one chunk of "
                        "logits; default 16 on CPU (so that this small batch spans several "
                        "chunks), the library's default (256) on CUDA")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default). As in train_lm.py: a "
                        "second thread gains little at these sizes and, when the cores are "
                        "shared with other work, costs several times over in waiting")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="largest relative loss difference between the runs at any step; "
                        "default 1e-4 in float32, 2e-2 in bfloat16 (whose rounding the runs "
                        "do in different places, and which grows over the steps)")
    p.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        p.error("need --steps > --warmup >= 0")
    if args.vocab < 256:
        p.error("--vocab must be >= 256: the tokens are bytes")
    return args


# --- one run, in its own process ------------------------------------------------------------

def _rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from triton_xent.integrations.hf import patch_causal_lm

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, use_cache=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    if args.worker == "patched":
        chunk_mib = args.chunk_mib if args.chunk_mib is not None else (
            16 if device.type == "cpu" else None)
        patch_causal_lm(model, memory_budget_bytes=(
            None if chunk_mib is None else int(chunk_mib * 2 ** 20)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    losses, times = [], []
    for _ in range(args.steps):
        starts = torch.randint(len(data) - args.seq_len, (args.batch_size,), generator=gen)
        ids = data[starts[:, None] + offsets].to(device)  # (B, T) byte ids
        t0 = time.perf_counter()
        # labels = input_ids: the model shifts them (position t predicts byte t + 1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return dict(losses=losses, ms=1e3 * sum(times[args.warmup:]) / len(times[args.warmup:]),
                peak_extra=peak - base, device_name=name, threads=torch.get_num_threads())


def run_worker(args: argparse.Namespace, device: str, variant: str) -> dict:
    """worker() in a fresh process, so that its peak memory is its own."""
    argv = [sys.executable, __file__, "--worker", variant, "--device", device,
            "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--vocab", str(args.vocab), "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--lr", str(args.lr), "--seed", str(args.seed),
            "--threads", str(args.threads)]
    if args.chunk_mib is not None:
        argv += ["--chunk-mib", str(args.chunk_mib)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"the {variant} run on {device} failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- main -----------------------------------------------------------------------------------

def main() -> int:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    try:
        import transformers
    except ImportError:
        raise SystemExit("this example needs transformers: pip install -e \".[hf]\"") from None
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda, but torch sees no CUDA GPU")
    devices = {"auto": ["cpu"] + (["cuda"] if cuda else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    cpu_memory = sys.platform.startswith("linux")
    tokens = args.batch_size * args.seq_len
    print(f"tiny LlamaForCausalLM: {args.layers} layers, hidden {args.hidden}, head "
          f"{args.hidden} -> {args.vocab} | {args.batch_size} x {args.seq_len} = {tokens} "
          f"byte tokens of {DATA.name} per step | {args.steps} steps, AdamW lr {args.lr} | "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1: the patch runs the Triton kernels interpreted on CPU "
              "(slow); unset it for the plain-PyTorch path")
    ok = True
    for device in devices:
        dtype = args.dtype if args.dtype != "auto" else (
            "bfloat16" if device == "cuda" else "float32")
        rtol = args.loss_rtol if args.loss_rtol is not None else (
            1e-4 if dtype == "float32" else 2e-2)
        run_args = argparse.Namespace(**{**vars(args), "dtype": dtype})
        results = {v: run_worker(run_args, device, v) for v in VARIANTS}
        hf = results["hf"]
        logits_mib = tokens * args.vocab * 4 / 2 ** 20
        print(f"\n{device} ({hf['device_name']}, {dtype}, {hf['threads']} threads); one "
              f"float32 (B, T, V) logits tensor is {logits_mib:.0f} MiB")
        what = ("peak CUDA memory above the model" if device == "cuda" else
                "peak RSS above the model" if cpu_memory else "peak memory")
        print(f"  {'loss computed by':32s} {what:>34s} {'ms/step':>9s}   loss first -> last")
        for v, label in VARIANTS.items():
            r = results[v]
            mem = (f"{r['peak_extra'] / 2 ** 20:,.1f} MiB" if device == "cuda" or cpu_memory
                   else "n/a (needs Linux /proc)")
            print(f"  {label:32s} {mem:>34s} {r['ms']:9.1f}   {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}")
        diff = max(abs(a - b) / abs(b) for a, b in
                   zip(results["patched"]["losses"], hf["losses"], strict=True))
        fell = math.isfinite(hf["losses"][-1]) and hf["losses"][-1] < 0.8 * hf["losses"][0]
        agree = diff <= rtol
        if device == "cuda" or cpu_memory:
            saved = hf["peak_extra"] - results["patched"]["peak_extra"]
            print(f"  the patch saved {saved / 2 ** 20:,.1f} MiB of peak memory; time per step "
                  f"x{results['patched']['ms'] / hf['ms']:.2f}")
        print(f"  losses of the two runs: largest relative difference over {args.steps} steps "
              f"{diff:.1e} ({'ok' if agree else 'MISMATCH'}, tolerance {rtol:.0e}); loss "
              f"{'fell' if fell else 'did NOT fall by 20%'}")
        ok = ok and agree and fell
    print("\nOK" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
