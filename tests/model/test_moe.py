"""The MoE baseline against a naive per-token reference: outputs, dropless routing, aux losses and
their mean over layers, gradients, the grouped-GEMM path against the loop, parameter and MAC
counts, init."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from umv2cli.config import MoEConfig, config_from_dict
from umv2cli.errors import UserError
from umv2cli.model.init import InitContext
from umv2cli.model.moe import MoE, PermuteRows, grouped_mm, moe_costs
from umv2cli.model.presets import get_preset
from umv2cli.model.transformer import build_model

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
    moe = MoE(MoEConfig(**cfg), h, n_layers=1).to(dtype)
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


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("shared", [0, 5])
@pytest.mark.parametrize("n_experts,topk", [(4, 1), (6, 2), (8, 3), (5, 5)])
def test_output_equals_per_token_reference(shared, n_experts, topk, experts):
    moe = make_moe(6, n_experts=n_experts, topk=topk, expert_hidden=4, shared_expert_hidden=shared,
                   experts=experts)
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


def balance_and_z(w_EH: torch.Tensor, x_NH: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L_balance = E·Σ_i f_i·P_i and L_z = mean logsumexp², written out token by token."""
    E, N = w_EH.shape[0], x_NH.shape[0]
    logits_NE = x_NH @ w_EH.T
    p_NE = logits_NE.softmax(dim=-1)
    chosen_NE = F.one_hot(p_NE.topk(K, dim=-1).indices, E).sum(dim=1).double()  # 1 where routed
    balance = E * sum(chosen_NE[:, i].sum() / (N * K) * p_NE[:, i].mean() for i in range(E))
    z = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits_NE) / N
    return balance, z


