"""The one reference (PyTorch in float64) and the per-dtype tolerances of every test, the
row sweep in small blocks, and the spawning of the distributed tests' ranks."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F

# Tests that compare with torch's own F.linear_cross_entropy, which torch 2.13 introduced;
# they skip on the older stacks that tools/stacks.sh runs.
needs_torch_linear_cross_entropy = pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"),
    reason=f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")

# Loss and gradient tolerances against the float64 reference, per input dtype. Low-precision
# inputs are judged by the rounding of the input itself (bf16 keeps 8 bits of mantissa).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def reference(x, target, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, lse_square_scale=0.0, softcap=None, grad_output=None,
              temperature=1.0, row_weight=None, entropy_weight=0.0, entropy_grad=None):
    """(loss, input gradient) in float64 from F.cross_entropy, plus our z-loss, softcap,
    temperature, row weights and entropy term (entropy_weight * H, H from
    torch.special.entr); entropy_grad: an upstream gradient of the returned entropy (its
    term sum(entropy_grad * H) joins the differentiated sum).

    The input is rounded to its own dtype first (it is what the kernel sees), then promoted.
    grad_output: the upstream gradient; 1 when None.
    """
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    z = softcap * torch.tanh(x64 / softcap) if softcap is not None else x64
    z = z / temperature
    prob = target.is_floating_point()
    t = target.to(torch.float64) if prob else target.long()
    w = weight.to(torch.float64) if weight is not None else None
    cdim = 1 if z.dim() > 1 else 0
    lse = torch.logsumexp(z, dim=cdim)
    keep = torch.ones_like(lse) if prob else (target != ignore_index).to(torch.float64)
    zero = torch.zeros_like(lse)  # terms not asked for are left out (edge rows hold inf)
    zl = lse_square_scale * lse * lse * keep if lse_square_scale else zero
    # H = -sum p log p, differentiated through log_softmax; where p = 0 (a -inf logit) the
    # term is 0 with a zero gradient (entr's own gradient there is 0 * inf)
    logp = torch.log_softmax(z, dim=cdim)
    p = logp.exp()
    H = -(p * torch.where(p > 0, logp, 0.0)).sum(cdim)
    H = torch.where(keep > 0, H, 0.0)
    ent = zero
    if torch.is_tensor(entropy_weight) or entropy_weight:
        ent = (entropy_weight.to(torch.float64) if torch.is_tensor(entropy_weight)
               else entropy_weight) * H
    if row_weight is None:
        loss = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    else:  # each row's CE and z-loss times its weight; "mean" keeps the usual denominators
        r = row_weight.to(torch.float64)
        ce = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
        loss = r * ce
        zl = r * zl
        if reduction == "sum":
            loss = loss.sum()
        elif reduction == "mean":
            w_y = keep if prob or w is None else w[t.clamp(min=0)] * keep
            loss = loss.sum() / w_y.sum()
    if reduction == "none":
        loss = loss + zl + ent
    elif reduction == "sum":
        loss = loss + zl.sum() + ent.sum()
    else:
        loss = loss + (zl.sum() + ent.sum()) / keep.sum()
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(torch.float64)
    total = (loss * go).sum()
    if entropy_grad is not None:
        total = total + (entropy_grad.to(torch.float64) * H).sum()
    total.backward()
    return loss.detach(), x64.grad


def entropy_reference(x, target=None, ignore_index=-100, softcap=None, temperature=1.0):
    """The per-row entropy of the tempered distribution in float64 (torch.special.entr), 0
    on ignored rows."""
    z = x.detach().to(torch.float64)
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    cdim = 1 if z.dim() > 1 else 0
    H = torch.special.entr(torch.softmax(z / temperature, dim=cdim)).sum(cdim)
    if target is not None and not target.is_floating_point():
        H = torch.where(target == ignore_index, 0.0, H)
    return H


def distill_reference(x, teacher, target=None, *, divergence="forward_kl", beta=0.5,
                      temperature=1.0, ignore_index=-100, reduction="batchmean",
                      grad_output=None):
    """(loss, student gradient) of distillation_loss in float64, by autograd of the issue's
    formulas on log_softmax over the last dimension (terms with a zero probability taken as
    0). Inputs are rounded to their own dtypes first, then promoted; grad_output: the
    upstream gradient (1 when None)."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    lp_s = torch.log_softmax(x64 / temperature, -1)
    lp_t = torch.log_softmax(teacher.detach().to(torch.float64) / temperature, -1)
    p_s, p_t = lp_s.exp(), lp_t.exp()

    def kl(p, log_p, log_q):  # sum p (log p - log q), 0 where p = 0
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)

    if divergence == "forward_kl":
        rows = kl(p_t, lp_t, lp_s)
    elif divergence == "reverse_kl":
        rows = kl(p_s, lp_s, lp_t)
    else:
        log_m = torch.log(beta * p_t + (1.0 - beta) * p_s)
        rows = beta * kl(p_t, lp_t, log_m) + (1.0 - beta) * kl(p_s, lp_s, log_m)
    keep = (torch.ones_like(rows) if target is None
            else (target != ignore_index).to(torch.float64))
    rows = torch.where(keep > 0, rows, 0.0)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / keep.sum().clamp(min=1.0)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(torch.float64)
    (loss * go).sum().backward()
    return loss.detach(), x64.grad


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[dtype])


def sweep_in_small_blocks(monkeypatch, *, block_v=32, prefetch=True, stages=1, reverse=True,
                          programs_per_sm=None):
    """The row sweep (config.LONG_ROWS = "sweep") in blocks of block_v columns (32: rows of
    33 .. 257 take 2 .. 9), with its knobs; programs_per_sm set caps the interpreter's grid
    at 3 programs walking the rows."""
    from triton_xent import config

    monkeypatch.setattr(config, "SWEEP_BLOCK_V", block_v)
    monkeypatch.setattr(config, "SWEEP_PREFETCH", prefetch)
    monkeypatch.setattr(config, "SWEEP_STAGES", stages)
    monkeypatch.setattr(config, "SWEEP_REVERSE", reverse)
    monkeypatch.setattr(config, "SWEEP_PROGRAMS_PER_SM", programs_per_sm)


def spawn_ranks(worker, args: tuple, world: int, tmp_path, timeout: float) -> list:
    """Runs worker(rank, *args) in `world` spawned processes, waiting at most `timeout`
    seconds for each. A worker's saved traceback (tmp_path / f"rank{r}.err") or a hang fails
    the test; returns the processes."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = {r: (tmp_path / f"rank{r}.err").read_text()
              for r in range(world) if (tmp_path / f"rank{r}.err").exists()}
    assert not errors, f"worker failures: {errors}"
    assert not hung, f"ranks {hung} did not finish"
    return procs
