"""torch.compile: cross_entropy is a custom op (torch.library) with a fake implementation
and registered autograd, so a compiled training step has no graph break and equals eager."""

import contextlib

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


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_breaks_allowed", "fullgraph"])
def test_inplace_backward_is_refused_under_compile(device, fullgraph):
    # A clear error, never a silent graph break: Dynamo's TorchRuntimeError quoting ours.
    torch._dynamo.reset()
    x = torch.randn(4, 7, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3], device=device)
    compiled = torch.compile(
        lambda x, t: triton_xent.cross_entropy(x * 1.0, t, inplace_backward=True),
        fullgraph=fullgraph, backend="aot_eager")
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
    rw = torch.rand(5, device=device)  # the RL extras too: row and entropy weights, H, argmax
    # softcap given as a 0-dim tensor (4.0 among the numbers is then its placeholder)
    args = (x, t, w, rw, rw - 0.5, prob_target, reduction, -100, 0.1, 1e-3, 4.0,
            [None, None, torch.tensor(3.0), None], False, backend == "triton", 0.8, True, True,
            True)
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
# The dtype (the placeholders' and accumulators') and the reduction (the loss's shape) are
# independent of each other: each value of both meets every schedule and every need.
@pytest.mark.parametrize("dtype, reduction", [(torch.float32, "mean"), (torch.bfloat16, "none")],
                         ids=["fp32-mean", "bf16-none"])
@pytest.mark.parametrize("schedule", ["rows", "vocab"])  # "vocab": d_W in x's dtype
def test_linear_custom_ops_pass_opcheck(backend, device, dtype, reduction, needs, schedule):
    torch.manual_seed(0)
    x = torch.randn(7, 11, device=device, dtype=dtype)
    w = torch.randn(13, 11, device=device, dtype=dtype)
    b = torch.randn(13, device=device, dtype=dtype)
    t = torch.tensor([0, 12, -100, 3, 4, 5, 6], device=device)
    # "vocab" with a budget of 4 classes a block for the 6 kept rows: 4 + 4 + 4 + 1 classes
    options = (False, reduction, -100, 0.1, 1e-3, 4.0, [torch.tensor(0.2), None, None, None],
               False, backend == "triton", 0.8, True, True, 3 if schedule == "rows" else None,
               None if schedule == "rows" else 6 * 4 * x.element_size(), torch.float32,
               schedule, *needs)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    rw = torch.rand(7, device=device)  # the RL extras too: row and entropy weights, H, argmax
    torch.library.opcheck(linear_cross_entropy_op, (x, w, b, t, None, rw, rw - 0.5, *options),
                          test_utils=tests)
    go = torch.rand(7, device=device)
    torch.library.opcheck(linear_cross_entropy_backward_op,
                          (x, w, b, t, None, go, go - 0.5, *options), test_utils=tests)


# --- every entry point, every way of compiling, every option --------------------------------
#
# One step calls the four entry points, each twice, so that one compiled graph covers every
# option: (a) class indices on (N, C, d) logits (for the linear op, (N, d, D) activations)
# with class weights, ignored targets, label smoothing passed as a float argument (symbolic
# under dynamic=True), the z-loss as a 0-dim tensor argument, softcap and return_lse;
# (b) class probabilities with reduction "none" (for the linear op with a trainable head:
# the recomputing backward op); (c) the RL extras (temperature, row and entropy weights,
# return_entropy, return_argmax). Batch and sequence sizes change between calls. Dynamo's
# counters tell graphs apart: a new graph break fails fullgraph=True, a new
# recompile fails the count.

C, D_MODEL = 13, 8


def _all_entries_step(backend, device):
    """step(x, h, t, p, label_smoothing, z_loss) -> (loss, lse of each entry point and the
    entropy and argmax of the RL calls) and the parameters it trains (the head of the linear
    ops). The modules are built outside, as a training loop builds them: their options are
    attributes."""
    torch.manual_seed(2)
    head = nn.Linear(D_MODEL, C).to(device)
    w = torch.rand(C, device=device) + 0.5
    common = dict(backend=backend, check_targets=False)
    linear_common = dict(common, chunk_size=7)
    module_options = dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0,
                          return_lse=True)
    criterion = triton_xent.CrossEntropyLoss(weight=w, **module_options, **common)
    linear_criterion = triton_xent.LinearCrossEntropyLoss(w, **module_options, **linear_common)

    def step(x, h, t, p, ls, z):
        options = dict(label_smoothing=ls, lse_square_scale=z, softcap=5.0, return_lse=True)
        loss_a, lse_a = triton_xent.cross_entropy(x, t, weight=w, **options, **common)
        none_a = triton_xent.cross_entropy(x[:, :, 0], p, reduction="none", label_smoothing=ls,
                                           **common)
        loss_b, lse_b = criterion(x, t)
        loss_c, lse_c = triton_xent.linear_cross_entropy(
            h, head.weight, t, linear_bias=head.bias, weight=w, **options, **linear_common)
        none_c = triton_xent.linear_cross_entropy(
            h[:, 0], head.weight, p, linear_bias=head.bias, reduction="none",
            label_smoothing=ls, **linear_common)
        loss_d, lse_d = linear_criterion(h, head.weight, t, head.bias)
        # (c) the RL extras: temperature, row and entropy weights, the entropy (its own
        # gradient flows) and the argmax, on logits and through the linear op.
        rl = dict(temperature=0.7, row_weight=p[:, 0] + 0.5, entropy_weight=-0.05,
                  return_entropy=True, return_argmax=True, reduction="sum")
        rl_a = triton_xent.cross_entropy(x[:, :, 0], t[:, 0], **rl, **common)
        rl_c = triton_xent.linear_cross_entropy(h[:, 0], head.weight, t[:, 0],
                                                linear_bias=head.bias, **rl, **linear_common)
        loss = (loss_a + none_a.sum() + 2 * loss_b + 3 * loss_c + 4 * none_c.sum()
                + 5 * loss_d + rl_a.loss + rl_a.entropy.sum() + rl_c.loss
                + rl_c.entropy.sum())
        return loss, (lse_a, lse_b, lse_c, lse_d, rl_a.entropy, rl_a.argmax, rl_c.entropy,
                      rl_c.argmax)

    return step, list(head.parameters())


