"""Whole rows as (ROWS, BLOCK_V) tiles (kernels/xent.py _rows_kernel): short rows, as an image
classifier's, share a program. The tile is shrunk here so that a few rows make several
tiles, the last one part-full."""

import pytest
import torch

import triton_xent
from helpers import assert_close, reference
from triton_xent import config

pytest.importorskip("triton")
from triton_xent.kernels import xent  # noqa: E402

SCHEDULES = {"one_per_tile": (False, 1), "persistent": (True, 2)}


@pytest.fixture(params=list(SCHEDULES))
def small_tiles(request, monkeypatch):
    monkeypatch.setattr(config, "ROWS_TILE_ELEMENTS", 64)  # V = 2: 32 rows a tile; V = 10: 4
    persistent, per_sm = SCHEDULES[request.param]
    monkeypatch.setattr(config, "PERSISTENT", persistent)
    monkeypatch.setattr(config, "PERSISTENT_PROGRAMS_PER_SM", per_sm)


# Two classes (a binary classifier), ten, and a row longer than the shrunk tile (one row a
# tile); 37 rows leave the last tile part-full.
@pytest.mark.parametrize("V, kwargs", [
    (2, {}),
    (10, dict(label_smoothing=0.2, weighted=True, ignore_index=3)),
    (100, dict(softcap=2.0, lse_square_scale=1e-2, reduction="none")),
], ids=["V2-plain", "V10-smoothing-weight-ignore", "V100-softcap-zloss-none"])
def test_short_rows_share_tiles(small_tiles, device, V, kwargs):
    kwargs = dict(kwargs)
    g = torch.Generator().manual_seed(V)
    x = (3 * torch.randn(37, V, generator=g)).to(device)
    t = torch.randint(0, V, (37,), generator=g).to(device)
    t[1] = 3 % V
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.rand(V, generator=g).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, t, backend="triton", **kwargs)
    loss.backward(torch.full_like(loss, 0.5))
    ref_loss, ref_grad = reference(x, t, grad_output=torch.full_like(loss, 0.5), **kwargs)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_short_rows_with_positions_and_probability_targets(small_tiles, device):
    # (N, C, d) input: the rows of a tile are (sample, position) pairs with a stride between
    # positions, not between samples.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 7, generator=g).to(device)
    p = torch.rand(5, 6, 7, generator=g).softmax(1).to(device)
    xg = x.clone().requires_grad_(True)
    loss = triton_xent.cross_entropy(xg, p, backend="triton")
    loss.backward()
    ref_loss, ref_grad = reference(x, p)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")


def test_short_rows_of_an_odd_strided_view(small_tiles, device):
    # Rows 13 elements apart: no row alignment to promise (ROW_ALIGN 1).
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 13, generator=g).to(device)
    x = wide[:, 2:12]
    t = torch.randint(0, 10, (20,), generator=g).to(device)
    assert xent.row_align(10, x.unsqueeze(-1)) == 1
    loss = triton_xent.cross_entropy(x, t, reduction="sum", backend="triton")
    assert_close(loss, reference(x, t, reduction="sum")[0], torch.float32, "loss")


@pytest.mark.parametrize("shape, dtype, expected", [
    ((4, 1000, 1), torch.bfloat16, 8),  # 2000-byte rows: 16-byte aligned, 8 elements
    ((4, 1000, 1), torch.float32, 4),
    ((4, 10, 1), torch.bfloat16, 2),
    ((4, 100, 1), torch.bfloat16, 4),
    ((4, 7, 1), torch.float32, 1),
    ((1, 10, 1), torch.bfloat16, 2),  # one row: only V constrains
    ((4, 8, 3), torch.float32, 1),  # positions 1 element apart
], ids=lambda v: str(v))
def test_row_align_is_what_every_row_start_and_V_share(shape, dtype, expected):
    x = torch.zeros(shape, dtype=dtype)
    assert xent.row_align(shape[1], x) == expected


def test_vocab_parallel_slices_longer_than_a_block_match_one_block(device, monkeypatch):
    # A rank's slice of 100 classes: statistics looped over 32-column blocks, gradient from
    # a grid of column blocks, against the same slice in one block (tests/test_distributed.py
    # checks the one-block kernels against a single process).
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(6, 100, 1, generator=g)).to(device)
    t = torch.tensor([0, 150, 99, 120, -100, 7], device=device)  # in, beyond, and ignored
    w = torch.rand(300, generator=g).to(device)
    opts = dict(class_offset=0, n_classes=300, ignore_index=-100, label_smoothing=0.1,
                softcap=5.0)

    def run():
        stats, _ = xent.xent_slice_stats(x, t, w, **opts)
        grad = torch.empty_like(x)
        row_stats = torch.cat([stats[:, :4], torch.zeros_like(stats[:, :1])], 1)  # H = 0
        xent.xent_slice_grad(x, t, w, row_stats, None, grad, None, None,
                             lse_square_scale=0.01, **opts)
        return stats, grad

    one_block = run()
    monkeypatch.setattr(config, "ROW_SLICE_MAX_V", 32)
    monkeypatch.setattr(config, "ROWS_TILE_ELEMENTS", 64)
    for blocked, whole in zip(run(), one_block):
        torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)


# The backward's scaling kernel takes tiles of rows too: per-row factors, some 1 (their tile
# may still be scaled for its other rows), on short rows (many a tile), on rows longer than
# its block (two blocks), and with positions between the samples' rows.
@pytest.mark.parametrize("shape", [(37, 10), (3, 70), (4, 6, 5)],
                         ids=["short_rows", "two_blocks", "positions"])
def test_scale_rows_takes_tiles_of_rows(monkeypatch, device, shape):
    monkeypatch.setattr(config, "ROWS_TILE_ELEMENTS", 64)
    monkeypatch.setattr(config, "SCALE_BLOCK_V", 32)
    g = torch.Generator().manual_seed(11)
    grad = torch.randn(*shape, generator=g).to(device)
    rows = grad.unsqueeze(-1) if grad.dim() == 2 else grad.flatten(2)
    factors = torch.randn(rows.shape[0] * rows.shape[2], generator=g)
    factors[::3] = 1.0
    expected = rows * factors.view(rows.shape[0], 1, rows.shape[2]).to(device)
    xent.scale_rows_(rows, factors.to(device))
    torch.testing.assert_close(rows, expected)

