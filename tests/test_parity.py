"""Parity of loss and input gradient with the float64 reference (helpers.reference, which is
F.cross_entropy plus our z-loss and softcap) for both backends, every dtype, shapes chosen for
the code paths they reach, every option and the combinations that interact."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn import _reduction

import triton_xent
from triton_xent import config
from helpers import assert_close, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
REDUCTIONS = ["mean", "sum", "none"]

# Rows longer than this are not handled by one program holding one block: the statistics of
# several blocks are merged (online logsumexp).
SP = config.ROW_SLICE_MAX_V

# Every test runs on the `device` fixture's device (conftest.DEVICE: "cuda" when there is a GPU,
# where backend="triton" takes CUDA tensors only; "cpu" otherwise, the kernels interpreted).
# Data is drawn from CPU generators, so it is the same on every machine, then moved there.

# (input shape, reason): every shape is here for a code path or a boundary it reaches.
SMALL_SHAPES = [
    ((4, 1), "V1-one-class-logp-is-zero"),
    ((5, 2), "V2-smallest-real-softmax"),
    ((5, 3), "V3-block-of-4-with-one-masked-column"),
    ((3, 4099), "V4099-odd-just-past-4096-masked-tail"),
    ((37,), "unbatched-(C,)-input"),
    ((2, 7, 3, 4), "(N,C,d1,d2)-spatial-rows-D=12"),
    ((3, 5, 1), "(N,C,1)-trailing-singleton-dim"),
]
# Long rows cost seconds in the interpreter: few rows, and one dtype per test function.
BIG_SHAPES = [
    ((2, SP), "V=SP-largest-row-in-one-block"),
    ((2, SP + 1), "V=SP+1-smallest-row-split-in-blocks"),
    ((2, 2 * SP + 3), "V=2SP+3-three-blocks-uneven-split"),
    ((2, 65537), "V65537-past-2^16-classes"),
    ((1, 128256), "V128256-llama3-vocab-one-row"),
]


def _shape_cases(big_dtype, skip_big=()):
    """Small shapes in every dtype; the long rows in `big_dtype` only."""
    cases = [pytest.param(shape, dt, id=f"{name}-{dt_id}")
             for shape, name in SMALL_SHAPES for dt, dt_id in zip(DTYPES, DTYPE_IDS)]
    big_id = DTYPE_IDS[DTYPES.index(big_dtype)]
    cases += [pytest.param(shape, big_dtype, id=f"{name}-{big_id}")
              for shape, name in BIG_SHAPES if name not in skip_big]
    return cases


def _logits(shape, dtype, seed, *, device, scale=3.0):
    """Logits rounded to `dtype` (what the kernel sees), spread enough to be peaked."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype).to(device)


def _n_classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def _row_shape(shape):
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


def _class_target(shape, seed, *, device, ignore=None, n_ignored=1):
    """Class indices in [0, C); with `ignore`, the first `n_ignored` rows (flat) get it."""
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, _n_classes(shape), _row_shape(shape), generator=g)
    if ignore is not None and t.numel() > 1:
        t.view(-1)[:n_ignored] = ignore
    return t.to(device)


def _prob_target(shape, dtype, seed, *, device):
    """Class probabilities along dim 1 (dim 0 for (C,)), including some exact zeros."""
    g = torch.Generator().manual_seed(seed + 2)
    cdim = 0 if len(shape) == 1 else 1
    t = torch.softmax(2.0 * torch.randn(shape, generator=g), dim=cdim)
    t = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, t)
    t = t / t.sum(dim=cdim, keepdim=True).clamp_min(1e-12)
    return t.to(dtype).to(device)


def _weight(n_classes, seed, *, device):
    g = torch.Generator().manual_seed(seed + 3)
    w = 0.25 + 2.0 * torch.rand(n_classes, generator=g)
    if n_classes > 2:
        w[1] = 0.0  # a zero weight must not turn into 0 * inf or divide by zero
    return w.to(device)


