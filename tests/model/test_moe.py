"""The MoE baseline against a naive per-token reference: outputs, dropless routing, aux loss,
gradients, parameter and MAC counts, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from umv2cli.config import MoEConfig
from umv2cli.model.init import InitContext
from umv2cli.model.moe import MoE, moe_costs

TINY = dict(n_experts=4, topk=2, expert_hidden=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, ten times the work when the cores are busy."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def make_moe(h: int, seed: int = 0, dtype=torch.float64, **cfg) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**cfg), h).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
    return moe


def swiglu(x_H, w1_HF, w3_HF, w2_FH):
    return (F.silu(x_H @ w1_HF) * (x_H @ w3_HF)) @ w2_FH


def reference(moe: MoE, u_BTH: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax over all experts, then the top-k experts computed densely."""
    ex, y_BTH = moe.experts, torch.zeros_like(u_BTH)
    for b in range(u_BTH.shape[0]):
        for t in range(u_BTH.shape[1]):
            x_H = u_BTH[b, t]
            p_E = torch.softmax(moe.router.w_EH @ x_H, dim=0)
            probs_K, experts_K = p_E.topk(moe.cfg.topk)
            for p, e in zip(probs_K, experts_K):
                y_BTH[b, t] += p * swiglu(x_H, ex.w1_EHF[e], ex.w3_EHF[e], ex.w2_EFH[e])
            if moe.shared_expert is not None:
                s = moe.shared_expert
                y_BTH[b, t] += swiglu(x_H, s.w1_EHF[0], s.w3_EHF[0], s.w2_EFH[0])
    return y_BTH


@pytest.mark.parametrize("shared", [0, 5])
@pytest.mark.parametrize("n_experts,topk", [(4, 1), (6, 2), (8, 3), (5, 5)])
def test_output_equals_per_token_reference(shared, n_experts, topk):
    moe = make_moe(6, n_experts=n_experts, topk=topk, expert_hidden=4, shared_expert_hidden=shared)
    u_BTH = torch.randn(2, 7, 6, dtype=torch.float64)
    y_BTH, _ = moe(u_BTH)
    torch.testing.assert_close(y_BTH, reference(moe, u_BTH), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [0, 3])
def test_dropless_when_every_token_picks_the_same_experts(shared):
    """All 2·9 tokens go to experts {2, 5}: each gets all 18 tokens, four times an even share
    (N·K/E = 4.5), and every token still receives both experts' outputs."""
    h, n_experts = 6, 8
    moe = make_moe(h, n_experts=n_experts, topk=2, expert_hidden=4, shared_expert_hidden=shared)
    base_H = torch.ones(h, dtype=torch.float64)
    with torch.no_grad():
        moe.router.w_EH.mul_(0.01).add_(-base_H)
        moe.router.w_EH[[2, 5]] += 2 * base_H
    u_BTH = base_H + 0.1 * torch.randn(2, 9, h, dtype=torch.float64)
    experts = (u_BTH @ moe.router.w_EH.T).topk(2, dim=-1).indices
    assert set(experts.flatten().tolist()) == {2, 5}
    y_BTH, _ = moe(u_BTH)
    torch.testing.assert_close(y_BTH, reference(moe, u_BTH), rtol=1e-12, atol=1e-12)


