"""Named edge cases: empty and fully ignored batches, boundary classes, extreme and non-finite
logits, unusual memory layouts and target dtypes, unchecked targets, in-place gradients,
return_lse shapes and no-grad mode. Expected values come from helpers.reference (float64) or,
where the value is exact, are written out."""

import math

import pytest
import torch
import torch.nn.functional as F

import triton_xent
from triton_xent import config
from helpers import assert_close, reference

# Rows longer than this are split into blocks whose statistics are merged.
SP = config.ROW_SLICE_MAX_V
REDUCTIONS = ["mean", "sum", "none"]
NAN = float("nan")
INF = float("inf")


# Every test runs on the `device` fixture's device (conftest.DEVICE: "cuda" when there is a GPU,
# where backend="triton" takes CUDA tensors only; "cpu" otherwise, the kernels interpreted).
# Data is drawn from CPU generators, so it is the same on every machine, then moved there.


def _randn(*shape, device, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device)


def _randint(high, shape, *, device, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, high, shape, generator=g).to(device)


def _weight(C, *, device, seed=0):
    return (0.5 + torch.rand(C, generator=torch.Generator().manual_seed(seed + 200))).to(device)


def _loss_and_grad(x, t, backend, reduction="mean", grad_output=None, **kw):
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, reduction=reduction, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), leaf.grad


# --- every target ignored, empty batch --------------------------------------------------------


ALL_IGNORED_OPTS = [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True}, id="weight"),
    pytest.param({"label_smoothing": 0.2, "weight": True}, id="smoothing+weight"),
    pytest.param({"lse_square_scale": 0.1, "softcap": 3.0}, id="zloss+softcap"),
]


@pytest.mark.parametrize("opts", ALL_IGNORED_OPTS)
@pytest.mark.parametrize("ignore_index", [-100, 4], ids=["ignore=-100", "ignore=4-in-range"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_target_ignored(backend, device, reduction, ignore_index, opts):
    """mean -> NaN (0/0, as PyTorch), sum -> 0, none -> zeros; the gradient is all zeros."""
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(7, device=device)
    x = _randn(5, 7, device=device)
    t = torch.full((5,), ignore_index, device=device)
    loss, grad = _loss_and_grad(x, t, backend, reduction, ignore_index=ignore_index, **opts)
    if reduction == "mean":
        assert loss.shape == () and torch.isnan(loss)
    elif reduction == "sum":
        assert loss.shape == () and loss.item() == 0.0
    else:
        assert torch.equal(loss, torch.zeros(5, device=device))
    assert torch.equal(grad, torch.zeros_like(x)), "an ignored row gets no gradient"
    if "lse_square_scale" not in opts:  # F.cross_entropy has no z-loss
        expected = F.cross_entropy(x.double(), t, ignore_index=ignore_index,
                                   reduction=reduction,
                                   **{k: (v.double() if k == "weight" else v)
                                      for k, v in opts.items() if k != "softcap"})
        assert_close(loss, expected, torch.float32, "vs F.cross_entropy")


@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True, "label_smoothing": 0.1, "lse_square_scale": 0.1},
                 id="weight+smoothing+zloss"),
])
@pytest.mark.parametrize("shape", [(0, 7), (0, 7, 3), (2, 7, 0), (0, SP + 5)],
                         ids=["(0,C)", "(0,C,d)", "(N,C,0)", "(0,long-row)"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, device, shape, reduction, opts):
    """No rows: mean NaN, sum 0, none empty (like F.cross_entropy); backward works."""
    opts = dict(opts)
    C = shape[1]
    if opts.pop("weight", False):
        opts["weight"] = _weight(C, device=device)
    x = torch.randn(shape).to(device)
    t = torch.zeros(shape[:1] + shape[2:], dtype=torch.long, device=device)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, reduction=reduction, backend=backend, **opts)
    expected = F.cross_entropy(x, t, reduction=reduction, weight=opts.get("weight"),
                               label_smoothing=opts.get("label_smoothing", 0.0))
    assert loss.shape == expected.shape
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0.0
    else:
        assert loss.numel() == 0
    loss.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch_prob_target(backend, device, reduction):
    x = torch.randn(0, 5).to(device)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, torch.zeros(0, 5, device=device), reduction=reduction,
                                     backend=backend)
    expected = F.cross_entropy(x, torch.zeros(0, 5, device=device), reduction=reduction)
    assert loss.shape == expected.shape
    assert_close(loss, expected, torch.float32, "empty prob target")
    loss.sum().backward()
    assert leaf.grad.shape == x.shape


