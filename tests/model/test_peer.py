"""PEER (arXiv 2407.04153) against brute force and a naive per-token reference, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from umv2cli.config import PEERConfig
from umv2cli.model.init import InitContext
from umv2cli.model.peer import PEER, peer_costs

ACTS = {"gelu": F.gelu, "relu": F.relu}


def random_layer(cfg: PEERConfig, h: int, seed: int = 0) -> PEER:
    """A float64 layer with every parameter N(0, 1), so scores spread and softmax weights differ."""
    torch.manual_seed(seed)
    layer = PEER(cfg, h).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def queries(layer: PEER, u_H: torch.Tensor) -> torch.Tensor:
    """Step 1 written out for one token: [Q, D] RMS-normalized queries."""
    q_QD = layer.w_q_QDH @ u_H
    return q_QD / torch.sqrt(q_QD.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.g_q_QD


def full_keys(layer: PEER) -> torch.Tensor:
    """[X, D]: the key of expert i·knum + j is [K_1,i ; K_2,j]."""
    k1_NP, k2_NP = layer.keys_SNP
    n = k1_NP.shape[0]
    return torch.cat([k1_NP.repeat_interleave(n, 0), k2_NP.repeat(n, 1)], dim=-1)


def naive_peer(layer: PEER, u_BTH: torch.Tensor) -> torch.Tensor:
    """Eq. 1-7 token by token: brute-force top-k over all experts, softmax, sum of neurons."""
    act, k = ACTS[layer.cfg.act], layer.cfg.topm
    keys_XD = full_keys(layer)
    y_BTH = torch.zeros_like(u_BTH)
    for b in range(u_BTH.shape[0]):
        for t in range(u_BTH.shape[1]):
            u_H = u_BTH[b, t]
            for q_D in queries(layer, u_H):
                s_K, idx_K = (keys_XD @ q_D).topk(k)
                for g, x in zip(s_K.softmax(-1), idx_K):
                    y_BTH[b, t] += g * act(layer.w_down_XH[x] @ u_H) * layer.w_up_XH[x]
    return y_BTH


@settings(max_examples=20, deadline=None)
@given(knum=st.integers(2, 9), heads=st.integers(1, 3), half_dk=st.integers(1, 4),
       h=st.integers(1, 6), data=st.data())
def test_selection_equals_brute_force_over_all_experts(knum, heads, half_dk, h, data):
    topm = data.draw(st.integers(1, knum))
    cfg = PEERConfig(knum=knum, topm=topm, heads=heads, dk=2 * half_dk)
    layer = random_layer(cfg, h, seed=data.draw(st.integers(0, 2**16)))
    u_BTH = torch.randn(2, 3, h, dtype=torch.float64)
    s_BTQK, idx_BTQK = layer.route(u_BTH)
    with torch.no_grad():
        q_BTQD = torch.stack([torch.stack([queries(layer, u_H) for u_H in u_TH]) for u_TH in u_BTH])
        ref_s_BTQK, ref_idx_BTQK = (q_BTQD @ full_keys(layer).T).topk(topm, dim=-1)
    assert torch.equal(idx_BTQK, ref_idx_BTQK)
    torch.testing.assert_close(s_BTQK, ref_s_BTQK, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("knum,topm,heads,dk,h", [(5, 3, 2, 6, 7), (8, 4, 3, 4, 5), (4, 4, 1, 2, 3)])
def test_forward_equals_naive_reference(act, knum, topm, heads, dk, h):
    layer = random_layer(PEERConfig(knum=knum, topm=topm, heads=heads, dk=dk, act=act), h)
    u_BTH = torch.randn(2, 4, h, dtype=torch.float64)
    y_BTH, aux = layer(u_BTH)
    with torch.no_grad():
        torch.testing.assert_close(y_BTH, naive_peer(layer, u_BTH), rtol=1e-10, atol=1e-10)
    assert aux.dim() == 0 and aux.item() == 0.0


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_one_head_one_expert_is_one_neuron(act):
    """heads = topm = 1: softmax of one score is 1, so y = act(<w_down[x*], u>) · w_up[x*] (eq. 8)."""
    layer = random_layer(PEERConfig(knum=6, topm=1, heads=1, dk=4, act=act), 5, seed=3)
    u_NH = torch.randn(1, 32, 5, dtype=torch.float64)[0]
    with torch.no_grad():
        x_N = torch.stack([(full_keys(layer) @ queries(layer, u_H)[0]).argmax() for u_H in u_NH])
        z_N = (layer.w_down_XH[x_N] * u_NH).sum(-1)
        expected_NH = ACTS[act](z_N)[:, None] * layer.w_up_XH[x_N]
        torch.testing.assert_close(layer(u_NH[None])[0][0], expected_NH, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gradcheck_input_and_every_parameter(act):
    layer = random_layer(PEERConfig(knum=3, topm=2, heads=2, dk=4, act=act), 3, seed=1)
    names = [n for n, _ in layer.named_parameters()]
    assert set(names) == {"w_q_QDH", "g_q_QD", "keys_SNP", "w_down_XH", "w_up_XH"}
    u_BTH = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(u_BTH, *params):
        return functional_call(layer, dict(zip(names, params)), (u_BTH,))[0]

    assert torch.autograd.gradcheck(fn, (u_BTH, *params))


@pytest.mark.parametrize("knum,topm,heads,dk,h", [(4, 2, 1, 2, 3), (7, 3, 4, 6, 10), (16, 16, 8, 32, 24)])
def test_costs_count_the_module_parameters(knum, topm, heads, dk, h):
    cfg = PEERConfig(knum=knum, topm=topm, heads=heads, dk=dk)
    costs = peer_costs(cfg, h)
    assert costs.dense_params + costs.sparse_params == sum(p.numel() for p in PEER(cfg, h).parameters())
    assert costs.sparse_params == 2 * knum**2 * h
    assert costs.activated_sparse_params == heads * topm * 2 * h
    assert costs.macs == {"query": h * heads * dk, "keys": heads * knum * dk,
                          "candidates": heads * topm**2, "experts": heads * topm * 2 * h}
    assert not costs.shared_sparse


def test_paper_default_costs():
    """PEER §3: 1024² experts, 8 heads × 16 experts → 128 active neurons; at d_model = 768."""
    costs = peer_costs(PEERConfig(), 768)
    assert costs.sparse_params == 2 * 1024**2 * 768
    assert costs.activated_sparse_params == 128 * 2 * 768


def test_permuting_tokens_permutes_outputs():
    layer = random_layer(PEERConfig(knum=6, topm=3, heads=2, dk=4), 8, seed=2)
    u_BTH = torch.randn(3, 5, 8, dtype=torch.float64)
    perm = torch.randperm(15)
    with torch.no_grad():
        y_NH = layer(u_BTH)[0].reshape(15, 8)
        y_perm_NH = layer(u_BTH.reshape(1, 15, 8)[:, perm])[0][0]
    torch.testing.assert_close(y_perm_NH, y_NH[perm], rtol=1e-12, atol=1e-12)


def test_reset_parameters_stds():
    cfg, h = PEERConfig(knum=32, topm=4, heads=4, dk=64), 64
    ctx = InitContext(scheme="paper", d_model=h, n_layers=8, ffn_hidden=4 * h)
    layer = PEER(cfg, h)
    torch.manual_seed(0)
    layer.reset_parameters(ctx)
    trunc = 0.9866  # std of N(0, 1) truncated at ±3σ
    for p, std in [(layer.w_q_QDH, ctx.small_std), (layer.keys_SNP, 0.02),
                   (layer.w_down_XH, 1 / math.sqrt(h)), (layer.w_up_XH, ctx.out_proj_std)]:
        assert p.std().item() == pytest.approx(trunc * std, rel=0.05)
    assert torch.equal(layer.g_q_QD, torch.ones_like(layer.g_q_QD))