def _run_and_compare(x, target, backend, reduction="mean", weight=None, grad_output=None,
                     what="", **opts):
    """Runs triton_xent on a leaf copy of x, backward with grad_output, and checks loss, dtype
    and gradient against the reference (computed from the same tensors, on their device).
    Returns (loss, grad)."""
    dtype = x.dtype
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, target, weight=weight, reduction=reduction,
                                     backend=backend, **opts)
    exp_loss, exp_grad = reference(x, target, weight=weight, reduction=reduction,
                                   grad_output=grad_output, **opts)
    expected_dtype = (torch.result_type(x, target) if target.is_floating_point() else dtype)
    assert loss.dtype == expected_dtype, what
    assert loss.shape == exp_loss.shape, what
    if grad_output is None:
        loss.backward(torch.ones_like(loss)) if reduction == "none" else loss.backward()
    else:
        loss.backward(grad_output)
    assert_close(loss, exp_loss, dtype, f"{what} loss")
    assert leaf.grad.dtype == dtype and leaf.grad.shape == x.shape
    assert_close(leaf.grad, exp_grad, dtype, f"{what} grad")
    return loss.detach(), leaf.grad


# --- shapes x dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype", _shape_cases(torch.bfloat16))
def test_shape_plain(backend, device, shape, dtype):
    x = _logits(shape, dtype, seed=len(shape) + shape[-1], device=device)
    t = _class_target(shape, seed=shape[-1], device=device)
    _run_and_compare(x, t, backend, "mean", what=f"{shape}")


@pytest.mark.parametrize("shape,dtype", _shape_cases(torch.float32))
def test_shape_all_options(backend, device, shape, dtype):
    """Weight, an ignored row, smoothing, z-loss and softcap at once, per-row grad_output."""
    x = _logits(shape, dtype, seed=7 + shape[-1], device=device, scale=6.0)
    t = _class_target(shape, seed=shape[-1], device=device, ignore=-100)
    w = _weight(_n_classes(shape), seed=1, device=device)
    go = torch.linspace(-1.5, 2.0, max(t.numel(), 1)).reshape(t.shape).to(device)
    _run_and_compare(x, t, backend, "none", weight=w, grad_output=go, label_smoothing=0.2,
                     lse_square_scale=1e-2, softcap=4.0, what=f"{shape}")


@pytest.mark.parametrize("shape,dtype", _shape_cases(
    torch.float16, skip_big=("V128256-llama3-vocab-one-row", "V=SP-largest-row-in-one-block")))
def test_shape_prob_target(backend, device, shape, dtype):
    x = _logits(shape, dtype, seed=11 + shape[-1], device=device)
    t = _prob_target(shape, dtype, seed=shape[-1], device=device)
    _run_and_compare(x, t, backend, "mean",
                     weight=_weight(_n_classes(shape), seed=2, device=device),
                     label_smoothing=0.1, what=f"{shape}")


# --- options x reductions -----------------------------------------------------------------


# Each entry: (kwargs for cross_entropy beyond weight; whether to use a weight; target kind
# "index" / "ignored" (two rows -100) / "ignore-in-range" (ignore_index=2, a real class) /
# "prob").
OPTIONS = [
    pytest.param({}, False, "index", id="plain"),
    pytest.param({}, True, "index", id="weight"),
    pytest.param({}, False, "ignored", id="ignore_index-default"),
    pytest.param({"ignore_index": 2}, False, "ignore-in-range", id="ignore_index-in-range"),
    pytest.param({"ignore_index": 2}, True, "ignore-in-range", id="weight+ignore_index-in-range"),
    pytest.param({}, True, "ignored", id="weighted-mean-with-ignored"),
    pytest.param({"label_smoothing": 0.1}, False, "index", id="smoothing"),
    pytest.param({"label_smoothing": 0.3}, True, "ignored", id="smoothing+weight+ignore"),
    pytest.param({"label_smoothing": 1.0}, True, "ignored", id="smoothing=1+weight+ignore"),
    pytest.param({"lse_square_scale": 0.05}, False, "index", id="zloss"),
    pytest.param({"lse_square_scale": 0.05}, True, "ignored", id="zloss+weight+ignore"),
    pytest.param({"lse_square_scale": 0.05, "label_smoothing": 0.1}, True, "ignore-in-range",
                 id="zloss+smoothing+weight+ignore_in_range"),
    pytest.param({"softcap": 2.5}, False, "index", id="softcap"),
    pytest.param({"softcap": 2.5, "label_smoothing": 0.2, "lse_square_scale": 0.02}, True,
                 "ignored", id="softcap+smoothing+zloss+weight+ignore"),
    pytest.param({}, False, "prob", id="prob"),
    pytest.param({"label_smoothing": 0.2}, True, "prob", id="prob+smoothing+weight"),
    pytest.param({"softcap": 2.5, "lse_square_scale": 0.05, "label_smoothing": 0.1}, True,
                 "prob", id="prob+softcap+zloss+smoothing+weight"),
]


