"""torch.compile: cross_entropy is a custom op (torch.library) with a fake implementation
and registered autograd, so a compiled training step has no graph break and equals eager."""

import pytest
import torch
from torch import nn

import triton_xent
from helpers import assert_close
from triton_xent.autograd import cross_entropy_op
from triton_xent.linear import linear_cross_entropy_backward_op, linear_cross_entropy_op


def _model_and_batch(device, V=50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, V)).to(device)
    h = torch.randn(12, 16, device=device)
    t = torch.randint(0, V, (12,), device=device)
    t[3] = -100
    return model, h, t


OPTIONS = {
    "plain": {},
    "everything": dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0),
    "none_reduction": dict(reduction="none"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_compiled_training_step_equals_eager_without_graph_breaks(backend, device, option):
    torch._dynamo.reset()
    kwargs = OPTIONS[option]
    model, h, t = _model_and_batch(device)

    def step(h, t):
        loss = triton_xent.cross_entropy(model(h), t, backend=backend, check_targets=False,
                                         **kwargs)
        return loss.sum() if loss.dim() else loss

    explanation = torch._dynamo.explain(step)(h, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(h, t)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(h, t)
    eager.backward()
    assert_close(loss, eager, torch.float32, "loss")
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters())):
        assert_close(got, want, torch.float32, "parameter gradient")


def test_target_check_inside_the_op_still_raises_when_compiled(backend, device):
    torch._dynamo.reset()
    x = torch.randn(4, 7, device=device)
    bad = torch.tensor([0, 1, 9, 2], device=device)
    compiled = torch.compile(lambda x, t: triton_xent.cross_entropy(x, t, backend=backend),
                             fullgraph=True)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        compiled(x, bad)


def test_inplace_backward_is_refused_under_compile(device):
    torch._dynamo.reset()
    x = torch.randn(4, 7, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3], device=device)
    compiled = torch.compile(
        lambda x, t: triton_xent.cross_entropy(x * 1.0, t, inplace_backward=True),
        fullgraph=True)
    with pytest.raises(Exception, match="inplace_backward is an eager-mode feature"):
        compiled(x, t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob_target", [False, True], ids=["indices", "probabilities"])
def test_custom_op_registration_passes_opcheck(backend, device, reduction, prob_target):
    x = torch.randn(5, 9, device=device, requires_grad=True)
    if prob_target:
        t = torch.rand(5, 9, device=device).softmax(1)
    else:
        t = torch.tensor([0, 8, -100, 3, 4], device=device)
    w = torch.rand(9, device=device)
    # softcap given as a 0-dim tensor (4.0 among the numbers is then its placeholder)
    args = (x, t, w, prob_target, reduction, -100, 0.1, 1e-3, 4.0,
            [None, None, torch.tensor(3.0)], False, backend == "triton", True)
    # The gradient output is computed, not differentiable: skip the generic autograd check,
    # whose probes differentiate every output; the backward is covered by the tests above.
    torch.library.opcheck(cross_entropy_op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static",
        "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_linear_cross_entropy_step_equals_eager(backend, device, reduction):
    # "none" with a trainable head takes the recomputing backward op.
    torch._dynamo.reset()
    torch.manual_seed(1)
    trunk = nn.Linear(16, 24).to(device)
    head = nn.Linear(24, 37).to(device)
    h = torch.randn(3, 5, 16, device=device)
    t = torch.randint(0, 37, (3, 5), device=device)
    t[0, 1] = -100

    def step(h, t):
        loss = triton_xent.linear_cross_entropy(trunk(h), head.weight, t,
                                                linear_bias=head.bias, reduction=reduction,
                                                backend=backend, check_targets=False,
                                                softcap=4.0, chunk_size=4)
        return loss.sum()

    explanation = torch._dynamo.explain(step)(h, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    params = list(trunk.parameters()) + list(head.parameters())
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(h, t)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    eager = step(h, t)
    eager.backward()
    assert_close(loss, eager, torch.float32, "loss")
    for got, p in zip(compiled_grads, params):
        assert_close(got, p.grad, torch.float32, "parameter gradient")


# need_input, need_weight, need_bias: all three, a frozen head (d_W, d_b placeholders), and
# frozen activations; in bf16 the placeholders and the float32 accumulators differ in dtype.
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False),
                                   (False, True, True)], ids=["all", "frozen_head", "frozen_x"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_custom_ops_pass_opcheck(backend, device, dtype, reduction, needs):
    torch.manual_seed(0)
    x = torch.randn(7, 11, device=device, dtype=dtype)
    w = torch.randn(13, 11, device=device, dtype=dtype)
    b = torch.randn(13, device=device, dtype=dtype)
    t = torch.tensor([0, 12, -100, 3, 4, 5, 6], device=device)
    options = (False, reduction, -100, 0.1, 1e-3, 4.0, [torch.tensor(0.2), None, None], False,
               backend == "triton", 3, None, torch.float32, *needs)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    torch.library.opcheck(linear_cross_entropy_op, (x, w, b, t, None, *options),
                          test_utils=tests)
    go = torch.rand(7, device=device, dtype=dtype)
    torch.library.opcheck(linear_cross_entropy_backward_op, (x, w, b, t, None, go, *options),
                          test_utils=tests)
