"""Kernel cases that only a GPU can hold: real LM vocabularies and N * V > 2^31 offsets.

Marked `cuda`: skipped without a GPU, run whenever one is present."""

import pytest
import torch

import triton_xent
from helpers import assert_close, reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("V", [128256, 256000], ids=["llama3_128256", "gemma_256000"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_real_lm_vocabularies(V, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (4 * torch.randn(64, V, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (64,), device="cuda", generator=g)
    t[::7] = -100
    for kwargs in ({}, dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)):
        x.grad = None
        loss = triton_xent.cross_entropy(x, t, backend="triton", **kwargs)
        loss.backward()
        ref_loss, ref_grad = reference(x, t, **kwargs)
        assert_close(loss, ref_loss, dtype, f"loss {kwargs}")
        assert_close(x.grad, ref_grad, dtype, f"grad {kwargs}")


def test_offsets_past_2_31_in_bf16():
    # 16800 x 128256 bf16 logits: 2.15e9 elements, so the last rows start past 2^31.
    N, V = 16800, 128256
    assert N * V > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * V * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    loss = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    loss.backward(torch.ones_like(loss))
    for rows in (slice(0, 8), slice(N - 8, N)):  # first rows, and rows past the 2^31 offset
        ref_loss, ref_grad = reference(x[rows], t[rows], reduction="none")
        assert_close(loss[rows], ref_loss, torch.bfloat16, f"loss rows {rows}")
        assert_close(x.grad[rows], ref_grad, torch.bfloat16, f"grad rows {rows}")


def test_unchecked_bad_target_gives_nan_row_without_sync_or_crash():
    x = torch.randn(4, 50000, device="cuda", requires_grad=True)
    t = torch.tensor([0, 50000, 7, -3], device="cuda")
    loss = triton_xent.cross_entropy(x, t, reduction="none", check_targets=False,
                                     backend="triton")
    loss.sum().backward()
    assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


def test_auto_backend_runs_the_kernels_on_cuda():
    x = torch.randn(8, 1000, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    auto = triton_xent.cross_entropy(x, t)
    torch.testing.assert_close(auto, triton_xent.cross_entropy(x, t, backend="triton"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("V", [32000, 128256], ids=["one_slice", "split_rows"])
def test_cuda_graph_captures_a_training_step_without_host_sync(V):
    # check_targets=False: nothing in forward or backward may synchronise with the host,
    # or capture fails. The replay on new data must equal an eager run.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, V, device="cuda", generator=g, requires_grad=True)
    t = torch.randint(0, V, (64,), device="cuda", generator=g)

    def step():
        loss = triton_xent.cross_entropy(x, t, check_targets=False, label_smoothing=0.1)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) off the capture
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()

    new_x = torch.randn(64, V, device="cuda", generator=g)
    new_t = torch.randint(0, V, (64,), device="cuda", generator=g)
    with torch.no_grad():
        x.copy_(new_x)
    t.copy_(new_t)
    graph.replay()
    ref_loss, ref_grad = reference(new_x, new_t, label_smoothing=0.1)
    assert_close(static_loss, ref_loss, torch.float32, "replayed loss")
    assert_close(x.grad, ref_grad, torch.float32, "replayed grad")