def _option_problem(shape, dtype, use_weight, kind, seed, *, device):
    x = _logits(shape, dtype, seed, device=device)
    C = _n_classes(shape)
    if kind == "prob":
        t = _prob_target(shape, dtype, seed, device=device)
    elif kind == "ignored":
        t = _class_target(shape, seed, device=device, ignore=-100, n_ignored=2)
    elif kind == "ignore-in-range":
        t = _class_target(shape, seed, device=device)
        t.view(-1)[::3] = 2  # class 2 is a real class, here used as ignore_index
        assert C > 2
    else:
        t = _class_target(shape, seed, device=device)
    w = _weight(C, seed, device=device) if use_weight else None
    return x, t, w


# Every reduction in float32; the low-precision dtypes with one reduction each (rounding of the
# result is what differs by dtype, not the reduction logic).
DTYPE_REDUCTIONS = [
    pytest.param(torch.float32, "mean", id="fp32-mean"),
    pytest.param(torch.float32, "sum", id="fp32-sum"),
    pytest.param(torch.float32, "none", id="fp32-none"),
    pytest.param(torch.float16, "mean", id="fp16-mean"),
    pytest.param(torch.bfloat16, "none", id="bf16-none"),
]


@pytest.mark.parametrize("dtype,reduction", DTYPE_REDUCTIONS)
@pytest.mark.parametrize("opts,use_weight,kind", OPTIONS)
def test_options(backend, device, opts, use_weight, kind, dtype, reduction):
    """Small (N, C) rows: every option and combination, every reduction, every dtype."""
    x, t, w = _option_problem((9, 37), dtype, use_weight, kind, seed=3, device=device)
    _run_and_compare(x, t, backend, reduction, weight=w, **opts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts,use_weight,kind", OPTIONS)
def test_options_many_blocks(backend, device, opts, use_weight, kind, reduction, monkeypatch):
    """The option matrix on rows split into many blocks, made cheap by lowering the split
    threshold in triton_xent.config to 16 columns (V = 53: four blocks, the last of 5)."""
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 16)
    x, t, w = _option_problem((3, 53), torch.float32, use_weight, kind, seed=4, device=device)
    go = None if reduction == "mean" else torch.tensor([0.5, -2.0, 3.0], device=device)
    _run_and_compare(x, t, backend, reduction, weight=w, grad_output=go, **opts)


MULTI_BLOCK_OPTIONS = [p for p in OPTIONS if p.id in (
    "plain", "smoothing+weight+ignore", "zloss+weight+ignore",
    "softcap+smoothing+zloss+weight+ignore", "prob+softcap+zloss+smoothing+weight")]