def _run_steps(step, params, sizes, device, *, mark_dynamic=False, backward=None):
    """[(loss, lses, input grads, parameter grads)] over the (batch, sequence) sizes;
    `backward` makes the context of each backward pass."""
    results = []
    for n, d in sizes:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, C, d, generator=g).to(device).requires_grad_(True)
        h = torch.randn(n, d, D_MODEL, generator=g).to(device).requires_grad_(True)
        t = torch.randint(0, C, (n, d), generator=g).to(device)
        t[0, 1] = -100
        p = torch.rand(n, C, generator=g).softmax(1).to(device)
        if mark_dynamic:
            for tensor in (x, h, t, p):
                torch._dynamo.mark_dynamic(tensor, 0)
        for q in params:
            q.grad = None
        loss, lses = step(x, h, t, p, 0.1, torch.tensor(1e-3))
        with backward() if backward else contextlib.nullcontext():
            loss.backward()
        results.append((loss.detach(), lses, [x.grad, h.grad], [q.grad for q in params]))
    return results


def _assert_results_equal(got, want):
    for (loss, lses, gx, gp), (loss_e, lses_e, gx_e, gp_e) in zip(got, want, strict=True):
        assert_close(loss, loss_e, torch.float32, "loss")
        for a, b in zip(lses, lses_e, strict=True):
            assert_close(a, b, torch.float32, "lse")
        for a, b in zip(gx + gp, gx_e + gp_e, strict=True):
            assert_close(a, b, torch.float32, "gradient")


# (batch, sequence) sizes of the three calls: both change (no power of two among them), or
# the batch only where only it is marked dynamic.
BOTH_CHANGE, BATCH_CHANGES = ((6, 3), (9, 5), (11, 4)), ((6, 3), (9, 3), (11, 3))
# mode -> (torch.compile keywords, sizes, mark the batch dimension dynamic, compiled
# autograd, graphs expected: automatic dynamic shapes compile a static graph first and a
# dynamic one at the first change of size; so does compiled autograd for the backward,
# beside the one dynamic forward graph)
MODES = {
    "dynamic_true": (dict(dynamic=True), BOTH_CHANGE, False, False, 1),
    "automatic_dynamic": (dict(dynamic=None), BOTH_CHANGE, False, False, 2),
    "mark_dynamic": (dict(dynamic=None), BATCH_CHANGES, True, False, 1),
    "compiled_autograd": (dict(dynamic=True), BOTH_CHANGE, False, True, 1 + 2),
}


# The custom ops are opaque to the compiler, and the same ops on either backend: the mode
# matrix runs the plain-PyTorch backend (the kernels under the interpreter would take
# minutes); the tests above compile the Triton backend.
@pytest.mark.parametrize("mode", MODES)
def test_every_entry_point_compiles_in_every_mode_with_every_option(device, mode):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    kwargs, sizes, mark, compiled_autograd, n_graphs = MODES[mode]
    torch._dynamo.reset()
    counters.clear()
    step, params = _all_entries_step("torch", device)
    want = _run_steps(step, params, sizes, device)
    compiled = torch.compile(step, fullgraph=True,
                             backend=CompileCounterWithBackend("aot_eager"), **kwargs)
    backward = None
    if compiled_autograd:
        # Compiled autograd traces the backward graph, our backward's Python included, and
        # compiles it: with fullgraph=True, a graph break there fails too. (The flag
        # torch._dynamo.config.compiled_autograd enters this context around a backward
        # called inside a compiled function, where Tensor.backward() itself breaks the graph.)
        from torch._dynamo import compiled_autograd as ca

        def backward():
            return ca._enable(lambda gm: torch.compile(gm, backend="aot_eager", fullgraph=True))
    got = _run_steps(compiled, params, sizes, device, mark_dynamic=mark, backward=backward)
    _assert_results_equal(got, want)
    assert counters["stats"]["unique_graphs"] == n_graphs, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    if compiled_autograd:  # the backward was captured by compiled autograd
        assert counters["compiled_autograd"]["captures"] >= 1, counters["compiled_autograd"]