@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_classes_with_every_target_ignored(backend, device, target, reduction):
    """(N, 0) logits: F.cross_entropy accepts them when every class index is ignored (and
    any probability target, an empty row): mean NaN (0/0), sum 0, none zeros."""
    x = torch.randn(3, 0).to(device)
    t = (torch.full((3,), -100, device=device) if target == "index"
         else torch.rand(3, 0).to(device))
    leaf = x.clone().requires_grad_(True)
    loss, lse = triton_xent.cross_entropy(leaf, t, reduction=reduction, backend=backend,
                                          return_lse=True)
    expected = F.cross_entropy(x, t, reduction=reduction)
    assert loss.shape == expected.shape
    assert_close(loss, expected, torch.float32, "loss")
    assert torch.equal(lse, torch.full((3,), -INF, device=device)), "log of an empty sum"
    loss.sum().backward()
    assert leaf.grad.shape == (3, 0)


def test_no_classes_with_a_target_raises_index_error(backend, device):
    with pytest.raises(IndexError, match="Target 0 is out of bounds .there are no classes"):
        triton_xent.cross_entropy(torch.randn(3, 0).to(device),
                                  torch.tensor([0, -100, -100], device=device), backend=backend)


def test_weighted_mean_with_smoothing_and_no_target_weight_is_nan(backend, device):
    """Every target's class weight is 0: F.cross_entropy's mean is 0/0 (NaN) plus the
    smoothing term over a zero weight sum, so NaN, not inf."""
    x = _randn(3, 4, device=device, seed=3)
    t = torch.tensor([0, 0, 1], device=device)
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
    loss = triton_xent.cross_entropy(x, t, weight=w, label_smoothing=0.3, backend=backend)
    assert torch.isnan(F.cross_entropy(x, t, weight=w, label_smoothing=0.3))
    assert torch.isnan(loss)


def test_one_sample_with_target_of_shape_1(backend, device):
    """A (C,) input with a (1,) target is one sample, as F.cross_entropy reads it (torch 2.11
    and later; torch 2.8 refused it): the loss of the batch x[None], 0-dim."""
    x = _randn(7, device=device, seed=4)
    t = torch.tensor([5], device=device)
    for reduction in REDUCTIONS:
        loss = triton_xent.cross_entropy(x, t, reduction=reduction, backend=backend)
        expected = F.cross_entropy(x[None], t, reduction=reduction).reshape(())
        assert loss.shape == expected.shape
        assert_close(loss, expected, torch.float32, reduction)


# --- boundary classes, shift invariance ------------------------------------------------------


@pytest.mark.parametrize("V", [2, 37, SP + 17], ids=["V2", "V37", "long-row"])
@pytest.mark.parametrize("which", ["first-class-0", "last-class-V-1"])
@pytest.mark.parametrize("opts", [pytest.param({}, id="plain"),
                                  pytest.param({"label_smoothing": 0.1, "weight": True},
                                               id="smoothing+weight")])
def test_target_first_and_last_class(backend, device, V, which, opts):
    """Class 0 and class V-1 (the last column, in the last block of a long row)."""
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(V, device=device, seed=1)
    x = _randn(3, V, device=device, seed=2)
    t = torch.full((3,), 0 if which == "first-class-0" else V - 1, device=device)
    loss, grad = _loss_and_grad(x, t, backend, "none", **opts)
    exp_loss, exp_grad = reference(x, t, reduction="none", **opts)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("V", [37, SP + 17], ids=["V37", "long-row"])
def test_shift_by_100_leaves_loss_and_grad_unchanged(backend, device, V):
    """Cross-entropy (also smoothed and weighted) is invariant to adding a constant to a row;
    lse moves by the constant. x is chosen so that x + 100 is exact in float32."""
    x = (_randn(4, V, device=device, seed=3) * 64).round() / 64  # multiples of 1/64: x + 100 exact
    t = _randint(V, (4,), device=device, seed=3)
    w = _weight(V, device=device, seed=3)
    kw = dict(weight=w, label_smoothing=0.1, reduction="none", return_lse=True)
    base = triton_xent.cross_entropy(x, t, backend=backend, **kw)
    shifted = triton_xent.cross_entropy(x + 100.0, t, backend=backend, **kw)
    assert_close(shifted[0], base[0], torch.float32, "loss after shift")
    assert_close(shifted[1], base[1] + 100.0, torch.float32, "lse after shift")
    _, g_base = _loss_and_grad(x, t, backend, "sum", weight=w, label_smoothing=0.1)
    _, g_shift = _loss_and_grad(x + 100.0, t, backend, "sum", weight=w, label_smoothing=0.1)
    assert_close(g_shift, g_base, torch.float32, "grad after shift")
    exp_loss, _ = reference(x + 100.0, t, weight=w, label_smoothing=0.1, reduction="none")
    assert_close(shifted[0], exp_loss, torch.float32, "vs reference")