@pytest.mark.parametrize("opts,use_weight,kind", MULTI_BLOCK_OPTIONS)
def test_options_long_rows(backend, device, opts, use_weight, kind):
    """Representative options on real-size rows longer than SP (three blocks, real block
    sizes); per-row grad_output."""
    shape = (2, 2 * SP + SP // 2 + 5)
    x, t, w = _option_problem(shape, torch.float32, use_weight, kind, seed=4, device=device)
    go = torch.tensor([0.5, -2.0], device=device)
    _run_and_compare(x, t, backend, "none", weight=w, grad_output=go, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts,use_weight,kind", OPTIONS)
def test_options_spatial(backend, device, opts, use_weight, kind, reduction):
    """The same option matrix on (N, C, d1, d2) input: rows are strided by d1*d2."""
    x, t, w = _option_problem((2, 6, 2, 3), torch.float32, use_weight, kind, seed=5,
                              device=device)
    _run_and_compare(x, t, backend, reduction, weight=w, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts,use_weight,kind", OPTIONS)
def test_options_unbatched(backend, device, opts, use_weight, kind, reduction):
    """The same option matrix on (C,) input: one row, loss of shape () for "none"."""
    x, t, w = _option_problem((11,), torch.float32, use_weight, kind, seed=6, device=device)
    if kind in ("ignored", "ignore-in-range"):
        # A single row cannot hold ignored and kept targets; keep it (ignored is an edge case).
        t = torch.tensor(4, device=device)
    _run_and_compare(x, t, backend, reduction, weight=w, **opts)


def test_zloss_mean_divides_by_kept_rows_not_weights(backend, device):
    """Pins the documented normalisation independently of helpers.reference: with weights, the
    CE part is divided by the weight sum and the z-loss part by the number of kept rows."""
    x = _logits((6, 13), torch.float64, seed=8, device=device)
    t = _class_target((6, 13), seed=8, device=device, ignore=-100, n_ignored=2)
    w = _weight(13, seed=8, device=device).double()
    scale = 0.1
    x32 = x.float()
    got = triton_xent.cross_entropy(x32, t, weight=w, lse_square_scale=scale, backend=backend)
    ce = F.cross_entropy(x32.double(), t, weight=w)
    lse = torch.logsumexp(x32.double(), dim=1)[t != -100]
    expected = ce + scale * (lse ** 2).sum() / 4
    assert_close(got, expected, torch.float32, "z-loss mean")
    got_none = triton_xent.cross_entropy(x32, t, weight=w, lse_square_scale=scale,
                                         reduction="none", backend=backend)
    assert bool((got_none[:2] == 0).all()), "ignored rows carry no z-loss"


# --- grad_output ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("go_value", [-2.5, 0.0, 1e3], ids=["go=-2.5", "go=0", "go=1e3"])
def test_scalar_grad_output(backend, device, reduction, dtype, go_value):
    x, t, w = _option_problem((7, 29), dtype, True, "ignored", seed=9, device=device)
    go = torch.tensor(go_value, dtype=dtype, device=device)
    _run_and_compare(x, t, backend, reduction, weight=w, grad_output=go, label_smoothing=0.1,
                     lse_square_scale=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(7, 29), (2, 5, 3, 2), (2, SP + 7), (13,)],
                         ids=["(N,C)", "(N,C,d1,d2)", "multi-pass", "(C,)"])
def test_per_row_grad_output_reduction_none(backend, device, shape, dtype):
    x = _logits(shape, dtype, seed=10, device=device)
    t = _class_target(shape, seed=10, device=device, ignore=-100)
    n = t.numel()
    go = torch.linspace(-3.0, 2.0, n).reshape(t.shape).to(dtype).to(device)
    _run_and_compare(x, t, backend, "none", grad_output=go, label_smoothing=0.05,
                     softcap=5.0)


def test_per_row_grad_output_via_weighted_sum(backend, device):
    """(loss * go).sum().backward(): the grad_output reaches backward through autograd."""
    x, t, w = _option_problem((8, 19), torch.float32, True, "ignored", seed=11, device=device)
    go = torch.randn(8, generator=torch.Generator().manual_seed(11)).to(device)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, weight=w, reduction="none", backend=backend)
    (loss * go).sum().backward()
    exp_loss, exp_grad = reference(x, t, weight=w, reduction="none", grad_output=go)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(leaf.grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("how", ["expand", "sum-times-scalar"])
@pytest.mark.parametrize("shape", [(6, 23), (2, 4, 3, 3)], ids=["(N,C)", "(N,C,d1,d2)"])
def test_stride0_grad_output(backend, device, shape, how):
    """An expanded (stride-0) grad_output other than 1 must scale every row."""
    x = _logits(shape, torch.float32, seed=12, device=device)
    t = _class_target(shape, seed=12, device=device, ignore=-100)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, reduction="none", backend=backend,
                                     label_smoothing=0.1)
    if how == "expand":
        go = torch.tensor(-1.75, device=device).expand(loss.shape)
        assert all(s == 0 for s in go.stride())
        loss.backward(go)
    else:
        (loss.sum() * -1.75).backward()  # SumBackward hands on an expanded -1.75
    go = torch.full(t.shape, -1.75, device=device)
    _, exp_grad = reference(x, t, reduction="none", label_smoothing=0.1, grad_output=go)
    assert_close(leaf.grad, exp_grad, torch.float32, "grad")


def test_non_contiguous_grad_output(backend, device):
    x = _logits((6, 23), torch.float32, seed=13, device=device)
    t = _class_target((6, 23), seed=13, device=device)
    wide = torch.linspace(-2.0, 2.0, 12).to(device)
    go = wide[::2]  # stride 2
    leaf = x.clone().requires_grad_(True)
    triton_xent.cross_entropy(leaf, t, reduction="none", backend=backend).backward(go)
    _, exp_grad = reference(x, t, reduction="none", grad_output=go)
    assert_close(leaf.grad, exp_grad, torch.float32, "grad")


# --- return_lse -----------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [1.0, 30.0, 1e3, 1e5],
                         ids=["softcap=1", "softcap=30", "softcap=1e3", "softcap=1e5"])
