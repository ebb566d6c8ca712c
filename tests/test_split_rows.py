"""Rows cut into slices (kernels/xent.py), on both long-row paths (config.LONG_ROWS).

"exchange": each program publishes its slice's record, merges all of them once its row's
arrival counter reads P, and a program whose siblings are late defers its slice to the
second (finish) launch. Under the interpreter (programs run one after another) every program
of a row but its last arrival is deferred, so both the direct and the deferred paths run,
and both schedules: one program a slice, and persistent programs that walk the slices in
grid-stride order. On a GPU the default spin limit exercises the exchange, and a spin limit
of 0 mostly the deferral.

"two_pass": one launch writes every slice's record, a second merges them and writes the
loss and gradient; no program waits on another. "sweep": one program walks each whole row
twice, in blocks (statistics, then the gradient). Both must match the reference with every
option, and launch no exchange kernel. Under "exchange" a call takes "two_pass" where a row's
slices would not all be resident on the device (faked here with small SM counts).

The slice size (and the sweep's block) is shrunk here so that small rows take the split
path with many slices (blocks).
"""

import pytest
import torch

import triton_xent
from helpers import assert_close, entropy_reference, reference, sweep_in_small_blocks
from triton_xent import config

pytest.importorskip("triton")
from triton_xent.kernels import xent  # noqa: E402

# On a GPU: the tuned limit (siblings meet) and 0 (mostly deferral). Under the interpreter,
# whose programs run one after another: 0 (the default there) and 3, which runs the polling
# loop through the interpreter before each early program gives up and defers.
if torch.cuda.is_available():
    SPIN_SETTING, SPIN_LIMITS = "SLICE_SPIN_LIMIT", [config.SLICE_SPIN_LIMIT, 0]
else:
    SPIN_SETTING, SPIN_LIMITS = "INTERPRET_SLICE_SPIN_LIMIT", [0, 3]
# Persistent: 3 programs an SM (the interpreter counts as one SM), fewer than the slices of
# the rows below, so programs take several slices each, siblings among them.
SCHEDULES = {"one_per_slice": (False, 1), "persistent": (True, 3)}
EXCHANGE_KERNELS = ("_split_kernel", "_finish_kernel")
TWO_PASS_KERNELS = ("_two_pass_stats_kernel", "_two_pass_finish_kernel")
SWEEP_KERNELS = ("_sweep_kernel",)
# The paths on which no program waits on another, and the kernels each launches.
NO_WAIT_KERNELS = {"two_pass": TWO_PASS_KERNELS, "sweep": SWEEP_KERNELS}


# Each path, and on the exchange each spin setting and schedule; "two_pass" has no spin;
# the sweep with its loop's knobs both ways, one program a row or 3 walking the rows.
@pytest.fixture(params=[("exchange", SPIN_LIMITS[0], "one_per_slice"),
                        ("exchange", SPIN_LIMITS[1], "one_per_slice"),
                        ("exchange", SPIN_LIMITS[1], "persistent"),
                        ("two_pass", None, "one_per_slice"),
                        ("sweep", None, "one_per_slice"),
                        ("sweep", None, "persistent")],
                ids=lambda p: p[0] + (f"-spin{p[1]}" if p[1] is not None else "") + f"-{p[2]}")
def small_slices(request, monkeypatch):
    path, spin, schedule = request.param
    monkeypatch.setattr(config, "LONG_ROWS", path)
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    if spin is not None:
        monkeypatch.setattr(config, SPIN_SETTING, spin)
    persistent, per_sm = SCHEDULES[schedule]
    monkeypatch.setattr(config, "PERSISTENT", persistent)
    monkeypatch.setattr(config, "PERSISTENT_PROGRAMS_PER_SM", per_sm)
    # persistent: the sweep's knobs the other way round from the default
    sweep_in_small_blocks(monkeypatch, prefetch=not persistent, stages=2 if persistent else 1,
                          reverse=not persistent, programs_per_sm=per_sm if persistent else None)


@pytest.fixture
def launches(monkeypatch):
    """The names of the split-row kernels launched, in order (the kernels still run)."""
    names = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(xent, name)

        def __getitem__(self, grid):
            names.append(self.name)
            return self.kernel[grid]

    for name in EXCHANGE_KERNELS + TWO_PASS_KERNELS + SWEEP_KERNELS:
        monkeypatch.setattr(xent, name, Spy(name))
    return names


