"""The value lookup (kernels/lookup.py) against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from umv2cli.kernels.lookup import memory_lookup_reference


def loop_lookup(x_p, table, rows, scores, act):
    B, M, C = scores.shape
    P = x_p.shape[1]
    V = table.shape[1] - P
    out = torch.zeros(B, V, dtype=table.dtype)
    for b in range(B):
        for j in range(M):
            row = table[rows[b, j]]
            z = row[:P] @ x_p[b]
            z = F.gelu(z) if act == "gelu" else z
            z = z if P else 1.0  # no pre-value neuron: plain score-weighted values
            for c in range(C):
                w = V // C
                out[b, c * w:(c + 1) * w] += scores[b, j, c] * z * row[P + c * w:P + (c + 1) * w]
    return out


def random_lookup(B, M, C, P, V, T, *, index_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_p = torch.randn(B, P, generator=gen, dtype=torch.float64)
    table = torch.randn(T, P + V, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, T, (B, M), generator=gen).to(index_dtype)
    rows[0, 1] = rows[0, 0]  # a duplicate within a token
    rows[1, 0] = rows[0, 0]  # and across tokens
    scores = torch.randn(B, M, C, generator=gen, dtype=torch.float64)
    return x_p, table, rows, scores


@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("B,M,C,P,V,T", [(4, 5, 2, 3, 6, 17), (3, 7, 1, 0, 5, 11), (2, 3, 3, 4, 9, 6)])
def test_lookup_equals_per_token_loop(act, B, M, C, P, V, T):
    x_p, table, rows, scores = random_lookup(B, M, C, P, V, T)
    expected = loop_lookup(x_p, table, rows, scores, act)
    torch.testing.assert_close(memory_lookup_reference(x_p, table, rows, scores, act), expected)
    torch.testing.assert_close(memory_lookup_reference(x_p, table, rows.int(), scores, act), expected)


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_lookup_gradients_for_input_table_and_scores(act):
    x_p, table, rows, scores = random_lookup(3, 4, 2, 3, 4, 5)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x_p, table, scores))
    assert torch.autograd.gradcheck(
        lambda x, t, s: memory_lookup_reference(x, t, rows, s, act), inputs)
