"""Rows cut into slices (kernels/xent.py): programs exchange (max, sum) statistics, and a
program whose siblings are late defers its slice to the kernel's second (FINISH) launch.

The slice size is shrunk here so that small rows take the split path with many slices.
Under the interpreter (programs run one after another) every program of a row but the last
is deferred, so both the direct and the deferred paths run. On a GPU the
default spin limit exercises the exchange, and a spin limit of 0 mostly the deferral.
"""

import pytest
import torch

import triton_xent
from helpers import assert_close, reference
from triton_xent import config

pytest.importorskip("triton")

# On a GPU: the tuned limit (siblings meet) and 0 (mostly deferral). Under the interpreter,
# whose programs run one after another: 0 (the default there) and 3, which runs the polling
# loop through the interpreter before each early program gives up and defers.
if torch.cuda.is_available():
    SPIN_SETTING, SPIN_LIMITS = "SLICE_SPIN_LIMIT", [config.SLICE_SPIN_LIMIT, 0]
else:
    SPIN_SETTING, SPIN_LIMITS = "INTERPRET_SLICE_SPIN_LIMIT", [0, 3]


@pytest.fixture(params=SPIN_LIMITS, ids=lambda s: f"spin{s}")
def small_slices(request, monkeypatch):
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(config, SPIN_SETTING, request.param)


OPTIONS = {
    "plain": {},
    "smoothing_weight_ignore": dict(label_smoothing=0.3, weighted=True, ignore_index=2),
    "softcap_zloss_none": dict(softcap=3.0, lse_square_scale=1e-2, reduction="none"),
    "everything_sum": dict(softcap=3.0, lse_square_scale=1e-2, label_smoothing=0.1,
                           weighted=True, reduction="sum"),
}


@pytest.mark.parametrize("V", [33, 100, 257], ids=lambda v: f"V{v}")  # 2, 4 and 9 slices
@pytest.mark.parametrize("option", OPTIONS)
def test_split_rows_match_reference(small_slices, device, V, option):
    kwargs = dict(OPTIONS[option])
    g = torch.Generator().manual_seed(V)
    x = (3 * torch.randn(6, V, generator=g)).to(device)
    t = torch.randint(0, V, (6,), generator=g).to(device)
    t[0] = 2
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.rand(V, generator=g).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, t, backend="triton", **kwargs)
    go = torch.full_like(loss, 0.7)
    loss.backward(go)
    ref_loss, ref_grad = reference(x, t, grad_output=go, **kwargs)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_split_rows_with_probability_targets(small_slices, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 97, generator=g).to(device)
    p = torch.rand(4, 97, generator=g).softmax(1).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, p, label_smoothing=0.2, backend="triton")
    loss.backward()
    ref_loss, ref_grad = reference(x, p, label_smoothing=0.2)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_split_rows_edge_values_stay_in_their_row(small_slices, device):
    V = 100
    x = torch.randn(5, V)
    x[0, :40] = float("-inf")  # the first slice of row 0 is all -inf, later slices finite
    x[1] = -1e30  # equal huge values across every slice: log(V)
    x[2, 70] = float("nan")  # a NaN in the third slice of row 2 only
    x[3, 5] = float("-inf")  # target logit -inf: +inf loss
    x = x.to(device)
    t = torch.tensor([50, 3, 10, 5, 99], device=device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, t, reduction="none", label_smoothing=0.1,
                                     backend="triton")
    loss.sum().backward()
    ref_loss, ref_grad = reference(x, t, reduction="none", label_smoothing=0.1)
    assert torch.isinf(loss[3]) and torch.isinf(ref_loss[3])
    assert torch.isnan(loss[2]) and torch.isnan(xg.grad[2]).all()
    torch.testing.assert_close(loss[1].double(), torch.log(torch.tensor(float(V))).double()
                               .to(loss.device), atol=1e-5, rtol=1e-5)
    for r in (0, 1, 4):
        assert_close(loss[r], ref_loss[r], torch.float32, f"loss row {r}")
        assert_close(xg.grad[r], ref_grad[r], torch.float32, f"grad row {r}")


def test_split_and_unsplit_rows_agree(device, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 300, generator=g).to(device)
    t = torch.randint(0, 300, (3,), generator=g).to(device)
    whole = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 64)
    split = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)


def test_split_rows_with_gradient_written_over_the_logits(small_slices, device):
    # In place, no program may read a slice (or the target logit) that a sibling has
    # already overwritten with its gradient.
    g = torch.Generator().manual_seed(5)
    x = (2 * torch.randn(8, 200, generator=g)).to(device)
    t = torch.randint(0, 200, (8,), generator=g).to(device)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    loss = triton_xent.cross_entropy(logits, t, label_smoothing=0.1, reduction="none",
                                     inplace_backward=True, backend="triton")
    loss.sum().backward()
    ref_loss, ref_grad = reference(x, t, label_smoothing=0.1, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")