def test_softcap_far_above_the_logits_keeps_float32_accuracy(backend, device, softcap):
    """With a softcap much larger than the logits, tanh(x / s) is taken near 0, where
    1 - 2 / (exp(2x) + 1) cancels: the kernel's tanh must stay accurate there."""
    x = _logits((16, 100), torch.float32, seed=16, device=device, scale=3.0)
    t = _class_target((16, 100), seed=16, device=device)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, reduction="none", softcap=softcap,
                                     backend=backend)
    loss.sum().backward()
    exp_loss, exp_grad = reference(x, t, reduction="none", softcap=softcap)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(leaf.grad, exp_grad, torch.float32, "grad")


LSE_CASES = [  # (shape, dtype, reduction): each reduction, dtype and rank at least once
    pytest.param((5, 17), torch.float32, "mean", id="(N,C)-fp32-mean"),
    pytest.param((5, 17), torch.float16, "sum", id="(N,C)-fp16-sum"),
    pytest.param((5, 17), torch.bfloat16, "none", id="(N,C)-bf16-none"),
    pytest.param((2, 2 * SP + 9), torch.float32, "none", id="long-rows-fp32-none"),
    pytest.param((1, 128256), torch.bfloat16, "mean", id="V128256-bf16-mean"),
    pytest.param((2, 4, 3), torch.float32, "none", id="(N,C,d)-fp32-none"),
    pytest.param((9,), torch.float16, "none", id="(C,)-fp16-none"),
]


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["no-softcap", "softcap=3"])
@pytest.mark.parametrize("shape,dtype,reduction", LSE_CASES)
def test_return_lse(backend, device, shape, dtype, softcap, reduction):
    """lse is float32, per row (also for ignored rows), the float64 logsumexp of the
    softcapped logits of the dtype-rounded input; the loss is unchanged by return_lse."""
    x = _logits(shape, dtype, seed=14, device=device, scale=5.0)
    t = _class_target(shape, seed=14, device=device, ignore=-100)
    leaf = x.clone().requires_grad_(True)
    loss, lse = triton_xent.cross_entropy(leaf, t, reduction=reduction, softcap=softcap,
                                          lse_square_scale=1e-3, return_lse=True,
                                          backend=backend)
    assert lse.dtype == torch.float32
    assert lse.shape == t.shape
    assert not lse.requires_grad
    x64 = x.double()
    z = softcap * torch.tanh(x64 / softcap) if softcap is not None else x64
    expected = torch.logsumexp(z, dim=0 if x.dim() == 1 else 1)
    # lse is computed in float32 from exactly representable inputs: float32's bar, any dtype.
    assert_close(lse, expected, torch.float32, "lse")
    loss.sum().backward()
    exp_loss, exp_grad = reference(x, t, reduction=reduction, softcap=softcap,
                                   lse_square_scale=1e-3)
    assert_close(loss, exp_loss, dtype, "loss")
    assert_close(leaf.grad, exp_grad, dtype, "grad")