# --- extreme and non-finite logits -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [5, 1000, SP + 17], ids=["V5", "V1000", "long-row"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3], ids=["no-smoothing", "smoothing=0.3"])
def test_row_of_all_minus_1e30_gives_log_V(backend, device, V, dtype, smoothing):
    """A row whose logits are all -1e30 is uniform: loss log(V) exactly-ish (lse - z_y must not
    be computed as (-1e30 + log V) - (-1e30) = 0), gradient (1/V - onehot) / rows."""
    x = _randn(3, V, device=device, seed=4, dtype=dtype)
    x[1] = -1e30
    t = torch.tensor([1, V - 2, 0], device=device)
    loss, grad = _loss_and_grad(x, t, backend, "none", label_smoothing=smoothing)
    assert_close(loss[1], torch.tensor(math.log(V), device=device), dtype,
                 "loss of the uniform row")
    expected_row = torch.full((V,), 1.0 / V, dtype=torch.float64, device=device)
    expected_row[V - 2] -= 1.0 - smoothing
    expected_row -= smoothing / V
    assert_close(grad[1], expected_row, dtype, "grad of the uniform row")
    exp_loss, exp_grad = reference(x, t, reduction="none", label_smoothing=smoothing)
    assert_close(loss, exp_loss, dtype, "loss")
    assert_close(grad, exp_grad, dtype, "grad")


@pytest.mark.parametrize("V", [50, SP + 17], ids=["V50", "long-row"])
@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1, "weight": True}, id="smoothing+weight"),
    pytest.param({"lse_square_scale": 1e-4}, id="zloss"),
])
def test_logits_of_magnitude_1e4_fp32(backend, device, V, opts):
    """Rows of +-1e4 logits in float32 (exp overflows unless shifted by the max)."""
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(V, device=device, seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.where(torch.rand(4, V, generator=g) < 0.5, -1e4, 1e4).to(device)
    # A near-tie at the top: the loss is O(1), not 0 or 1e4.
    x[0] = _randn(V, device=device, seed=5) + 1e4
    x[3, :] = -1e4
    x[3, 7] = 1e4
    t = torch.tensor([3, 5, 11, 7], device=device)
    loss, grad = _loss_and_grad(x, t, backend, "none", **opts)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    exp_loss, exp_grad = reference(x, t, reduction="none", **opts)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("V", [9, SP + 17], ids=["V9", "long-row"])
@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"label_smoothing": 0.1, "weight": True}, id="smoothing+weight"),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_target_logit_minus_inf_gives_inf(backend, device, V, opts, reduction):
    """The target's logit is -inf: loss +inf (PyTorch's answer), gradient still finite. With
    smoothing every -inf logit makes the row's loss +inf."""
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(V, device=device, seed=6)
    x = _randn(3, V, device=device, seed=6)
    t = torch.tensor([2, 4, V - 1], device=device)
    x[0, 2] = -INF  # the target's logit
    x[2, 0] = -INF  # not a target: finite loss without smoothing, +inf with it
    loss, grad = _loss_and_grad(x, t, backend, reduction, **opts)
    exp_loss, exp_grad = reference(x, t, reduction=reduction, **opts)
    if reduction == "none":
        assert loss[0].item() == INF
        assert loss[1].isfinite()
        if "label_smoothing" in opts:
            assert loss[2].item() == INF
        else:
            assert loss[2].isfinite()
    else:
        assert loss.item() == INF
    assert torch.isfinite(grad).all()
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["no-smoothing", "smoothing=0.1"])
def test_whole_block_of_minus_inf_logits(backend, device, smoothing, target):
    """A long row whose first SP columns (a whole block of the split) are -inf, as for a masked
    part of the vocabulary. Without smoothing the loss is finite; with smoothing (or class
    probabilities on the masked columns) it is +inf as in PyTorch, never NaN."""
    V = 2 * SP
    x = _randn(2, V, device=device, seed=7)
    x[:, :SP] = -INF
    if target == "index":
        t = torch.tensor([SP + 3, V - 1], device=device)
    else:
        # Some probability on every column, masked ones too.
        t = torch.full((2, V), 1.0 / V, device=device)
    loss, grad = _loss_and_grad(x, t, backend, "none", label_smoothing=smoothing)
    exp_loss, exp_grad = reference(x, t, reduction="none", label_smoothing=smoothing)
    assert not torch.isnan(loss).any(), f"NaN loss {loss.tolist()}, expected {exp_loss.tolist()}"
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("V", [9, SP + 17], ids=["V9", "long-row"])
@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1, "weight": True, "lse_square_scale": 0.01,
                  "softcap": 5.0}, id="all-options"),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_in_one_row_stays_in_that_row(backend, device, V, opts, reduction):
    """A NaN logit makes its own row's loss and gradient NaN; the other rows are untouched
    (their loss with reduction "none", their gradient for every reduction)."""
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(V, device=device, seed=8)
    x = _randn(4, V, device=device, seed=8)
    x[1, V // 2] = NAN
    t = torch.tensor([0, 3, V - 1, 5], device=device)
    loss, grad = _loss_and_grad(x, t, backend, reduction, **opts)
    exp_loss, exp_grad = reference(x, t, reduction=reduction, **opts)
    if reduction == "none":
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    else:
        assert torch.isnan(loss)
    assert torch.isnan(grad[1]).all()
    assert torch.isfinite(grad[[0, 2, 3]]).all()
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


# --- layouts -------------------------------------------------------------------------------


def _check_layout(x, t, backend, **opts):
    """x may be any view; compared on values with the reference, with per-row grad_output."""
    leaf_base = x.detach().clone()
    loss = triton_xent.cross_entropy(x, t, reduction="none", backend=backend, **opts)
    go = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape).to(loss.device)
    exp_loss, exp_grad = reference(leaf_base, t, reduction="none", grad_output=go, **opts)
    assert_close(loss, exp_loss, torch.float32, "loss")
    return loss, go, exp_grad