def test_inductor_with_dynamic_shapes_and_options_equals_eager(device):
    # The inductor backend (C++ code on CPU) with dynamic=True: one graph for two batch
    # sizes, the options as above (a smaller step: inductor compiles each fused kernel).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(3)
    head = nn.Linear(D_MODEL, C).to(device)

    def step(x, h, t, p, ls, z):
        loss, lse = triton_xent.cross_entropy(x, t, label_smoothing=ls, lse_square_scale=z,
                                              softcap=5.0, return_lse=True, backend="torch")
        linear = triton_xent.linear_cross_entropy(h[:, 0], head.weight, p, reduction="none",
                                                  linear_bias=head.bias, backend="torch")
        return loss + linear.sum(), (lse,)

    params = list(head.parameters())
    sizes = BOTH_CHANGE[:2]
    want = _run_steps(step, params, sizes, device)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="inductor")
    _assert_results_equal(_run_steps(compiled, params, sizes, device), want)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# --- errors under compile ---------------------------------------------------------------------

BAD_SMOOTHING = {"float": 1.5, "nan": float("nan"), "tensor": torch.tensor(1.5)}


@pytest.mark.parametrize("bad", BAD_SMOOTHING)
def test_bad_option_under_compile_raises_our_error(device, bad):
    # Without fullgraph Dynamo sees our check raise and runs the frame in eager, which raises
    # it; a 0-dim tensor option is checked inside the op, when its value is known.
    torch._dynamo.reset()
    x, t = torch.randn(4, 7, device=device), torch.tensor([0, 1, 2, 3], device=device)
    compiled = torch.compile(
        lambda x, t, ls: triton_xent.cross_entropy(x, t, label_smoothing=ls, backend="torch"),
        backend="aot_eager")
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        compiled(x, t, BAD_SMOOTHING[bad])


def test_bad_option_under_fullgraph_is_dynamos_error_carrying_ours(device):
    # fullgraph=True turns an exception raised while tracing into Dynamo's
    # Unsupported("Observed exception"), whose text quotes ours from torch 2.11 on (each
    # version in its own words; documented in the README); torch 2.8's names the class only.
    torch._dynamo.reset()
    x, t = torch.randn(4, 7, device=device), torch.tensor([0, 1, 2, 3], device=device)
    compiled = torch.compile(
        lambda x, t, ls: triton_xent.cross_entropy(x, t, label_smoothing=ls, backend="torch"),
        backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Observed exception") as caught:
        compiled(x, t, 1.5)
    assert "ValueError" in str(caught.value)
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.11":
        assert "label_smoothing must be between 0.0 and 1.0, got 1.5" in str(caught.value)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_breaks_allowed", "fullgraph"])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_process_group_is_refused_under_compile(device, entry, fullgraph):
    # Eager-only: a clear error rather than a graph break, also where breaks are allowed
    # (checked before the group is touched: any object stands for it here).
    torch._dynamo.reset()
    x, t = torch.randn(4, 7, device=device), torch.tensor([0, 1, 2, 3], device=device)
    group = object()
    if entry == "cross_entropy":
        def fn(x, t):
            return triton_xent.cross_entropy(x, t, process_group=group)
    else:
        w = torch.randn(5, 7, device=device)

        def fn(x, t):
            return triton_xent.linear_cross_entropy(x, w, t, process_group=group)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=fullgraph)
    with pytest.raises(Exception, match="process_group is an eager-mode feature"):
        compiled(x, t)


@pytest.mark.cuda
@pytest.mark.parametrize("V", [32000, 128256], ids=["one_slice", "split_rows"])
def test_reduce_overhead_training_step_equals_eager(V):
    # mode="reduce-overhead": inductor's CUDA graphs around a training step, which
    # check_targets=False keeps free of host syncs; rows of 128256 classes are split in
    # slices (config.ROW_SLICE_MAX_V). Three replays on new data against eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, V)).cuda()

    def forward(h, t):
        return triton_xent.cross_entropy(model(h), t, check_targets=False, label_smoothing=0.1,
                                         lse_square_scale=1e-4)

    compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    for i in range(3):
        h = torch.randn(32, 64, device="cuda")
        t = torch.randint(0, V, (32,), device="cuda")
        results = []
        for fn in (compiled, forward):
            model.zero_grad(set_to_none=True)
            loss = fn(h, t)
            loss.backward()  # the compiled backward is replayed as a CUDA graph too
            results.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        (loss, grads), (ref, ref_grads) = results
        assert_close(loss, ref, torch.float32, f"loss, step {i}")
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close(got, want, torch.float32, f"gradient, step {i}")
