"""The transformer with each sparse layer: causality, learning, placement, seeding."""

import pytest
import torch
import torch.nn.functional as F

from umv2cli.model.presets import get_preset
from umv2cli.model.transformer import build_model

TINY_PRESETS = ["tiny-dense", "tiny-ultramemv2", "tiny-ultramem", "tiny-memoryplus", "tiny-pkm",
                "tiny-peer", "tiny-moe"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_changing_token_t_changes_no_output_before_t(preset):
    model = build_model(get_preset(preset), seed=1).double()
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 512
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert (after[:, t:] - before[:, t:]).abs().amax() > 1e-6  # the change does reach later outputs


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_model_lowers_its_loss_on_a_fixed_batch_within_50_steps(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt.register_step_post_hook(lambda *_: model.refresh_rank1())
    idx = torch.randint(0, 512, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(50):
        logits, aux = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        (loss + aux).backward()
        losses.append(loss.item())
        if len(losses) == 1:  # the sparse layers take part in learning
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sparse.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_sparse_layers_read_the_normed_ffn_input_of_their_read_block():
    model = build_model(get_preset("tiny-ultramem"), seed=0)  # skip pairs 0:2/1:3
    normed, read = {}, []
    for i, block in enumerate(model.blocks):
        block.ffn_norm.register_forward_hook(lambda m, a, out, i=i: normed.__setitem__(i, out))
    for layer in model.sparse:
        layer.register_forward_hook(lambda m, args, out: read.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 8)))
    assert torch.equal(read[0], normed[0]) and torch.equal(read[1], normed[1])


def test_replaced_blocks_have_no_ffn_and_the_others_keep_theirs():
    memoryplus = build_model(get_preset("tiny-memoryplus"))  # replaces the FFN of blocks 1 and 3
    assert [b.ffn is None for b in memoryplus.blocks] == [False, True, False, True]
    peer = build_model(get_preset("tiny-peer"))  # "middle": the FFN of block L//2 (PEER §3)
    assert [b.ffn is None for b in peer.blocks] == [False, False, True, False]
    ultramemv2 = build_model(get_preset("tiny-ultramemv2"))  # parallel to the FFN in every block
    assert all(b.ffn is not None for b in ultramemv2.blocks) and len(ultramemv2.sparse) == 4


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    a, b, c = (build_model(get_preset("tiny-ultramemv2"), seed=s) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["memory_pool"], sc["memory_pool"])


def test_shared_pool_is_one_parameter_for_every_memory_layer():
    model = build_model(get_preset("tiny-ultramemv2"))
    assert all(layer.pool_TD is model.memory_pool for layer in model.sparse)
    assert sum(p is model.memory_pool for p in model.parameters()) == 1


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_training_is_bitwise_deterministic_with_several_threads(preset):
    # exact resume needs it; advanced-indexing backward on CPU is not (the layers use F.embedding)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(2):
            model = build_model(get_preset(preset), seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(0)
            losses = []
            for _ in range(6):
                idx = torch.randint(0, 512, (8, 33), generator=gen)
                logits, aux = model(idx[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
                (loss + aux).backward()
                opt.step()
                opt.zero_grad()
                model.refresh_rank1()
                losses.append(loss.item())
            runs.append(losses)
        assert runs[0] == runs[1]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["tiny-ultramemv2", "tiny-ultramem"])
def test_model_refresh_rank1_equals_each_layer_refreshing_its_own(preset):
    """The model refreshes every layer's prefilter vectors in one batched SVD: the same vectors,
    signs included, as each layer's own refresh."""
    torch.manual_seed(0)
    model, twin = build_model(get_preset(preset), seed=3), build_model(get_preset(preset), seed=3)
    layers = [layer for layer in model.sparse if hasattr(layer, "refresh_rank1")]
    assert len(layers) >= 2
    with torch.no_grad():
        for k, (layer, other) in enumerate(zip(layers, (m for m in twin.sparse if hasattr(m, "refresh_rank1")))):
            cores = torch.rand_like(layer.cores_CRR)
            layer.cores_CRR.copy_(cores)
            other.cores_CRR.copy_(cores)
            if k % 2:  # a previous sign the other way: the refresh must keep it
                for buf in (layer.rank1_u_R, layer.rank1_v_R, other.rank1_u_R, other.rank1_v_R):
                    buf.neg_()
    model.refresh_rank1()
    for layer in twin.sparse:
        if hasattr(layer, "refresh_rank1"):
            layer.refresh_rank1()
    for layer, other in zip(layers, (m for m in twin.sparse if hasattr(m, "refresh_rank1"))):
        torch.testing.assert_close(layer.rank1_u_R, other.rank1_u_R, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.rank1_v_R, other.rank1_v_R, rtol=1e-6, atol=1e-6)