@pytest.mark.parametrize("V", [37, SP + 17], ids=["V37", "long-row"])
def test_row_strided_slice_of_wider_tensor(backend, device, V):
    """x[:, :V] of a (N, V + 13) leaf: rows strided by V + 13, read in place."""
    wide = _randn(4, V + 13, device=device, seed=9).requires_grad_(True)
    x = wide[:, :V]
    assert not x.is_contiguous()
    t = _randint(V, (4,), device=device, seed=9)
    loss, go, exp_grad = _check_layout(x, t, backend, label_smoothing=0.1)
    loss.backward(go)
    assert_close(wide.grad[:, :V], exp_grad, torch.float32, "grad")
    assert torch.equal(wide.grad[:, V:], torch.zeros(4, 13, device=device))


@pytest.mark.parametrize("layout", ["transposed-(C,N).t()", "channels-last-(N,d,C).permute",
                                    "channels_last-4d"])
def test_class_dimension_with_unit_or_large_stride(backend, device, layout):
    if layout == "transposed-(C,N).t()":
        # (C, N) -> (N, C), class stride N
        base = _randn(11, 6, device=device, seed=10).requires_grad_(True)
        x = base.t()
    elif layout == "channels-last-(N,d,C).permute":
        # (N, d, C) -> (N, C, d)
        base = _randn(3, 5, 11, device=device, seed=10).requires_grad_(True)
        x = base.permute(0, 2, 1)
    else:
        base = _randn(2, 11, 3, 4, device=device, seed=10).contiguous(
            memory_format=torch.channels_last)
        base.requires_grad_(True)
        x = base
    assert not x.is_contiguous()
    t = _randint(11, x.shape[:1] + x.shape[2:], device=device, seed=10)
    loss, go, exp_grad = _check_layout(x, t, backend, weight=_weight(11, device=device),
                                       softcap=3.0)
    loss.backward(go)
    grad = base.grad.t() if layout.startswith("transposed") else (
        base.grad.permute(0, 2, 1) if layout.startswith("channels-last") else base.grad)
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("layout", ["strided-1d", "expanded-stride-0", "transposed-2d"])
def test_non_contiguous_class_index_target(backend, device, layout):
    """Targets taken from a larger tensor without a copy (labels[:, 0], one label expanded to
    every row, a transposed label map) must be read through their strides."""
    # The views are taken on the device: moving a view would copy it into a contiguous tensor.
    if layout == "strided-1d":
        x = _randn(6, 13, device=device, seed=11)
        t = _randint(13, (6, 2), device=device, seed=11)[:, 0]
    elif layout == "expanded-stride-0":
        x = _randn(6, 13, device=device, seed=11)
        t = torch.tensor(4, device=device).expand(6)
    else:
        x = _randn(3, 13, 4, device=device, seed=11)
        t = _randint(13, (4, 3), device=device, seed=11).t()
    assert not t.is_contiguous()
    _check_layout(x, t, backend)


