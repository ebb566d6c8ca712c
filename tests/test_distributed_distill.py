"""Vocab-parallel distillation over torch.distributed (gloo on CPU, spawned processes):
distillation_loss on class slices of both logits, and linear_distillation_loss with both
heads split by rows, every rank's loss and gradient slice against the single-process result
(checked against float64 in tests/test_distill.py and tests/test_linear_distill.py).

One spawn per world size (spawning is the slow part): each worker runs every case, on both
backends, for each slicing of its world. Workers leave with os._exit(0), as in
tests/test_distributed.py (gloo's teardown at interpreter exit can abort under torch 2.13).
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

import triton_xent
from helpers import assert_close, spawn_ranks

pytest.importorskip("torch.distributed.tensor")
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

N, V, D, DT = 7, 37, 6, 5
# Slice sizes in rank order, several per world: unequal, and one with an empty slice (that
# rank holds no class of either head and adds nothing).
SLICINGS = {2: [[10, 27]], 3: [[5, 20, 12], [17, 0, 20]]}
LOGIT_CASES = {
    "forward_kl_batchmean": dict(divergence="forward_kl"),
    "reverse_kl_T07_sum": dict(divergence="reverse_kl", temperature=0.7, reduction="sum"),
    "jsd_beta03_T13_none": dict(divergence="jsd", beta=0.3, temperature=1.3, reduction="none"),
}
LINEAR_CASES = {
    "linear_forward_kl_batchmean": dict(divergence="forward_kl", chunk_size=3),
    "linear_jsd_none_recompute": dict(divergence="jsd", beta=0.6, reduction="none",
                                      chunk_size=4),
    "linear_reverse_kl_T2_sum": dict(divergence="reverse_kl", temperature=2.0,
                                     reduction="sum", chunk_size=5),
}
BACKENDS = ["torch"] + (["triton"] if triton_xent.triton_available() else [])


def _problem():
    g = torch.Generator().manual_seed(5)
    s = 3 * torch.randn(N, V, generator=g)
    t = 3 * torch.randn(N, V, generator=g)
    h = torch.randn(N, D, generator=g)
    w, b = torch.randn(V, D, generator=g) / 2, torch.randn(V, generator=g)
    th = torch.randn(N, DT, generator=g)
    tw, tb = torch.randn(V, DT, generator=g) / 2, torch.randn(V, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    target[[1, 4]] = -100
    return s, t, h, w, b, th, tw, tb, target


def _grad_output(loss):
    return torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape) if loss.dim() else None


def _backward(loss):
    go = _grad_output(loss)
    (loss * go if go is not None else loss).sum().backward()
    return loss.detach()


def _worker(rank, world, rendezvous, out_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
        s, t, h, w, b, th, tw, tb, target = _problem()
        results = {}
        for k, slices in enumerate(SLICINGS[world]):
            lo = sum(slices[:rank])
            hi = lo + slices[rank]
            for backend in BACKENDS:
                for case, kwargs in LOGIT_CASES.items():
                    s_local = s[:, lo:hi].clone().requires_grad_(True)
                    loss = triton_xent.distillation_loss(s_local, t[:, lo:hi], target,
                                                         backend=backend, process_group=group,
                                                         **kwargs)
                    results[k, backend, case] = (_backward(loss), s_local.grad)
                for case, kwargs in LINEAR_CASES.items():
                    hl = h.clone().requires_grad_(True)
                    wl = w[lo:hi].clone().requires_grad_(True)
                    bl = b[lo:hi].clone().requires_grad_(True)
                    loss = triton_xent.linear_distillation_loss(
                        hl, wl, th, tw[lo:hi], target, bias=bl, teacher_bias=tb[lo:hi],
                        backend=backend, process_group=group, **kwargs)
                    results[k, backend, case] = (_backward(loss), hl.grad, wl.grad, bl.grad)
        # DTensors: logits Shard(-1) and ColwiseParallel-style heads Shard(0) on a 1-D mesh
        # (torch.chunk's slices: 19 + 18 on 2 ranks, 13 + 13 + 11 on 3), both backends' alike
        # so the default one; gradients come back as DTensors, compared in full.
        mesh = init_device_mesh("cpu", (world,))
        s_dt = distribute_tensor(s, mesh, [Shard(1)]).requires_grad_(True)
        loss = triton_xent.distillation_loss(s_dt, distribute_tensor(t, mesh, [Shard(1)]),
                                             target, **LOGIT_CASES["jsd_beta03_T13_none"])
        results["dtensor"] = (_backward(loss.full_tensor()), s_dt.grad.full_tensor())
        w_dt, b_dt = (distribute_tensor(p, mesh, [Shard(0)]).requires_grad_(True)
                      for p in (w, b))
        hl = h.clone().requires_grad_(True)
        loss = triton_xent.linear_distillation_loss(
            hl, w_dt, th, distribute_tensor(tw, mesh, [Shard(0)]), target, bias=b_dt,
            teacher_bias=distribute_tensor(tb, mesh, [Shard(0)]),
            **LINEAR_CASES["linear_jsd_none_recompute"])
        results["linear_dtensor"] = (_backward(loss.full_tensor()), hl.grad,
                                     w_dt.grad.full_tensor(), b_dt.grad.full_tensor())
        # A rank whose own arguments fail the checks (rank 0: a teacher slice of another
        # size; then a target of one row too few) raises its error; the others raise too,
        # naming it, instead of waiting in a collective.
        lo, hi = rank * 2, rank * 2 + 2
        bad_teacher = t[:, lo:hi + 1] if rank == 0 else t[:, lo:hi]
        bad_target = target[:-1] if rank == 0 else target
        for name, call in (
                ("refused", lambda: triton_xent.distillation_loss(
                    s[:, lo:hi], bad_teacher, target, process_group=group)),
                ("refused_linear", lambda: triton_xent.linear_distillation_loss(
                    h, w[lo:hi], th, tw[lo:hi], bad_target, process_group=group))):
            try:
                call()
                results[name] = "no error"
            except ValueError as e:
                results[name] = str(e)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _check_full(got, expected, what):
    for name, g, e in zip(("loss", "d_input", "d_weight", "d_bias"), got, expected):
        assert_close(g, e, torch.float32, f"{what}: {name}")


@pytest.mark.parametrize("world", sorted(SLICINGS), ids=lambda w: f"world{w}")
def test_vocab_parallel_distillation_matches_single_process(world, tmp_path):
    if torch.cuda.is_available() and "triton" in BACKENDS:
        pytest.skip("on a GPU machine the kernels want CUDA tensors; gloo ranks hold CPU ones")
    procs = spawn_ranks(_worker, (world, str(tmp_path / "rdzv"), str(tmp_path)), world,
                        tmp_path, timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    s, t, h, w, b, th, tw, tb, target = _problem()
    for case, kwargs in LOGIT_CASES.items():
        full = s.clone().requires_grad_(True)
        loss = _backward(triton_xent.distillation_loss(full, t, target, backend="torch",
                                                       **kwargs))
        if case == "jsd_beta03_T13_none":
            for rank, res in enumerate(results):
                _check_full(res["dtensor"], (loss, full.grad), f"DTensor, rank {rank}")
        for k, slices in enumerate(SLICINGS[world]):
            for backend in BACKENDS:
                for rank, res in enumerate(results):
                    lo = sum(slices[:rank])
                    hi = lo + slices[rank]
                    what = f"{case}, slices {slices}, {backend}, rank {rank}"
                    got_loss, grad = res[k, backend, case]
                    assert_close(got_loss, loss, torch.float32, f"{what}: loss")
                    assert_close(grad, full.grad[:, lo:hi], torch.float32, f"{what}: grad")
    for case, kwargs in LINEAR_CASES.items():
        hl, wl, bl = (p.clone().requires_grad_(True) for p in (h, w, b))
        loss = _backward(triton_xent.linear_distillation_loss(
            hl, wl, th, tw, target, bias=bl, teacher_bias=tb, backend="torch", **kwargs))
        if case == "linear_jsd_none_recompute":
            for rank, res in enumerate(results):
                _check_full(res["linear_dtensor"], (loss, hl.grad, wl.grad, bl.grad),
                            f"linear DTensor, rank {rank}")
        for k, slices in enumerate(SLICINGS[world]):
            for backend in BACKENDS:
                for rank, res in enumerate(results):
                    lo = sum(slices[:rank])
                    hi = lo + slices[rank]
                    what = f"{case}, slices {slices}, {backend}, rank {rank}"
                    got_loss, d_h, d_w, d_b = res[k, backend, case]
                    assert_close(got_loss, loss, torch.float32, f"{what}: loss")
                    assert_close(d_h, hl.grad, torch.float32, f"{what}: d_input")
                    assert_close(d_w, wl.grad[lo:hi], torch.float32, f"{what}: d_weight")
                    assert_close(d_b, bl.grad[lo:hi], torch.float32, f"{what}: d_bias")
    for name, own in (("refused", "teacher must have input's shape"),
                      ("refused_linear", "target must have shape")):
        assert own in results[0][name], results[0][name]
        for res in results[1:]:
            assert res[name].startswith("with a process_group every rank must accept its "
                                        "arguments; rank 0 refused them (ValueError: "), res[name]
