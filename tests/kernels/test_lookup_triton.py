"""The Triton value lookup (kernels/lookup.py K2 and the x_p pass, kernels/value_grad.py K34 and
its sort by row) against the reference, under Triton's interpreter without CUDA (see
kernel_checks.py)."""

import os

import pytest
import torch
from kernel_checks import DEVICE, REL_TOL, rel_err

from umv2cli.kernels import lookup, value_grad


def random_lookup(B, M, C, P, V, T, *, dtype=torch.float32, index_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_p = torch.randn(B, P, generator=gen).to(dtype)
    table = torch.randn(T, P + V, generator=gen).to(dtype)
    rows_BM = torch.randint(0, T, (B, M), generator=gen)
    rows_BM[0, 1] = rows_BM[0, 0]  # a duplicate within a token
    rows_BM[1, 0] = rows_BM[0, 0]  # and across tokens
    scores = torch.randn(B, M, C, generator=gen).to(dtype)
    do = torch.randn(B, V, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (x_p, table, rows_BM.to(index_dtype), scores, do)]


def check_against_reference(B, M, C, P, V, T, act, dtype, index_dtype, *, read_dtype=None, seed=0):
    """Output and every gradient of the Triton lookup against the reference in fp64 on the same
    (rounded) inputs; with read_dtype the reference reads the table rounded to it."""
    x_p, table, rows_BM, scores, do = random_lookup(B, M, C, P, V, T, dtype=dtype, index_dtype=index_dtype,
                                                    seed=seed)
    ours = [t.clone().requires_grad_(True) for t in (x_p, table, scores)]
    o = lookup.memory_lookup(ours[0], ours[1], rows_BM, ours[2], act, impl="triton", read_dtype=read_dtype)
    o.backward(do.to(o.dtype))
    ref = [t.double().cpu().requires_grad_(True) for t in (x_p, table, scores)]
    read = ref[1] if read_dtype is None else ref[1].to(read_dtype).double()  # rounded, straight-through
    o_ref = lookup.memory_lookup_reference(ref[0], read, rows_BM.cpu(), ref[2], act)
    o_ref.backward(do.to(o.dtype).double().cpu())
    tol = REL_TOL[read_dtype or dtype]
    assert o.dtype == (read_dtype or dtype) and o.shape == (B, V)
    assert rel_err(o.cpu(), o_ref) < tol, "output"
    for name, a, b in zip(("x_p", "table", "scores"), ours, ref):
        if name == "x_p" and not P:  # D_p = 0: x_p [B, 0] does not enter the output
            continue
        assert a.grad.dtype == a.dtype, name  # the table's gradient keeps the table's dtype
        assert rel_err(a.grad.cpu(), b.grad) < tol, f"grad of {name}"


SHAPES = [  # B, M, C, D_p, D_v, T: odd dims (masks), D_p = 0, C = 1, 2, 3, T < B·m (duplicates)
    (5, 4, 2, 3, 6, 9),
    (3, 3, 1, 0, 5, 7),
    (4, 5, 3, 7, 9, 6),
    (4, 3, 2, 20, 34, 11),
]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("B,M,C,P,V,T", SHAPES)
def test_triton_lookup_equals_reference_fp32(B, M, C, P, V, T, act):
    check_against_reference(B, M, C, P, V, T, act, torch.float32, torch.int64)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype,index_dtype,act,shape", [
    (torch.float16, torch.int32, "gelu", SHAPES[0]),
    (torch.float16, torch.int64, "none", SHAPES[2]),
    (torch.float32, torch.int32, "none", SHAPES[1]),
    (torch.bfloat16, torch.int32, "gelu", SHAPES[3]),  # no tl.dot, so the interpreter gets bf16 right
])
def test_triton_lookup_dtypes_and_index_types(dtype, index_dtype, act, shape):
    check_against_reference(*shape, act, dtype, index_dtype)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("act,shape", [("gelu", SHAPES[3]), ("none", SHAPES[1])])