def test_non_contiguous_prob_target_and_weight(backend, device):
    x = _randn(5, 9, device=device, seed=12)
    t = torch.softmax(_randn(9, 5, device=device, seed=13), dim=0).t()  # class stride 5
    w = _weight(18, device=device, seed=12)[::2]  # stride 2
    assert not t.is_contiguous() and not w.is_contiguous()
    _check_layout(x, t, backend, weight=w, label_smoothing=0.1)


# --- target dtypes, unchecked targets ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8],
                         ids=["int64", "int32", "int16", "int8", "uint8"])
def test_integer_target_dtypes(backend, device, dtype):
    """Any integer class-index tensor is accepted (torch itself takes only int64 and uint8)
    with the int64 result; an in-range ignore_index works in each dtype."""
    x = _randn(6, 40, device=device, seed=14)
    t64 = _randint(40, (6,), device=device, seed=14)
    t64[2] = 7
    t = t64.to(dtype)
    loss, grad = _loss_and_grad(x, t, backend, "mean", ignore_index=7, label_smoothing=0.1)
    exp_loss, exp_grad = reference(x, t64, ignore_index=7, label_smoothing=0.1)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_uint8_target_156_is_a_class_not_ignore_index_minus_100(backend, device, reduction):
    """uint8 156 is -100 modulo 256: with the default ignore_index=-100 it is class 156 (as in
    F.cross_entropy, which compares the int64 value), not an ignored row."""
    x = _randn(3, 200, device=device, seed=15)
    t = torch.tensor([156, 3, 10], dtype=torch.uint8, device=device)
    loss, grad = _loss_and_grad(x, t, backend, reduction)
    expected = F.cross_entropy(x.double(), t, reduction=reduction)
    exp_loss, exp_grad = reference(x, t.long(), reduction=reduction)
    assert_close(expected, exp_loss, torch.float32, "F.cross_entropy agrees with the reference")
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("check_targets", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["no-weight", "weight"])
def test_uint8_target_with_more_than_256_classes(backend, device, use_weight, check_targets):
    """uint8 targets index up to 255 of V = 300 classes; V itself does not fit in uint8, so
    the range check and the weight lookup must not compare or clamp in uint8."""
    x = _randn(3, 300, device=device, seed=15)
    w = _weight(300, device=device, seed=15) if use_weight else None
    t = torch.tensor([50, 3, 255], dtype=torch.uint8, device=device)
    loss, grad = _loss_and_grad(x, t, backend, "mean", weight=w, check_targets=check_targets)
    expected = F.cross_entropy(x.double(), t, weight=None if w is None else w.double())
    exp_loss, exp_grad = reference(x, t.long(), weight=w)
    assert_close(expected, exp_loss, torch.float32, "F.cross_entropy agrees with the reference")
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=["int8", "int16"])
def test_narrow_signed_target_with_more_classes_than_the_dtype_holds(backend, device, dtype):
    """C = 40000 is out of int16's (and int8's) range: the range check must not compare in
    the target's dtype, where C would wrap and a valid target would look out of bounds."""
    x = _randn(3, 40000, device=device, seed=15)
    t = torch.tensor([100, 3, 127], dtype=dtype, device=device)
    loss, grad = _loss_and_grad(x, t, backend, "mean")
    exp_loss, exp_grad = reference(x, t.long())
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


def test_int32_target_with_ignore_index_beyond_int32(backend, device):
    """ignore_index = 2**32 wraps to 0 in int32: class 0 must still count, as with int64."""
    x = _randn(4, 6, device=device, seed=15)
    t = torch.tensor([0, 1, 2, 3], device=device)
    loss, grad = _loss_and_grad(x, t.int(), backend, "mean", ignore_index=2**32)
    exp_loss, exp_grad = reference(x, t, ignore_index=2**32)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


