"""Train a tiny character-level transformer on Shakespeare with triton_xent's cross-entropy.

Run it from the repository root:

    python examples/train_lm.py                    # CUDA + Triton kernels if a GPU is present,
                                                   # else CPU + the plain-PyTorch fallback
    python examples/train_lm.py --device cuda --steps 1000 --batch-size 64
    python examples/train_lm.py --backend torch    # force the fallback (also on CUDA)
    TRITON_INTERPRET=1 python examples/train_lm.py --backend triton --steps 20
                                                   # the Triton kernels on CPU, interpreted:
                                                   # slow, about 10 s a step at these sizes

The model (2 pre-norm transformer blocks, about 0.4M parameters) reads --seq-len characters
of examples/data/shakespeare.txt and predicts each next character; its loss is
triton_xent.cross_entropy on the (batch * seq_len, vocab) logits. The script prints

  * the training loss every --log-every steps, and first vs last loss at the end;
  * every --check-every steps, the agreement with torch.nn.functional.cross_entropy on the
    same batch: the max absolute difference of the loss, and of the gradient with respect to
    the logits (the one triton_xent gave the model vs the one F.cross_entropy gives);
  * the time per training step (forward, loss, backward, optimizer), in ms, averaged over
    the steps after the first --warmup ones;

and exits with status 1 if the loss did not fall by 10% or the two losses or gradients differ
by more than the tolerances below. The same --seed gives the same run (bit for bit on CPU;
on CUDA up to the order of the GPU's floating-point sums).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_xent

DATA = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare.txt"

# Agreement with F.cross_entropy (float32 logits, both accumulate in float32):
LOSS_RTOL = 1e-5  # |loss - loss_ref| <= LOSS_RTOL * |loss_ref|
GRAD_RTOL = 1e-4  # max |g - g_ref| <= GRAD_RTOL * max |g_ref|  (g_ref ~ 1/N per element)
MIN_LOSS_DROP = 0.10  # the last losses must be at least 10% below the first one


# --- model --------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)  # each (B, T, D)
        # (B, T, D) -> (B, H, T, D/H): one attention per head, causal (t sees only <= t)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, `n_layers` blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocab: int, seq_len: int, dim: int = 128, n_heads: int = 4,
                 n_layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) int64
        """(B, T, dim): what the head reads (examples/tensor_parallel.py feeds it to
        triton_xent.linear_cross_entropy with the head's weight, without the logits)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) int64, T <= seq_len
        return self.head(self.hidden_states(idx))  # (B, T, vocab) logits for the next character


# --- data ---------------------------------------------------------------------------------

def load_text() -> tuple[torch.Tensor, list[str]]:
    """The text as a 1-D int64 tensor of character ids, and the id -> character table."""
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def get_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """`batch` random windows: x = data[s : s+T], y = data[s+1 : s+T+1] (the next characters)."""
    starts = torch.randint(len(data) - seq_len - 1, (batch,), generator=gen)
    offsets = torch.arange(seq_len)
    x = data[starts[:, None] + offsets]  # (B, T)
    y = data[starts[:, None] + offsets + 1]  # (B, T)
    return x, y


@torch.no_grad()
def sample(model: TinyLM, chars: list[str], seq_len: int, n: int, device, gen) -> str:
    """n characters drawn one at a time from the model, starting from a newline."""
    idx = torch.tensor([[chars.index("\n")]], device=device)
    for _ in range(n):
        probs = torch.softmax(model(idx[:, -seq_len:])[0, -1].float(), dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        idx = torch.cat([idx, nxt[None]], dim=1)
    return "".join(chars[i] for i in idx[0, 1:].tolist())


# --- main ---------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a tiny character-level transformer on Shakespeare with "
                    "triton_xent.cross_entropy; check it against F.cross_entropy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if available, else cpu")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="triton_xent backend: auto = Triton kernels for CUDA tensors (and CPU "
                        "tensors under TRITON_INTERPRET=1), plain PyTorch otherwise")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="characters per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, batches and sampling")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (torch.set_num_threads); 0 keeps torch's "
                        "default. This model's ops are small: a second thread gains little "
                        "and, when the cores are shared with other work, costs several times "
                        "over in waiting")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="passed to both triton_xent and F.cross_entropy")
    p.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
    p.add_argument("--check-every", type=int, default=50,
                   help="compare with F.cross_entropy every N steps (and at the first and "
                        "last step)")
    p.add_argument("--warmup", type=int, default=10,
                   help="steps left out of the time per step (at most half of --steps)")
    p.add_argument("--sample", type=int, default=200,
                   help="characters to sample from the trained model (0: none)")
    args = p.parse_args()
    if args.steps < 2 or args.batch_size < 1 or args.seq_len < 1:
        p.error("need --steps >= 2, --batch-size >= 1 and --seq-len >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.log_every < 1 or args.check_every < 1:
        p.error("--log-every and --check-every must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.backend == "triton" and args.device == "cpu" and not interpret:
        p.error("--backend triton on CPU needs TRITON_INTERPRET=1 in the environment "
                "(the Triton interpreter); or use --device cuda")
    # which path triton_xent will take (its own rule, in triton_xent/functional.py)
    if args.backend != "torch" and (args.device == "cuda" or interpret) and (
            args.backend == "triton" or triton_xent.triton_available()):
        args.loss_path = "Triton kernels" + (", interpreted" if args.device == "cpu" else "")
    else:
        args.loss_path = "plain-PyTorch fallback"
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model initialisation
    gen = torch.Generator().manual_seed(args.seed)  # batches and sampling (on the CPU)

    data, chars = load_text()
    vocab = len(chars)
    model = TinyLM(vocab, args.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"text: {DATA.name}, {len(data):,} characters, vocab {vocab} | model: {n_params:,} "
          f"parameters | device {device}, torch threads {torch.get_num_threads()}")
    print(f"loss: triton_xent.cross_entropy, backend={args.backend!r} -> {args.loss_path} | "
          f"batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len} "
          f"rows of {vocab} classes | {args.steps} steps, seed {args.seed}")
    print(f"untrained loss should be near ln({vocab}) = {math.log(vocab):.3f}")

    warmup = min(args.warmup, args.steps // 2)
    losses, step_times, checks = [], [], []
    for step in range(1, args.steps + 1):
        x, y = get_batch(data, args.batch_size, args.seq_len, gen)
        x, y = x.to(device), y.to(device)
        check = step == 1 or step % args.check_every == 0 or step == args.steps

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(x)  # (B, T, V)
        if check:
            logits.retain_grad()  # keep dloss/dlogits, the gradient triton_xent produced
        # rows = every (sequence, position): (B*T, V) logits against (B*T,) next-char ids
        loss = triton_xent.cross_entropy(logits.view(-1, vocab), y.view(-1),
                                         label_smoothing=args.label_smoothing,
                                         backend=args.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > warmup:
            step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())

        if check:  # the same batch through F.cross_entropy, outside the timed region
            ref_logits = logits.detach().clone().requires_grad_(True)
            ref_loss = F.cross_entropy(ref_logits.view(-1, vocab), y.view(-1),
                                       label_smoothing=args.label_smoothing)
            (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
            d_loss = (loss.detach() - ref_loss.detach()).abs().item()
            d_grad = (logits.grad - ref_grad).abs().max().item()
            g_scale = ref_grad.abs().max().item()
            ok = (d_loss <= LOSS_RTOL * abs(ref_loss.item())
                  and d_grad <= GRAD_RTOL * g_scale)
            checks.append(ok)
            print(f"  check step {step:4d} vs F.cross_entropy: max|dloss| {d_loss:.2e}  "
                  f"max|dgrad| {d_grad:.2e} (max|grad| {g_scale:.2e})  "
                  f"{'ok' if ok else 'MISMATCH'}")
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")

    if args.sample > 0:
        model.eval()
        print(f"--- {args.sample} sampled characters ---")
        print(sample(model, chars, args.seq_len, args.sample, device, gen))
        print("---")

    first = losses[0]
    k = max(1, min(10, args.steps // 10))
    last = sum(losses[-k:]) / k  # mean of the last k steps: less noisy than one batch
    fell = math.isfinite(last) and last <= (1 - MIN_LOSS_DROP) * first
    agree = all(checks)
    ms = 1e3 * sum(step_times) / len(step_times)
    tok_s = args.batch_size * args.seq_len / (ms / 1e3)
    verdict = "" if fell else f" -- did NOT fall by {MIN_LOSS_DROP:.0%}"
    print(f"loss: first {first:.4f} -> last {last:.4f} (mean of last {k} steps){verdict}")
    print(f"time per step: {ms:.1f} ms (mean of {len(step_times)} steps after {warmup} "
          f"warm-up), {tok_s:,.0f} tokens/s")
    status = "OK" if fell and agree else "FAIL"
    print(f"{status}: {args.steps} steps on {device} ({args.loss_path}), loss {first:.3f} -> "
          f"{last:.3f}, {sum(checks)}/{len(checks)} checks agree with F.cross_entropy, "
          f"{ms:.1f} ms/step")
    return 0 if status == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
