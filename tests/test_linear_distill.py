"""linear_distillation_loss: both heads chunk by chunk, against float64 logits of both heads
followed by the divergence (helpers.distill_reference), with the chain rule to the student's
hidden states, head and bias done in float64. Vocab parallelism: tests/test_distributed.py.

Shapes: N = 11 rows (chunks of 4: an uneven last chunk), D = 8 for the student and Dt = 6
for the teacher (hidden sizes that differ), V = 37 classes (prime: no tile fits it). The
"vocab" schedule (config.LINEAR_SCHEDULE) takes blocks of VOCAB_COLS classes (10, 10, 10, 7).
"""

import pytest
import torch

import triton_xent
import triton_xent.chunks as chunks_mod
import triton_xent.linear_distill as linear_distill_mod
from helpers import assert_close, distill_reference, sweep_in_small_blocks
from triton_xent import LinearDistillationLoss, config, linear_distillation_loss

N, D, DT, V = 11, 8, 6, 37
CHUNK = 4
IGNORED = [2, 5]
VOCAB_COLS = 10


def schedule_options(schedule: str, device, monkeypatch) -> dict:
    """The keyword arguments, and config for this test, of a schedule: "rows" in chunks of
    CHUNK rows, "vocab" in blocks of VOCAB_COLS classes over the kept rows."""
    if schedule == "rows":
        return dict(chunk_size=CHUNK)
    monkeypatch.setitem(config.LINEAR_SCHEDULE, torch.device(device).type, "vocab")
    monkeypatch.setattr(config, "LINEAR_VOCAB_BLOCK_MULTIPLE", 1)
    # the budget of the kept rows' float32 logits (bf16: twice the classes, one block)
    monkeypatch.setattr(config, "LINEAR_VOCAB_BLOCK_BYTES", (N - len(IGNORED)) * 4 * VOCAB_COLS)
    return {}