def test_uint8_target_with_ignore_index_255(backend, device):
    """The usual segmentation convention: uint8 label maps with 255 = ignore."""
    x = _randn(2, 5, 3, 3, device=device, seed=16)
    t = _randint(5, (2, 3, 3), device=device, seed=16).to(torch.uint8)
    t[0, 0, :] = 255
    loss, grad = _loss_and_grad(x, t, backend, "mean", ignore_index=255)
    exp_loss, exp_grad = reference(x, t.long(), ignore_index=255)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("V", [10, SP + 17], ids=["V10", "long-row"])
@pytest.mark.parametrize("bad", [-1, "V", 10**6], ids=["target=-1", "target=V", "target=1e6"])
@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"weight": True, "label_smoothing": 0.1, "lse_square_scale": 0.01},
                 id="weight+smoothing+zloss"),
])
def test_unchecked_out_of_range_target_is_nan_for_its_row_only(device, V, bad, opts):
    """check_targets=False on the kernel path: no sync, no crash, no wild read; the bad row's
    loss and gradient are NaN and every other row matches the reference."""
    if not triton_xent.triton_available():
        pytest.skip("needs triton")
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = _weight(V, device=device, seed=17)
    bad = V if bad == "V" else bad
    x = _randn(4, V, device=device, seed=17)
    t = torch.tensor([1, bad, V - 1, 0], device=device)
    loss, grad = _loss_and_grad(x, t, "triton", "none", check_targets=False, **opts)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    keep = [0, 2, 3]
    exp_loss, exp_grad = reference(x[keep], t[keep], reduction="none", **opts)
    assert_close(loss[keep], exp_loss, torch.float32, "other rows' loss")
    assert_close(grad[keep], exp_grad, torch.float32, "other rows' grad")
    mean = triton_xent.cross_entropy(x, t, check_targets=False, backend="triton", **opts)
    assert torch.isnan(mean)


