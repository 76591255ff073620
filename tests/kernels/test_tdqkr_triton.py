"""The fused TDQKR selection (kernels/tdqkr.py K1) against the reference, under Triton's
interpreter without CUDA (see kernel_checks.py).

On continuous random inputs scores have no ties, so the kernel must choose exactly the reference's
rows and columns in the same order. Where scores tie, `torch.topk` (and so the reference) leaves
the order unspecified; there the kernel is held to its documented rule (ties to the lower key id,
then the lower cell row·n + col) by `tie_rule_topm`, which applies that rule in fp64.
"""

import os

import pytest
import torch
from kernel_checks import DEVICE, REL_TOL, rel_err

from umv2cli.kernels import tdqkr


def random_scores(B, R, N, C, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(B, R, N, generator=gen)
    s_col = torch.randn(B, R, N, generator=gen)
    cores = torch.rand(C, R, R, generator=gen)
    u, v = tdqkr.rank1_vectors(cores, torch.zeros(R), torch.zeros(R))
    return [t.to(dtype).to(DEVICE) for t in (s_row, s_col, cores, u, v)]


def scores_at(s_row, s_col, cores, rows, cols):
    """s_{j,c} = S_row[:, row_j]^T C_c S_col[:, col_j] of given cells, by plain autograd ops."""
    sr_BMR = s_row.gather(2, rows[:, None, :].expand(-1, s_row.shape[1], -1)).transpose(1, 2)
    sc_BMR = s_col.gather(2, cols[:, None, :].expand(-1, s_col.shape[1], -1)).transpose(1, 2)
    return torch.einsum("bmr,crs,bms->bmc", sr_BMR, cores, sc_BMR)


def run_both(inputs, k_rc, m, *, reference):
    """The kernel on `inputs` and `reference` on fp64 copies; a random ∂s through both.
    Returns ((rows, cols, scores), grads) for each, on the CPU."""
    s_row, s_col, cores, u, v = inputs
    ours = [t.clone().requires_grad_(True) for t in (s_row, s_col, cores)]
    rows, cols, scores = tdqkr.select_topm(*ours, u, v, k_rc, m, impl="triton")
    ref = [t.double().cpu().requires_grad_(True) for t in (s_row, s_col, cores)]
    ref_rows, ref_cols, ref_scores = reference(*ref, u.double().cpu(), v.double().cpu(), k_rc, m)
    dscores = torch.randn(scores.shape, generator=torch.Generator().manual_seed(9)).to(scores)
    scores.backward(dscores)
    ref_scores.backward(dscores.double().cpu())
    return ((rows.cpu(), cols.cpu(), scores.cpu()), [t.grad.cpu() for t in ours],
            (ref_rows, ref_cols, ref_scores), [t.grad for t in ref])


def assert_matches(inputs, k_rc, m, dtype, reference=tdqkr.select_topm_reference):
    (rows, cols, scores), grads, (ref_rows, ref_cols, ref_scores), ref_grads = run_both(
        inputs, k_rc, m, reference=reference)
    assert rows.dtype == cols.dtype == torch.int64 and scores.dtype == inputs[0].dtype
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert rel_err(scores, ref_scores) < REL_TOL[dtype], "scores"
    for name, a, b in zip(("s_row", "s_col", "cores"), grads, ref_grads):
        assert a.dtype == {"cores": inputs[2].dtype}.get(name, inputs[0].dtype), name
        assert rel_err(a, b) < REL_TOL[dtype], f"grad of {name}"


SHAPES = [  # B, r, n, C, k_rc, m: odd sizes (masks), r = 1..3, C = 1..3, m > k_rc (rows repeat)
    (5, 2, 9, 2, 5, 7),
    (3, 3, 13, 1, 6, 20),
    (4, 2, 6, 3, 6, 36),  # k_rc = n and m = k_rc²: the whole grid, in order
    (3, 1, 7, 2, 3, 4),
    (2, 2, 40, 2, 11, 9),  # n > 32: a wider prefilter block than the candidates
]
TILED = [  # k_rc > 32: the grid streams through several tiles, the last ones partial
    (2, 2, 50, 2, 40, 24),
    (2, 1, 30, 1, 24, 150),  # m > 128: many cells of every tile ranked and merged
]


def grid_tiles(N, k_rc, m):
    blocks = tdqkr._blocks(2, N, k_rc, m)
    return -(-k_rc // blocks["BLOCK_I"]) * -(-k_rc // blocks["BLOCK_J"])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("B,R,N,C,k_rc,m", SHAPES + TILED)
def test_triton_select_equals_reference_fp32(B, R, N, C, k_rc, m):
    assert (B, R, N, C, k_rc, m) in SHAPES or grid_tiles(N, k_rc, m) > 1
    assert_matches(random_scores(B, R, N, C, seed=B + N), k_rc, m, torch.float32)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype,cores_dtype", [(torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])  # bf16 autocast
def test_triton_select_half_precision(dtype, cores_dtype):
    s_row, s_col, cores, u, v = random_scores(4, 2, 11, 2, dtype=dtype, seed=3)
    assert_matches([s_row, s_col, cores.to(cores_dtype), u.float(), v.float()], 5, 12, dtype)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("layout", ["token-major", "rank-major"])
def test_triton_select_reads_strided_row_and_column_views(layout):
    """The layer passes the two sides of one [B, 2, r, n] score tensor, which its einsum lays out
    rank-major ([2, r, B, n] in memory): no copies, same result, same gradient."""
    s_row, s_col, cores, u, v = random_scores(3, 2, 10, 2, seed=5)
    if layout == "token-major":
        s_BSRN = torch.stack([s_row, s_col], 1).requires_grad_(True)
        sides = s_BSRN.unbind(1)
    else:
        s_SRBN = torch.stack([s_row, s_col], 0).transpose(1, 2).contiguous().requires_grad_(True)
        s_BSRN = s_SRBN.permute(2, 0, 1, 3)
        sides = s_BSRN.unbind(1)
        assert sides[0].stride() == (10, 3 * 10, 1)
    assert all(tdqkr._keys_contiguous(side) is side for side in sides)
    rows, cols, scores = tdqkr.select_topm(*sides, cores, u, v, 4, 6, impl="triton")
    scores.sum().backward()
    grad_BSRN = s_BSRN.grad if layout == "token-major" else s_SRBN.grad.permute(2, 0, 1, 3)
    flat = [t.detach().clone().requires_grad_(True) for t in (s_row, s_col)]
    rows2, cols2, scores2 = tdqkr.select_topm(*flat, cores, u, v, 4, 6, impl="triton")
    scores2.sum().backward()
    assert torch.equal(rows, rows2) and torch.equal(cols, cols2) and torch.equal(scores, scores2)
    assert torch.equal(grad_BSRN, torch.stack([flat[0].grad, flat[1].grad], 1))


def tie_rule_topm(s_row, s_col, cores, u, v, k_rc, m):
    """TDQKR in fp64 with the kernel's tie rule: candidates by score, ties to the lower key id;
    cells by score, ties to the lower cell row·n + col."""
    B, R, N = s_row.shape
    rows, cols = [], []
    for b in range(B):
        i_K = torch.sort(u @ s_row[b], descending=True, stable=True).indices[:k_rc]
        j_K = torch.sort(v @ s_col[b], descending=True, stable=True).indices[:k_rc]
        grid = s_row[b][:, i_K].T @ cores.sum(0) @ s_col[b][:, j_K]
        cell = (i_K[:, None] * N + j_K[None, :]).flatten()
        by_cell = cell.argsort()
        best = by_cell[torch.sort(grid.flatten()[by_cell], descending=True, stable=True).indices[:m]]
        rows.append(cell[best] // N)
        cols.append(cell[best] % N)
    rows, cols = torch.stack(rows), torch.stack(cols)
    return rows, cols, scores_at(s_row, s_col, cores, rows, cols)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype,N,k_rc,m", [(torch.float32, 12, 5, 11), (torch.float16, 12, 5, 11),
                                             (torch.float32, 24, 20, 12)])  # the last: several tiles
def test_triton_select_breaks_ties_by_the_lower_id(dtype, N, k_rc, m):
    """Small integers: every product is exact and ties are everywhere, at the k_rc and the m
    boundary and across grid tiles too. The kernel repeats itself bit for bit and follows its rule."""
    gen = torch.Generator().manual_seed(11)
    s_row, s_col = (torch.randint(-2, 3, (4, 2, N), generator=gen).to(dtype) for _ in range(2))
    cores = torch.randint(0, 3, (2, 2, 2), generator=gen).to(dtype)
    s_row[:, :, 7] = s_row[:, :, 2]  # a duplicated key: equal prefilter scores and equal cells
    u, v = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -1.0])
    inputs = [t.to(DEVICE) for t in (s_row, s_col, cores, u, v)]
    assert_matches(inputs, k_rc, m, dtype, reference=tie_rule_topm)
    first = tdqkr.select_topm(*inputs, k_rc, m, impl="triton")
    second = tdqkr.select_topm(*inputs, k_rc, m, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_select_switch_and_one_line_errors():
    s_row, s_col, cores, u, v = random_scores(2, 2, 6, 2)
    expected = tdqkr.select_topm_reference(s_row, s_col, cores, u, v, 3, 4)
    got = tdqkr.select_topm(s_row, s_col, cores, u, v, 3, 4, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if DEVICE == "cpu":  # auto = Triton iff the scores are on CUDA
        got = tdqkr.select_topm(s_row, s_col, cores, u, v, 3, 4)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    call = dict(s_row_BRN=s_row, s_col_BRN=s_col, cores_CRR=cores, u_R=u, v_R=v, k_rc=3, topm=4,
                impl="triton")
    bad = {
        "impl='cuda'": dict(impl="cuda"),
        "k_rc ≤ n=6": dict(k_rc=7),
        "topm ≤ k_rc²": dict(topm=10),
        "one dtype": dict(s_col_BRN=s_col.half()),
        "cores must be": dict(cores_CRR=cores[:, :1]),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            tdqkr.select_topm(**{**call, **change})


def test_interpreter_runs_the_selection_kernels_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(tdqkr._tdqkr_fwd_kernel).__name__ == "InterpretedFunction"
        assert type(tdqkr._tdqkr_bwd_kernel).__name__ == "InterpretedFunction"
