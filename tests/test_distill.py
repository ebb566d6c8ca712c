"""distillation_loss from logits (issue 20): forward KL, reverse KL and JSD against the float64
reference of helpers.py (autograd of the issue's formulas), on both backends, every
reduction, whole rows and long rows on both of their paths (config.LONG_ROWS: "two_pass",
the stage kernels on slices; "sweep", one program walking each row in blocks, with its
knobs), ignored rows, -inf teacher logits, the dtypes, the shapes, the backward's scaling,
torch.compile and every bad input. The stage functions the linear op and vocab parallelism
build on (triton_xent/distill.py) are checked on column sets merged by merge_stats.
"""

import pytest
import torch

import triton_xent
from helpers import assert_close, distill_reference, sweep_in_small_blocks
from triton_xent import config, distill
from triton_xent.autograd import distillation_op

# 7 rows, V = 37 (prime: no block or slice divides it); row 2 is ignored.
N, V = 7, 37
# Divergence, temperature, beta (used by JSD only): each at T = 1 and T != 1, JSD at
# beta 0.1, 0.5 and 0.9.
CASES = {
    "forward_kl": ("forward_kl", 1.0, 0.5),
    "forward_kl_T2": ("forward_kl", 2.0, 0.5),
    "reverse_kl": ("reverse_kl", 1.0, 0.5),
    "reverse_kl_T0.7": ("reverse_kl", 0.7, 0.5),
    "jsd_beta0.1": ("jsd", 1.0, 0.1),
    "jsd_beta0.5_T1.5": ("jsd", 1.5, 0.5),
    "jsd_beta0.9": ("jsd", 1.0, 0.9),
}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _logits(shape, seed=0, scale=3.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(shape, generator=g)
    teacher = student + scale * torch.randn(shape, generator=g)  # related, as in training
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def _target(rows_shape, v, device, ignored=((2,),), seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, rows_shape, generator=g)
    for row in ignored:
        t[row] = -100
    return t.to(device)


def _run(x, teacher, target=None, grad_output=None, **kwargs):
    """(loss, student gradient) of distillation_loss; grad_output as in distill_reference."""
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.distillation_loss(xg, teacher, target, **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), xg.grad


def _check(x, teacher, target=None, *, what="", grad_output=None, **kwargs):
    loss, grad = _run(x, teacher, target, grad_output, **kwargs)
    options = {k: v for k, v in kwargs.items() if k != "backend"}
    want_loss, want_grad = distill_reference(x, teacher, target, grad_output=grad_output,
                                             **options)
    assert grad.dtype == x.dtype
    assert_close(loss, want_loss, x.dtype, f"{what} loss")
    assert_close(grad, want_grad, x.dtype, f"{what} gradient")
    return loss, grad


@pytest.fixture
def small_slices(monkeypatch):
    """Rows above one slice at an interpreter-friendly V: slices of at most 64 columns."""
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 64)


@pytest.fixture(params=["two_pass", "sweep"])
def long_row_paths(request, monkeypatch, small_slices):
    """small_slices on each long-row path: "two_pass" (the stage kernels) and "sweep"
    (blocks of 64 columns: V = 70 .. 200 take 2 .. 4). The PyTorch backend has no long-row
    paths: it runs once."""
    if request.param == "sweep" and request.getfixturevalue("backend") == "torch":
        pytest.skip("the PyTorch backend has no long-row paths")
    monkeypatch.setattr(config, "LONG_ROWS", request.param)
    sweep_in_small_blocks(monkeypatch, block_v=64)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
def test_every_divergence_temperature_and_reduction(backend, device, case, reduction):
    divergence, temperature, beta = CASES[case]
    x, t = _logits((N, V), device=device)
    _check(x, t, _target((N,), V, device), divergence=divergence, beta=beta,
           temperature=temperature, reduction=reduction, backend=backend, what=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", ["V37", "V1000", "V300_in_5_slices"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dtypes_and_vocabulary_sizes(backend, device, monkeypatch, divergence, vocab, dtype):
    # V = 1000 is a whole-row tile of two rows; V = 300 with slices of at most 64 columns
    # takes the slice kernels (stats, JSD's terms, grad: five slices, the last shorter).
    v = int(vocab.split("_")[0][1:])
    if "slices" in vocab:
        monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 64)
    x, t = _logits((5, v), dtype=dtype, device=device)
    _check(x, t, _target((5,), v, device), divergence=divergence, temperature=0.8,
           backend=backend, what=f"{divergence} {vocab}")