# --- inplace_backward ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(13,), (5, 13), (2, 13, 2, 3), (2, SP + 17)],
                         ids=["(C,)", "(N,C)", "(N,C,d1,d2)", "long-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("go", [None, -2.0], ids=["go=1", "go=-2"])
def test_inplace_backward_same_gradient_and_storage_holds_it(backend, device, shape, dtype, go):
    C = shape[0] if len(shape) == 1 else shape[1]
    x0 = _randn(*shape, device=device, seed=18, dtype=dtype)
    t = _randint(C, shape[:1] + shape[2:] if len(shape) > 1 else (), device=device, seed=18)
    opts = dict(label_smoothing=0.1, softcap=4.0, lse_square_scale=0.01,
                weight=_weight(C, device=device))
    x = x0.clone().requires_grad_(True)
    ptr = x.data_ptr()
    loss = triton_xent.cross_entropy(x, t, inplace_backward=True, backend=backend, **opts)
    exp_loss, exp_grad = reference(x0, t, **opts)
    assert_close(loss, exp_loss, dtype, "loss")
    _, unit_grad = reference(x0, t, **opts)
    assert_close(x.detach(), unit_grad, dtype, "the input's storage holds the gradient")
    gout = None if go is None else torch.tensor(go, dtype=dtype, device=device)
    loss.backward(gout)
    _, exp_grad = reference(x0, t, grad_output=gout, **opts)
    assert_close(x.grad, exp_grad, dtype, "grad")
    assert x.data_ptr() == ptr
    # Same gradient as without inplace_backward.
    y = x0.clone().requires_grad_(True)
    triton_xent.cross_entropy(y, t, backend=backend, **opts).backward(gout)
    assert_close(x.grad, y.grad, dtype, "in-place vs out-of-place")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_inplace_backward_on_an_expanded_input_is_computed_out_of_place(backend, device,
                                                                       reduction):
    """Rows of an expanded (stride-0) input share memory: their gradients cannot all be
    written there. The gradient is then computed out of place, and the base is untouched."""
    base0 = _randn(1, 9, device=device, seed=19)
    t = torch.tensor([0, 4, 8, 2], device=device)
    base = base0.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(base.expand(4, 9), t, reduction=reduction,
                                     inplace_backward=True, backend=backend)
    assert torch.equal(base.detach(), base0), "the shared row was overwritten"
    loss.sum().backward()
    ref = base0.double().requires_grad_(True)
    F.cross_entropy(ref.expand(4, 9), t, reduction=reduction).sum().backward()
    assert_close(base.grad, ref.grad, torch.float32, "grad")


def test_inplace_backward_gradient_from_autograd_grad_is_usable(backend, device):
    """The gradient returned by torch.autograd.grad lives in the input's storage; using it in
    later (grad-mode) arithmetic must work like any other tensor."""
    x0 = _randn(4, 9, device=device, seed=20)
    t = torch.tensor([0, 4, 8, 2], device=device)
    x = x0.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(x, t, inplace_backward=True, backend=backend)
    (g,) = torch.autograd.grad(loss, x, torch.tensor(2.0, device=device))
    _, exp_grad = reference(x0, t, grad_output=torch.tensor(2.0, device=device))
    assert_close(g * 1.0, exp_grad, torch.float32, "grad")


def test_inplace_backward_on_a_row_strided_slice_leaves_the_padding(backend, device):
    """The gradient goes into the slice's elements only; the other columns keep their values."""
    V = 37
    wide0 = _randn(4, V + 5, device=device, seed=19)
    wide = wide0.clone()
    t = _randint(V, (4,), device=device, seed=19)
    x = wide[:, :V].requires_grad_(True)
    loss = triton_xent.cross_entropy(x, t, inplace_backward=True, backend=backend,
                                     label_smoothing=0.1)
    loss.backward()
    _, exp_grad = reference(wide0[:, :V], t, label_smoothing=0.1)
    assert_close(x.grad, exp_grad, torch.float32, "grad")
    assert torch.equal(wide[:, V:], wide0[:, V:]), "padding columns were overwritten"


# --- return_lse shapes, no-grad mode -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (4, 7), (4, 7, 3), (2, 7, 3, 2), (0, 7)],
                         ids=["(C,)", "(N,C)", "(N,C,d)", "(N,C,d1,d2)", "(0,C)"])
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_lse_shape_for_each_rank(backend, device, shape, target, reduction):
    x = _randn(*shape, device=device, seed=20).requires_grad_(True)
    row_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if target == "index":
        t = _randint(7, row_shape, device=device, seed=20)
    else:
        t = torch.softmax(_randn(*shape, device=device, seed=21), dim=0 if len(shape) == 1 else 1)
    loss, lse = triton_xent.cross_entropy(x, t, reduction=reduction, return_lse=True,
                                          backend=backend)
    assert lse.shape == torch.Size(row_shape)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    expected_loss_shape = row_shape if reduction == "none" else ()
    assert loss.shape == torch.Size(expected_loss_shape)
    assert_close(lse, torch.logsumexp(x.detach().double(), dim=0 if len(shape) == 1 else 1),
                 torch.float32, "lse")


@pytest.mark.parametrize("mode", ["torch.no_grad", "inference_mode", "input-without-grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_mode_returns_the_same_loss(backend, device, mode, reduction):
    """Without a graph the forward skips the gradient; the loss and lse must not change, and
    inplace_backward must then leave the input alone."""
    x0 = _randn(5, 23, device=device, seed=22)
    t = _randint(23, (5,), device=device, seed=22)
    t[0] = -100
    opts = dict(weight=_weight(23, device=device), label_smoothing=0.1, lse_square_scale=0.01,
                softcap=6.0, reduction=reduction, return_lse=True, backend=backend)
    with_grad = triton_xent.cross_entropy(x0.clone().requires_grad_(True), t, **opts)
    x = x0.clone()
    if mode == "torch.no_grad":
        x.requires_grad_(True)
        with torch.no_grad():
            loss, lse = triton_xent.cross_entropy(x, t, inplace_backward=True, **opts)
    elif mode == "inference_mode":
        with torch.inference_mode():
            loss, lse = triton_xent.cross_entropy(x, t, inplace_backward=True, **opts)
    else:
        loss, lse = triton_xent.cross_entropy(x, t, inplace_backward=True, **opts)
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad[0].detach())
    assert torch.equal(lse, with_grad[1])
    assert torch.equal(x.detach(), x0), "no gradient is written without a graph"
    exp_loss, _ = reference(x0, t, weight=opts["weight"], label_smoothing=0.1,
                            lse_square_scale=0.01, softcap=6.0, reduction=reduction)
    assert_close(loss, exp_loss, torch.float32, "loss")
