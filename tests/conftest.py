"""Test setup: without a GPU the Triton kernels run through Triton's interpreter on CPU
tensors, so TRITON_INTERPRET must be set before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import triton_xent  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    yield "torch"
    if triton_xent.triton_available():
        yield "triton"


@pytest.fixture(params=list(_backends()))
def backend(request):
    """Each backend in turn: the plain-PyTorch fallback and the Triton kernels."""
    return request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
