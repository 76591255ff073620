"""The Triton path under torch.compile: the custom ops umv2::tdqkr_select and umv2::memory_lookup
(registration, fake shapes, autograd), no graph break in an UltraMemV2 layer, and a compiled layer
that computes what the eager one does. On CPU the kernels run under Triton's interpreter and the
compiler backend is aot_eager (AOTAutograd traces forward and backward through the ops' fake
implementations, without Inductor's C++ build)."""

import torch
from kernel_checks import DEVICE

from umv2cli.config import UltraMemV2Config
from umv2cli.kernels import tdqkr
from umv2cli.model.init import InitContext
from umv2cli.model.ultramemv2 import UltraMemV2, new_value_pool

TINY = UltraMemV2Config(knum=5, topm=6, dk=4, dv=6, dp=3, k_rc=5, kernels="triton")


def tiny_layer(cfg=TINY, d_model=8):
    torch.manual_seed(0)
    layer = UltraMemV2(cfg, d_model, pool=new_value_pool(cfg, 1), home=0)
    layer.reset_parameters(InitContext("paper", d_model, 1, ffn_hidden=2 * d_model))
    return layer.to(DEVICE)


def test_select_custom_op_registration():
    gen = torch.Generator().manual_seed(0)
    s_row, s_col = (torch.randn(3, 2, 6, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    cores = torch.rand(2, 2, 2, generator=gen).to(DEVICE).requires_grad_()
    u, v = tdqkr.rank1_vectors(cores, torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE))
    result = torch.library.opcheck(tdqkr.tdqkr_select_op, (s_row, s_col, cores, u, v, 3, 4))
    assert set(result.values()) == {"SUCCESS"}, result


def test_layer_has_no_graph_break():
    layer = tiny_layer()
    explained = torch._dynamo.explain(layer)(torch.randn(1, 5, 8, device=DEVICE))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_layer_equals_eager_forward_and_backward():
    layer = tiny_layer()
    u = torch.randn(1, 5, 8, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))

    def run(fn):
        layer.zero_grad(set_to_none=True)
        y, _ = fn(u)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y, grads = run(layer)
    torch._dynamo.reset()
    y_compiled, grads_compiled = run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads.keys() and "pool_TD" in grads
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
