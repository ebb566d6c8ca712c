"""Rows cut into slices (kernels/xent.py): each program publishes its slice's record, merges
all of them once its row's arrival counter reads P, and a program whose siblings are late
defers its slice to the second (finish) launch.

The slice size is shrunk here so that small rows take the split path with many slices.
Under the interpreter (programs run one after another) every program of a row but its last
arrival is deferred, so both the direct and the deferred paths run, and both schedules:
one program a slice, and persistent programs that walk the slices in grid-stride order.
On a GPU the default spin limit exercises the exchange, and a spin limit of 0 mostly the
deferral.
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
# Persistent: 3 programs an SM (the interpreter counts as one SM), fewer than the slices of
# the rows below, so programs take several slices each, siblings among them.
SCHEDULES = {"one_per_slice": (False, 1), "persistent": (True, 3)}


@pytest.fixture(params=[(SPIN_LIMITS[0], "one_per_slice"), (SPIN_LIMITS[1], "one_per_slice"),
                        (SPIN_LIMITS[1], "persistent")], ids=lambda p: f"spin{p[0]}-{p[1]}")
def small_slices(request, monkeypatch):
    spin, schedule = request.param
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(config, SPIN_SETTING, spin)
    persistent, per_sm = SCHEDULES[schedule]
    monkeypatch.setattr(config, "PERSISTENT", persistent)
    monkeypatch.setattr(config, "PERSISTENT_PROGRAMS_PER_SM", per_sm)


OPTIONS = {
    "plain": {},
    "smoothing_weight_ignore": dict(label_smoothing=0.3, weighted=True, ignore_index=2),
    "softcap_zloss_none": dict(softcap=3.0, lse_square_scale=1e-2, reduction="none"),
    "everything_sum": dict(softcap=3.0, lse_square_scale=1e-2, label_smoothing=0.1,
                           weighted=True, reduction="sum"),
}


# 2, 4 and 9 slices (the last one short), each option once.
@pytest.mark.parametrize("V, option", [(33, "plain"), (100, "smoothing_weight_ignore"),
                                       (100, "softcap_zloss_none"), (257, "everything_sum")],
                         ids=lambda v: f"V{v}" if isinstance(v, int) else v)
def test_split_rows_match_reference(small_slices, device, V, option):
    kwargs = dict(OPTIONS[option])
    g = torch.Generator().manual_seed(V)
    x = (3 * torch.randn(4, V, generator=g)).to(device)
    t = torch.randint(0, V, (4,), generator=g).to(device)
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
    x = (2 * torch.randn(4, 200, generator=g)).to(device)
    t = torch.randint(0, 200, (4,), generator=g).to(device)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    loss = triton_xent.cross_entropy(logits, t, label_smoothing=0.1, reduction="none",
                                     inplace_backward=True, backend="triton")
    loss.sum().backward()
    ref_loss, ref_grad = reference(x, t, label_smoothing=0.1, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")


def _deferral_flags(monkeypatch, x, t, compute_grad):
    """Runs xent_rows and returns (arrival counters, deferral flags (rows, P)) as the finish
    launch found them."""
    from triton_xent.kernels import xent

    seen = {}
    finish = xent._finish_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(finish.arg_names, args))
                sync, n_rows, n_slices = named["sync_ptr"], named["n_rows"], named["n_slices"]
                seen["arrivals"] = sync[:n_rows].clone()
                seen["flags"] = sync[n_rows:].view(n_rows, n_slices).clone()
                finish[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(xent, "_finish_kernel", Spy())
    grad = torch.empty_like(x) if compute_grad else None
    ce, *_ = xent.xent_rows(x.unsqueeze(-1), t, None, None,
                            grad.unsqueeze(-1) if compute_grad else None, prob_target=False,
                            ignore_index=-100, label_smoothing=0.0,
                            lse_square_scale=0.0, softcap=None)
    ref_loss, ref_grad = reference(x, t, reduction="none")
    assert_close(ce, ref_loss, torch.float32, "loss")
    if compute_grad:
        assert_close(grad, ref_grad, torch.float32, "grad")
    return seen["arrivals"], seen["flags"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's program order")
@pytest.mark.parametrize("compute_grad", [True, False], ids=["with_grad", "forward_only"])
def test_interpreter_defers_every_slice_but_the_last_arrival(monkeypatch, compute_grad):
    # Programs run in order, so slice j of a row arrives j-th: with a gradient, slices
    # 0 .. P-2 find the counter short and defer, the last merges at once; without one only
    # slice 0 (the loss's writer) waits, and defers.
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(config, "PERSISTENT", False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 100, generator=g)  # 4 slices of 32, 32, 32, 4
    t = torch.tensor([0, 99, 50])
    arrivals, flags = _deferral_flags(monkeypatch, x, t, compute_grad)
    assert arrivals.tolist() == [4, 4, 4]
    expected = [1, 1, 1, 0] if compute_grad else [1, 0, 0, 0]
    assert flags.tolist() == [expected] * 3
