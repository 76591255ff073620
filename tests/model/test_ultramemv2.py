"""The UltraMemV2 layer against an independent per-token reference, its gradients and its init."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from umv2cli.config import UltraMemV2Config
from umv2cli.model.ffn import SwiGLU
from umv2cli.model.init import InitContext
from umv2cli.model.ultramemv2 import UltraMemV2, new_value_pool

from devices import DEVICE

TINY = UltraMemV2Config(knum=5, topm=6, dk=4, dv=6, dp=3, k_rc=5)


def make_layers(cfg, d_model=8, n_layers=1, scheme="paper", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    pool = new_value_pool(cfg, n_layers)
    layers = [UltraMemV2(cfg, d_model, pool=pool, home=i) for i in range(n_layers)]
    ctx = InitContext(scheme, d_model, n_layers, ffn_hidden=2 * d_model)
    for layer in layers:
        layer.reset_parameters(ctx)
        layer.to(dtype)
        with torch.no_grad():  # random norm weights, so a test sees which weight goes where
            layer.g_q_D.mul_(1 + 0.3 * torch.rand_like(layer.g_q_D))
            layer.g_k_D.mul_(1 + 0.3 * torch.rand_like(layer.g_k_D))
    return layers, pool


def reference_layer(layer: UltraMemV2, u_BH: torch.Tensor) -> torch.Tensor:
    """Steps 1-10 of the layer (its module's docstring; paper §3) token by token, scoring all n²
    grid cells (valid when k_rc = n)."""
    cfg = layer.cfg
    R, D, C = cfg.rank, cfg.dk, cfg.cores
    out = []
    for u in u_BH:
        q = layer.w_q.weight @ u
        q = q.view(2, -1, D)
        q = q.expand(2, R, D) if cfg.shared_rank_query else q
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * layer.g_q_D
        k = layer.keys_SRND / layer.keys_SRND.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * layer.g_k_D
        s_row = torch.stack([k[0, r] @ q[0, r] for r in range(R)])  # [R, N]
        s_col = torch.stack([k[1, r] @ q[1, r] for r in range(R)])
        grid = torch.stack([s_row.T @ layer.cores_CRR[c] @ s_col for c in range(C)])  # [C, N, N]
        cells = grid.sum(0).flatten().topk(cfg.topm).indices
        x_p = layer.w_pre.weight @ u
        window = cfg.window_knum**2
        start = (layer.home - (cfg.share_layers - 1) // 2) * cfg.knum**2
        o = torch.zeros(cfg.dv, dtype=u.dtype)
        for cell in cells:
            row = layer.pool_TD[(start + int(layer.shuffle[cell]) % window) % layer.pool_TD.shape[0]]
            z = row[:cfg.dp] @ x_p
            z = F.gelu(z) if cfg.pre_value_act == "gelu" else z
            w = cfg.dv // C
            for c in range(C):
                o[c * w:(c + 1) * w] += grid[c].flatten()[cell] * z * row[cfg.dp + c * w:cfg.dp + (c + 1) * w]
        out.append(layer.w_o.weight @ o)
    return torch.stack(out)


VARIANTS = {
    "paper defaults": TINY,
    "shared rank query": dataclasses.replace(TINY, shared_rank_query=True),
    "gelu neuron": dataclasses.replace(TINY, pre_value_act="gelu"),
    "key expansion 2": dataclasses.replace(TINY, key_expand=2, k_rc=10, topm=7, knum=5),
    "three cores, rank 3": dataclasses.replace(TINY, cores=3, rank=3, dv=9),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_equals_per_token_reference_over_the_full_grid(name):
    (layer,), _ = make_layers(VARIANTS[name])
    u = torch.randn(2, 3, 8, dtype=torch.float64)
    y, aux = layer(u)
    torch.testing.assert_close(y.view(-1, 8), reference_layer(layer, u.view(-1, 8)))
    assert aux.item() == 0.0


def test_ring_sharing_reads_a_window_centred_on_the_home_table():
    cfg = dataclasses.replace(TINY, knum=3, share_layers=4, k_rc=6, topm=5)  # window 6² = 36 rows of 4·9
    layers, pool = make_layers(cfg, n_layers=5)
    u = torch.randn(4, 8, dtype=torch.float64)
    for layer in layers:
        torch.testing.assert_close(layer(u[None])[0][0], reference_layer(layer, u))
        start = (layer.home - 1) * 9
        reachable = {(start + s) % 45 for s in range(36)}
        rows = layer.physical_rows(torch.arange(cfg.keys_per_side**2))
        assert set(rows.tolist()) == reachable  # the window, wrapping around the 5·9-row pool


def test_without_sharing_each_layer_reads_only_its_home_table():
    layers, _ = make_layers(TINY, n_layers=3)
    for layer in layers:
        rows = layer.physical_rows(torch.arange(TINY.keys_per_side**2))
        assert sorted(rows.tolist()) == list(range(layer.home * 25, (layer.home + 1) * 25))


@pytest.mark.parametrize("name", ["paper defaults", "shared rank query", "gelu neuron"])
def test_gradients_of_every_parameter_and_the_input(name):
    (layer,), _ = make_layers(VARIANTS[name])
    names = [n for n, _ in layer.named_parameters()]
    assert set(names) == {"w_q.weight", "g_q_D", "keys_SRND", "g_k_D", "cores_CRR", "w_pre.weight",
                          "w_o.weight", "pool_TD"}
    u = torch.randn(1, 3, 8, dtype=torch.float64)

    def f(u, *params):
        return functional_call(layer, dict(zip(names, params)), (u,))[0]

    inputs = (u.requires_grad_(True), *(p.detach().clone().requires_grad_(True) for p in layer.parameters()))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6)


def test_no_gradient_reaches_rank1_vectors_or_the_shuffle():
    (layer,), _ = make_layers(TINY)
    layer(torch.randn(1, 4, 8, dtype=torch.float64))[0].sum().backward()
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"shuffle", "rank1_u_R", "rank1_v_R"}
    assert all(not b.requires_grad and b.grad is None for b in buffers.values())
    assert all(p.grad is not None for p in layer.parameters())


def test_rank1_refresh_follows_the_cores_without_flipping_sign():
    (layer,), _ = make_layers(TINY)
    u0 = layer.rank1_u_R.clone()
    with torch.no_grad():
        layer.cores_CRR.add_(0.01 * torch.randn_like(layer.cores_CRR))
    layer.refresh_rank1()
    assert (layer.rank1_u_R - u0).abs().sum() < 0.2  # moved a little, did not flip
    U, _, Vh = torch.linalg.svd(layer.cores_CRR.detach().sum(0))
    torch.testing.assert_close(layer.rank1_u_R.abs(), U[:, 0].abs())
    torch.testing.assert_close(layer.rank1_v_R.abs(), Vh[0].abs())


@pytest.mark.parametrize("shared_rank_query", [False, True])
def test_paper_init_matches_ffn_output_std_and_calibrates_scores(shared_rank_query):
    # App. A: the memory output std matches the FFN's at step 0, mean top-m score ≈ 1 (A.2)
    h, L, F_ = 256, 8, 683
    cfg = UltraMemV2Config(knum=64, topm=16, dk=64, dv=96, dp=32, shared_rank_query=shared_rank_query)
    (layer,), _ = make_layers(cfg, d_model=h, n_layers=1, dtype=torch.float32)
    ctx = InitContext("paper", h, L, F_)
    layer.reset_parameters(ctx)  # again, with this model's depth and FFN, and no jittered norms
    ffn = SwiGLU(h, F_)
    ffn.reset_parameters(ctx)
    u = F.rms_norm(torch.randn(4096, h), (h,))
    with torch.no_grad():
        ratio = (layer(u[None])[0].std() / ffn(u).std()).item()
        s = layer.scores(u)
        from umv2cli.kernels.tdqkr import select_topm_reference
        _, _, scores = select_topm_reference(s[:, 0], s[:, 1], layer.cores_CRR, layer.rank1_u_R,
                                             layer.rank1_v_R, cfg.k_rc, cfg.topm)
    assert 1 / 1.5 < ratio < 1.5
    assert abs(scores.sum(-1).mean().item() - 1) < 0.1


def test_official_init_uses_the_code_constants():
    (layer,), pool = make_layers(TINY, scheme="official", dtype=torch.float32)
    layer.reset_parameters(InitContext("official", 8, 1, 16))
    torch.testing.assert_close(layer.g_q_D, torch.full((4,), 4**-0.4))
    assert 0.01 < pool.std().item() < 0.03  # N(0, 0.02²)
    assert 0 <= layer.cores_CRR.min() and layer.cores_CRR.max() <= 1  # U(0, 1)


# ----------------------------------------------------------------------------------------------
# kernels = "triton" | "torch": the whole model trains the same either way, on DEVICE (CUDA when
# there is one; else the CPU, where the Triton kernels, selection and lookup, run under the
# interpreter, which tests/conftest.py switches on)


def tiny_model_logits_and_grads(kernels: str, sparse: UltraMemV2Config):
    from umv2cli.config import ModelConfig
    from umv2cli.model.transformer import build_model

    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, vocab_size=64, seq_len=8,
                      sparse=dataclasses.replace(sparse, kernels=kernels))
    model = build_model(cfg, seed=0, device=DEVICE)
    idx = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits, _ = model(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["paper defaults", "gelu neuron", "no pre-values"])
def test_triton_kernels_give_the_same_logits_and_gradients_as_torch(name):
    sparse = VARIANTS.get(name) or dataclasses.replace(TINY, dp=0)
    logits, grads = tiny_model_logits_and_grads("triton", sparse)
    ref_logits, ref_grads = tiny_model_logits_and_grads("torch", sparse)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and "memory_pool" in grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_triton_lookup_under_bf16_autocast_returns_the_reference_dtype():
    (layer,), _ = make_layers(TINY, dtype=torch.float32)
    layer.to(DEVICE)
    u_BH = torch.randn(5, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), torch.no_grad():
        p_BM, scores_BMC = layer.select(u_BH)  # one selection for both lookups
    assert scores_BMC.dtype == torch.bfloat16
    outputs = []
    for kernels in ("triton", "torch"):
        layer.cfg = dataclasses.replace(TINY, kernels=kernels)
        layer.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            o_BV = layer.lookup(layer.w_pre(u_BH), p_BM, scores_BMC)
        o_BV.float().sum().backward()
        outputs.append((o_BV, layer.pool_TD.grad.clone(), layer.w_pre.weight.grad.clone()))
    (o, d_pool, d_pre), (o_ref, d_pool_ref, d_pre_ref) = outputs
    assert o.dtype == o_ref.dtype == torch.bfloat16
    assert d_pool.dtype == torch.float32
    # the reference rounds its einsums to bf16, the kernels accumulate in fp32
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d_pool, d_pool_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d_pre, d_pre_ref, rtol=2e-2, atol=2e-2)


TRITON_NODES, TORCH_NODES = ("TDQKRSelectBackward", "MemoryLookupBackward"), ("TransposeBackward0", "ViewBackward0")


@pytest.mark.parametrize("kernels,nodes", [
    ("triton", TRITON_NODES),
    ("torch", TORCH_NODES),
    ("auto", TRITON_NODES if DEVICE == "cuda" else TORCH_NODES),  # "auto": Triton on CUDA tensors
])
def test_kernels_switch_picks_selection_and_lookup(kernels, nodes):
    (layer,), _ = make_layers(dataclasses.replace(TINY, kernels=kernels), dtype=torch.float32)
    layer.to(DEVICE)
    u_BH = torch.randn(3, 8, device=DEVICE)
    p_BM, scores_BMC = layer.select(u_BH)
    o_BV = layer.lookup(layer.w_pre(u_BH), p_BM, scores_BMC)
    assert (scores_BMC.grad_fn.name(), o_BV.grad_fn.name()) == nodes


def test_pool_windows_give_each_layer_its_home_table_on_the_triton_path():
    from umv2cli.model.ultramemv2 import pool_windows

    cfg = dataclasses.replace(TINY, kernels="triton")
    layers, pool = make_layers(cfg, n_layers=3, dtype=torch.float32)
    n2 = cfg.knum**2
    windows = pool_windows(pool, layers)
    assert [w.first for w in windows] == [0, n2, 2 * n2]
    grads = [w.grad_rows() for w in windows]  # as the layers' backwards ask for them
    for (table, first, _), grad in zip(windows, grads):  # views of the pool, so gradients flow to it
        assert table.shape == grad.shape == (n2, pool.shape[1]) and table.data_ptr() == pool[first].data_ptr()
        assert grad._base is grads[0]._base and grad.data_ptr() == grads[0]._base[first].data_ptr()
    with torch.no_grad():  # nothing to differentiate: no buffer
        assert all(w.grad_rows is None for w in pool_windows(pool, layers))
    assert pool_windows(pool, make_layers(dataclasses.replace(cfg, kernels="torch"), n_layers=3)[0]) is None
    shared = dataclasses.replace(cfg, share_layers=2)
    assert pool_windows(new_value_pool(shared, 3), make_layers(shared, n_layers=3)[0]) is None


def three_windowed_layers():
    """Three layers on the Triton path, their shared pool, an input, and `pool_windows`'s windows."""
    from umv2cli.model.ultramemv2 import pool_windows

    cfg = dataclasses.replace(TINY, kernels="triton")
    layers, pool = make_layers(cfg, n_layers=3, dtype=torch.float32)
    for layer in layers:
        layer.to(DEVICE)
    return cfg, layers, pool, torch.randn(2, 3, 8, device=DEVICE), pool_windows(pool, layers)


def test_the_pool_gradient_is_the_buffer_the_lookups_wrote_not_a_concatenation():
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg, layers, pool, u, windows = three_windowed_layers()
    loss = sum(layer(u, window=w)[0].square().sum() for layer, w in zip(layers[::-1], windows[::-1]))
    del windows

    class PoolSizedResults(TorchDispatchMode):  # the ops whose result is as large as the pool
        made: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == pool.numel():
                self.made.append((func.__name__, out.data_ptr()))
            return out

    with PoolSizedResults():
        loss.backward()
    names = [name.split(".")[0] for name, _ in PoolSizedResults.made]  # no cat, clone, copy or add
    assert names == ["empty_like", "detach"], names  # one buffer, made in the backward; .grad takes it
    assert {ptr for _, ptr in PoolSizedResults.made} == {pool.grad.data_ptr()}
    got = pool.grad.clone()
    pool.grad = None
    for layer in layers:
        layer.cfg = dataclasses.replace(cfg, kernels="torch")
    sum(layer(u)[0].square().sum() for layer in layers).backward()  # the whole pool, the references
    torch.testing.assert_close(got, pool.grad, rtol=1e-4, atol=1e-6)


def test_a_table_no_layer_read_gets_a_zero_gradient():
    cfg, layers, pool, u, windows = three_windowed_layers()
    layers[1](u, window=windows[1])[0].square().sum().backward()  # layers 0 and 2 do not run
    n2 = cfg.knum**2
    assert bool((pool.grad[:n2] == 0).all() and (pool.grad[2 * n2:] == 0).all())
    assert pool.grad[n2:2 * n2].abs().sum() > 0