OPTIONS = {
    "plain": {},
    "smoothing_weight_ignore": dict(label_smoothing=0.3, weighted=True, ignore_index=2),
    "softcap_zloss_none": dict(softcap=3.0, lse_square_scale=1e-2, reduction="none"),
    "everything_sum": dict(softcap=3.0, lse_square_scale=1e-2, label_smoothing=0.1,
                           weighted=True, reduction="sum"),
}


# 2, 4 and 9 slices (the last one short), each option once.
@pytest.mark.parametrize("V, option", [(33, "plain"), (100, "smoothing_weight_ignore"),
                                       (100, "softcap_zloss_none"), (257, "everything_sum")],
                         ids=lambda v: f"V{v}" if isinstance(v, int) else v)
def test_split_rows_match_reference(small_slices, device, V, option):
    kwargs = dict(OPTIONS[option])
    g = torch.Generator().manual_seed(V)
    x = (3 * torch.randn(4, V, generator=g)).to(device)
    t = torch.randint(0, V, (4,), generator=g).to(device)
    t[0] = 2
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.rand(V, generator=g).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, t, backend="triton", **kwargs)
    go = torch.full_like(loss, 0.7)
    loss.backward(go)
    ref_loss, ref_grad = reference(x, t, grad_output=go, **kwargs)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_split_rows_with_probability_targets(small_slices, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 97, generator=g).to(device)
    p = torch.rand(4, 97, generator=g).softmax(1).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, p, label_smoothing=0.2, backend="triton")
    loss.backward()
    ref_loss, ref_grad = reference(x, p, label_smoothing=0.2)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_split_rows_edge_values_stay_in_their_row(small_slices, device):
    V = 100
    x = torch.randn(5, V)
    x[0, :40] = float("-inf")  # the first slice of row 0 is all -inf, later slices finite
    x[1] = -1e30  # equal huge values across every slice: log(V)
    x[2, 70] = float("nan")  # a NaN in the third slice of row 2 only
    x[3, 5] = float("-inf")  # target logit -inf: +inf loss
    x = x.to(device)
    t = torch.tensor([50, 3, 10, 5, 99], device=device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, t, reduction="none", label_smoothing=0.1,
                                     backend="triton")
    loss.sum().backward()
    ref_loss, ref_grad = reference(x, t, reduction="none", label_smoothing=0.1)
    assert torch.isinf(loss[3]) and torch.isinf(ref_loss[3])
    assert torch.isnan(loss[2]) and torch.isnan(xg.grad[2]).all()
    torch.testing.assert_close(loss[1].double(), torch.log(torch.tensor(float(V))).double()
                               .to(loss.device), atol=1e-5, rtol=1e-5)
    for r in (0, 1, 4):
        assert_close(loss[r], ref_loss[r], torch.float32, f"loss row {r}")
        assert_close(xg.grad[r], ref_grad[r], torch.float32, f"grad row {r}")


@pytest.mark.parametrize("path", config.LONG_ROWS_CHOICES)
def test_split_and_unsplit_rows_agree(device, monkeypatch, path):
    monkeypatch.setattr(config, "LONG_ROWS", path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 300, generator=g).to(device)
    t = torch.randint(0, 300, (3,), generator=g).to(device)
    whole = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 64)
    split = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)