def test_aux_loss_equals_its_formula():
    """One layer: lb_coef·L_balance + z_coef/K·L_z (OLMoE's code divides the z-loss by K too)."""
    lb_coef, z_coef, E, K = 0.03, 0.007, 6, 2
    moe = make_moe(5, n_experts=E, topk=K, expert_hidden=3, lb_coef=lb_coef, z_coef=z_coef)
    u_BTH = torch.randn(1, 11, 5, dtype=torch.float64)
    _, aux = moe(u_BTH)
    balance, z = balance_and_z(moe.router.w_EH, u_BTH[0], K)
    assert aux.shape == ()
    torch.testing.assert_close(aux, lb_coef * balance + z_coef / K * z, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_experts,topk", [(4, 1), (8, 3), (64, 8)])
def test_uniform_router_gives_balance_one_and_z_log_e_squared(n_experts, topk):
    """Zero router weights: p_i = 1/E, so L_balance = E·Σ f_i/E = 1 whatever the top-k ties pick,
    and every logsumexp is log E."""
    torch.manual_seed(0)
    u_BTH = torch.randn(3, 4, 8, dtype=torch.float64)
    for lb_coef, z_coef, expected in [(1.0, 0.0, 1.0), (0.0, 1.0, math.log(n_experts) ** 2 / topk)]:
        moe = make_moe(8, n_experts=n_experts, topk=topk, expert_hidden=2,
                       lb_coef=lb_coef, z_coef=z_coef)
        torch.nn.init.zeros_(moe.router.w_EH)
        _, aux = moe(u_BTH)
        assert aux.item() == pytest.approx(expected, rel=1e-12)


def moe_model(n_layers: int):
    """tiny-moe with n_layers blocks, an MoE in each, float64, its own aux weights."""
    cfg = get_preset("tiny-moe")
    sparse = dataclasses.replace(cfg.sparse, lb_coef=0.02, z_coef=0.003)
    return build_model(dataclasses.replace(cfg, n_layers=n_layers, sparse=sparse), seed=n_layers).double()


def test_model_aux_is_the_mean_over_layers_as_olmoe_combines_them():
    """OLMoE's code: lb_coef·(1/L)·Σ_l L_balance,l + z_coef·(1/(L·K))·Σ_l L_z,l, each layer's terms
    computed on the input its router saw."""
    model = moe_model(n_layers=3)
    inputs = []
    for layer in model.sparse:
        layer.router.register_forward_pre_hook(lambda m, args: inputs.append((m.w_EH, args[0])))
    _, aux = model(torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0)))
    cfg, L = model.cfg.sparse, len(model.sparse)
    assert L == len(inputs) == 3
    terms = [balance_and_z(w_EH, x_NH, cfg.topk) for w_EH, x_NH in inputs]
    want = (cfg.lb_coef * sum(b for b, _ in terms) / L
            + cfg.z_coef / cfg.topk * sum(z for _, z in terms) / L)
    torch.testing.assert_close(aux, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_layers", [1, 4])
def test_uniform_routers_give_the_same_aux_whatever_the_number_of_layers(n_layers):
    """Balance 1 and z = (log E)² in every layer: the mean over layers is lb_coef + z_coef/K·(log E)²
    for 1 layer or 4 (a sum over layers, as before this convention, gave 4× that)."""
    model = moe_model(n_layers)
    for layer in model.sparse:
        torch.nn.init.zeros_(layer.router.w_EH)
    with torch.no_grad():
        _, aux = model(torch.randint(0, 512, (2, 9)))
    cfg = model.cfg.sparse
    assert aux.item() == pytest.approx(cfg.lb_coef + cfg.z_coef / cfg.topk * math.log(cfg.n_experts) ** 2,
                                       rel=1e-12)


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("shared", [0, 2])
def test_gradcheck_input_and_every_parameter(shared, experts):
    moe = make_moe(3, seed=1, **TINY, shared_expert_hidden=shared, experts=experts)
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


def output_and_gradients(moe: MoE, u_BTH: torch.Tensor, dy_BTH: torch.Tensor) -> list[torch.Tensor]:
    u_BTH = u_BTH.clone().requires_grad_()
    moe.zero_grad(set_to_none=True)
    y_BTH, aux = moe(u_BTH)
    ((y_BTH * dy_BTH).sum() + aux).backward()
    return [y_BTH, aux, u_BTH.grad, *(p.grad for p in moe.parameters())]


@pytest.mark.parametrize("shared", [0, 3])
@pytest.mark.parametrize("n_experts,topk", [(4, 1), (8, 3), (5, 5)])
def test_grouped_experts_equal_the_loop_forward_and_gradients(shared, n_experts, topk):
    """The grouped path (offsets, grouped products, one elementwise SwiGLU over all rows) against
    the per-expert loop on the same weights: output, aux, input and every parameter gradient."""
    cfg = dict(n_experts=n_experts, topk=topk, expert_hidden=4, shared_expert_hidden=shared)
    grouped, loop = make_moe(6, experts="grouped", **cfg), make_moe(6, experts="loop", **cfg)
    loop.load_state_dict(grouped.state_dict())
    u_BTH = torch.randn(3, 5, 6, dtype=torch.float64)
    dy_BTH = torch.randn(3, 5, 6, dtype=torch.float64)
    for got, want in zip(output_and_gradients(grouped, u_BTH, dy_BTH), output_and_gradients(loop, u_BTH, dy_BTH),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_grouped_experts_equal_the_loop_when_experts_get_no_rows():
    """Experts 0, 1, 3, 4, 6, 7 receive nothing: the offsets repeat, the empty groups are skipped."""
    h, cfg = 6, dict(n_experts=8, topk=2, expert_hidden=4, experts="grouped")
    grouped = make_moe(h, **cfg)
    base_H = torch.ones(h, dtype=torch.float64)
    with torch.no_grad():
        grouped.router.w_EH.mul_(0.01).add_(-base_H)
        grouped.router.w_EH[[2, 5]] += 2 * base_H
    loop = make_moe(h, **{**cfg, "experts": "loop"})
    loop.load_state_dict(grouped.state_dict())
    u_BTH = base_H + 0.1 * torch.randn(2, 9, h, dtype=torch.float64)
    assert set((u_BTH @ grouped.router.w_EH.T).topk(2, dim=-1).indices.flatten().tolist()) == {2, 5}
    dy_BTH = torch.randn(2, 9, h, dtype=torch.float64)
    for got, want in zip(output_and_gradients(grouped, u_BTH, dy_BTH), output_and_gradients(loop, u_BTH, dy_BTH),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grouped(u_BTH)[0], reference(grouped, u_BTH), rtol=1e-12, atol=1e-12)


def test_grouped_mm_fallback_follows_torch_grouped_mm_conventions():
    """torch's own CPU `_grouped_mm` (float32, 16-byte-aligned rows) against `grouped_mm`'s CPU
    path: block e of the rows ends at offs[e] (cumulative, int32), the weights are [E, in, out],
    and empty blocks are allowed; forward and both gradients. The CUDA path is this op's CUDA
    kernel, checked on a GPU by `umv2 bench layer --preset olmoe-227m` and `umv2 bench curves`."""
    g = torch.Generator().manual_seed(0)
    x_SI = torch.randn(13, 8, generator=g)
    w_EIO = torch.randn(4, 8, 12, generator=g)
    ends_E = torch.tensor([3, 3, 10, 13], dtype=torch.int32)
    dy_SO = torch.randn(13, 12, generator=g)
    results = []
    for fn in (lambda x, w: torch._grouped_mm(x, w, offs=ends_E), lambda x, w: grouped_mm(x, w, ends_E)):
        x, w = x_SI.clone().requires_grad_(), w_EIO.clone().requires_grad_()
        y = fn(x, w)
        y.backward(dy_SO)
        results.append((y, x.grad, w.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][0][3:10], x_SI[3:10] @ w_EIO[2])  # block 2 after the empty block 1


def test_permute_rows_gradient_gathers_and_sums_each_tokens_copies():
    """x[perm // K] whose gradient sums each row's K copies, as the scatter-add of plain indexing
    does; the combine's inverse permutation (K = 1) round-trips the rows."""
    g = torch.Generator().manual_seed(0)
    N, K, H = 7, 3, 5
    x_NH = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    perm_S = torch.randperm(N * K, generator=g)
    inv_S = perm_S.argsort()
    dy_SH = torch.randn(N * K, H, dtype=torch.float64, generator=g)
    y_SH = PermuteRows.apply(x_NH, perm_S, inv_S, K)
    (dx_NH,) = torch.autograd.grad(y_SH, x_NH, dy_SH)
    assert torch.equal(y_SH, x_NH.detach()[perm_S // K])
    want_NH = torch.zeros(N, H, dtype=torch.float64).index_add_(0, perm_S // K, dy_SH)
    torch.testing.assert_close(dx_NH, want_NH, rtol=1e-15, atol=1e-15)
    assert torch.equal(PermuteRows.apply(y_SH, inv_S, perm_S, 1), x_NH.detach().repeat_interleave(K, 0))


def test_auto_runs_the_loop_on_cpu_and_the_switch_is_validated():
    u_BTH = torch.randn(1, 2, 8)
    assert not make_moe(8, **TINY, experts="auto").use_grouped(u_BTH)
    assert make_moe(8, **TINY, experts="grouped").use_grouped(u_BTH)
    assert not make_moe(8, **TINY, experts="loop").use_grouped(u_BTH)
    with pytest.raises(UserError, match="sparse.experts='fast': expected one of 'auto', 'grouped', 'loop'"):
        config_from_dict({"preset": "tiny-moe", "sparse": {"experts": "fast"}})


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
    moe = MoE(MoEConfig(n_experts=8, topk=2, expert_hidden=64, shared_expert_hidden=128), 64, n_layers=1)
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


def test_bench_sets_grouped_experts_beside_the_loop_on_the_same_model():
    """`umv2 bench layer|curves` on an MoE preset: two configs that differ only in `experts`."""
    from umv2cli.kernel_bench import path_and_reference

    cfg = get_preset("tiny-moe")
    paths = path_and_reference(cfg)
    assert list(paths) == ["grouped", "loop"]
    for name, path_cfg in paths.items():
        assert path_cfg == dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, experts=name))
    assert list(path_and_reference(get_preset("tiny-ultramemv2"))) == ["triton", "torch"]
    with pytest.raises(UserError, match="use an UltraMemV2 or MoE preset"):
        path_and_reference(get_preset("tiny-dense"))