def test_the_smallest_real_split_row(device):
    pytest.importorskip("triton")
    # V = ROW_SLICE_MAX_V + 1 with the configured slice width: two slices, the second of one
    # column. JSD takes all three slice kernels.
    v = config.ROW_SLICE_MAX_V + 1
    x, t = _logits((2, v), device=device)
    _check(x, t, divergence="jsd", beta=0.3, backend="triton", what="split row")


@pytest.mark.parametrize("shape", ["N_V", "B_T_V", "B_T_V_strided_view", "V"])
def test_row_shapes(backend, device, long_row_paths, shape):
    # (N, V) and (B, T, V) logits; a logits[:, :-1] view is read in place (its rows are not
    # evenly spaced); one row of shape (V,) with a 0-dim target. V = 70 takes two slices.
    if shape == "B_T_V_strided_view":
        x, t = _logits((2, 4, 70), device=device)
        x, t = x[:, :-1], t[:, :-1]
    else:
        full = {"N_V": (6, 70), "B_T_V": (2, 3, 70), "V": (70,)}[shape]
        x, t = _logits(full, device=device)
    # JSD: the slice path's three kernels (the divergences' formulas are tested above).
    target = _target(x.shape[:-1], 70, device, ignored=((0,) * (x.dim() - 1),))
    loss, grad = _check(x, t, target, divergence="jsd", reduction="none", backend=backend,
                        what=shape)
    assert loss.shape == x.shape[:-1] and grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_every_row_ignored_gives_zero_loss_and_gradient(backend, device, small_slices,
                                                        reduction):
    # One all-prompt micro-batch must not poison a run: "batchmean" over no row is 0, not NaN.
    x, t = _logits((4, 70), device=device)
    target = torch.full((4,), -100, device=device)
    for divergence in DIVERGENCES:
        loss, grad = _run(x, t, target, divergence=divergence, reduction=reduction,
                          backend=backend)
        assert torch.equal(loss, torch.zeros_like(loss)), divergence
        assert torch.equal(grad, torch.zeros_like(grad)), divergence


def test_no_target_counts_every_row_and_ignore_index_is_honoured(backend, device):
    x, t = _logits((N, V), device=device)
    _check(x, t, None, divergence="jsd", backend=backend, what="no target")
    target = _target((N,), V, device, ignored=())
    target[4] = 5
    _check(x, t, target, ignore_index=5, divergence="reverse_kl", backend=backend,
           what="ignore_index=5")


def test_minus_inf_teacher_logits(backend, device, long_row_paths):
    # Some classes the teacher rules out (-inf), in every slice of row 0 and in one slice of
    # the others, and a whole slice of -inf in row 1: forward KL and JSD are finite and match;
    # reverse KL is +inf, its true value, where the student puts mass on such a class.
    x, t = _logits((4, 200), device=device)
    t[0, ::7] = float("-inf")
    t[1, 64:128] = float("-inf")
    t[2:, :5] = float("-inf")
    target = _target((4,), 200, device, ignored=())
    for divergence in ("forward_kl", "jsd"):
        loss, _ = _check(x, t, target, divergence=divergence, reduction="none",
                         backend=backend, what=f"-inf teacher {divergence}")
        assert torch.isfinite(loss).all()
    loss, _ = _run(x, t, target, divergence="reverse_kl", reduction="none", backend=backend)
    assert torch.isinf(loss).all() and (loss > 0).all()


def test_a_nan_logit_gives_its_row_a_nan_loss(backend, device, long_row_paths):
    # Never a silent 0: a NaN in the student's row 0 or the teacher's row 1 (V = 100, two
    # slices) makes that row's loss NaN; row 2 is untouched.
    x, t = _logits((3, 100), device=device)
    x[0, 5] = float("nan")
    t[1, 80] = float("nan")
    for divergence in DIVERGENCES:
        loss = triton_xent.distillation_loss(x, t, divergence=divergence, reduction="none",
                                             backend=backend)
        assert loss[:2].isnan().all() and loss[2].isfinite(), divergence