def test_split_rows_with_gradient_written_over_the_logits(small_slices, device):
    # In place, no program may read a slice (or the target logit) that a sibling has
    # already overwritten with its gradient.
    g = torch.Generator().manual_seed(5)
    x = (2 * torch.randn(4, 200, generator=g)).to(device)
    t = torch.randint(0, 200, (4,), generator=g).to(device)
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    loss = triton_xent.cross_entropy(logits, t, label_smoothing=0.1, reduction="none",
                                     inplace_backward=True, backend="triton")
    loss.sum().backward()
    ref_loss, ref_grad = reference(x, t, label_smoothing=0.1, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")


def _deferral_flags(monkeypatch, x, t, compute_grad):
    """Runs xent_rows and returns (arrival counters, deferral flags (rows, P)) as the finish
    launch found them."""
    seen = {}
    finish = xent._finish_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(finish.arg_names, args))
                sync, n_rows, n_slices = named["sync_ptr"], named["n_rows"], named["n_slices"]
                seen["arrivals"] = sync[:n_rows].clone()
                seen["flags"] = sync[n_rows:].view(n_rows, n_slices).clone()
                finish[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(xent, "_finish_kernel", Spy())
    grad = torch.empty_like(x) if compute_grad else None
    ce, *_ = xent.xent_rows(x.unsqueeze(-1), t, None, None,
                            grad.unsqueeze(-1) if compute_grad else None, prob_target=False,
                            ignore_index=-100, label_smoothing=0.0,
                            lse_square_scale=0.0, softcap=None)
    ref_loss, ref_grad = reference(x, t, reduction="none")
    assert_close(ce, ref_loss, torch.float32, "loss")
    if compute_grad:
        assert_close(grad, ref_grad, torch.float32, "grad")
    return seen["arrivals"], seen["flags"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's program order")
@pytest.mark.parametrize("compute_grad", [True, False], ids=["with_grad", "forward_only"])
def test_interpreter_defers_every_slice_but_the_last_arrival(monkeypatch, compute_grad):
    # Programs run in order, so slice j of a row arrives j-th: with a gradient, slices
    # 0 .. P-2 find the counter short and defer, the last merges at once; without one only
    # slice 0 (the loss's writer) waits, and defers.
    monkeypatch.setattr(config, "LONG_ROWS", "exchange")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(config, "PERSISTENT", False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 100, generator=g)  # 4 slices of 32, 32, 32, 4
    t = torch.tensor([0, 99, 50])
    arrivals, flags = _deferral_flags(monkeypatch, x, t, compute_grad)
    assert arrivals.tolist() == [4, 4, 4]
    expected = [1, 1, 1, 0] if compute_grad else [1, 0, 0, 0]
    assert flags.tolist() == [expected] * 3


# --- "two_pass" and "sweep": every option, no exchange ---------------------------------------

# Every option the exchange takes, with the RL extras (temperature, row and entropy weights,
# the returned entropy with an upstream gradient of its own, the argmax) at once; the
# forward alone and the linear op's chunks apart (the in-place gradient: the small_slices
# tests above). V = 100: 4 slices of 32 (the last of 4 classes).
TWO_PASS_CASES = {
    "indices_weight_smoothing_softcap_zloss_ignore_mean": dict(
        weighted=True, label_smoothing=0.2, softcap=4.0, lse_square_scale=1e-2,
        ignore_index=2),
    "probabilities_weight_smoothing_softcap_zloss_sum": dict(
        prob_target=True, weighted=True, label_smoothing=0.1, softcap=4.0,
        lse_square_scale=1e-2, reduction="sum"),
}


def _two_pass_problem(case, device, n=4, v=100):
    kwargs = dict(TWO_PASS_CASES[case])
    g = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(n, v, generator=g)
    x[1, 64:] = 40.0  # the row's max, and its first column (the argmax), in slice 2
    if kwargs.pop("prob_target", False):
        t = torch.rand(n, v, generator=g).softmax(1)
    else:
        t = torch.randint(0, v, (n,), generator=g)
        t[0], t[3] = kwargs.get("ignore_index", 0), v - 1
    if kwargs.pop("weighted", False):
        kwargs["weight"] = (torch.rand(v, generator=g) + 0.5).to(device)
    rw = torch.randn(n, generator=g).to(device)
    ew = -0.1 * torch.rand(n, generator=g).to(device)
    eg = torch.randn(n, generator=g).to(device)
    return x.to(device), t.to(device), kwargs, rw, ew, eg


@pytest.fixture(params=list(NO_WAIT_KERNELS))
def no_wait(request, monkeypatch):
    """LONG_ROWS = "two_pass" or "sweep" on rows of V = 100 (4 slices, 4 blocks); the
    kernels the path launches."""
    monkeypatch.setattr(config, "LONG_ROWS", request.param)
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    sweep_in_small_blocks(monkeypatch)
    return NO_WAIT_KERNELS[request.param]


@pytest.mark.parametrize("case", TWO_PASS_CASES)
def test_no_wait_paths_match_the_reference_with_every_option(no_wait, launches, device, case):
    x, t, kwargs, rw, ew, eg = _two_pass_problem(case, device)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, temperature=0.8, row_weight=rw, entropy_weight=ew,
                                    return_entropy=True, return_argmax=True, backend="triton",
                                    **kwargs)
    (out.loss + (out.entropy * eg).sum()).backward()
    ref_loss, ref_grad = reference(x, t, temperature=0.8, row_weight=rw, entropy_weight=ew,
                                   entropy_grad=eg, **kwargs)
    assert set(launches) == set(no_wait)  # the entropy's gradient: a second call
    assert_close(out.loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")
    H = entropy_reference(x, t, ignore_index=kwargs.get("ignore_index", -100),
                          softcap=kwargs.get("softcap"), temperature=0.8)
    assert_close(out.entropy, H, torch.float32, "entropy")
    argmax = x.argmax(1)
    if not t.is_floating_point():
        argmax[t == kwargs.get("ignore_index", -100)] = -1
    assert out.argmax.tolist() == argmax.tolist()


def test_no_wait_forward_alone_writes_every_row(no_wait, launches, device):
    # Without a gradient two_pass's second launch runs one program a row (slice 0's), and
    # the sweep makes its first sweep only.
    g = torch.Generator().manual_seed(10)
    x = (3 * torch.randn(4, 100, generator=g)).to(device)
    t = torch.tensor([0, 40, 70, 99], device=device)  # one target in each slice
    with torch.no_grad():
        out = triton_xent.cross_entropy(x, t, reduction="none", return_entropy=True,
                                        return_argmax=True, backend="triton")
    assert launches == list(no_wait)
    assert_close(out.loss, reference(x, t, reduction="none")[0], torch.float32, "loss")
    assert_close(out.entropy, entropy_reference(x, t), torch.float32, "entropy")
    assert out.argmax.tolist() == x.argmax(1).tolist()


def test_no_wait_through_the_linear_op_in_chunks(no_wait, launches, device):
    # 6 rows in chunks of 4 and 2: each chunk's logits are overwritten by their gradient.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 8, generator=g).to(device)
    w = torch.randn(100, 8, generator=g).to(device)
    t = torch.randint(0, 100, (6,), generator=g).to(device)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = triton_xent.linear_cross_entropy(xg, wg, t, label_smoothing=0.1, chunk_size=4,
                                            backend="triton")
    loss.backward()
    logits = (x.double() @ w.double().T).requires_grad_(True)
    ref_loss, d_logits = reference(logits, t, label_smoothing=0.1)
    assert launches == list(no_wait) * 2
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, d_logits @ w.double(), torch.float32, "d_x")
    assert_close(wg.grad, d_logits.T @ x.double(), torch.float32, "d_W")


# --- the switch: environment, checks, and the device's capacity -----------------------------


@pytest.mark.parametrize("environ, expected", [
    ({}, "two_pass"), ({"TRITON_XENT_LONG_ROWS": "exchange"}, "exchange"),
    ({"TRITON_XENT_LONG_ROWS": "sweep"}, "sweep"),
], ids=["default", "env_exchange", "env_sweep"])
def test_long_rows_initial_value(environ, expected):
    assert config.initial_long_rows(environ) == expected


def test_long_rows_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="TRITON_XENT_LONG_ROWS='twopass'.*'exchange', "
                                         "'two_pass', 'sweep'"):
        config.initial_long_rows({"TRITON_XENT_LONG_ROWS": "twopass"})


