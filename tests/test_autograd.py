"""The autograd contract: the gradient is computed in forward and only scaled in backward,
which must stay right for any grad_output, for retain_graph, and for in-place gradients."""

import pytest
import torch

import triton_xent
from helpers import assert_close, reference


def _problem(device, N=6, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g).to(device)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[1] = -100
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_with_retain_graph_and_different_grad_outputs(backend, device, reduction):
    x, t = _problem(device)
    x.requires_grad_(True)
    loss = triton_xent.cross_entropy(x, t, reduction=reduction, backend=backend)
    for factor in (3.0, 1.0, -0.5):  # the second and third runs must not see the first's scaling
        go = torch.full_like(loss, factor)
        x.grad = None
        loss.backward(go, retain_graph=True)
        _, expected = reference(x, t, reduction=reduction, grad_output=go)
        assert_close(x.grad, expected, torch.float32, f"grad_output={factor}")


def test_per_row_grad_output_scales_each_row(backend, device):
    x, t = _problem(device)
    x.requires_grad_(True)
    loss = triton_xent.cross_entropy(x, t, reduction="none", label_smoothing=0.1, backend=backend)
    go = torch.linspace(-2.0, 2.0, loss.numel(), device=device)
    loss.backward(go)
    _, expected = reference(x, t, reduction="none", label_smoothing=0.1, grad_output=go)
    assert_close(x.grad, expected, torch.float32, "per-row grad_output")


def test_stride0_grad_output_from_sum_of_unreduced_loss(backend, device):
    # loss.sum().backward() hands the Function an expanded (stride-0) grad_output.
    x, t = _problem(device)
    x.requires_grad_(True)
    (2.5 * triton_xent.cross_entropy(x, t, reduction="none", backend=backend).sum()).backward()
    _, expected = reference(x, t, reduction="sum", grad_output=torch.tensor(2.5))
    assert_close(x.grad, expected, torch.float32, "expanded grad_output")


def test_gradient_flows_into_a_non_leaf_through_matmul(backend, device):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 8, generator=g).to(device).requires_grad_(True)
    w = torch.randn(11, 8, generator=g).to(device).requires_grad_(True)
    t = torch.randint(0, 11, (5,), generator=g).to(device)
    triton_xent.cross_entropy(h @ w.T, t, backend=backend, inplace_backward=True).backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(h64 @ w64.T, t).backward()
    assert_close(h.grad, h64.grad, torch.float32, "d hidden")
    assert_close(w.grad, w64.grad, torch.float32, "d weight")


def test_inplace_backward_spends_the_input_and_autograd_notices(backend, device):
    x, t = _problem(device)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf that nothing else saves: fine to spend
    loss = triton_xent.cross_entropy(logits, t, inplace_backward=True, backend=backend)
    _, expected = reference(x, t)
    assert_close(logits.detach(), expected, torch.float32, "gradient written into the input")
    loss.backward()
    assert_close(leaf.grad, expected, torch.float32, "gradient through the spent input")

    saved = leaf * 1.0
    other_use = saved * saved  # saves `saved` for its own backward
    loss = triton_xent.cross_entropy(saved, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other_use.sum()).backward()


def test_second_order_gradient_is_refused(backend, device):
    x, t = _problem(device)
    x.requires_grad_(True)
    loss = triton_xent.cross_entropy(x, t, backend=backend)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_lse_carries_no_gradient_and_loss_does(backend, device):
    x, t = _problem(device)
    x.requires_grad_(True)
    loss, lse = triton_xent.cross_entropy(x, t, return_lse=True, backend=backend)
    assert loss.requires_grad and not lse.requires_grad
    assert lse.dtype == torch.float32


def test_no_gradient_requested_gives_the_same_loss(backend, device):
    x, t = _problem(device)
    plain = triton_xent.cross_entropy(x, t, label_smoothing=0.2, backend=backend)
    with torch.no_grad():
        no_grad = triton_xent.cross_entropy(x.requires_grad_(True), t, label_smoothing=0.2,
                                            backend=backend)
    assert not plain.requires_grad and not no_grad.requires_grad
    torch.testing.assert_close(plain, no_grad)
