"""Bad input: a clear error naming the problem, raised before anything is written."""

import pytest
import torch
import torch.nn.functional as F

import triton_xent


def _x(device, N=4, V=5):
    return torch.randn(N, V, device=device)


@pytest.mark.parametrize("bad_target", [5, 7, -1, -5], ids=lambda v: f"target={v}")
def test_out_of_range_target_raises_index_error_naming_it(backend, device, bad_target):
    x = _x(device)
    t = torch.tensor([0, 1, bad_target, 3], device=device)
    with pytest.raises(IndexError, match=f"Target {bad_target} is out of bounds"):
        triton_xent.cross_entropy(x, t, backend=backend)


def test_failed_call_leaves_inplace_input_untouched(backend, device):
    x = _x(device).requires_grad_(True)
    before = x.detach().clone()
    t = torch.tensor([0, 1, 9, 3], device=device)
    with pytest.raises(IndexError):
        triton_xent.cross_entropy(x, t, inplace_backward=True, backend=backend)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda d: (_x(d), torch.tensor([0, 1, 2], device=d)), ValueError,
         r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
        (lambda d: (_x(d).long(), torch.tensor([0, 1, 2, 3], device=d)), TypeError,
         "floating-point logits"),
        (lambda d: (torch.tensor(1.0, device=d), torch.tensor(0, device=d)), ValueError,
         "class dimension"),
        (lambda d: (_x(d), torch.rand(4, 6, device=d)), ValueError, "class probabilities"),
        (lambda d: (_x(d), torch.tensor([True, False, True, True], device=d)), TypeError,
         "integer class indices"),
        (lambda d: (torch.randn(2, 3, 4, device=d), torch.zeros(2, 5, dtype=torch.long,
                                                               device=d)),
         ValueError, "must have shape"),
        (lambda d: (_x(d), [0, 1, 2, 3]), TypeError, "target must be a tensor"),
        (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device="meta")), ValueError,
         "target is on meta"),
    ],
    ids=["batch_mismatch", "integer_input", "scalar_input", "float_target_wrong_shape",
         "bool_target", "spatial_shape_mismatch", "list_target", "target_on_other_device"],
)
def test_shape_and_dtype_mismatches(backend, device, make_args, error, match):
    x, t = make_args(device)
    with pytest.raises(error, match=match):
        triton_xent.cross_entropy(x, t, backend=backend)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.ones(3)), ValueError, r"weight must have shape \(5,\)"),
        (dict(weight=torch.ones(5, 1)), ValueError, r"weight must have shape \(5,\)"),
        (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "floating-point"),
        (dict(reduction="average"), ValueError, "average is not a valid value for reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be between"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be between"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale"),
        (dict(lse_square_scale=float("nan")), ValueError, "lse_square_scale"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
    ids=["weight_too_short", "weight_2d", "weight_integer", "unknown_reduction",
         "smoothing_above_1", "smoothing_negative", "softcap_zero", "softcap_inf",
         "zloss_negative", "zloss_nan", "unknown_backend"],
)
def test_bad_options(device, kwargs, error, match):
    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        triton_xent.cross_entropy(_x(device), torch.tensor([0, 1, 2, 3], device=device),
                                  **kwargs)


def test_ignore_index_with_probability_targets_is_refused(backend, device):
    with pytest.raises(ValueError, match="ignore_index is not supported"):
        triton_xent.cross_entropy(_x(device), torch.rand(4, 5, device=device).softmax(1),
                                  ignore_index=0, backend=backend)


def test_negative_ignore_index_with_probability_targets_is_accepted(backend, device):
    """As in PyTorch, which refuses only an ignore_index >= 0 there: nothing is ignored."""
    x, p = _x(device), torch.rand(4, 5, device=device).softmax(1)
    loss = triton_xent.cross_entropy(x, p, ignore_index=-1, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, p, ignore_index=-1))


def test_deprecated_elementwise_mean_is_mean_with_pytorchs_warning(backend, device):
    x, t = _x(device), torch.tensor([0, 1, 2, 3], device=device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = triton_xent.cross_entropy(x, t, reduction="elementwise_mean", backend=backend)
    torch.testing.assert_close(loss, triton_xent.cross_entropy(x, t, backend=backend))


def test_options_as_0_dim_tensors_are_numbers(backend, device):
    """F.cross_entropy takes label_smoothing=torch.tensor(0.1); so do we."""
    x, t = _x(device), torch.tensor([0, 1, 2, 3], device=device)
    loss = triton_xent.cross_entropy(x, t, label_smoothing=torch.tensor(0.1), backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1))


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=None), dict(label_smoothing="0.1"),
                                    dict(lse_square_scale=None), dict(softcap="30")],
                         ids=["smoothing_None", "smoothing_str", "zloss_None", "softcap_str"])
def test_option_of_the_wrong_type_is_a_type_error_naming_it(device, kwargs):
    (name,) = kwargs
    with pytest.raises(TypeError, match=f"{name} must be a number"):
        triton_xent.cross_entropy(_x(device), torch.tensor([0, 1, 2, 3], device=device),
                                  **kwargs)


def test_target_or_weight_requiring_grad_is_refused(device):
    soft = torch.rand(4, 5, device=device).softmax(1).requires_grad_(True)
    with pytest.raises(ValueError, match="gradient of input only"):
        triton_xent.cross_entropy(_x(device), soft)
    weight = torch.ones(5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="gradient of input only"):
        triton_xent.cross_entropy(_x(device), torch.tensor([0, 1, 2, 3], device=device),
                                  weight=weight)


def test_triton_backend_refuses_float64(device):
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="float64"):
        triton_xent.cross_entropy(_x(device).double(), torch.tensor([0, 1, 2, 3], device=device),
                                  backend="triton")


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        triton_xent.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]),
                                  backend="triton")


def test_auto_backend_on_cpu_without_interpreter_is_the_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(triton_xent.cross_entropy(x, t),
                               torch.nn.functional.cross_entropy(x, t))