def test_long_rows_bad_value_in_code_fails_the_next_call(monkeypatch, device):
    monkeypatch.setattr(config, "LONG_ROWS", "fast")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    x = torch.randn(2, 40, device=device)
    with pytest.raises(ValueError, match="LONG_ROWS = 'fast'.*'exchange', 'two_pass', 'sweep'"):
        triton_xent.cross_entropy(x, torch.tensor([0, 1], device=device), backend="triton")


# P slices against SPLIT_RESIDENT_MARGIN x SMs x programs per SM: an 8-SM GPU holds 8
# slices of a lean row with the margin (4 of another), a 16-SM MIG slice 16 (8).
@pytest.mark.parametrize("sms, n_slices, lean, expected", [
    (8, 8, True, "exchange"), (8, 9, True, "two_pass"), (8, 4, False, "exchange"),
    (8, 5, False, "two_pass"), (16, 16, True, "exchange"), (16, 63, True, "two_pass"),
    (16, 9, False, "two_pass"), (132, 63, True, "exchange"), (132, 63, False, "exchange"),
    (114, 63, False, "two_pass"),
])
def test_exchange_only_where_a_rows_slices_fit_the_device(monkeypatch, sms, n_slices, lean,
                                                           expected):
    monkeypatch.setattr(config, "LONG_ROWS", "exchange")
    monkeypatch.setattr(xent, "sm_count", lambda device: sms)
    per_sm = config.SPLIT_PROGRAMS_PER_SM_LEAN if lean else config.SPLIT_PROGRAMS_PER_SM
    assert xent.long_rows_path(n_slices, torch.device("cuda"), per_sm) == expected
    for path in ("two_pass", "sweep"):
        monkeypatch.setattr(config, "LONG_ROWS", path)
        assert xent.long_rows_path(n_slices, torch.device("cuda"), per_sm) == path


