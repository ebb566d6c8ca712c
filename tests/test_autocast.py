"""torch.autocast: every entry point returns what PyTorch returns (a float32 loss and lse, the
gradient in the input's dtype), without the float32 copy of the logits that autocast makes
for F.cross_entropy (on its float32 list), in eager mode and compiled.

CPU autocast in bfloat16 here; CUDA autocast in bfloat16 and float16 in the tests marked
cuda. Both sides see the same bf16 logits and accumulate in float32, so the losses agree to
float32 rounding and the gradients to the rounding of the bf16 gradient (helpers.TOL)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import triton_xent
from helpers import assert_close, needs_torch_linear_cross_entropy
from triton_xent import config

N, C, SPATIAL = 37, 29, 3  # unaligned sizes


def _logits(device, dtype=torch.bfloat16, shape=(N, C)):
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_(True)


def _targets(device, shape=(N,)):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, C, shape, generator=g).to(device)
    t.view(-1)[::5] = -100
    return t


CASES = {
    # name -> (input shape, target maker, keyword options)
    "indices_with_options": ((N, C), lambda d: _targets(d),
                             dict(weight="w", label_smoothing=0.1)),
    "spatial_none": ((N, C, SPATIAL), lambda d: _targets(d, (N, SPATIAL)),
                     dict(reduction="none")),
    "probabilities": ((N, C), lambda d: torch.rand(N, C, device=d).softmax(1),
                      dict(label_smoothing=0.05)),
}


def _case(name, device):
    shape, make_target, options = CASES[name]
    x = _logits(device, shape=shape)
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(C, device=device) + 0.5
    return x, make_target(device), options


def _both(x, t, options, backend, autocast_device, dtype=torch.bfloat16):
    """((loss, grad) of F.cross_entropy, (loss, lse, grad) of ours), both under autocast."""
    with torch.autocast(autocast_device, dtype=dtype):
        ref = F.cross_entropy(x, t, **options)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    with torch.autocast(autocast_device, dtype=dtype):
        loss, lse = triton_xent.cross_entropy(x, t, **options, return_lse=True, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return (ref, ref_grad), (loss, lse, grad)


@pytest.mark.parametrize("case", CASES)
def test_cross_entropy_under_autocast_returns_what_pytorch_returns(backend, device, case):
    x, t, options = _case(case, device)
    (ref, ref_grad), (loss, lse, grad) = _both(x, t, options, backend, x.device.type)
    assert ref.dtype == loss.dtype == lse.dtype == torch.float32
    assert grad.dtype == ref_grad.dtype == torch.bfloat16
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.bfloat16, "gradient")


def test_module_and_float32_logits_under_autocast(backend, device):
    # The module takes the same path; float32 logits stay float32 (autocast casts nothing).
    x = _logits(device, torch.float32)
    t = _targets(device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = triton_xent.CrossEntropyLoss(backend=backend)(x, t)
        ref = torch.nn.CrossEntropyLoss()(x, t)
    assert loss.dtype == ref.dtype == torch.float32
    assert_close(loss, ref, torch.float32, "loss")


def test_without_autocast_bf16_logits_give_a_bf16_loss(backend, device):
    # Outside autocast, PyTorch's result dtype is the input's: so is ours.
    x, t = _logits(device), _targets(device)
    loss = triton_xent.cross_entropy(x, t, backend=backend)
    assert loss.dtype == F.cross_entropy(x, t).dtype == torch.bfloat16


class _Float32Allocations(TorchDispatchMode):
    """Records every float32 tensor of at least `numel` elements that an op returns."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.numel() >= self.numel):
                self.seen.append(func)
        return out


def test_no_float32_copy_of_the_logits(backend, device, monkeypatch):
    # F.cross_entropy under autocast makes one (the detector's check); ours makes none: the
    # kernels accumulate in float32 registers, the fallback in float32 chunks (smaller than
    # the logits here).
    monkeypatch.setattr(config, "TORCH_CHUNK_ELEMENTS", N * C // 4)
    x, t = _logits(device), _targets(device)
    for fn, expect_copy in ((F.cross_entropy, True),
                            (lambda x, t: triton_xent.cross_entropy(x, t, backend=backend),
                             False)):
        mode = _Float32Allocations(N * C)
        with torch.autocast(x.device.type, dtype=torch.bfloat16), mode:
            loss = fn(x, t)
            loss.backward()
        assert loss.dtype == torch.float32
        assert bool(mode.seen) == expect_copy, mode.seen


@needs_torch_linear_cross_entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_under_autocast_matches_torchs(backend, device, dtype):
    # torch's F.linear_cross_entropy under autocast: the head's matmul in bf16 (linear is on
    # autocast's lower-precision list), the loss float32, each gradient in its input's dtype.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, 16, generator=g).to(device, dtype).requires_grad_(True)
    w = (0.5 * torch.randn(C, 16, generator=g)).to(device, dtype).requires_grad_(True)
    t = _targets(device)
    results = []
    for fn in (F.linear_cross_entropy,
               lambda h, w, t: triton_xent.linear_cross_entropy(h, w, t, backend=backend,
                                                                chunk_size=8)):
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            loss = fn(h, w, t)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    (ref, ref_dh, ref_dw), (loss, dh, dw) = results
    assert loss.dtype == ref.dtype == torch.float32
    assert dh.dtype == ref_dh.dtype == dtype and dw.dtype == ref_dw.dtype == dtype
    assert_close(loss, ref, torch.float32, "loss")
    # The bf16 logits' gradient, rounded, goes through the GEMMs in bf16 both ways.
    assert_close(dh, ref_dh, torch.bfloat16, "input gradient")
    assert_close(dw, ref_dw, torch.bfloat16, "head gradient")


def test_autocast_inside_a_compiled_step(device):
    # The autocast state is read while tracing: the compiled step returns eager's dtypes and
    # values, with no graph break. (The ops are opaque to the compiler, the same for both
    # backends: the fallback's is the quicker to run.)
    backend = "torch"
    x, t = _logits(device), _targets(device)
    h = torch.randn(N, 16, device=device)
    w = torch.randn(C, 16, device=device, requires_grad=True)

    def step(x, t, h):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            a = triton_xent.cross_entropy(x, t, backend=backend, check_targets=False)
            b = triton_xent.linear_cross_entropy(h, w, t, backend=backend, check_targets=False)
        return a, b

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, t, h), step(x, t, h), strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert_close(got, want, torch.float32, "loss")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast(dtype):
    x = _logits("cuda", dtype)
    t = _targets("cuda")
    (ref, ref_grad), (loss, lse, grad) = _both(x, t, dict(label_smoothing=0.1), "triton",
                                               "cuda", dtype)
    assert ref.dtype == loss.dtype == lse.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, dtype, "gradient")


@pytest.mark.cuda
@needs_torch_linear_cross_entropy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_linear(dtype):
    t = _targets("cuda")
    h = torch.randn(N, 64, device="cuda", requires_grad=True)
    w = torch.randn(C, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        loss = triton_xent.linear_cross_entropy(h, w, t, backend="triton")
        ref = F.linear_cross_entropy(h, w, t)
    assert loss.dtype == ref.dtype == torch.float32
    assert_close(loss, ref, dtype, "linear loss")  # the head's GEMM in `dtype`, two kernels
