"""UltraMem v1: selection and forward against brute force, gradients, aux loss, rank-1 refresh, costs."""

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

from umv2cli.config import UltraMemV1Config
from umv2cli.model.init import InitContext
from umv2cli.model.ultramem_v1 import NORM_EPS, UltraMemV1, ultramem_v1_costs

H = 5


def tiny(**kw) -> UltraMemV1Config:
    return UltraMemV1Config(**{"knum": 3, "topm": 3, "heads": 2, "dk": 4, "dv": 4, "value_expand": 4, **kw})


def make_layer(cfg: UltraMemV1Config, seed: int = 0, scheme: str = "official") -> UltraMemV1:
    """A float64 layer with random norm weights and signed cores, so their use is checked too."""
    torch.manual_seed(seed)
    layer = UltraMemV1(cfg, H).double()
    layer.reset_parameters(InitContext(scheme, d_model=H, n_layers=4, ffn_hidden=4 * H))
    with torch.no_grad():
        layer.g_q_D.uniform_(0.5, 1.5)
        layer.g_k_D.uniform_(0.5, 1.5)
        layer.cores_CRR.normal_()
    layer.refresh_rank1()
    return layer


def without_prefilter(cfg: UltraMemV1Config) -> UltraMemV1Config:
    """k_rc = topm = n_keys = √E·knum: every key survives step 4, so TDQKR is the exact top-m of
    the full grid."""
    return dataclasses.replace(cfg, topm=math.isqrt(cfg.value_expand) * cfg.knum)


def rms(x, g):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * g


def row_col_scores(layer: UltraMemV1, u_KH):
    """Per-rank row and column scores S_row, S_col: [K, A, R, N] each."""
    cfg = layer.cfg
    q_KASD = rms((u_KH @ layer.w_q.weight.T).view(-1, cfg.heads, 2, cfg.dk), layer.g_q_D)
    k_ASRND = rms(layer.keys_ASRND, layer.g_k_D)
    return (torch.einsum("kad,arnd->karn", q_KASD[:, :, 0], k_ASRND[:, 0]),
            torch.einsum("kad,arnd->karn", q_KASD[:, :, 1], k_ASRND[:, 1]))


def full_grid(layer: UltraMemV1, u_KH):
    """Each core's score S_row[:, i]^T C_c S_col[:, j] of every cell: [K, A, C, N, N]."""
    s_row, s_col = row_col_scores(layer, u_KH)
    return torch.einsum("kari,crs,kasj->kacij", s_row, layer.cores_CRR, s_col)


def candidates(layer: UltraMemV1, u_KH):
    """The rank-1 prefilter: True at cells whose row is among the m best by u^T S_row and whose
    column is among the m best by v^T S_col: [K, A, N, N]."""
    s_row, s_col = row_col_scores(layer, u_KH)
    keep = []
    for s, w in ((s_row, layer.rank1_u_R), (s_col, layer.rank1_v_R)):
        best = torch.einsum("karn,r->kan", s, w).topk(layer.cfg.topm).indices
        keep.append(torch.zeros(s.shape[:2] + s.shape[3:], dtype=torch.bool).scatter_(-1, best, True))
    return keep[0][..., :, None] & keep[1][..., None, :]


def reference_forward(layer: UltraMemV1, u_BTH):
    """Token by token, head by head: top-m of the prefiltered full grid, shuffle, per-block sums,
    E projectors."""
    cfg, (B, T, _) = layer.cfg, u_BTH.shape
    N, P, E, V = layer.n_keys, cfg.knum**2, cfg.value_expand, cfg.dv
    u_KH = u_BTH.reshape(B * T, H)
    grid = full_grid(layer, u_KH)
    total = grid.sum(2).masked_fill(~candidates(layer, u_KH), -math.inf)
    out = []
    for k in range(B * T):
        o = torch.zeros(E, V, dtype=u_KH.dtype)
        for a in range(cfg.heads):
            for cell in total[k, a].flatten().topk(layer.cfg.topm).indices.tolist():
                i, j = divmod(cell, N)
                p, row = divmod(int(layer.shuffle_X[i * N + j]), P)
                o[p] += (grid[k, a, :, i, j, None] * layer.values_PV[row].view(cfg.cores, -1)).flatten()
        out.append(sum(layer.w_out.weight[:, p * V:(p + 1) * V] @ o[p] for p in range(E)))
    return torch.stack(out).view(B, T, H)


