"""Vocab-parallel cross-entropy over torch.distributed (gloo on CPU, spawned processes):
every rank's loss and gradient slice against the single-process result, for cross_entropy
and for linear_cross_entropy with the head split by rows.

Each worker saves its results, then leaves with os._exit(0): with torch 2.13 a gloo process
can abort in its C++ teardown at interpreter exit after its work is done, and skipping that
teardown keeps the test about the work. A real failure still fails the test: a worker that
raises writes its traceback (and exits 1), and the parent requires every rank's results.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

import triton_xent
from helpers import assert_close, spawn_ranks

V = 37
N = 9
# Slice sizes in rank order: unequal, and one rank with no class at all (it adds nothing).
SLICES = {"world2": [10, 27], "world3": [5, 20, 12], "world3_empty_slice": [17, 0, 20]}
CASES = {
    "mean": dict(reduction="mean"),
    "sum_weighted": dict(reduction="sum", weighted=True),
    "none_ignore": dict(reduction="none", ignore_index=4),
    "smoothing_weight": dict(label_smoothing=0.2, weighted=True),
    "zloss_softcap_none": dict(lse_square_scale=1e-2, softcap=3.0, reduction="none"),
    "everything": dict(label_smoothing=0.1, lse_square_scale=1e-3, weighted=True),
    # the RL extras (rl: row and entropy weights, the entropy with a gradient, the argmax)
    "rl_mean_weighted": dict(rl=True, temperature=0.7, label_smoothing=0.1, weighted=True),
    "rl_none_softcap": dict(rl=True, reduction="none", temperature=1.3, softcap=3.0,
                            ignore_index=4, lse_square_scale=1e-2),
}


def _problem(case):
    g = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(N, V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    t[5] = 4
    kwargs = dict(CASES[case])
    t[t == -100] = kwargs.get("ignore_index", -100)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.rand(V, generator=g) + 0.5
    _rl(kwargs, N, g)
    return x, t, kwargs


def _rl(kwargs, n, g):
    if kwargs.pop("rl", False):
        kwargs.update(row_weight=torch.randn(n, generator=g), return_entropy=True,
                      entropy_weight=-0.2 * torch.rand(n, generator=g), return_argmax=True)


LINEAR_CASES = {
    "linear_mean_chunked": dict(chunk_size=4, label_smoothing=0.1),
    "linear_none_recompute": dict(reduction="none", chunk_size=3, lse_square_scale=1e-2),
    "linear_rl_sum": dict(rl=True, reduction="sum", chunk_size=4, temperature=0.8),
    "linear_rl_none": dict(rl=True, reduction="none", chunk_size=3, temperature=1.2,
                           label_smoothing=0.1),
}


def _linear_problem(case):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(N, 13, generator=g)
    w = torch.randn(V, 13, generator=g) / 3
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100
    kwargs = dict(LINEAR_CASES[case])
    _rl(kwargs, N, g)
    return h, w, b, t, kwargs


def _grad_output(loss):
    return torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape) if loss.dim() else None


def _backward(out):
    """Backward of the loss (with a per-row grad_output for "none") and, when returned, of
    the entropy with an upstream gradient of its own; (loss, entropy, argmax) detached."""
    if not isinstance(out, triton_xent.CrossEntropyOutput):
        out = triton_xent.CrossEntropyOutput(out, None, None, None)
    go = _grad_output(out.loss)
    total = (out.loss * go.to(out.loss.device)).sum() if go is not None else out.loss
    if out.entropy is not None:
        total = total + (out.entropy * torch.linspace(-1, 1, N, device=out.loss.device)).sum()
    total.backward()
    return tuple(v.detach().cpu() if v is not None else None
                 for v in (out.loss, out.entropy, out.argmax))


def _worker(rank, slices, rendezvous, out_dir, backend, transport):
    try:
        dev = torch.device("cuda", rank) if transport == "nccl" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(transport, init_method=f"file://{rendezvous}", rank=rank,
                                world_size=len(slices))
        lo = sum(slices[:rank])
        hi = lo + slices[rank]
        results = {}
        for case in CASES:
            x, t, kwargs = _problem(case)
            t, kwargs = t.to(dev), {k: v.to(dev) if torch.is_tensor(v) else v
                                     for k, v in kwargs.items()}
            x_local = x[:, lo:hi].to(dev).requires_grad_(True)
            out = triton_xent.cross_entropy(x_local, t, process_group=dist.group.WORLD,
                                            backend=backend, **kwargs)
            results[case] = (_backward(out), x_local.grad.cpu())
        for case in LINEAR_CASES:
            h, w_full, b_full, t, kwargs = _linear_problem(case)
            t, kwargs = t.to(dev), {k: v.to(dev) if torch.is_tensor(v) else v
                                     for k, v in kwargs.items()}
            h = h.to(dev).requires_grad_(True)
            w = w_full[lo:hi].to(dev).requires_grad_(True)
            b = b_full[lo:hi].to(dev).requires_grad_(True)
            out = triton_xent.linear_cross_entropy(h, w, t, linear_bias=b, backend=backend,
                                                   process_group=dist.group.WORLD, **kwargs)
            results[case] = (_backward(out),) + tuple(v.cpu() for v in (h.grad, w.grad, b.grad))
        try:  # a bad target must raise on every rank alike, leaving none in a collective
            triton_xent.cross_entropy(torch.randn(3, hi - lo, device=dev),
                                      torch.tensor([0, V, 1], device=dev),
                                      process_group=dist.group.WORLD, backend=backend)
            results["bad_target"] = "no error"
        except IndexError as e:
            results["bad_target"] = str(e)
        # Ranks that disagree (a caller's bug) must raise alike, not hang in a collective:
        # rank 0 with one row fewer, then rank 0 with other targets.
        for name, rows, target in (("other_rows", 2 if rank == 0 else 3, [0, 1, 2]),
                                   ("other_targets", 3, [2, 1, 0] if rank == 0 else [0, 1, 2])):
            try:
                triton_xent.cross_entropy(torch.randn(rows, hi - lo, device=dev),
                                          torch.tensor(target[:rows], device=dev),
                                          process_group=dist.group.WORLD, backend=backend)
                results[name] = "no error"
            except ValueError as e:
                results[name] = str(e)
        # A rank whose own arguments fail the checks (rank 0: a target of 2 rows for 3 rows
        # of logits) raises its error; the others raise too, naming it, instead of waiting.
        for name, fn in (("refused", triton_xent.cross_entropy),
                         ("refused_linear", triton_xent.linear_cross_entropy)):
            t = torch.tensor([0, 1] if rank == 0 else [0, 1, 2], device=dev)
            args = ((torch.randn(3, hi - lo, device=dev),) if name == "refused" else
                    (torch.randn(3, 4, device=dev), torch.randn(hi - lo, 4, device=dev)))
            try:
                fn(*args, t, process_group=dist.group.WORLD, backend=backend)
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


def _check_outputs(got, expected, what):
    loss, entropy, argmax = got
    assert_close(loss, expected[0], torch.float32, f"{what}: loss")
    assert (entropy is None) == (expected[1] is None), what
    if entropy is not None:
        assert_close(entropy, expected[1], torch.float32, f"{what}: entropy")
        assert torch.equal(argmax, expected[2]), f"{what}: argmax {argmax} != {expected[2]}"


TRANSPORTS = [pytest.param("gloo", id="gloo"),
              pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(
                  torch.cuda.device_count() < 2, reason="NCCL needs two or more GPUs"))]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("layout", list(SLICES))
def test_vocab_parallel_matches_single_process(backend, layout, transport, tmp_path):
    slices = SLICES[layout]
    world = len(slices)
    if transport == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    if transport == "gloo" and backend == "triton" and torch.cuda.is_available():
        pytest.skip("on a GPU machine the kernels want CUDA tensors: the nccl case runs them")
    procs = spawn_ranks(_worker, (slices, str(tmp_path / "rdzv"), str(tmp_path), backend,
                                  transport), world, tmp_path, timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in CASES:
        x, t, kwargs = _problem(case)
        full = x.clone().requires_grad_(True)
        # The single-process result, on CPU (the plain-PyTorch backend, checked against
        # float64 elsewhere), whatever backend and transport the ranks used.
        expected = _backward(triton_xent.cross_entropy(full, t, backend="torch", **kwargs))
        for rank, res in enumerate(results):
            outs, grad = res[case]
            lo = sum(slices[:rank])
            hi = lo + slices[rank]
            _check_outputs(outs, expected, f"{case}, rank {rank}")
            assert_close(grad, full.grad[:, lo:hi], torch.float32, f"{case} grad, rank {rank}")
    for case in LINEAR_CASES:
        h, w, b, t, kwargs = _linear_problem(case)
        h, w, b = (p.clone().requires_grad_(True) for p in (h, w, b))
        expected = _backward(triton_xent.linear_cross_entropy(h, w, t, linear_bias=b,
                                                              backend="torch", **kwargs))
        for rank, (outs, d_h, d_w, d_b) in enumerate(r[case] for r in results):
            lo = sum(slices[:rank])
            hi = lo + slices[rank]
            _check_outputs(outs, expected, f"{case}, rank {rank}")
            assert_close(d_h, h.grad, torch.float32, f"{case} d_input, rank {rank}")
            assert_close(d_w, w.grad[lo:hi], torch.float32, f"{case} d_weight, rank {rank}")
            assert_close(d_b, b.grad[lo:hi], torch.float32, f"{case} d_bias, rank {rank}")
    for res in results:
        assert res["bad_target"].startswith(f"Target {V} is out of bounds"), res["bad_target"]
        assert "the ranks hold [2, 3" in res["other_rows"], res["other_rows"]
        assert "they differ between ranks" in res["other_targets"], res["other_targets"]
    for name in ("refused", "refused_linear"):
        assert "batch_size" in results[0][name] or "must have shape (3,)" in results[0][name]
        for res in results[1:]:
            assert res[name].startswith("with a process_group every rank must accept its "
                                        "arguments; rank 0 refused them (ValueError: "), res[name]