def test_equal_distributions_give_exactly_zero_kl(backend, device, long_row_paths):
    # D_t = sum e_t (d_t - d_s) is exactly 0 when the teacher is the student: no cancellation
    # of two large sums, and a +100 shift of the teacher changes nothing.
    x, _ = _logits((3, 150), device=device)
    for divergence in ("forward_kl", "reverse_kl"):
        loss, grad = _run(x, x.clone(), divergence=divergence, reduction="none",
                          backend=backend)
        assert torch.equal(loss, torch.zeros_like(loss)), divergence
        assert grad.abs().max() < 1e-7, divergence
    loss, _ = _run(x, x + 100.0, divergence="jsd", reduction="none", backend=backend)
    assert loss.abs().max() < 1e-6


def test_backward_scales_by_grad_output(backend, device, small_slices):
    # A reduced loss times 3 (grad_output 3), "none" with a per-row grad_output of either
    # sign, and a second backward through the same graph (retain_graph: the saved gradient
    # must not have been scaled in place).
    x, t = _logits((5, 90), device=device)
    target = _target((5,), 90, device)
    go = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0], device=device)
    _check(x, t, target, grad_output=torch.tensor(3.0), divergence="reverse_kl",
           backend=backend, what="grad_output 3")
    for divergence in DIVERGENCES:
        _check(x, t, target, grad_output=go, divergence=divergence, reduction="none",
               backend=backend, what=f"{divergence} per-row grad_output")
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.distillation_loss(xg, t, target, reduction="none", backend=backend)
    loss.backward(go, retain_graph=True)
    first = xg.grad.clone()
    xg.grad = None
    loss.backward(go)
    assert torch.equal(xg.grad, first)


def test_dtypes_of_loss_and_gradient(backend, device):
    # The loss has F.kl_div's dtype (input's promoted with the teacher's; float32 under
    # autocast); the gradient has input's.
    x, t = _logits((3, 20), dtype=torch.bfloat16, device=device)
    loss, grad = _run(x, t, backend=backend)
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    loss, grad = _run(x, t.float(), backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss, grad = _run(x, t, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    loss, grad = _check(x.float(), t.float(), divergence="reverse_kl", backend=backend)
    with torch.no_grad():  # no gradient asked for: the same loss
        again = triton_xent.distillation_loss(x.float(), t.float(), divergence="reverse_kl",
                                              backend=backend)
    assert torch.equal(loss, again)


def test_float64_runs_in_float64_on_the_torch_backend(device):
    x, t = _logits((4, 30), dtype=torch.float64, device=device)
    loss, grad = _run(x, t, divergence="jsd", backend="auto")
    want_loss, want_grad = distill_reference(x, t, divergence="jsd")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)


def test_module_equals_function(backend, device):
    x, t = _logits((N, V), device=device)
    target = _target((N,), V, device)
    module = triton_xent.DistillationLoss(divergence="jsd", beta=0.2, temperature=2.0,
                                          reduction="sum", backend=backend)
    assert "jsd" in repr(module)
    torch.testing.assert_close(
        module(x, t, target),
        triton_xent.distillation_loss(x, t, target, divergence="jsd", beta=0.2,
                                      temperature=2.0, reduction="sum", backend=backend))


@pytest.mark.parametrize("backend_", ["torch", "triton"])
def test_merged_column_sets_equal_whole_rows(device, backend_):
    # The interface of the linear op and vocab parallelism: statistics of unequal column sets
    # (one of them all -inf in the teacher, one empty: a rank's empty slice) merged by
    # merge_stats, JSD's terms summed over the sets, and each set's gradient equal those of
    # the whole rows.
    x, t = _logits((3, 50), device=device)
    t[:, 10:20] = float("-inf")
    sets = [slice(0, 10), slice(10, 20), slice(20, 20), slice(20, 50)]
    kw = dict(temperature=0.9, use_triton=backend_ == "triton")
    whole = distill.distill_stats(x, t, **kw)
    merged = distill.merge_stats(torch.stack([distill.distill_stats(x[:, c], t[:, c], **kw)
                                              for c in sets], 1))
    torch.testing.assert_close(merged, whole)
    for divergence in DIVERGENCES:
        terms = None
        if divergence == "jsd":
            terms = sum(distill.distill_terms(x[:, c], t[:, c], merged, beta=0.4, **kw)
                        for c in sets)
        loss, kl_s = distill.row_losses(merged, terms, divergence)
        grad = torch.empty_like(x)
        for c in sets:
            distill.distill_grad(x[:, c], t[:, c], merged, kl_s, grad[:, c], None,
                                 divergence=divergence, beta=0.4, **kw)
        want_loss, want_grad = distill_reference(x, t, divergence=divergence, beta=0.4,
                                                 temperature=0.9, reduction="none")
        assert_close(loss, want_loss, torch.float32, f"{divergence} merged loss")
        assert_close(grad, want_grad, torch.float32, f"{divergence} merged gradient")


@pytest.mark.parametrize("vocab", [37, 150], ids=["whole_rows", "three_slices"])
def test_gradient_may_overwrite_the_student(backend, device, long_row_paths, vocab):
    # The linear op's chunks take their gradient in the logits' own buffer: distill_rows with
    # grad aliasing the student gives the gradient it gives into a separate buffer.
    x, t = _logits((4, vocab), device=device)
    scale = torch.tensor([0.5, 0.0, 1.0, 2.0], device=device)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.3, use_triton=backend == "triton")
    grad = torch.empty_like(x)
    loss = distill.distill_rows(x, t, grad, scale, **kw)
    spent = x.clone()
    loss_in_place = distill.distill_rows(spent, t, spent, scale, **kw)
    assert torch.equal(loss, loss_in_place) and torch.equal(spent, grad)
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))