def test_select_without_prefilter_equals_bruteforce_topm_of_full_grid():
    layer = make_layer(without_prefilter(tiny()))
    u_KH = torch.randn(7, H, dtype=torch.float64)
    rows_GM, cols_GM, scores_GMC = layer.select(u_KH)
    grid_GCNN = full_grid(layer, u_KH).flatten(0, 1)
    best_GM = grid_GCNN.sum(1).flatten(1).topk(layer.cfg.topm).indices
    assert torch.equal(rows_GM, best_GM // layer.n_keys)
    assert torch.equal(cols_GM, best_GM % layer.n_keys)
    cells_GCM = best_GM[:, None].expand(-1, grid_GCNN.shape[1], -1)
    want_GMC = grid_GCNN.flatten(2).gather(2, cells_GCM).transpose(1, 2)
    torch.testing.assert_close(scores_GMC, want_GMC)


@pytest.mark.parametrize("prefilter", [False, True])
@pytest.mark.parametrize("kw", [{}, {"heads": 1, "value_expand": 1, "topm": 2}, {"cores": 1, "rank": 3},
                                {"knum": 2, "topm": 2, "value_expand": 9, "dv": 6, "cores": 3}])
def test_forward_equals_naive_reference(kw, prefilter):
    layer = make_layer(tiny(**kw) if prefilter else without_prefilter(tiny(**kw)), seed=1)
    u_BTH = torch.randn(2, 3, H, dtype=torch.float64)
    y_BTH, _ = layer(u_BTH)
    torch.testing.assert_close(y_BTH, reference_forward(layer, u_BTH))


def test_gradcheck_input_and_every_parameter():
    layer = make_layer(tiny(knum=2, topm=2, dk=3, aux_tau=0.01))  # the prefilter is on: k_rc = 2 < n = 4
    names = [n for n, _ in layer.named_parameters()]
    assert set(names) == {"w_q.weight", "g_q_D", "keys_ASRND", "g_k_D", "cores_CRR", "values_PV",
                          "w_out.weight"}
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    u_BTH = torch.randn(1, 3, H, dtype=torch.float64, requires_grad=True)

    def f(u, *ps):
        return functional_call(layer, dict(zip(names, ps)), (u,))

    assert torch.autograd.gradcheck(f, (u_BTH, *params))


def test_rank1_vectors_are_buffers_and_get_no_gradient():
    layer = make_layer(tiny())
    y, aux = layer(torch.randn(2, 3, H, dtype=torch.float64))
    (y.sum() + aux).backward()
    params = {id(p) for p in layer.parameters()}
    for buf in (layer.rank1_u_R, layer.rank1_v_R):
        assert not buf.requires_grad and buf.grad is None and id(buf) not in params
    assert {"rank1_u_R", "rank1_v_R", "shuffle_X"} <= set(layer.state_dict())
    assert layer.cores_CRR.grad.abs().sum() > 0


def core_with_spectrum(lam, seed):
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ q2.T, q1, q2


def set_cores_summing_to(layer: UltraMemV1, core_RR: torch.Tensor, seed: int = 5) -> None:
    """Random cores C_1 … C_{C−1} far from rank 1, and C_0 = core − the others: Σ_c C_c = core."""
    g = torch.Generator().manual_seed(seed)
    others = 3.0 * torch.randn(layer.cfg.cores - 1, *core_RR.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.cores_CRR.copy_(torch.cat([(core_RR - others.sum(0))[None], others]))


def test_aux_loss_is_zero_when_the_summed_core_is_near_rank_1_whatever_each_core_is():
    layer = make_layer(tiny(aux_tau=0.15))  # 2 cores, rank 2
    set_cores_summing_to(layer, core_with_spectrum([2.0, 0.14], 0)[0])
    # each core alone has a second singular value far above τ: a per-core penalty would not be 0
    assert torch.linalg.svdvals(layer.cores_CRR.detach())[:, 1].min() > 1.0
    _, aux = layer(torch.randn(1, 2, H, dtype=torch.float64))
    assert aux.item() == 0.0


def test_aux_loss_equals_formula_on_the_summed_core_and_its_gradient_reaches_every_core():
    alpha, tau, lam = 0.001, 0.15, [3.0, 0.5, 0.2]
    layer = make_layer(tiny(rank=3, cores=3, dv=6, aux_coef=alpha, aux_tau=tau))
    core_RR, q1, q2 = core_with_spectrum(lam, 0)
    set_cores_summing_to(layer, core_RR)
    _, aux = layer(torch.randn(1, 2, H, dtype=torch.float64))
    # α/(r−1)·Σ_{i≥2} max(0, λ_i(Σ_c C_c) − τ)², r = 3
    assert aux.item() == pytest.approx(alpha / 2 * ((0.5 - tau) ** 2 + (0.2 - tau) ** 2), rel=1e-10)
    aux.backward()
    # ∂λ_i/∂C = u_i v_i^T of the sum, the same for every core C_c:
    # ∂aux/∂C_c = α/(r−1)·Σ_{i≥2} 2·max(0, λ_i − τ)·u_i v_i^T
    grad_RR = sum(alpha / 2 * 2 * max(0.0, lam[i] - tau) * torch.outer(q1[:, i], q2[:, i]) for i in (1, 2))
    torch.testing.assert_close(layer.cores_CRR.grad, grad_RR.expand(3, 3, 3))


def test_refresh_rank1_is_idempotent_and_keeps_the_previous_sign():
    layer = make_layer(tiny())
    u_R, v_R = layer.rank1_u_R.clone(), layer.rank1_v_R.clone()
    U, _, Vh = torch.linalg.svd(layer.cores_CRR.detach().sum(0))
    # the leading singular pair up to a common sign; rank1_vectors runs its SVD in float32
    torch.testing.assert_close(torch.outer(u_R, v_R), torch.outer(U[:, 0], Vh[0]), rtol=1e-5, atol=1e-6)
    layer.refresh_rank1()
    assert torch.equal(layer.rank1_u_R, u_R) and torch.equal(layer.rank1_v_R, v_R)
    layer.rank1_u_R.neg_()
    layer.rank1_v_R.neg_()
    layer.refresh_rank1()
    assert torch.equal(layer.rank1_u_R, -u_R) and torch.equal(layer.rank1_v_R, -v_R)


def test_tokens_are_independent():
    layer = make_layer(tiny())
    u_BTH = torch.randn(2, 4, H, dtype=torch.float64)
    perm = torch.randperm(8)
    y_BTH, aux = layer(u_BTH)
    y_perm, aux_perm = layer(u_BTH.reshape(8, H)[perm].view(2, 4, H))
    torch.testing.assert_close(y_perm.reshape(8, H), y_BTH.reshape(8, H)[perm])
    assert aux_perm.item() == aux.item()


def test_reset_parameters_follows_the_scheme():
    cfg = tiny(knum=40, topm=8, dk=8, dv=8)
    for scheme, value_std in [("official", 0.02), ("paper", math.sqrt(4 / (2 * 8 * 2 * 4)))]:
        layer = UltraMemV1(cfg, H)
        layer.reset_parameters(InitContext(scheme, d_model=H, n_layers=4, ffn_hidden=4 * H))
        assert torch.all(layer.g_q_D == 8**-0.33) and torch.all(layer.g_k_D == 8**-0.33)
        assert 0 <= layer.cores_CRR.min() and layer.cores_CRR.max() < 1
        assert torch.equal(layer.shuffle_X.sort().values, torch.arange(4 * 40**2, dtype=torch.int32))
        # truncation at 3σ shrinks the std by 1.3%
        assert layer.values_PV.std().item() == pytest.approx(value_std, rel=0.05)


@pytest.mark.parametrize("kw", [{}, {"heads": 1, "value_expand": 9, "knum": 2, "topm": 2},
                                {"rank": 3, "cores": 4, "dv": 8, "value_expand": 1}])
def test_costs_count_the_layer_parameters(kw):
    cfg = tiny(**kw)
    costs = ultramem_v1_costs(cfg, H)
    layer = UltraMemV1(cfg, H)
    assert costs.dense_params + costs.sparse_params == sum(p.numel() for p in layer.parameters())
    assert costs.sparse_params == layer.values_PV.numel()


def test_costs_of_the_227m_v1_layer():
    costs = ultramem_v1_costs(UltraMemV1Config(), 768)  # knum 808, dk 192, dv 384, 2×80, E = 4
    assert costs.dense_params == 589_824 + 2_482_176 + 384 + 8 + 1_179_648
    assert costs.sparse_params == 808**2 * 384 == 250_699_776
    assert costs.activated_sparse_params == 61_440
    assert costs.macs == {"query": 589_824, "keys": 2_482_176, "prefilter": 12_928, "grid": 52_480,
                          "lookup": 61_440, "out": 1_179_648}
    assert not costs.shared_sparse
