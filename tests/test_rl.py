"""Reinforcement learning and monitoring in the same pass: temperature, the entropy (returned
with its gradient, and as a weighted term of the loss), per-row weights and the argmax,
against the float64 reference of helpers.py (F.cross_entropy, torch.special.entr and
autograd of the same formula), on both backends, with every existing option, through the
linear op and under torch.compile. Vocab parallelism: tests/test_distributed.py.
"""

import math

import pytest
import torch

import triton_xent
from helpers import TOL, assert_close, entropy_reference, reference
from triton_xent import config

# 7 rows, V = 37 (prime: no block or slice divides it); row 2 is ignored.
N, V = 7, 37

# Each existing option (or a mix) with every new argument at once: temperature, row
# weights, per-row entropy weights, the returned entropy (with an upstream gradient of its
# own) and the argmax.
OPTIONS = {
    "plain": {},
    "weight_smoothing": dict(weighted=True, label_smoothing=0.2),
    "softcap_zloss": dict(softcap=4.0, lse_square_scale=1e-2),
    "ignore_index_4": dict(ignore_index=4),
    "probabilities_smoothing": dict(prob_target=True, label_smoothing=0.1, weighted=True),
}


def _problem(device, option, seed=0, n=N, v=V, scale=3.0):
    kwargs = dict(OPTIONS[option])
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, v, generator=g)
    if kwargs.pop("prob_target", False):
        t = torch.rand(n, v, generator=g).softmax(1)
    else:
        t = torch.randint(0, v, (n,), generator=g)
        t[2] = kwargs.get("ignore_index", -100)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = (torch.rand(v, generator=g) + 0.5).to(device)
    row_weight = torch.randn(n, generator=g)  # an advantage: either sign
    entropy_weight = -0.1 * torch.rand(n, generator=g)  # an entropy bonus
    entropy_grad = torch.randn(n, generator=g)
    return (x.to(device), t.to(device), kwargs, row_weight.to(device),
            entropy_weight.to(device), entropy_grad.to(device))


def _rows(t, ignore_index=-100):
    return t.shape[0] if t.is_floating_point() else int((t != ignore_index).sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_every_new_argument_with_every_option(backend, device, option, reduction):
    x, t, kwargs, rw, ew, eg = _problem(device, option)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, reduction=reduction, temperature=0.7,
                                    row_weight=rw, entropy_weight=ew, return_entropy=True,
                                    return_argmax=True, return_lse=True, backend=backend,
                                    **kwargs)
    go = torch.linspace(0.5, 1.5, N, device=device) if reduction == "none" else None
    out.loss.backward(go, inputs=[xg], retain_graph=True)
    (out.entropy * eg).sum().backward(inputs=[xg])
    ref_loss, ref_grad = reference(x, t, reduction=reduction, temperature=0.7, row_weight=rw,
                                   entropy_weight=ew, grad_output=go, entropy_grad=eg,
                                   **kwargs)
    assert_close(out.loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")
    ignore = kwargs.get("ignore_index", -100)
    H = entropy_reference(x, t, ignore, kwargs.get("softcap"), 0.7)
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == (N,)
    assert_close(out.entropy, H, torch.float32, "entropy")
    z = x if "softcap" not in kwargs else kwargs["softcap"] * torch.tanh(x / kwargs["softcap"])
    assert_close(out.lse, torch.logsumexp(z.double() / 0.7, 1), torch.float32, "lse")
    expected_argmax = x.argmax(1)
    if not t.is_floating_point():
        expected_argmax = torch.where(t == ignore, -1, expected_argmax)
    assert out.argmax.dtype == torch.int64
    assert torch.equal(out.argmax, expected_argmax)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_entropy_weight_as_a_number_with_spatial_dims(backend, device, reduction):
    # (N, C, d) input: the per-row tensors take the target's (N, d) shape.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, V, 4, generator=g).to(device)
    t = torch.randint(0, V, (3, 4), generator=g).to(device)
    t[1, 2] = -100
    rw = torch.rand(3, 4, generator=g).to(device)
    xg = x.clone().requires_grad_(True)
    # a 0-dim tensor is a number too
    ew = -0.3 if reduction != "sum" else torch.tensor(-0.3, device=device)
    loss = triton_xent.cross_entropy(xg, t, reduction=reduction, entropy_weight=ew,
                                     row_weight=rw, temperature=1.3, label_smoothing=0.1,
                                     backend=backend)
    go = torch.rand(3, 4, generator=g).to(device) if reduction == "none" else None
    loss.backward(go)
    ref_loss, ref_grad = reference(x, t, reduction=reduction, entropy_weight=-0.3,
                                   row_weight=rw, temperature=1.3, label_smoothing=0.1,
                                   grad_output=go)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_input(backend, device, dtype):
    x, t, kwargs, rw, ew, eg = _problem(device, "plain", seed=3)
    x = x.to(dtype)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, temperature=0.8, row_weight=rw, entropy_weight=ew,
                                    return_entropy=True, backend=backend, reduction="sum")
    (out.loss + (out.entropy * eg).sum()).backward()
    ref_loss, ref_grad = reference(x, t, reduction="sum", temperature=0.8, row_weight=rw,
                                   entropy_weight=ew, entropy_grad=eg)
    assert xg.grad.dtype == dtype and out.entropy.dtype == torch.float32
    assert_close(out.loss, ref_loss, dtype, "loss")
    assert_close(xg.grad, ref_grad, dtype, "grad")
    assert_close(out.entropy, entropy_reference(x, t, temperature=0.8), torch.float32,
                 "entropy")