def test_bf16_reads_of_an_fp32_table(act, shape):
    """The bf16 pool: rows read in bf16, the gradient in fp32 as if the rounding were not there."""
    check_against_reference(*shape, act, torch.float32, torch.int64, read_dtype=torch.bfloat16)


def test_bf16_reads_under_the_reference_path_round_the_same_way():
    x_p, table, rows_BM, scores, _ = random_lookup(*SHAPES[0], dtype=torch.float32)
    table.requires_grad_(True)
    o = lookup.memory_lookup(x_p, table, rows_BM, scores, "none", impl="torch", read_dtype=torch.bfloat16)
    rounded = table.detach().bfloat16().float()  # rows rounded, arithmetic in fp32 (as the kernels)
    expected = lookup.memory_lookup_reference(x_p, rounded, rows_BM, scores, "none")
    assert o.dtype == torch.bfloat16 and torch.equal(o, expected.bfloat16())
    o.float().sum().backward()
    assert table.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the backward's parts: the sort by row, K34's rows (hot rows over several steps), every row written


@pytest.mark.parametrize("L,T", [(37, 9), (5000, 1000), (60, 2), (5, 1)])
def test_sort_by_row_is_stable_and_gives_int32(L, T):
    rows_L = torch.randint(0, T, (L,), generator=torch.Generator().manual_seed(L)).to(DEVICE)
    sorted_L, order_L = value_grad.sort_by_row(rows_L, T)
    assert sorted_L.dtype == order_L.dtype == torch.int32
    assert torch.equal(sorted_L.cpu().long(), rows_L.cpu()[order_L.cpu().long()])
    assert bool((sorted_L[1:] >= sorted_L[:-1]).all())
    ties = sorted_L[1:] == sorted_L[:-1]  # equal rows keep ascending lookup order ℓ
    assert bool((order_L[1:][ties] > order_L[:-1][ties]).all())


def backward_inputs(B, M, C, P, V, T, seed=1, crowd=0):
    """Inputs of mem_bwd with h from the forward; each token's first `crowd` lookups read row 0."""
    x_p, table, rows_BM, scores, do = random_lookup(B, M, C, P, V, T, seed=seed)
    rows_BM[:, :crowd] = 0
    _, h = lookup.mem_fwd(x_p, table, rows_BM, scores, "gelu")
    return x_p, table, rows_BM, scores, h, do


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("B,M,C,P,V,T,crowd", [
    (6, 6, 1, 3, 200, 1, 0),  # one row of 36 lookups: two chunks
    (4, 6, 2, 0, 200, 2, 0),  # D_p = 0; two rows of ~12 in 24 lookups: one chunk each
    (40, 5, 2, 3, 8, 30, 3),  # 120+ lookups on row 0 (four or five chunks), the rest spread over 30 rows
    (30, 4, 1, 0, 16, 3, 2),  # D_p = 0; 60 and ~20 more on row 0, ~20 on each of the two others
])
def test_rows_of_many_lookups_sum_in_a_fixed_order(B, M, C, P, V, T, crowd):
    """A row's lookups are summed in chunks of value_grad.CHUNK, in one fixed order however many
    crowd onto it."""
    args = backward_inputs(B, M, C, P, V, T, crowd=crowd)
    assert (args[2] == 0).sum() > 2 * value_grad.CHUNK or not crowd, "row 0 must take three chunks or more"
    first = lookup.mem_bwd(*args, "gelu")
    second = lookup.mem_bwd(*args, "gelu")
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two calls differ in some bit"
    x_p, table, rows_BM, scores, h, do = args
    ref = [t.double().cpu().requires_grad_(True) for t in (x_p, table, scores)]
    lookup.memory_lookup_reference(ref[0], ref[1], rows_BM.cpu(), ref[2], "gelu").backward(do.double().cpu())
    dx, dtable, ds = first
    assert rel_err(dtable.cpu(), ref[1].grad) < 1e-5 and rel_err(ds.cpu(), ref[2].grad) < 1e-5
    if P:
        assert rel_err(dx.cpu(), ref[0].grad) < 1e-5


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("B", [4, 0])  # no lookups at all: the gradient is still all written
def test_backward_writes_every_row_untouched_ones_zero(B):
    x_p, table, rows_BM, scores, h, do = backward_inputs(4, 3, 2, 3, 4, 40)
    x_p, rows_BM, scores, h, do = (t[:B] for t in (x_p, rows_BM, scores, h, do))
    grad = torch.full((40, 7), float("nan"), device=DEVICE)  # no row may be left as it was
    z = torch.nn.functional.gelu(h)
    _, dz = value_grad.mem_bwd_rows(table, *value_grad.sort_by_row(rows_BM, 40), scores, h, x_p, do, grad, "gelu")
    touched = torch.zeros(40, dtype=torch.bool)
    touched[rows_BM.reshape(-1).cpu()] = True
    assert bool((grad.cpu()[~touched] == 0).all())
    fp64 = [t.cpu() if t is rows_BM else t.double().cpu() for t in (x_p, rows_BM, scores, z, dz, do)]
    expected = value_grad.value_grad_reference(*fp64, 40)
    assert rel_err(grad.cpu(), expected) < 1e-5