def test_return_lse_prob_target(backend, device):
    x = _logits((3, 6, 2), torch.float32, seed=15, device=device)
    t = _prob_target((3, 6, 2), torch.float32, seed=15, device=device)
    loss, lse = triton_xent.cross_entropy(x, t, reduction="none", return_lse=True,
                                          backend=backend)
    assert lse.shape == loss.shape == (3, 2)
    assert_close(lse, torch.logsumexp(x.double(), dim=1), torch.float32, "lse")


# --- weights in other dtypes, mixed-precision probability targets ----------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
def test_weight_dtype(backend, device, dtype, weight_dtype):
    x, t, w = _option_problem((8, 21), dtype, True, "ignored", seed=16, device=device)
    w = w.to(dtype) if weight_dtype == "same" else w
    # The reference sees the weight as given (rounded to `dtype` in the "same" case).
    _run_and_compare(x, t, backend, "mean", weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_input_fp32_prob_target(backend, device, dtype):
    """Like F.cross_entropy, a float32 probability target makes the loss float32."""
    x = _logits((6, 15), dtype, seed=17, device=device)
    t = _prob_target((6, 15), torch.float32, seed=17, device=device)
    loss, _ = _run_and_compare(x, t, backend, "mean")
    assert loss.dtype == F.cross_entropy(x.float(), t).dtype == torch.float32


# --- low precision: no worse than PyTorch in the same dtype ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_no_worse_than_pytorch(backend, device, dtype, reduction):
    """Against the float64 reference, our fp16/bf16 error must not exceed F.cross_entropy's own
    error in the same dtype (on the same device) by more than one rounding of the result
    (fused float32 accumulation should in fact be better)."""
    # Sized so that PyTorch's own fp16 sum does not overflow (its error must be finite).
    x, t, w = _option_problem((32, 129), dtype, True, "ignored", seed=18, device=device)
    w = w.to(dtype)
    leaf = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(leaf, t, weight=w, reduction=reduction,
                                     label_smoothing=0.1, backend=backend)
    loss.sum().backward()
    tleaf = x.clone().requires_grad_(True)
    tloss = F.cross_entropy(tleaf, t, weight=w, reduction=reduction, label_smoothing=0.1)
    tloss.sum().backward()
    exp_loss, exp_grad = reference(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
    ulp = torch.finfo(dtype).eps
    for ours, theirs, exp, what in ((loss, tloss, exp_loss, "loss"),
                                    (leaf.grad, tleaf.grad, exp_grad, "grad")):
        our_err = (ours.double() - exp).abs().max().item()
        torch_err = (theirs.double() - exp).abs().max().item()
        one_rounding = ulp * exp.abs().max().item()
        assert math.isfinite(torch_err), (what, "PyTorch overflowed: no bar to compare with")
        assert our_err <= torch_err + one_rounding, (what, our_err, torch_err)


# --- legacy flags, module -------------------------------------------------------------------


LEGACY = [(None, False), (True, False), (False, False), (False, None), (False, True),
          (True, None), (True, True), (None, True)]


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("size_average,reduce", LEGACY,
                         ids=[f"size_average={a}-reduce={b}" for a, b in LEGACY])
def test_legacy_size_average_reduce(backend, device, size_average, reduce):
    x, t, w = _option_problem((6, 10), torch.float32, True, "ignored", seed=19, device=device)
    leaf = x.clone().requires_grad_(True)
    # reduction="sum" must be overridden by the legacy flags, as in F.cross_entropy.
    loss = triton_xent.cross_entropy(leaf, t, w, size_average, -100, reduce, "sum",
                                     backend=backend)
    x64 = x.double().requires_grad_(True)
    tloss = F.cross_entropy(x64, t, w.double(), size_average, -100, reduce, "sum")
    assert loss.shape == tloss.shape
    loss.sum().backward()
    tloss.sum().backward()
    assert_close(loss, tloss, torch.float32, "loss")
    assert_close(leaf.grad, x64.grad, torch.float32, "grad")
    expected_reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    exp_loss, _ = reference(x, t, weight=w, reduction=expected_reduction)
    assert_close(loss, exp_loss, torch.float32, "loss vs reference")


MODULE_CASES = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(reduction="sum", ignore_index=3), id="sum+ignore_index=3"),
    pytest.param(dict(reduction="none", label_smoothing=0.2, weight=True), id="none+smooth+weight"),
    pytest.param(dict(reduction="mean", label_smoothing=0.1, weight=True, ignore_index=0),
                 id="mean+smooth+weight+ignore_index=0"),
]