# --- the long-row paths (config.LONG_ROWS) -------------------------------------------------

STAGE_KERNELS = ("_distill_slice_stats_kernel", "_distill_slice_terms_kernel",
                 "_distill_slice_grad_kernel")
SWEEP_KERNELS = ("_distill_sweep_kernel",)


@pytest.fixture
def launches(monkeypatch):
    """The names of the distillation kernels launched, in order (the kernels still run)."""
    kd = pytest.importorskip("triton_xent.kernels.distill")
    names = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kd, name)

        def __getitem__(self, grid):
            names.append(self.name)
            return self.kernel[grid]

    for name in ("_distill_rows_kernel",) + STAGE_KERNELS + SWEEP_KERNELS:
        monkeypatch.setattr(kd, name, Spy(name))
    return names


# Each divergence case on the sweep with its knobs varied across the cases: prefetch on and
# off, Triton's pipelining (stages 2), the later sweeps reversed or not, and the grid capped
# (programs_per_sm: 3 programs walk the 4 rows). Both dtypes, every reduction, row 2
# ignored, -inf teacher logits (not for reverse KL: +inf there, test_minus_inf_teacher_logits);
# V = 100 (lanes of 4 columns) or 99 (of 1) in blocks of 32, the last one partial.
# case: (prefetch, stages, reverse, programs_per_sm, dtype, reduction, V)
SWEEP_CASES = {
    "forward_kl": (True, 1, True, None, torch.float32, "batchmean", 100),
    "forward_kl_T2": (False, 1, False, 1, torch.bfloat16, "sum", 99),
    "reverse_kl": (False, 2, True, None, torch.bfloat16, "none", 100),
    "reverse_kl_T0.7": (True, 1, False, 1, torch.float32, "batchmean", 100),
    "jsd_beta0.1": (True, 1, True, None, torch.bfloat16, "sum", 99),
    "jsd_beta0.5_T1.5": (False, 1, False, 1, torch.float32, "none", 100),
    "jsd_beta0.9": (True, 2, False, None, torch.bfloat16, "batchmean", 100),
}


if triton_xent.triton_available():
    import triton
    import triton.language as tl

    from triton_xent.kernels.distill import _log1p_unit

    @triton.jit
    def _apply_log1p_unit(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)
        tl.store(out_ptr + cols, _log1p_unit(w), mask=cols < n)


