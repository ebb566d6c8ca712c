"""Train the demo model (examples/train_lm.py) with its head split by PyTorch's own tensor
parallelism, and the loss from triton_xent.linear_cross_entropy on the DTensor head.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py          # CPU (gloo)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cuda   # GPUs (NCCL)

`parallelize_module(model.head, mesh, ColwiseParallel())` leaves the head's weight and bias
as DTensors sharded by rows (Shard(0)): each rank holds a contiguous slice of the
vocabulary. The trunk is replicated (same weights and same batches on every rank). The loss
is linear_cross_entropy(hidden, model.head.weight, targets, linear_bias=model.head.bias):
triton_xent maps the DTensor head onto its vocab-parallel path over the mesh's process
group, so no rank materialises the (rows, vocab) logits, and the loss is a replicated
DTensor. The hidden states' gradient comes back whole on every rank, so the replicated
trunk needs no extra all-reduce.

Every rank also trains an unsplit copy of the model with the plain-tensor call, on the same
batches, and the script checks that the two losses agree at every step (exit status 1 if
they do not, or if the loss did not fall).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import triton_xent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_lm import TinyLM, get_batch, load_text  # noqa: E402

LOSS_RTOL = 1e-4  # |loss_tp - loss_single| <= LOSS_RTOL * loss_single, every step


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
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
    mesh = init_device_mesh(args.device, (world,))

    data, chars = load_text()
    vocab = len(chars)
    torch.manual_seed(0)  # the same model on every rank
    single = TinyLM(vocab, args.seq_len).to(device)
    model = copy.deepcopy(single)
    parallelize_module(model.head, mesh, ColwiseParallel())  # head.weight: DTensor Shard(0)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (model, single)]
    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    rows = model.head.weight.to_local().shape[0]
    if rank == 0:
        print(f"{world} ranks, vocab {vocab}: head.weight is a DTensor "
              f"{tuple(model.head.weight.placements)}, rank 0 holds {rows} rows", flush=True)

    losses, mismatches = [], 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = get_batch(data, args.batch_size, args.seq_len, gen)
        x, y = x.to(device), y.to(device)
        step_losses = []
        for m, opt in zip((model, single), optimizers):
            loss = triton_xent.linear_cross_entropy(m.hidden_states(x), m.head.weight, y,
                                                    linear_bias=m.head.bias)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_losses.append(loss.to_local() if isinstance(loss, DTensor) else loss)
        tp, ref = (v.item() for v in step_losses)
        ok = abs(tp - ref) <= LOSS_RTOL * abs(ref)
        mismatches += not ok
        losses.append(tp)
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps or not ok):
            print(f"step {step:3d}  loss {tp:.5f} (DTensor head)  {ref:.5f} (single process)  "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
    elapsed = (time.perf_counter() - start) / args.steps * 1e3
    fell = losses[-1] < losses[0]
    if rank == 0:
        print(f"{'OK' if fell and not mismatches else 'FAIL'}: loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f} in {args.steps} steps, {args.steps - mismatches}/"
              f"{args.steps} steps match the single-process loss (rtol {LOSS_RTOL}), "
              f"{elapsed:.0f} ms/step for both models")
    dist.destroy_process_group()
    return fell and not mismatches


if __name__ == "__main__":
    # os._exit: with torch 2.13 a gloo process can abort in its C++ teardown at interpreter
    # exit after its work is done; the exit status is the work's.
    os._exit(0 if main() else 1)