# ------------------------------------------------------------------------------------------------
# the custom op (torch.compile's path) and the switch


def test_lookup_custom_op_registration():
    x_p, table, rows_BM, scores, _ = random_lookup(3, 4, 2, 3, 6, 5)
    args = (x_p.requires_grad_(), table.requires_grad_(), None, rows_BM, scores.requires_grad_(), "gelu")
    result = torch.library.opcheck(lookup.memory_lookup_op, args)
    assert set(result.values()) == {"SUCCESS"}, result
    bf16 = (*args[:2], table.detach().bfloat16(), *args[3:])
    result = torch.library.opcheck(lookup.memory_lookup_op, bf16)
    assert set(result.values()) == {"SUCCESS"}, result


def test_impl_switch_and_one_line_errors():
    x_p, table, rows_BM, scores, _ = random_lookup(2, 3, 2, 2, 4, 5)
    expected = lookup.memory_lookup_reference(x_p, table, rows_BM, scores, "gelu")
    assert torch.equal(lookup.memory_lookup(x_p, table, rows_BM, scores, "gelu", impl="torch"), expected)
    if DEVICE == "cpu":  # auto = Triton iff the table is on CUDA
        assert torch.equal(lookup.memory_lookup(x_p, table, rows_BM, scores, "gelu"), expected)
    bad = {"act": dict(act="relu"), "impl": dict(impl="cuda")}
    call = dict(x_p_BP=x_p, table_TD=table, rows_BM=rows_BM, scores_BMC=scores, act="none", impl="triton")
    for name, change in bad.items():
        with pytest.raises(ValueError, match=name):
            lookup.memory_lookup(**{**call, **change})
    wide = torch.randn(5, 12, device=DEVICE)[:, :6]  # rows of a wider tensor: not contiguous
    with pytest.raises(ValueError, match="table must be contiguous"):
        lookup.memory_lookup(**{**call, "table_TD": wide})
    with pytest.raises(ValueError, match="float tensors"):
        lookup.memory_lookup(**{**call, "scores_BMC": scores.long()})
    with pytest.raises(ValueError, match="divisible by C=3"):
        lookup.memory_lookup(**{**call, "scores_BMC": torch.randn(2, 3, 3, device=DEVICE)})
    with pytest.raises(ValueError, match="int32 or int64"):
        lookup.memory_lookup(**{**call, "rows_BM": rows_BM.float()})


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(lookup._mem_fwd_kernel).__name__ == "InterpretedFunction"
        assert type(value_grad._mem_bwd_rows_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("shape,dtype", [((40, 6), torch.float32), ((40, 7), torch.bfloat16)])
def test_backward_refuses_a_gradient_buffer_of_another_shape_or_dtype(shape, dtype):
    x_p, table, rows_BM, scores, h, do = backward_inputs(4, 3, 2, 3, 4, 40)
    with pytest.raises(ValueError, match="grad_TD must be contiguous fp32"):
        lookup.mem_bwd(x_p, table, rows_BM, scores, h, do, "gelu", torch.empty(shape, dtype=dtype, device=DEVICE))