def _edge_rows(v):
    """Rows where naive entropy code cancels or makes NaN, for v classes."""
    g = torch.Generator().manual_seed(v)
    x = torch.randn(6, v, generator=g)
    x[0] = 0.0
    x[0, 5] = 60.0  # peaked: H near 0 (about 60 v e^-60)
    x[1] = 1e-3 * torch.randn(v, generator=g)  # near-uniform: H near log v
    x[2] = 1e30  # huge equal logits: exactly log v
    x[3, ::3] = float("-inf")  # -inf logits: p log p = 0 there
    x[4] = float("-inf")
    x[4, 7] = 2.0  # one finite logit: H = 0 exactly
    x[5] = -1e30  # huge negative equal logits: log v
    return x


# V = 1000 and 4099: multiples of nothing the kernel uses (verl returned positive log-probs
# for V not a multiple of 256); 4099 > 4096 is past the last power-of-two block below it.
@pytest.mark.parametrize("v", [1000, 4099])
def test_entropy_numerics_at_the_edges(backend, device, v):
    x = _edge_rows(v).to(device)
    t = torch.tensor([5, 0, 1, 1, 7, 3], device=device)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, reduction="none", return_entropy=True,
                                    temperature=0.8, backend=backend)
    out.entropy.sum().backward()
    H = out.entropy
    assert torch.isfinite(H).all() and (H >= 0).all(), H
    log_v = math.log(v)
    assert abs(H[2].item() - log_v) < 1e-5 and abs(H[5].item() - log_v) < 1e-5
    assert H[4].item() == 0.0
    assert_close(H, entropy_reference(x, temperature=0.8), torch.float32, "entropy")
    assert H[0].item() < 1e-10  # peaked: no cancellation left behind
    assert abs(H[1].item() - log_v) < 1e-4
    _, ref_grad = reference(x, t, reduction="none", temperature=0.8,
                            grad_output=torch.zeros(6), entropy_grad=torch.ones(6))
    assert torch.isfinite(xg.grad).all()
    assert_close(xg.grad, ref_grad, torch.float32, "grad of H")
    # log-probabilities are never positive (the verl report): -loss = log p_y <= 0
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(8, v, generator=g)).to(device)
    labels = logits.argmax(1)  # the most likely token: log p closest to 0
    logp = -triton_xent.cross_entropy(logits, labels, reduction="none", temperature=0.8,
                                      backend=backend)
    assert (logp <= 0).all(), logp.max()


@pytest.fixture
def small_slices(monkeypatch):
    """Rows above one slice in the kernel (the torch backend has no slices: it runs as is)."""
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)


