"""Distil a small character-level teacher into a smaller student on Shakespeare, with
triton_xent.linear_distillation_loss: the divergence between the two models' next-character
distributions is computed from their hidden states and heads, chunk by chunk, without either
model's logits.

Run it from the repository root (CPU, one thread: about 25 s of compute):

    python examples/distill.py
    python examples/distill.py --divergence jsd --beta 0.5 --temperature 1.0
    python examples/distill.py --device cuda --teacher-steps 1000 --steps 1000

The teacher (examples/train_lm.py's TinyLM: 2 blocks, width 128) is first trained for
--teacher-steps steps with triton_xent.linear_cross_entropy; then it is frozen and the student
(1 block, width 64: a hidden size that differs from the teacher's) learns from it alone, with
linear_distillation_loss(student hidden states, student head, teacher hidden states, teacher
head) at temperature T, multiplied by T**2 (Hinton's scaling: triton_xent's loss has no T^2
factor). The script prints

  * the distillation loss every --log-every steps, and its first vs last value;
  * on one batch, the agreement with the naive PyTorch distillation on the logits of both
    models (F.kl_div of the log-softmaxes, reduction "batchmean");
  * the student's and the teacher's cross-entropy on held-out batches, before and after;

and exits with status 1 if the distillation loss did not fall by 30% or the agreement check
fails.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

import triton_xent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_lm import TinyLM, get_batch, load_text  # noqa: E402  (the demo's model and data)

MIN_LOSS_DROP = 0.30  # the last distillation losses must be at least 30% below the first
LOSS_RTOL = 1e-4  # against the naive F.kl_div on the same logits (float32)


def naive_distillation(student_logits, teacher_logits, args) -> torch.Tensor:
    """The textbook loss on (N, V) logits, for the agreement check (forward KL, reverse KL
    or JSD, reduction "batchmean")."""
    T = args.temperature
    lp_s = F.log_softmax(student_logits / T, -1)
    lp_t = F.log_softmax(teacher_logits / T, -1)
    if args.divergence == "forward_kl":
        return F.kl_div(lp_s, lp_t, log_target=True, reduction="batchmean")
    if args.divergence == "reverse_kl":
        return F.kl_div(lp_t, lp_s, log_target=True, reduction="batchmean")
    b = args.beta
    log_m = torch.logaddexp(lp_t + math.log(b), lp_s + math.log(1 - b))
    return (b * F.kl_div(log_m, lp_t, log_target=True, reduction="batchmean")
            + (1 - b) * F.kl_div(log_m, lp_s, log_target=True, reduction="batchmean"))


@torch.no_grad()
def held_out_ce(model: TinyLM, data, args, device) -> float:
    """Mean cross-entropy (nats per character) on 4 fixed batches of the last 10% of the
    text, which no training step reads."""
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(4):
        x, y = get_batch(data, args.batch_size, args.seq_len, gen)
        logits = model(x.to(device))
        losses.append(float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())))
    return sum(losses) / len(losses)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"),
                   default="forward_kl")
    p.add_argument("--beta", type=float, default=0.5, help="JSD's mixture weight")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--teacher-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=150, help="distillation steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text, chars = load_text()
    split = int(0.9 * len(text))
    train, held_out = text[:split], text[split:]
    gen = torch.Generator().manual_seed(args.seed)
    V = len(chars)

    # 1. The teacher: next-character cross-entropy from its hidden states and head.
    teacher = TinyLM(V, args.seq_len, dim=128, n_layers=2).to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    start = time.perf_counter()
    for _ in range(args.teacher_steps):
        x, y = (t.to(device) for t in get_batch(train, args.batch_size, args.seq_len, gen))
        loss = triton_xent.linear_cross_entropy(teacher.hidden_states(x), teacher.head.weight,
                                                y, linear_bias=teacher.head.bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)
    print(f"teacher: {args.teacher_steps} steps in {time.perf_counter() - start:.1f} s, "
          f"held-out cross-entropy {held_out_ce(teacher, held_out, args, device):.3f}")

    # 2. The student learns from the teacher's distribution only (target=None: every
    # position counts).
    student = TinyLM(V, args.seq_len, dim=64, n_layers=1).to(device)
    before = held_out_ce(student, held_out, args, device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    options = dict(divergence=args.divergence, beta=args.beta, temperature=args.temperature)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        x, _ = (t.to(device) for t in get_batch(train, args.batch_size, args.seq_len, gen))
        with torch.no_grad():
            teacher_h = teacher.hidden_states(x)  # (B, T, 128)
        loss = triton_xent.linear_distillation_loss(
            student.hidden_states(x), student.head.weight, teacher_h, teacher.head.weight,
            bias=student.head.bias, teacher_bias=teacher.head.bias, **options)
        opt.zero_grad(set_to_none=True)
        (loss * args.temperature ** 2).backward()  # Hinton's T^2: gradients of T-free size
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}  {args.divergence} {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    after = held_out_ce(student, held_out, args, device)

    # 3. The same loss from both models' logits, the naive way.
    x, _ = (t.to(device) for t in get_batch(train, args.batch_size, args.seq_len, gen))
    with torch.no_grad():
        ours = triton_xent.linear_distillation_loss(
            student.hidden_states(x), student.head.weight, teacher.hidden_states(x),
            teacher.head.weight, bias=student.head.bias, teacher_bias=teacher.head.bias,
            **options)
        naive = naive_distillation(student(x).flatten(0, 1), teacher(x).flatten(0, 1), args)
    agree = math.isclose(float(ours), float(naive), rel_tol=LOSS_RTOL, abs_tol=1e-6)

    first = sum(losses[:10]) / len(losses[:10])
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"\nstudent: {args.steps} steps in {elapsed:.1f} s; {args.divergence} at "
          f"T={args.temperature}: first {first:.4f}, last {last:.4f} "
          f"({100 * (1 - last / first):.0f}% lower)")
    print(f"held-out cross-entropy: student {before:.3f} -> {after:.3f}, teacher "
          f"{held_out_ce(teacher, held_out, args, device):.3f}")
    print(f"one batch: triton_xent {float(ours):.6f}, naive F.kl_div {float(naive):.6f} "
          f"({'agree' if agree else 'DIFFER'})")
    ok = agree and last <= (1 - MIN_LOSS_DROP) * first
    if not ok:
        print("FAILED: " + ("the loss did not fall enough" if agree else "the losses differ"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