@pytest.mark.skipif(not triton_xent.triton_available(), reason="needs Triton")
def test_log1p_unit_keeps_its_digits_from_tiny_w_to_one(device):
    """JSD's log M = hi + log(1 + w), w = exp(lo - hi) in [0, 1] (kernels/distill.py
    _log1p_unit): within a few float32 ulps of float64's log1p, relatively, also where w is
    far below float32's epsilon and 1 + w would round to 1."""
    w = torch.cat([torch.zeros(1), torch.logspace(-30, 0, 400), torch.rand(111)]).to(device)
    out = torch.empty_like(w)
    _apply_log1p_unit[(1,)](w, out, w.numel(), BLOCK=512)
    want = torch.log1p(w.double())
    assert out[0].item() == 0.0
    rel = ((out.double() - want).abs() / want.clamp_min(1e-300))[1:]
    assert rel.max().item() < 4e-7, rel.max().item()


@pytest.mark.parametrize("case", SWEEP_CASES)
def test_sweep_matches_the_reference_and_launches_only_itself(device, monkeypatch, launches,
                                                              case):
    divergence, temperature, beta = CASES[case]
    prefetch, stages, reverse, per_sm, dtype, reduction, v = SWEEP_CASES[case]
    monkeypatch.setattr(config, "LONG_ROWS", "sweep")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    sweep_in_small_blocks(monkeypatch, prefetch=prefetch, stages=stages, reverse=reverse,
                          programs_per_sm=per_sm)
    x, t = _logits((4, v), dtype=dtype, device=device)
    if divergence != "reverse_kl":
        t[3, ::7] = float("-inf")
        t[1, 32:64] = float("-inf")  # a whole block
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature,
                  reduction=reduction, backend="triton")
    loss, _ = _check(x, t, _target((4,), v, device), what=case, **kwargs)
    assert launches == list(SWEEP_KERNELS)  # the backward scales the saved gradient only
    with torch.no_grad():  # the forward alone: the statistics' sweep (and JSD's terms')
        again = triton_xent.distillation_loss(x, t, _target((4,), v, device), **kwargs)
    assert launches == list(SWEEP_KERNELS) * 2 and torch.equal(again, loss)


@pytest.mark.parametrize("path", ["two_pass", "exchange"])
def test_two_pass_and_exchange_take_the_stage_kernels(device, monkeypatch, launches, path):
    # Distillation has no exchange: both run the stages (JSD: stats, terms, grad).
    pytest.importorskip("triton")
    monkeypatch.setattr(config, "LONG_ROWS", path)
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    x, t = _logits((2, 70), device=device)
    _check(x, t, divergence="jsd", beta=0.3, backend="triton", what=path)
    assert launches == list(STAGE_KERNELS)


def test_a_bad_long_rows_fails_every_kernel_call(device, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(config, "LONG_ROWS", "fast")
    x, t = _logits((2, 10), device=device)
    with pytest.raises(ValueError, match="LONG_ROWS = 'fast'"):
        triton_xent.distillation_loss(x, t, backend="triton")


def test_vocab_parallel_keeps_the_stage_kernels_under_the_sweep(device, monkeypatch,
                                                                 launches):
    # A rank's columns are a slice of the rows: the vocab-parallel driver runs the stages
    # whatever LONG_ROWS. One rank, its collectives faked (gather: itself; reduce: as is).
    monkeypatch.setattr(config, "LONG_ROWS", "sweep")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group: 1)
    monkeypatch.setattr(torch.distributed, "all_gather",
                        lambda out, x, group: out[0].copy_(x))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, group: x)
    x, t = _logits((3, 70), device=device)
    grad = torch.empty_like(x)
    loss = distill.distill_rows_vocab_parallel(x, t, grad, None, divergence="jsd", beta=0.3,
                                               temperature=1.0, use_triton=True, group=None)
    assert launches == list(STAGE_KERNELS)
    want_loss, want_grad = distill_reference(x, t, divergence="jsd", beta=0.3,
                                             reduction="none")
    assert_close(loss, want_loss, torch.float32, "loss")
    assert_close(grad, want_grad, torch.float32, "gradient")


