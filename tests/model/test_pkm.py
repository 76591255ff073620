"""Product-key memory / Memory+: selection and forward against brute force, gradients, sharing, costs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import PKMConfig
from umv2cli.model.init import InitContext
from umv2cli.model.pkm import NORM_EPS, ProductKeyMemory, new_value_pool, pkm_costs, product_key_topk

H = 6


def tiny(swilu=True, qk_norm=True, shared_pool=False, **kw) -> PKMConfig:
    return PKMConfig(**{"knum": 5, "topm": 3, "heads": 2, "dk": 4, "dv": 4, **kw},
                     swilu=swilu, qk_norm=qk_norm, shared_pool=shared_pool)


def make_layer(cfg: PKMConfig, seed: int = 0, values=None, scheme="official") -> ProductKeyMemory:
    """A float64 layer with random (not unit) norm weights, so their use is checked too."""
    torch.manual_seed(seed)
    layer = ProductKeyMemory(cfg, H, values).double()
    layer.reset_parameters(InitContext(scheme, d_model=H, n_layers=4, ffn_hidden=4 * H))
    if cfg.qk_norm:
        with torch.no_grad():
            layer.g_q_D.uniform_(0.5, 1.5)
            layer.g_k_D.uniform_(0.5, 1.5)
    return layer


def rms(x, g):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * g


def bruteforce_topk(q_XASD, keys_ASND, k):
    """Score every full key [K1_i ; K2_j] (i·N + j) against the whole query; top-k."""
    A, _, N, D = keys_ASND.shape
    full_ARD = torch.cat([keys_ASND[:, 0, :, None, :].expand(A, N, N, D),
                          keys_ASND[:, 1, None, :, :].expand(A, N, N, D)], dim=-1).reshape(A, N * N, 2 * D)
    return torch.einsum("xae,are->xar", q_XASD.flatten(-2), full_ARD).topk(k, dim=-1)


def reference_forward(layer: ProductKeyMemory, u_BTH):
    """Token by token: brute-force top-k, softmax, gather, sum over heads, optional swilu."""
    cfg, (B, T, _) = layer.cfg, u_BTH.shape
    A, D = cfg.heads, cfg.dk // 2
    u_XH = u_BTH.reshape(B * T, H)
    q_XASD = (u_XH @ layer.w_q.weight.T).view(-1, A, 2, D)
    keys = layer.keys_ASND
    if cfg.qk_norm:
        q_XASD, keys = rms(q_XASD, layer.g_q_D), rms(keys, layer.g_k_D)
    score_XAK, rows_XAK = bruteforce_topk(q_XASD, keys, cfg.topm)
    outs = []
    for x in range(B * T):
        y = sum(torch.softmax(score_XAK[x, a], 0) @ layer.values[rows_XAK[x, a]] for a in range(A))
        if cfg.swilu:
            y = y * F.silu(layer.w1.weight @ u_XH[x])
        outs.append(layer.w2.weight @ y)
    return torch.stack(outs).view(B, T, H)


def test_product_key_selection_equals_bruteforce_topk_over_all_full_keys():
    torch.manual_seed(1)
    for A, N, D, K in [(1, 7, 3, 4), (3, 16, 5, 8), (2, 9, 2, 9)]:
        q = torch.randn(2, 5, A, 2, D, dtype=torch.float64)
        keys = torch.randn(A, 2, N, D, dtype=torch.float64)
        score, rows = product_key_topk(q, keys, K)
        ref_score, ref_rows = bruteforce_topk(q.view(10, A, 2, D), keys, K)
        torch.testing.assert_close(score.view(10, A, K), ref_score, rtol=0, atol=1e-12)
        assert torch.equal(rows.view(10, A, K), ref_rows)


@pytest.mark.parametrize("swilu", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("scheme", ["official", "paper"])
def test_forward_equals_naive_reference(swilu, qk_norm, scheme):
    layer = make_layer(tiny(swilu, qk_norm, knum=8, topm=5, heads=3, dk=6, dv=5), scheme=scheme)
    u = torch.randn(2, 4, H, dtype=torch.float64)
    y, aux = layer(u)
    torch.testing.assert_close(y, reference_forward(layer, u), rtol=1e-12, atol=1e-12)
    assert aux.dim() == 0 and aux.item() == 0.0


def test_tokens_are_independent_permuting_tokens_permutes_outputs():
    layer = make_layer(tiny(knum=8, topm=4))
    u = torch.randn(3, 5, H, dtype=torch.float64)
    perm = torch.randperm(15)
    y = layer(u)[0].reshape(15, H)
    y_perm = layer(u.reshape(15, H)[perm].view(5, 3, H))[0].reshape(15, H)
    torch.testing.assert_close(y_perm, y[perm], rtol=1e-12, atol=1e-12)


def test_shared_pool_is_one_tensor_counted_once_and_gets_both_layers_gradients():
    cfg = tiny(shared_pool=True)
    pool = new_value_pool(cfg)
    l1, l2 = make_layer(cfg, seed=1, values=pool), make_layer(cfg, seed=2, values=pool)
    assert l1.values is l2.values is pool and l1.values.data_ptr() == l2.values.data_ptr()
    model = nn.ModuleList([l1, l2])
    assert sum(p.numel() for p in model.parameters()) == 2 * pkm_costs(cfg, H).dense_params + pool.numel()

    u = torch.randn(2, 3, H, dtype=torch.float64)
    grads = []
    for layer in (l1, l2):
        pool.grad = None
        layer(u)[0].square().sum().backward()
        grads.append(pool.grad.clone())
        assert grads[-1].abs().sum() > 0
    pool.grad = None
    (l1(u)[0].square().sum() + l2(u)[0].square().sum()).backward()
    torch.testing.assert_close(pool.grad, grads[0] + grads[1])


def test_a_pool_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[25, 4\] \(knum², dv\)"):
        ProductKeyMemory(tiny(), H, nn.Parameter(torch.empty(25, 5)))


@pytest.mark.parametrize("swilu, qk_norm", [(True, True), (False, False)])
def test_gradcheck_input_and_every_parameter(swilu, qk_norm):
    layer = make_layer(tiny(swilu, qk_norm, knum=4, topm=2, dv=3))
    names = [n for n, _ in layer.named_parameters()]
    expected = {"w_q.weight", "keys_ASND", "values", "w2.weight"} | (
        {"g_q_D", "g_k_D"} if qk_norm else set()) | ({"w1.weight"} if swilu else set())
    assert set(names) == expected
    u = torch.randn(1, 3, H, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(u, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (u,))[0]

    assert torch.autograd.gradcheck(f, (u, *params))


@pytest.mark.parametrize("cfg", [tiny(), tiny(swilu=False), tiny(qk_norm=False, shared_pool=True),
                                 tiny(False, False, knum=7, topm=5, heads=3, dk=8, dv=9)])
def test_costs_count_every_parameter_of_the_layer(cfg):
    costs = pkm_costs(cfg, H)
    layer = ProductKeyMemory(cfg, H)
    assert costs.dense_params + costs.sparse_params == sum(p.numel() for p in layer.parameters())
    assert costs.sparse_params == layer.values.numel() == cfg.knum**2 * cfg.dv
    assert costs.activated_sparse_params == cfg.heads * cfg.topm * cfg.dv
    assert costs.shared_sparse == cfg.shared_pool


def test_costs_of_memory_plus_227m_defaults():
    cfg = PKMConfig()  # heads 2, knum 1138, topm 80, dk 384, dv 768
    costs = pkm_costs(cfg, 768)
    assert costs.macs == {"query": 768 * 2 * 384, "keys": 2 * 1138 * 384, "candidates": 2 * 80 * 80,
                          "lookup": 2 * 80 * 768, "gate": 768 * 768, "out": 768 * 768}
    assert costs.dense_params == 768 * 768 + 2 * 1138 * 384 + 384 + 2 * 768 * 768
    assert costs.sparse_params == 1138**2 * 768 and costs.shared_sparse


@pytest.mark.parametrize("scheme", ["official", "paper"])
def test_init_draws_the_documented_distributions(scheme):
    cfg = PKMConfig(knum=64, topm=4, heads=2, dk=64, dv=128)
    layer = ProductKeyMemory(cfg, 256)
    ctx = InitContext(scheme, d_model=256, n_layers=4, ffn_hidden=1024)
    torch.manual_seed(0)
    layer.reset_parameters(ctx)
    linear_std = ctx.small_std if scheme == "paper" else 256**-0.5
    query_std = ctx.small_std if scheme == "paper" else (2 / (256 + 128)) ** 0.5
    truncation = 0.986  # std of N(0, 1) truncated at ±3σ
    assert layer.values.std().item() == pytest.approx(128**-0.5 * truncation, rel=0.02)
    assert layer.keys_ASND.abs().max().item() <= 64**-0.5
    assert layer.keys_ASND.std().item() == pytest.approx(64**-0.5 / 3**0.5, rel=0.05)
    query_std *= truncation if scheme == "paper" else 1  # official: xavier_uniform_, as Meta
    assert layer.w_q.weight.std().item() == pytest.approx(query_std, rel=0.05)
    for w in (layer.w1.weight, layer.w2.weight):
        assert w.std().item() == pytest.approx(linear_std * truncation, rel=0.05)
    assert torch.equal(layer.g_q_D, torch.ones(32)) and torch.equal(layer.g_k_D, torch.ones(32))