@pytest.mark.parametrize("element_size, switches, lean", [
    (2, dict(COMPUTE_GRAD=True, ENTROPY=True, HAS_ROW_WEIGHT=True), True),
    (4, dict(COMPUTE_GRAD=True), False), (2, dict(ARGMAX=True), False),
    (2, dict(HAS_WEIGHT=True), False), (2, dict(PROB_TARGET=True), False),
], ids=["bf16_rl_extras", "fp32", "argmax", "class_weights", "probabilities"])
def test_programs_per_sm_assumed_of_the_exchange(element_size, switches, lean):
    expected = config.SPLIT_PROGRAMS_PER_SM_LEAN if lean else config.SPLIT_PROGRAMS_PER_SM
    assert xent.split_programs_per_sm(element_size, switches) == expected


@pytest.mark.parametrize("sms, kernels", [(8, TWO_PASS_KERNELS), (132, EXCHANGE_KERNELS)],
                         ids=["8_sms_two_pass", "132_sms_exchange"])
def test_exchange_on_a_small_device_runs_two_pass(monkeypatch, launches, device, sms,
                                                  kernels):
    # V = 257: 9 slices of 32 (float32: 1 program an SM), more than an 8-SM device holds
    # with the margin; a 132-SM device holds them.
    monkeypatch.setattr(config, "LONG_ROWS", "exchange")
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(xent, "sm_count", lambda device: sms)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 257, generator=g).to(device)
    t = torch.tensor([3, 256], device=device)
    loss = triton_xent.cross_entropy(x, t, reduction="none", backend="triton")
    assert launches == list(kernels)
    assert_close(loss, reference(x, t, reduction="none")[0], torch.float32, "loss")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter has no SMs")
def test_interpreter_takes_the_exchange_when_asked(monkeypatch, launches):
    monkeypatch.setattr(config, "LONG_ROWS", "exchange")
    assert xent.long_rows_path(10**6, torch.device("cpu"), 1) == "exchange"


# The sweep's grid: one program a row, or capped by programs per SM and by the rows that fill
# a share of the L2 (an H200's 132 SMs and 60 MB; rows of V = 128256 in bf16: 256 KB).
@pytest.mark.parametrize("per_sm, l2_fraction, expected", [
    (None, None, 16384), (2, None, 264), (None, 0.5, 122), (1, 0.5, 122), (1, 2.0, 132),
], ids=["one_a_row", "per_sm", "l2_half", "both_l2_binds", "both_sms_bind"])
def test_sweep_grid_caps_the_rows_between_their_sweeps(monkeypatch, per_sm, l2_fraction,
                                                        expected):
    from triton_xent.kernels import tiles

    class Props:
        multi_processor_count, L2_cache_size = 132, 60 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(config, "SWEEP_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(config, "SWEEP_L2_FRACTION", l2_fraction)
    assert tiles.sweep_grid(16384, 128256 * 2, torch.device("cuda")) == (expected,)