def test_compiled_training_step_equals_eager_without_graph_breaks(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = torch.nn.Linear(8, 40).to(device)
    teacher_logits = torch.randn(2, 5, 40, device=device)
    h = torch.randn(2, 5, 8, device=device)
    target = _target((2, 5), 40, device, ignored=((0, 1),))

    def step(h, teacher_logits, target):
        return triton_xent.distillation_loss(student(h), teacher_logits, target,
                                             divergence="jsd", beta=0.3, temperature=2.0,
                                             backend=backend)

    explanation = torch._dynamo.explain(step)(h, teacher_logits, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(h, teacher_logits, target)
    loss.backward()
    compiled = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    eager = step(h, teacher_logits, target)
    eager.backward()
    assert_close(loss, eager, torch.float32, "loss")
    for got, want in zip(compiled, (p.grad for p in student.parameters())):
        assert_close(got, want, torch.float32, "parameter gradient")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_custom_op_registration_passes_opcheck(backend, device, reduction):
    x, t = _logits((2, 3, 9), device=device)
    target = _target((2, 3), 9, device, ignored=((0, 1),))
    args = (x.requires_grad_(True), t, target, "jsd", 0.3, 0.8, -100, reduction,
            backend == "triton", True)
    # The gradient output is computed, not differentiable: the generic autograd probes are
    # skipped; the backward is covered by the tests above.
    torch.library.opcheck(distillation_op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _bad_cases(device):
    x, t = _logits((4, 6), device=device)
    target = torch.zeros(4, dtype=torch.int64, device=device)
    grad_teacher = t.clone().requires_grad_(True)
    return {
        "teacher_shape": ((x, t[:, :5]), {}, ValueError, "teacher must have input's shape"),
        "target_shape": ((x, t, target[:3]), {}, ValueError, "target must have shape"),
        "temperature_zero": ((x, t), dict(temperature=0.0), ValueError, "temperature"),
        "temperature_negative": ((x, t), dict(temperature=-1.0), ValueError, "temperature"),
        "temperature_inf": ((x, t), dict(temperature=float("inf")), ValueError,
                            "temperature"),
        "temperature_nan": ((x, t), dict(temperature=float("nan")), ValueError,
                            "temperature"),
        "temperature_string": ((x, t), dict(temperature="1"), TypeError, "temperature"),
        "beta_zero_jsd": ((x, t), dict(divergence="jsd", beta=0.0), ValueError, "beta"),
        "beta_one_jsd": ((x, t), dict(divergence="jsd", beta=1.0), ValueError, "beta"),
        "beta_nan_jsd": ((x, t), dict(divergence="jsd", beta=float("nan")), ValueError,
                         "beta"),
        "unknown_divergence": ((x, t), dict(divergence="kl"), ValueError, "divergence"),
        "reduction_mean": ((x, t), dict(reduction="mean"), ValueError, "batchmean"),
        "unknown_reduction": ((x, t), dict(reduction="avg"), ValueError, "reduction"),
        "teacher_requires_grad": ((x, grad_teacher), {}, ValueError, "detach"),
        "integer_input": ((x.long(), t), {}, TypeError, "input"),
        "integer_teacher": ((x, t.long()), {}, TypeError, "teacher"),
        "float_target": ((x, t, target.float()), {}, TypeError, "integer"),
        "scalar_input": ((x[0, 0], t[0, 0]), {}, ValueError, "class dimension"),
        "no_classes": ((x[:, :0], t[:, :0]), {}, ValueError, "at least one class"),
        "unknown_backend": ((x, t), dict(backend="cuda"), ValueError, "backend"),
        "triton_float64": ((x, t.double()), dict(backend="triton"), TypeError, "float64"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_is_refused_and_left_untouched(device, case):
    args, kwargs, error, words = _bad_cases(device)[case]
    before = [a.clone() for a in args]
    with pytest.raises(error, match=words):
        triton_xent.distillation_loss(*args, **kwargs)
    for a, b in zip(args, before):
        assert torch.equal(a, b)