@pytest.mark.parametrize("kwargs", MODULE_CASES)
def test_module_matches_nn_cross_entropy_loss(backend, device, kwargs):
    kwargs = dict(kwargs)
    weight = _weight(12, seed=20, device=device) if kwargs.pop("weight", False) else None
    ours = triton_xent.CrossEntropyLoss(weight=weight, backend=backend, **kwargs)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, **kwargs).double()
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    plain = torch.nn.CrossEntropyLoss(weight=weight, **kwargs)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = _logits((10, 12, 2), torch.float32, seed=20, device=device)
    t = _class_target((10, 12, 2), seed=20, device=device)
    t[0, 0] = 3  # so that ignore_index=3 has something to ignore
    t[1, 1] = 0
    leaf = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    loss, tloss = ours(leaf, t), theirs(x64, t)
    loss.sum().backward()
    tloss.sum().backward()
    assert_close(loss, tloss, torch.float32, "loss")
    assert_close(leaf.grad, x64.grad, torch.float32, "grad")


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_module_legacy_flags(backend, device):
    ours = triton_xent.CrossEntropyLoss(size_average=False, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"
    x = _logits((5, 7), torch.float32, seed=21, device=device)
    t = _class_target((5, 7), seed=21, device=device)
    assert_close(ours(x, t), theirs(x.double(), t), torch.float32, "loss")


def test_module_extras(backend, device):
    mod = triton_xent.CrossEntropyLoss(reduction="none", lse_square_scale=0.01, softcap=4.0,
                                       return_lse=True, label_smoothing=0.1, backend=backend)
    x = _logits((6, 9), torch.float32, seed=22, device=device)
    t = _class_target((6, 9), seed=22, device=device, ignore=-100)
    leaf = x.clone().requires_grad_(True)
    loss, lse = mod(leaf, t)
    loss.sum().backward()
    exp_loss, exp_grad = reference(x, t, reduction="none", lse_square_scale=0.01, softcap=4.0,
                                   label_smoothing=0.1)
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(leaf.grad, exp_grad, torch.float32, "grad")
    assert_close(lse, torch.logsumexp(4.0 * torch.tanh(x.double() / 4.0), 1), torch.float32,
                 "lse")


def test_auto_backend_matches_explicit(backend, device):
    """backend="auto" must give what the explicit backends give (it picks one of them)."""
    x, t, w = _option_problem((5, 33), torch.float32, True, "ignored", seed=23, device=device)
    auto = triton_xent.cross_entropy(x, t, w, label_smoothing=0.1, reduction="none")
    explicit = triton_xent.cross_entropy(x, t, w, label_smoothing=0.1, reduction="none",
                                         backend=backend)
    assert_close(auto, explicit, torch.float32, "auto vs explicit")