def _problem(device, dtype=torch.float32, seed=0, lead=(N,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    w = torch.randn(V, D, generator=g) / 2
    b = torch.randn(V, generator=g)
    tx = torch.randn(*lead, DT, generator=g)
    tw = torch.randn(V, DT, generator=g) / 2
    tb = torch.randn(V, generator=g)
    t = torch.randint(0, V, lead, generator=g)
    t.view(-1)[IGNORED] = -100
    return [a.to(device, dtype) if a.is_floating_point() else a.to(device)
            for a in (x, w, b, tx, tw, tb, t)]


def linear_distill_reference(x, w, b, tx, tw, tb, target=None, grad_output=None, **options):
    """(loss, d_x, d_W, d_b) in float64: both heads' logits, helpers.distill_reference on them,
    then d_x = G W, d_W = G^T x, d_b = sum_rows G for the logits' gradient G."""
    x64, w64, tx64, tw64 = (a.detach().double() for a in (x, w, tx, tw))
    lead = x.shape[:-1]
    s = x64.reshape(-1, x.shape[-1]) @ w64.T
    t = tx64.reshape(-1, tx.shape[-1]) @ tw64.T
    if b is not None:
        s = s + b.detach().double()
    if tb is not None:
        t = t + tb.detach().double()
    go = grad_output.reshape(-1) if grad_output is not None and grad_output.dim() else grad_output
    loss, g = distill_reference(s, t, target.reshape(-1) if target is not None else None,
                                grad_output=go, **options)
    d_x = (g @ w64).reshape(*lead, x.shape[-1])
    return (loss.reshape(lead) if options.get("reduction") == "none" else loss, d_x,
            g.T @ x64.reshape(-1, x.shape[-1]), g.sum(0) if b is not None else None)


def _run(x, w, b, tx, tw, tb, t, grad_output=None, **kwargs):
    """(loss, d_x, d_W, d_b) of linear_distillation_loss on fresh leaves."""
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bl = b.clone().requires_grad_(True) if b is not None else None
    loss = linear_distillation_loss(xl, wl, tx, tw, t, bias=bl, teacher_bias=tb, **kwargs)
    (loss * grad_output if grad_output is not None else loss).sum().backward()
    return loss.detach(), xl.grad, wl.grad, bl.grad if bl is not None else None


def _check(got, expected, dtype, what):
    for name, g, e in zip(("loss", "d_input", "d_weight", "d_bias"), got, expected):
        assert (g is None) == (e is None), f"{what}: {name}"
        if g is not None:
            assert_close(g, e, dtype, f"{what}: {name}")


# name: (divergence and options, (student bias, teacher bias), reduction)
CASES = {
    "forward_kl_biases_batchmean": (dict(divergence="forward_kl"), (True, True), "batchmean"),
    "forward_kl_T2_no_biases_sum": (dict(divergence="forward_kl", temperature=2.0),
                                    (False, False), "sum"),
    "reverse_kl_T07_student_bias_none": (dict(divergence="reverse_kl", temperature=0.7),
                                         (True, False), "none"),
    "jsd_beta01_teacher_bias_batchmean": (dict(divergence="jsd", beta=0.1), (False, True),
                                          "batchmean"),
    "jsd_beta09_T15_biases_none": (dict(divergence="jsd", beta=0.9, temperature=1.5),
                                   (True, True), "none"),
}


@pytest.mark.parametrize("schedule", ["rows", "vocab"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, device, case, schedule, monkeypatch):
    options, (has_b, has_tb), reduction = CASES[case]
    x, w, b, tx, tw, tb, t = _problem(device)
    b, tb = (b if has_b else None), (tb if has_tb else None)
    go = (torch.linspace(0.5, 1.5, N, device=device) if reduction == "none" else None)
    got = _run(x, w, b, tx, tw, tb, t, grad_output=go, reduction=reduction, backend=backend,
               **schedule_options(schedule, device, monkeypatch), **options)
    expected = linear_distill_reference(x, w, b, tx, tw, tb, t, grad_output=go,
                                        reduction=reduction, **options)
    _check(got, expected, torch.float32, case)
    if reduction == "none":
        assert torch.all(got[0][IGNORED] == 0)


def test_bf16_and_leading_shape(backend, device):
    """(B, T, D) hidden states in bf16: loss (B, T) for "none", gradients in bf16."""
    x, w, b, tx, tw, tb, t = _problem(device, torch.bfloat16, seed=3, lead=(3, 4))
    got = _run(x, w, b, tx, tw, tb, t, grad_output=torch.rand(3, 4, device=device),
               reduction="none", backend=backend, chunk_size=5, divergence="jsd")
    assert got[0].shape == (3, 4) and got[1].dtype == torch.bfloat16
    expected = linear_distill_reference(x, w, b, tx, tw, tb, t, reduction="none",
                                        grad_output=None, divergence="jsd")
    assert_close(got[0], expected[0], torch.bfloat16, "loss")


def test_chunk_size_does_not_change_the_result(backend, device):
    x, w, b, tx, tw, tb, t = _problem(device, seed=1)
    runs = [_run(x, w, b, tx, tw, tb, t, backend=backend, chunk_size=size,
                 divergence="reverse_kl") for size in (1, 3, N)]
    for run in runs[:2]:
        for got, ref in zip(run, runs[2]):
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("path", ["two_pass", "sweep"])
def test_long_rows_on_each_path_in_chunks(device, monkeypatch, path):
    # V = 37 above slices of 16 columns: each chunk's logits through the stage kernels or
    # the row sweep (blocks of 16), the gradient written over the chunk's logits.
    pytest.importorskip("triton")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 16)
    monkeypatch.setattr(config, "LONG_ROWS", path)
    sweep_in_small_blocks(monkeypatch, block_v=16)
    x, w, b, tx, tw, tb, t = _problem(device)
    options = dict(divergence="jsd", beta=0.3, temperature=1.5, reduction="sum")
    got = _run(x, w, b, tx, tw, tb, t, backend="triton", chunk_size=CHUNK, **options)
    _check(got, linear_distill_reference(x, w, b, tx, tw, tb, t, **options), torch.float32,
           path)


@pytest.mark.parametrize("schedule", ["rows", "vocab"])
def test_ignored_rows_are_dropped_before_both_gemms(device, monkeypatch, schedule):
    rows = []
    real = chunks_mod.head_logits

    def spy(x_c, weight, bias, out):
        rows.append((weight.shape[1], x_c.shape[0], weight.shape[0]))
        return real(x_c, weight, bias, out)

    monkeypatch.setattr(chunks_mod, "head_logits", spy)
    monkeypatch.setattr(linear_distill_mod, "head_logits", spy)
    x, w, b, tx, tw, tb, t = _problem(device)
    _run(x, w, b, tx, tw, tb, t, divergence="jsd",
         **schedule_options(schedule, device, monkeypatch))
    kept = N - len(IGNORED)
    if schedule == "rows":  # each row once through each head
        assert sum(r for d, r, _ in rows if d == D) == kept  # the student's head
        assert sum(r for d, r, _ in rows if d == DT) == kept  # the teacher's
    else:  # every block of every pass (JSD: stats, terms, gradient) over the kept rows only
        assert {r for _, r, _ in rows} == {kept}
        assert sum(v for d, _, v in rows if d == D) == 3 * V
        assert sum(v for d, _, v in rows if d == DT) == 3 * V


def test_every_row_ignored_gives_zero_loss_and_gradient(backend, device):
    x, w, b, tx, tw, tb, t = _problem(device)
    loss, d_x, d_w, d_b = _run(x, w, b, tx, tw, tb, torch.full_like(t, -100),
                               backend=backend)
    assert loss.item() == 0.0
    for g in (d_x, d_w, d_b):
        assert torch.count_nonzero(g) == 0


def test_no_target_counts_every_row(backend, device):
    x, w, b, tx, tw, tb, _ = _problem(device, seed=2)
    got = _run(x, w, b, tx, tw, tb, None, backend=backend, chunk_size=CHUNK,
               divergence="forward_kl", temperature=1.3)
    expected = linear_distill_reference(x, w, b, tx, tw, tb, None, divergence="forward_kl",
                                        temperature=1.3)
    _check(got, expected, torch.float32, "no target")


def test_only_what_requires_grad_gets_a_gradient(backend, device):
    x, w, b, tx, tw, tb, t = _problem(device)
    wl = w.clone().requires_grad_(True)
    loss = linear_distillation_loss(x, wl, tx, tw, t, bias=b, teacher_bias=tb,
                                    backend=backend, reduction="none")
    loss.sum().backward()
    expected = linear_distill_reference(x, w, b, tx, tw, tb, t, reduction="none")
    assert_close(wl.grad, expected[2], torch.float32, "d_weight")
    with torch.no_grad():  # a teacher that requires grad is fine where no graph is built
        linear_distillation_loss(x, w, tx, tw.clone().requires_grad_(True), t)


def test_module_equals_function(device):
    x, w, b, tx, tw, tb, t = _problem(device)
    module = LinearDistillationLoss(divergence="jsd", beta=0.3, temperature=1.2, chunk_size=3)
    assert "beta=0.3" in repr(module)
    got = module(x, w, tx, tw, t, b, tb)
    expected = linear_distillation_loss(x, w, tx, tw, t, bias=b, teacher_bias=tb,
                                        divergence="jsd", beta=0.3, temperature=1.2,
                                        chunk_size=3)
    assert torch.equal(got, expected)


def test_compiled_training_step_equals_eager_without_graph_breaks(backend, device):
    torch._dynamo.reset()
    x, w, b, tx, tw, tb, t = _problem(device, seed=4)
    head = torch.nn.Linear(D, V).to(device)
    trunk = torch.nn.Linear(D, D).to(device)

    def step(h):  # the forward compiled, its backward run by autograd
        return linear_distillation_loss(trunk(h), head.weight, tx, tw, t, bias=head.bias,
                                        teacher_bias=tb, divergence="reverse_kl",
                                        temperature=1.5, chunk_size=CHUNK, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    params = list(trunk.parameters()) + list(head.parameters())
    results = []
    for fn in (compiled, step):
        for p in params:
            p.grad = None
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    assert_close(results[0][0], results[1][0], torch.float32, "loss")
    for g, e in zip(results[0][1], results[1][1]):
        assert_close(g, e, torch.float32, "gradient")


def _bad_cases(device):
    x, w, b, tx, tw, tb, t = _problem(device)
    ok = dict(input=x, weight=w, teacher_input=tx, teacher_weight=tw, target=t)
    return {
        "teacher_weight_requires_grad": (dict(ok, teacher_weight=tw.clone().requires_grad_()),
                                         ValueError, "teacher gets no gradient"),
        "teacher_input_requires_grad": (dict(ok, teacher_input=tx.clone().requires_grad_()),
                                        ValueError, "detach"),
        "teacher_bias_requires_grad": (dict(ok, teacher_bias=tb.clone().requires_grad_()),
                                       ValueError, "detach"),
        "hidden_size_mismatch": (dict(ok, weight=w[:, :5]), ValueError, "in_features"),
        "teacher_hidden_size_mismatch": (dict(ok, teacher_input=tx[:, :4]), ValueError,
                                         "teacher_input's last dimension"),
        "classes_differ": (dict(ok, teacher_weight=tw[:30]), ValueError, "share the classes"),
        "rows_differ": (dict(ok, teacher_input=tx[:5]), ValueError, "leading shape"),
        "target_shape": (dict(ok, target=t[:4]), ValueError, "target must have shape"),
        "float_target": (dict(ok, target=t.float()), TypeError, "integer class indices"),
        "bias_shape": (dict(ok, bias=b[:3]), ValueError, "bias must have shape"),
        "bias_dtype": (dict(ok, bias=b.double()), TypeError, "dtype"),
        "mean": (dict(ok, reduction="mean"), ValueError, "batchmean"),
        "temperature_zero": (dict(ok, temperature=0.0), ValueError, "temperature"),
        "temperature_inf": (dict(ok, temperature=float("inf")), ValueError, "temperature"),
        "beta_one_jsd": (dict(ok, divergence="jsd", beta=1.0), ValueError, "beta"),
        "unknown_divergence": (dict(ok, divergence="kl"), ValueError, "divergence"),
        "chunk_size_zero": (dict(ok, chunk_size=0), ValueError, "chunk_size"),
        "integer_input": (dict(ok, input=t), TypeError, "floating-point"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_is_refused_and_left_untouched(device, case):
    kwargs, error, match = _bad_cases(device)[case]
    kwargs["input"] = kwargs["input"].clone().requires_grad_(kwargs["input"].is_floating_point())
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        linear_distillation_loss(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"
    if kwargs["input"].is_floating_point():
        assert kwargs["input"].grad is None


def test_public_names():
    assert triton_xent.linear_distillation_loss is linear_distillation_loss
    assert "LinearDistillationLoss" in triton_xent.__all__


@pytest.mark.parametrize("schedule", ["rows", "vocab"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_custom_ops_pass_opcheck(device, reduction, schedule):
    x, w, b, tx, tw, tb, t = _problem(device)
    x, w, b = (a.requires_grad_(True) for a in (x, w, b))
    options = ("jsd", 0.4, 1.3, -100, reduction, False, CHUNK, schedule)
    torch.library.opcheck(linear_distill_mod.linear_distillation_op,
                          (x, w, b, tx, tw, tb, t, *options, True, True, True))
    torch.library.opcheck(linear_distill_mod.linear_distillation_backward_op,
                          (x.detach(), w.detach(), b.detach(), tx, tw, tb, t,
                           torch.rand(N, device=device), *options,
                           True, True, False))