SPLIT_CASES = {
    "smoothing_mean": dict(label_smoothing=0.1, reduction="mean"),
    "smoothing_none": dict(label_smoothing=0.1, reduction="none"),
    "probabilities_softcap_zloss_weight_sum": dict(prob_target=True, softcap=20.0,
                                                   lse_square_scale=1e-3, weighted=True,
                                                   reduction="sum"),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_rows_above_one_slice(backend, device, small_slices, case):
    # V = 100: 4 slices of 32 (the last of 4 classes); the edge rows spread over them.
    kwargs = dict(SPLIT_CASES[case])
    prob = kwargs.pop("prob_target", False)
    x = _edge_rows(100)
    x[3] = torch.randn(100)
    x[3, :40] = float("-inf")  # the first slice all -inf, later ones finite
    x[0, 5] = 0.0
    x[0, 70] = 60.0  # the peak in the third slice
    x[2] = 1e3  # huge equal logits (1e30 would overflow the z-loss)
    x = x.to(device)
    t = torch.tensor([70, 3, -100, 50, 7, 99], device=device)
    if prob:
        t = torch.rand(6, 100, generator=torch.Generator().manual_seed(0)).softmax(1)
        t = t.to(device)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.linspace(0.5, 1.5, 100, device=device)
    rw = torch.linspace(-1, 1, 6, device=device)
    ew = torch.full((6,), -0.2, device=device)
    eg = torch.linspace(2, -2, 6, device=device)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, temperature=0.9, row_weight=rw, entropy_weight=ew,
                                    return_entropy=True, return_argmax=True, backend=backend,
                                    **kwargs)
    (out.loss.sum() + (out.entropy * eg).sum()).backward()
    ref_loss, ref_grad = reference(x, t, temperature=0.9, row_weight=rw, entropy_weight=ew,
                                   entropy_grad=eg, **kwargs)
    assert_close(out.loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")
    H = entropy_reference(x, t, softcap=kwargs.get("softcap"), temperature=0.9)
    assert_close(out.entropy, H, torch.float32, "H")
    first = [70, x[1].argmax().item(), 0, x[3].argmax().item(), 7, 0]
    if not prob:
        first[2] = -1  # the ignored row
    assert out.argmax.tolist() == first


def test_argmax_takes_the_first_index_on_ties(backend, device, small_slices):
    # Ties inside a slice, across slices (the merge keeps the smaller index), an all -inf
    # row (index 0, as torch.argmax), and a tie that only the softcap makes.
    x = torch.zeros(4, 100)
    x[0, [10, 20]] = 5.0
    x[1, [33, 70, 99]] = 5.0  # slices 1, 2 and 3
    x[2] = float("-inf")
    x[3, 40] = 1e4
    x[3, 41] = 1e5  # both saturate softcap 2 to 2.0 in float32: the first one wins
    x = x.to(device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    out = triton_xent.cross_entropy(x, t, reduction="none", softcap=2.0, return_argmax=True,
                                    backend=backend)
    assert out.argmax.tolist() == [10, 33, 0, 40]
    assert out.entropy is None and out.lse is None


def test_no_classes_with_the_new_options(backend, device):
    # (3, 0) logits, every row ignored: loss 0 per row, the entropy of nothing 0, no argmax.
    x = torch.empty(3, 0, device=device, requires_grad=True)
    t = torch.full((3,), -100, device=device)
    out = triton_xent.cross_entropy(x, t, reduction="none", entropy_weight=-0.1,
                                    row_weight=torch.ones(3, device=device), temperature=0.5,
                                    return_entropy=True, return_argmax=True, backend=backend)
    assert out.loss.tolist() == [0.0] * 3 and out.entropy.tolist() == [0.0] * 3
    assert out.argmax.tolist() == [-1] * 3


def test_grpo_loss_in_one_call_equals_the_naive_computation(backend, device):
    # GRPO: -sum_t A_t mask_t log pi(y_t) - c sum_t mask_t H_t, at a temperature.
    g = torch.Generator().manual_seed(4)
    logits = (2 * torch.randn(12, V, generator=g)).to(device)
    y = torch.randint(0, V, (12,), generator=g).to(device)
    mask = (torch.rand(12, generator=g) > 0.3).float().to(device)
    adv = torch.randn(12, generator=g).to(device)
    c, T = 0.01, 0.8
    ours = logits.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(ours, y, row_weight=adv * mask, entropy_weight=-c * mask,
                                     temperature=T, reduction="sum", backend=backend)
    loss.backward()
    naive = logits.double().clone().requires_grad_(True)
    logp = torch.log_softmax(naive / T, dim=1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    H = -(logp.exp() * logp).sum(1)
    expected = (-(adv * mask).double() * logp_y - c * mask.double() * H).sum()
    expected.backward()
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(ours.grad, naive.grad, torch.float32, "grad")


def test_return_forms(backend, device):
    x, t, *_ = _problem(device, "plain")
    loss, lse = triton_xent.cross_entropy(x, t, return_lse=True, backend=backend)
    assert lse.shape == (N,)
    out = triton_xent.cross_entropy(x, t, return_entropy=True, backend=backend)
    assert isinstance(out, triton_xent.CrossEntropyOutput)
    assert out.lse is None and out.argmax is None and out.entropy.shape == (N,)
    loss2, lse2, H, idx = triton_xent.cross_entropy(x, t, return_lse=True, return_argmax=True,
                                                    backend=backend)
    assert H is None and torch.equal(lse2, lse) and idx.shape == (N,)
    torch.testing.assert_close(loss2, loss)
    # No extra in the loss: the same value as without the options.
    torch.testing.assert_close(out.loss, loss)


def test_temperature_scales_the_gradient(backend, device):
    # z = x / 0.25 = 4x: the loss of x at T = 0.25 is that of 4x at T = 1, and its gradient
    # is 4 times the gradient at 4x.
    x, t, *_ = _problem(device, "plain", scale=1.0)
    a = x.clone().requires_grad_(True)
    triton_xent.cross_entropy(a, t, temperature=0.25, backend=backend).backward()
    b = (4 * x).clone().requires_grad_(True)
    triton_xent.cross_entropy(b, t, backend=backend).backward()
    torch.testing.assert_close(a.grad, 4 * b.grad, **TOL[torch.float32])


def test_modules_take_the_new_options(backend, device):
    x, t, _, rw, _, _ = _problem(device, "plain")
    crit = triton_xent.CrossEntropyLoss(temperature=0.7, entropy_weight=-0.1,
                                        return_entropy=True, reduction="sum", backend=backend)
    assert "temperature=0.7" in repr(crit) and "entropy_weight=-0.1" in repr(crit)
    out = crit(x, t, row_weight=rw)
    ref_loss, _ = reference(x, t, reduction="sum", temperature=0.7, entropy_weight=-0.1,
                            row_weight=rw)
    assert_close(out.loss, ref_loss, torch.float32, "module loss")


@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936], ids=["llama3_128256", "qwen_151936"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_real_lm_vocabularies_on_cuda(V, dtype):
    # Split rows at real vocabularies (bf16 logits, fp32 statistics), every new argument.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (4 * torch.randn(64, V, device="cuda", generator=g)).to(dtype)
    t = torch.randint(0, V, (64,), device="cuda", generator=g)
    t[::7] = -100
    rw = torch.randn(64, device="cuda", generator=g)
    ew = -0.01 * torch.rand(64, device="cuda", generator=g)
    eg = torch.randn(64, device="cuda", generator=g)
    xg = x.clone().requires_grad_(True)
    out = triton_xent.cross_entropy(xg, t, temperature=0.8, row_weight=rw, entropy_weight=ew,
                                    return_entropy=True, return_argmax=True, reduction="sum",
                                    softcap=30.0, backend="triton")
    (out.loss + (out.entropy * eg).sum()).backward()
    ref_loss, ref_grad = reference(x, t, temperature=0.8, row_weight=rw, entropy_weight=ew,
                                   entropy_grad=eg, reduction="sum", softcap=30.0)
    assert_close(out.loss, ref_loss, dtype, "loss")
    assert_close(xg.grad, ref_grad, dtype, "grad")
    H = entropy_reference(x, t, softcap=30.0, temperature=0.8)
    assert_close(out.entropy, H, dtype, "entropy")
    assert (out.entropy >= 0).all()


# --- through the linear op ----------------------------------------------------------------


def _linear_problem(device, seed=0, lead=(2, 5), d=13, v=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5 * 2
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, lead, generator=g)
    t.view(-1)[3] = -100
    rw = torch.randn(*lead, generator=g)
    ew = -0.1 * torch.rand(*lead, generator=g)
    eg = torch.randn(*lead, generator=g)
    return tuple(a.to(device) for a in (h, w, b, t, rw, ew, eg))


@pytest.mark.parametrize("schedule", ["rows", "vocab"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_op_with_every_new_argument(backend, device, reduction, schedule, monkeypatch):
    # "none" with a trainable head recomputes in backward; "mean" and "sum" do not, except
    # for the returned entropy's own gradient. Row 3 is ignored. "rows": chunks of 3 rows;
    # "vocab" (config.LINEAR_SCHEDULE): blocks of 3 classes over the 9 kept rows, in passes
    # whose statistics (entropy and argmax included) merge over the blocks.
    h, w, b, t, rw, ew, eg = _linear_problem(device)
    leaves = [a.clone().requires_grad_(True) for a in (h, w, b)]
    if schedule == "rows":
        tuning = dict(chunk_size=3)
    else:
        monkeypatch.setitem(config.LINEAR_SCHEDULE, torch.device(device).type,
                            "vocab")
        monkeypatch.setattr(config, "LINEAR_VOCAB_BLOCK_MULTIPLE", 1)
        tuning = dict(memory_budget_bytes=9 * 4 * 3)
    out = triton_xent.linear_cross_entropy(
        *leaves[:2], t, linear_bias=leaves[2], reduction=reduction, temperature=0.8,
        label_smoothing=0.1, lse_square_scale=1e-2, row_weight=rw, entropy_weight=ew,
        return_entropy=True, return_argmax=True, backend=backend, **tuning)
    go = torch.rand(t.shape, device=device) + 0.5 if reduction == "none" else None
    out.loss.backward(go, retain_graph=True)
    (out.entropy * eg).sum().backward()
    h64, w64, b64 = (a.double().requires_grad_(True) for a in (h, w, b))
    logits = h64.reshape(-1, h.shape[-1]) @ w64.T + b64
    ref_loss, d_logits = reference(logits, t.reshape(-1), reduction=reduction, temperature=0.8,
                                   label_smoothing=0.1, lse_square_scale=1e-2,
                                   row_weight=rw.reshape(-1), entropy_weight=ew.reshape(-1),
                                   grad_output=go.reshape(-1) if go is not None else None,
                                   entropy_grad=eg.reshape(-1))
    logits.backward(d_logits)
    assert_close(out.loss, ref_loss.reshape(out.loss.shape), torch.float32, "loss")
    for name, got, want in zip(("d_input", "d_weight", "d_bias"), leaves, (h64, w64, b64)):
        assert_close(got.grad, want.grad, torch.float32, name)
    H = entropy_reference(logits, t.reshape(-1), temperature=0.8).reshape(t.shape)
    assert_close(out.entropy, H, torch.float32, "entropy")
    expected_argmax = torch.where(t == -100, -1, logits.detach().argmax(1).reshape(t.shape))
    assert torch.equal(out.argmax, expected_argmax)


def test_linear_module_and_unchecked_targets(backend, device):
    # check_targets=False computes the ignored rows too (and zeroes them): the same results.
    h, w, b, t, rw, ew, _ = _linear_problem(device, seed=2)
    crit = triton_xent.LinearCrossEntropyLoss(temperature=1.5, return_entropy=True,
                                              return_argmax=True, backend=backend,
                                              chunk_size=4)
    results = []
    for check in (True, False):
        crit.check_targets = check
        results.append(crit(h, w, t, b, row_weight=rw, entropy_weight=ew))
    for a, e in zip(results[0], results[1]):
        if a is not None:
            torch.testing.assert_close(a, e)
    assert results[0].argmax.view(-1)[3] == -1 and results[0].entropy.view(-1)[3] == 0


# --- torch.compile -------------------------------------------------------------------------


def test_compiled_rl_step_equals_eager(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V).to(device)
    h = torch.randn(10, 16, device=device)
    y = torch.randint(0, V, (10,), device=device)
    y[4] = -100
    adv = torch.randn(10, device=device)

    def step(h, y, adv):
        out = triton_xent.cross_entropy(head(h), y, temperature=0.8, row_weight=adv,
                                        entropy_weight=-0.01, return_entropy=True,
                                        return_argmax=True, reduction="sum",
                                        backend=backend, check_targets=False)
        hidden_out = triton_xent.linear_cross_entropy(
            h, head.weight, y, linear_bias=head.bias, temperature=0.8, row_weight=adv,
            return_entropy=True, reduction="sum", backend=backend, check_targets=False,
            chunk_size=4)
        accuracy = (out.argmax == y).float().mean()
        return out.loss + out.entropy.sum() + hidden_out.loss + hidden_out.entropy.sum(), \
            accuracy

    compiled = torch.compile(step, fullgraph=True)
    loss, acc = compiled(h, y, adv)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    eager, eager_acc = step(h, y, adv)
    eager.backward()
    assert_close(loss, eager, torch.float32, "loss")
    torch.testing.assert_close(acc, eager_acc)
    for got, p in zip(compiled_grads, head.parameters()):
        assert_close(got, p.grad, torch.float32, "parameter gradient")


# --- bad input ------------------------------------------------------------------------------


def _bad(rows):
    """Bad new arguments for a loss of `rows` shape: (kwargs, error, message)."""
    ones = lambda shape=rows, **kw: torch.ones(shape, **kw)  # noqa: E731
    shape = str(tuple(rows)).replace("(", r"\(").replace(")", r"\)")
    return {
        "temperature_0": (dict(temperature=0.0), ValueError,
                          "temperature must be a finite number > 0"),
        "temperature_negative": (dict(temperature=-1.0), ValueError, "temperature must be"),
        "temperature_inf": (dict(temperature=float("inf")), ValueError, "temperature must be"),
        "temperature_nan": (dict(temperature=float("nan")), ValueError, "temperature must be"),
        "temperature_str": (dict(temperature="hot"), TypeError, "temperature must be a number"),
        "row_weight_shape": (dict(row_weight=ones((3,))), ValueError,
                             f"row_weight must have the unreduced loss's shape {shape}"),
        "row_weight_int": (dict(row_weight=ones(dtype=torch.long)), TypeError,
                           "row_weight must be a floating-point tensor"),
        "row_weight_list": (dict(row_weight=[1.0]), TypeError, "row_weight must be a tensor"),
        "row_weight_requires_grad": (dict(row_weight=ones(requires_grad=True)), ValueError,
                                     "gives row_weight no gradient"),
        "entropy_weight_shape": (dict(entropy_weight=ones((3,))), ValueError,
                                 f"entropy_weight must have the unreduced loss's shape {shape}"),
        "entropy_weight_requires_grad": (dict(entropy_weight=ones(requires_grad=True)),
                                         ValueError, "gives entropy_weight no gradient"),
        "entropy_weight_inf": (dict(entropy_weight=float("inf")), ValueError,
                               "entropy_weight must be finite"),
        "entropy_weight_str": (dict(entropy_weight="x"), TypeError,
                               "entropy_weight must be a number or a per-row float tensor"),
    }


def _on(kwargs, device):
    return {k: v.detach().to(device).requires_grad_(v.requires_grad) if torch.is_tensor(v)
            else v for k, v in kwargs.items()}


@pytest.mark.parametrize("case", list(_bad((N,))))
def test_bad_new_arguments_raise_and_leave_the_inputs_untouched(backend, device, case):
    x, t, *_ = _problem(device, "plain")
    xg = x.clone().requires_grad_(True)
    kwargs, error, match = _bad((N,))[case]
    with pytest.raises(error, match=match):
        triton_xent.cross_entropy(xg, t, backend=backend, **_on(kwargs, device))
    assert torch.equal(xg.detach(), x) and xg.grad is None
    h, w, b, tl, *_ = _linear_problem(device)
    leaves = [a.clone().requires_grad_(True) for a in (h, w, b)]
    kwargs, error, match = _bad(tl.shape)[case]
    with pytest.raises(error, match=match):
        triton_xent.linear_cross_entropy(*leaves[:2], tl, linear_bias=leaves[2],
                                         backend=backend, **_on(kwargs, device))
    for leaf, a in zip(leaves, (h, w, b)):
        assert torch.equal(leaf.detach(), a) and leaf.grad is None


def test_inplace_backward_refuses_return_entropy(backend, device):
    x, t, *_ = _problem(device, "plain")
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    with pytest.raises(ValueError, match="inplace_backward spends"):
        triton_xent.cross_entropy(logits, t, inplace_backward=True, return_entropy=True,
                                  backend=backend)
    assert torch.equal(logits.detach(), x)
    # entropy_weight needs no recomputation: it works in place
    loss = triton_xent.cross_entropy(logits, t, inplace_backward=True, entropy_weight=-0.2,
                                     temperature=0.9, backend=backend)
    loss.backward()
    ref_loss, ref_grad = reference(x, t, entropy_weight=-0.2, temperature=0.9)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")
