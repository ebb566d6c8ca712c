"""Tensors on any GPU: every kernel launch runs under a device guard naming its tensors'
device, since Triton launches on the current CUDA device (a Hugging Face model with
device_map="auto" keeps lm_head on the last GPU while cuda:0 is current).

Without two GPUs the wiring is checked by recording, at each launch of each kernel, the
device of the guard it runs under; with two GPUs the real thing runs on cuda:1."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import triton_xent
from helpers import assert_close
from triton_xent import core

pytest.importorskip("triton")
from triton_xent.kernels import xent  # noqa: E402


class _Recorded:
    """A kernel whose launches record the device of the innermost active guard."""

    def __init__(self, kernel, name, guards, launches):
        self.kernel, self.name, self.guards, self.launches = kernel, name, guards, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def recorded(*args, **kwargs):
            self.launches.append((self.name, self.guards[-1] if self.guards else None))
            return launch(*args, **kwargs)

        return recorded


def test_every_kernel_launch_runs_under_a_guard_naming_the_inputs_device(device, monkeypatch):
    guards, launches = [], []

    @contextlib.contextmanager
    def guard(dev):
        guards.append(torch.device(dev))
        try:
            yield
        finally:
            guards.pop()

    monkeypatch.setattr(core, "device_guard", guard)
    kernels = [name for name in vars(xent) if name.endswith("_kernel")]  # every @triton.jit
    for name in kernels:
        monkeypatch.setattr(xent, name, _Recorded(getattr(xent, name), name, guards, launches))

    x = torch.randn(6, 9, device=device, requires_grad=True)
    t = torch.tensor([0, 8, 3, -100, 4, 5], device=device)
    (2.0 * triton_xent.cross_entropy(x, t, backend="triton")).backward()  # + the scale kernel
    h = torch.randn(6, 4, device=device, requires_grad=True)
    w = torch.randn(9, 4, device=device, requires_grad=True)
    triton_xent.linear_cross_entropy(h, w, t, backend="triton", chunk_size=4).backward()

    names = {name for name, _ in launches}
    assert {"_rows_kernel", "_scale_rows_kernel"} <= names, launches
    assert all(dev == x.device for _, dev in launches), launches


def test_vocab_parallel_launchers_are_guarded_too():
    # Their launches need a process group; the wrapping itself is what is checked here.
    from triton_xent import distributed

    stats, grad = distributed.slice_fns(use_triton=True)
    assert stats.__wrapped__ is xent.xent_slice_stats and grad.__wrapped__ is xent.xent_slice_grad
    rows, scale = core.row_fns(use_triton=True)
    assert rows.__wrapped__ is xent.xent_rows and scale.__wrapped__ is xent.scale_rows_


def test_the_guard_is_cuda_device_for_cuda_and_nothing_for_cpu():
    assert isinstance(core.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(core.device_guard(torch.device("cuda", 1)), torch.cuda.device)
    assert core.device_guard(torch.device("cuda", 1)).idx == 1


@pytest.mark.cuda
def test_tensors_on_a_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(64, 1000, device=dev, generator=g).requires_grad_(True)
    t = torch.randint(0, 1000, (64,), device=dev, generator=g)
    loss = triton_xent.cross_entropy(x, t, label_smoothing=0.1, backend="triton")
    (2.0 * loss).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(x_ref, t, label_smoothing=0.1)
    (2.0 * ref).backward()
    assert torch.cuda.current_device() == 0  # the guard restored it
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(x.grad, x_ref.grad, torch.float32, "gradient")
    h = torch.randn(64, 32, device=dev, generator=g)
    w = torch.randn(1000, 32, device=dev, generator=g)
    lin = triton_xent.linear_cross_entropy(h, w, t, backend="triton", chunk_size=16)
    assert_close(lin, F.cross_entropy(h @ w.T, t), torch.float32, "linear loss")
