"""Train a small character model whose output head is split across ranks by vocabulary.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py            # CPU (gloo)
    torchrun --nproc-per-node 2 examples/vocab_parallel.py --device cuda   # GPUs (NCCL)

Every rank holds the same trunk (embedding + MLP over a window of characters) and its own
contiguous rows of the head: rank r's logits are the classes of its slice only. The loss is
triton_xent.cross_entropy(..., process_group=...), which exchanges per-row statistics instead
of gathering logits; every rank gets the same loss. The trunk's gradient needs the sum of the
ranks' contributions, hence the all-reduce in `_SumGradAcrossRanks` (Megatron's "copy to the
tensor-parallel region"). At the first and last step, rank 0 checks the loss against
F.cross_entropy on the gathered head.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import triton_xent

DATA = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare.txt"


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (each rank's head slice adds
    its share of dloss/dh)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=8, help="characters seen per prediction")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    text = DATA.read_text()
    chars = sorted(set(text))
    V = len(chars)
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    sizes = [V // world + (r < V % world) for r in range(world)]  # unequal when V % world
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    torch.manual_seed(0)  # same trunk and same full head on every rank, then keep a slice
    dim = 128
    trunk = nn.Sequential(nn.Embedding(V, 32), nn.Flatten(), nn.Linear(32 * args.context, dim),
                          nn.GELU(), nn.Linear(dim, dim), nn.GELU()).to(device)
    head = nn.Parameter((torch.randn(V, dim) / dim**0.5)[lo:hi].clone().to(device))
    opt = torch.optim.AdamW(list(trunk.parameters()) + [head], lr=3e-3)
    gen = torch.Generator().manual_seed(1)  # same batches on every rank

    def batch():
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(args.context + 1)
        window = data[idx].to(device)
        return window[:, :-1], window[:, -1]

    def check(h, y, loss):
        padded = torch.zeros(max(sizes), dim, device=device)  # all_gather wants equal sizes
        padded[:sizes[rank]] = head.detach()
        heads = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(heads, padded)
        if rank == 0:
            full = torch.cat([w[:n] for w, n in zip(heads, sizes)])
            ref = F.cross_entropy(h.detach() @ full.T, y)
            diffs.append(abs(loss.item() - ref.item()))
            print(f"  check vs F.cross_entropy on the gathered head: |dloss| = {diffs[-1]:.2e}",
                  flush=True)

    first = last = None
    diffs = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch()
        h = _SumGradAcrossRanks.apply(trunk(x))
        loss = triton_xent.cross_entropy(h @ head.T, y, process_group=dist.group.WORLD)
        if step in (1, args.steps):
            check(h, y, loss)  # before the step changes the head
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if rank == 0 and (step % 25 == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    elapsed = (time.perf_counter() - start) / args.steps * 1e3
    losses = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(losses, torch.tensor([last], device=device))
    if rank == 0:
        same = all(abs(v.item() - last) < 1e-6 for v in losses)
        print(f"{world} ranks, head slices {sizes} of {V} classes: loss {first:.3f} -> "
              f"{last:.3f}, {elapsed:.1f} ms/step, same loss on every rank: {same}")
    ok = rank != 0 or (last < first and same and max(diffs) < 1e-4)
    dist.destroy_process_group()
    return ok


if __name__ == "__main__":
    # os._exit: with torch 2.13 a gloo process can abort in its C++ teardown at interpreter
    # exit after its work is done; the exit status is the work's.
    os._exit(0 if main() else 1)
