"""Test setup: without a GPU the Triton kernels run through Triton's interpreter on CPU
tensors, so TRITON_INTERPRET must be set before anything imports triton."""

from __future__ import annotations

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


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels in this environment, or None.

    Triton 3.6 and older turn a loop bound into a Python int with int() of a one-element
    array, which NumPy 2.4 made a TypeError (triton-lang/triton#9171, fixed in later Tritons
    by a squeeze): every kernel with a runtime loop bound fails so, which is every kernel of
    ours. No rewrite of a loop avoids it short of dropping `for` loops; NumPy < 2.4 does."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not triton_xent.triton_available():
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = tl.zeros((), tl.int32)
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps the TypeError in its own error
        if "0-dimensional arrays" not in str(error):
            raise
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime "
                f"bound under NumPy {numpy.__version__} (triton-lang/triton#9171): install "
                f"numpy<2.4 with this Triton, e.g. tools/stacks.sh --numpy '<2.4'")
    assert out.item() == 3, out
    return None


def pytest_sessionstart(session):
    problem = _interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
