"""TDQKR selection (kernels/tdqkr.py) against brute force over the full n² grid."""

import pytest
import torch

from umv2cli.kernels.tdqkr import rank1_vectors, select_topm_reference


def random_scores(B, R, N, C, *, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(B, R, N, generator=gen, dtype=dtype)
    s_col = torch.randn(B, R, N, generator=gen, dtype=dtype)
    cores = torch.rand(C, R, R, generator=gen, dtype=dtype)
    return s_row, s_col, cores


def bruteforce_topm(s_row, s_col, cores, m):
    """Score every one of the n² cells with every core; top-m of the sum."""
    grid_BCNN = torch.einsum("brn,crs,bsk->bcnk", s_row, cores, s_col)
    cells = grid_BCNN.sum(1).flatten(1).topk(m).indices
    per_core = grid_BCNN.flatten(2).gather(2, cells[:, None, :].expand(-1, cores.shape[0], -1))
    return cells, per_core.transpose(1, 2)


@pytest.mark.parametrize("B,R,N,C,m", [(7, 2, 9, 2, 5), (3, 3, 13, 1, 20), (5, 2, 6, 4, 36)])
def test_tdqkr_with_full_krc_equals_bruteforce_topm(B, R, N, C, m):
    s_row, s_col, cores = random_scores(B, R, N, C)
    u, v = rank1_vectors(cores, torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64))
    rows, cols, scores = select_topm_reference(s_row, s_col, cores, u, v, k_rc=N, topm=m)
    cells, expected = bruteforce_topm(s_row, s_col, cores, m)
    assert torch.equal(rows * N + cols, cells)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_gradients_reach_scores_and_cores_but_not_rank1_vectors():
    B, R, N, C = 4, 2, 8, 2
    s_row, s_col, cores = random_scores(B, R, N, C)
    u, v = rank1_vectors(cores, torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64))
    u.requires_grad_(True)
    v.requires_grad_(True)
    rows, cols, _ = select_topm_reference(s_row, s_col, cores, u, v, k_rc=5, topm=6)  # fix the selection

    def selected_scores(sr, sc, cr):
        _, _, scores = select_topm_reference(sr, sc, cr, u.detach(), v.detach(), k_rc=5, topm=6)
        return scores

    inputs = tuple(t.clone().requires_grad_(True) for t in (s_row, s_col, cores))
    assert torch.autograd.gradcheck(selected_scores, inputs)
    _, _, scores = select_topm_reference(*inputs, u, v, k_rc=5, topm=6)
    scores.sum().backward()
    assert u.grad is None and v.grad is None  # the prefilter's top-k is not differentiable
    assert not rows.requires_grad and not cols.requires_grad


def test_rank1_vectors_are_the_leading_singular_pair_with_a_smooth_sign():
    gen = torch.Generator().manual_seed(3)
    cores = torch.rand(2, 3, 3, generator=gen)
    u, v = rank1_vectors(cores, torch.zeros(3), torch.zeros(3))
    total = cores.sum(0)
    sigma = torch.linalg.svdvals(total)[0]
    torch.testing.assert_close(u @ total @ v, sigma)  # u^T C̄ v = σ1
    # a previous vector of the opposite sign makes the refresh flip, so (u, v) do not jump
    u2, v2 = rank1_vectors(cores, -u, -v)
    torch.testing.assert_close(u2, -u)
    torch.testing.assert_close(v2, -v)
    u3, v3 = rank1_vectors(cores, u, v)
    torch.testing.assert_close(u3, u)
    torch.testing.assert_close(v3, v)