def test_aux_loss_equals_its_formula():
    lb_coef, z_coef, E, K = 0.03, 0.007, 6, 2
    moe = make_moe(5, n_experts=E, topk=K, expert_hidden=3, lb_coef=lb_coef, z_coef=z_coef)
    u_BTH = torch.randn(1, 11, 5, dtype=torch.float64)
    _, aux = moe(u_BTH)
    logits_NE = u_BTH[0] @ moe.router.w_EH.T
    p_NE = logits_NE.softmax(dim=-1)
    chosen_NE = F.one_hot(p_NE.topk(K, dim=-1).indices, E).sum(dim=1).double()  # 1 where routed
    balance = E * sum(chosen_NE[:, i].sum() / (11 * K) * p_NE[:, i].mean() for i in range(E))
    z = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits_NE) / 11
    assert aux.shape == ()
    torch.testing.assert_close(aux, lb_coef * balance + z_coef * z, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_experts,topk", [(4, 1), (8, 3), (64, 8)])
def test_uniform_router_gives_balance_one_and_z_log_e_squared(n_experts, topk):
    """Zero router weights: p_i = 1/E, so L_balance = E·Σ f_i/E = 1 whatever the top-k ties pick,
    and every logsumexp is log E."""
    torch.manual_seed(0)
    u_BTH = torch.randn(3, 4, 8, dtype=torch.float64)
    for lb_coef, z_coef, expected in [(1.0, 0.0, 1.0), (0.0, 1.0, math.log(n_experts) ** 2)]:
        moe = make_moe(8, n_experts=n_experts, topk=topk, expert_hidden=2,
                       lb_coef=lb_coef, z_coef=z_coef)
        torch.nn.init.zeros_(moe.router.w_EH)
        _, aux = moe(u_BTH)
        assert aux.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shared", [0, 2])
def test_gradcheck_input_and_every_parameter(shared):
    moe = make_moe(3, seed=1, **TINY, shared_expert_hidden=shared)
    u_BTH = torch.randn(1, 3, 3, dtype=torch.float64)
    # the perturbations (eps = 1e-6) must not change any token's top-k set
    logits_sorted = (u_BTH @ moe.router.w_EH.T).sort(dim=-1, descending=True).values
    assert (logits_sorted[..., 1] - logits_sorted[..., 2]).min() > 1e-3
    names = [n for n, _ in moe.named_parameters()]
    assert len(names) == (7 if shared else 4)

    def run(u, *params):
        return functional_call(moe, dict(zip(names, params)), (u,))

    inputs = (u_BTH, *(p.detach() for p in moe.parameters()))
    assert torch.autograd.gradcheck(run, tuple(t.clone().requires_grad_() for t in inputs))


@pytest.mark.parametrize("h,cfg", [
    (4, TINY),
    (6, dict(n_experts=8, topk=3, expert_hidden=5, shared_expert_hidden=7)),
    (32, dict(n_experts=64, topk=8, expert_hidden=16)),
    (16, dict(n_experts=16, topk=4, expert_hidden=8, shared_expert_hidden=32)),
])
def test_costs_match_module_params_and_counted_macs(h, cfg):
    moe_cfg = MoEConfig(**cfg)
    moe = make_moe(h, dtype=torch.float32, **cfg)
    costs = moe_costs(moe_cfg, h)
    assert costs.dense_params + costs.sparse_params == sum(p.numel() for p in moe.parameters())
    e, k, f, g = moe_cfg.n_experts, moe_cfg.topk, moe_cfg.expert_hidden, moe_cfg.shared_expert_hidden
    assert costs.sparse_params == e * 3 * h * f
    assert costs.activated_sparse_params == k * 3 * h * f
    assert costs.dense_params == h * e + 3 * h * g
    assert not costs.shared_sparse
    # FLOPs of the matrix products that actually run, per token, are 2 × the MACs
    n_tokens = 10
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(2, n_tokens // 2, h))
    assert counter.get_total_flops() == 2 * n_tokens * sum(costs.macs.values())


def test_permuting_tokens_permutes_outputs():
    """The layer is per-token (hence causal): the output of a token depends on it alone."""
    moe = make_moe(6, n_experts=6, topk=2, expert_hidden=4, shared_expert_hidden=3)
    u_BTH = torch.randn(3, 5, 6, dtype=torch.float64)
    perm = torch.randperm(15)
    y_BTH, aux = moe(u_BTH)
    y_perm_BTH, aux_perm = moe(u_BTH.reshape(15, 6)[perm].reshape(3, 5, 6))
    torch.testing.assert_close(y_perm_BTH.reshape(15, 6), y_BTH.reshape(15, 6)[perm],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux_perm, aux, rtol=1e-12, atol=0)
    # and changing one token changes only that token's output
    u2_BTH = u_BTH.clone()
    u2_BTH[1, 2] += 1.0
    y2_BTH, _ = moe(u2_BTH)
    changed = (y2_BTH != y_BTH).any(dim=-1)
    assert changed[1, 2] and changed.sum() == 1


@pytest.mark.parametrize("scheme", ["paper", "official"])
def test_reset_parameters_uses_full_megatron_stds(scheme):
    ctx = InitContext(scheme=scheme, d_model=64, n_layers=8, ffn_hidden=256)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(n_experts=8, topk=2, expert_hidden=64, shared_expert_hidden=128), 64)
    moe.reset_parameters(ctx)
    trunc = 0.98658  # std of N(0, 1) truncated at ±3σ
    small, out = ctx.small_std * trunc, ctx.out_proj_std * trunc
    expected = {"router.w_EH": small, "experts.w1_EHF": small, "experts.w3_EHF": small,
                "experts.w2_EFH": out, "shared_expert.w1_EHF": small, "shared_expert.w3_EHF": small,
                "shared_expert.w2_EFH": out}
    for name, p in moe.named_parameters():
        std = expected.pop(name)
        assert p.std().item() == pytest.approx(std, rel=0.05), name
        assert p.abs().max().item() <= 3 * std / trunc, name  # truncated at 3σ
    assert not expected
