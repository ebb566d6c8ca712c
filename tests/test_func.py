"""torch.func: grad, vmap(grad) (per-sample gradients, as in DP-SGD) and vjp of
cross_entropy, CrossEntropyLoss and linear_cross_entropy equal F's; what cannot be supported
(forward mode, second order, the eager-only features) raises an error that says so."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

import triton_xent
from helpers import assert_close, needs_torch_linear_cross_entropy

B, N, C, D = 3, 5, 11, 7  # B problems of N rows (unaligned sizes)
OPTIONS = dict(label_smoothing=0.1)


def _problems(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g).to(device)
    t = torch.randint(0, C, (B, N), generator=g).to(device)
    t[0, 1] = -100
    w = torch.rand(C, generator=g).to(device) + 0.5
    return x, t, w


def _ours(kind, backend, w):
    if kind == "module":
        criterion = triton_xent.CrossEntropyLoss(weight=w, backend=backend, **OPTIONS)
        return lambda x, t: criterion(x, t)
    return lambda x, t: triton_xent.cross_entropy(x, t, weight=w, backend=backend, **OPTIONS)


@pytest.mark.parametrize("kind", ["function", "module"])
def test_grad_vmap_grad_and_vjp_equal_Fs(backend, device, kind):
    x, t, w = _problems(device)
    ours = _ours(kind, backend, w)

    def ref(x, t):
        return F.cross_entropy(x, t, weight=w, **OPTIONS)

    assert_close(grad(ours)(x[0], t[0]), grad(ref)(x[0], t[0]), torch.float32, "grad")
    per_sample = vmap(grad(ours))(x, t)  # one gradient per problem
    assert per_sample.shape == x.shape
    assert_close(per_sample, vmap(grad(ref))(x, t), torch.float32, "vmap(grad)")
    loss, pullback = vjp(lambda x: ours(x, t[1]), x[1])
    ref_loss, ref_pullback = vjp(lambda x: ref(x, t[1]), x[1])
    assert_close(loss, ref_loss, torch.float32, "loss")
    cotangent = torch.tensor(2.5, device=device)
    assert_close(pullback(cotangent)[0], ref_pullback(cotangent)[0], torch.float32, "vjp")


def test_vjp_of_unreduced_loss_with_a_per_row_cotangent(backend, device):
    x, t, _ = _problems(device)
    loss, pullback = vjp(lambda x: triton_xent.cross_entropy(x, t[0], reduction="none",
                                                             backend=backend), x[0])
    ref_loss, ref_pullback = vjp(lambda x: F.cross_entropy(x, t[0], reduction="none"), x[0])
    v = torch.linspace(-1, 2, N, device=device)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(pullback(v)[0], ref_pullback(v)[0], torch.float32, "vjp")


@needs_torch_linear_cross_entropy
def test_linear_cross_entropy_grad_and_per_sample_grads(backend, device):
    # Per-sample gradients of the head, as Opacus-style training takes them.
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, N, D, generator=g).to(device)
    w = torch.randn(C, D, generator=g).to(device)
    _, t, _ = _problems(device)

    def ours(w, h, t):
        return triton_xent.linear_cross_entropy(h, w, t, backend=backend, chunk_size=2,
                                                **OPTIONS)

    def ref(w, h, t):
        return F.linear_cross_entropy(h, w, t, **OPTIONS)

    assert_close(grad(ours)(w, h[0], t[0]), grad(ref)(w, h[0], t[0]), torch.float32, "grad")
    per_sample = vmap(grad(ours), in_dims=(None, 0, 0))(w, h, t)
    assert per_sample.shape == (B, C, D)
    assert_close(per_sample, vmap(grad(ref), in_dims=(None, 0, 0))(w, h, t), torch.float32,
                 "vmap(grad)")
    both = grad(ours, argnums=(0, 1))(w, h[2], t[2])
    for got, want in zip(both, grad(ref, argnums=(0, 1))(w, h[2], t[2]), strict=True):
        assert_close(got, want, torch.float32, "grad of head and input")


def test_forward_mode_is_refused_with_a_clear_error(device):
    x, t, _ = _problems(device)
    with pytest.raises(NotImplementedError, match="no forward-mode AD"):
        jvp(lambda x: triton_xent.cross_entropy(x, t[0]), (x[0],), (torch.ones_like(x[0]),))


@pytest.mark.parametrize("how", ["grad_of_grad", "jacrev_of_grad"])
def test_second_order_is_refused_with_a_clear_error(device, how):
    # A zero second derivative would be silently wrong: refused, as create_graph=True is.
    x, t, _ = _problems(device)
    first = grad(lambda x: triton_xent.cross_entropy(x, t[0]))
    outer = grad(lambda x: first(x).square().sum()) if how == "grad_of_grad" else jacrev(first)
    with pytest.raises(NotImplementedError, match="no second-order gradients"):
        outer(x[0])


def test_eager_only_features_are_refused_under_a_transform(device):
    x, t, _ = _problems(device)
    with pytest.raises(ValueError, match="inplace_backward is an eager-mode feature"):
        grad(lambda x: triton_xent.cross_entropy(x * 1.0, t[0], inplace_backward=True))(x[0])
    with pytest.raises(ValueError, match="process_group is an eager-mode feature"):
        grad(lambda x: triton_xent.cross_entropy(x, t[0], process_group=object()))(x[0])


def test_plain_vmap_without_gradients(backend, device):
    x, t, w = _problems(device)
    got = vmap(lambda x, t: triton_xent.cross_entropy(x, t, weight=w, backend=backend))(x, t)
    want = torch.stack([F.cross_entropy(x[b], t[b], weight=w) for b in range(B)])
    assert_close(got, want, torch.float32, "vmap")
