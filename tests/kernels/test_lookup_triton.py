"""The Triton value lookup (kernels/lookup.py K2/K3, kernels/value_grad.py K4) against the reference,
under Triton's interpreter without CUDA (see kernel_checks.py)."""

import os

import pytest
import torch
from kernel_checks import DEVICE, REL_TOL, rel_err

from umv2cli.kernels import lookup, value_grad


def random_lookup(B, M, C, P, V, T, *, dtype=torch.float32, index_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_p = torch.randn(B, P, generator=gen).to(dtype)
    table = torch.randn(T, P + V, generator=gen).to(dtype)
    rows = torch.randint(0, T, (B, M), generator=gen)
    rows[0, 1] = rows[0, 0]  # a duplicate within a token
    rows[1, 0] = rows[0, 0]  # and across tokens
    scores = torch.randn(B, M, C, generator=gen).to(dtype)
    do = torch.randn(B, V, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (x_p, table, rows.to(index_dtype), scores, do)]


def check_against_reference(B, M, C, P, V, T, act, dtype, index_dtype, deterministic=True):
    x_p, table, rows, scores, do = random_lookup(B, M, C, P, V, T, dtype=dtype, index_dtype=index_dtype)
    ours = [t.clone().requires_grad_(True) for t in (x_p, table, scores)]
    o = lookup.memory_lookup(ours[0], ours[1], rows, ours[2], act, impl="triton",
                             deterministic=deterministic)
    o.backward(do)
    ref = [t.double().cpu().requires_grad_(True) for t in (x_p, table, scores)]
    o_ref = lookup.memory_lookup_reference(ref[0], ref[1], rows.cpu(), ref[2], act)
    o_ref.backward(do.double().cpu())
    tol = REL_TOL[dtype]
    assert o.dtype == dtype and o.shape == (B, V)
    assert rel_err(o.cpu(), o_ref) < tol, "output"
    names = ("x_p", "table", "scores") if P else ("table", "scores")
    for name, a, b in zip(("x_p", "table", "scores"), ours, ref):
        if name not in names:  # D_p = 0: x_p [B, 0] does not enter the output
            continue
        assert a.grad.dtype == dtype, name
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lookup_with_atomic_table_grad(dtype):
    check_against_reference(*SHAPES[0], "gelu", dtype, torch.int32, deterministic=False)


def value_grad_inputs(B, M, C, P, V, T, dtype=torch.float32, seed=1):
    x_p, _, rows, scores, do = random_lookup(B, M, C, P, V, T, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(B, M, generator=gen).to(DEVICE) if P else None
    dz = torch.randn(B, M, generator=gen).to(DEVICE) if P else None
    return x_p, rows, scores, z, dz, do


def as_fp64(tensors):
    """Float tensors to fp64 on the CPU (the reference's precision); indices and None as they are."""
    return [t if t is None else (t.double() if t.is_floating_point() else t).cpu() for t in tensors]


@pytest.mark.parametrize("B,M,C,P,V,T", [(6, 7, 2, 5, 10, 3), (4, 4, 1, 0, 6, 2)])
def test_value_grad_is_deterministic_and_matches_atomics(B, M, C, P, V, T):
    args = value_grad_inputs(B, M, C, P, V, T)  # T ≤ 3 rows: every row hit many times
    first = value_grad.value_grad(*args, T, deterministic=True)
    second = value_grad.value_grad(*args, T, deterministic=True)
    assert torch.equal(first, second), "two calls differ in some bit"
    atomic = value_grad.value_grad(*args, T, deterministic=False)
    expected = value_grad.value_grad_reference(*as_fp64(args), T)
    assert rel_err(first.cpu(), expected) < 1e-5
    assert rel_err(atomic.cpu(), first.double().cpu()) < 1e-5  # fp32 sums in another order


def test_value_grad_leaves_untouched_rows_zero_and_casts():
    x_p, rows, scores, z, dz, do = value_grad_inputs(3, 2, 2, 3, 4, 12, dtype=torch.float16)
    grad = value_grad.value_grad(x_p, rows, scores, z, dz, do, 12, out_dtype=torch.float16)
    assert grad.dtype == torch.float16 and grad.shape == (12, 7)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows.reshape(-1).cpu()] = False
    assert untouched.any() and (grad.cpu()[untouched] == 0).all()
    expected = value_grad.value_grad_reference(*as_fp64((x_p, rows, scores, z, dz, do)), 12)
    assert rel_err(grad.cpu(), expected) < REL_TOL[torch.float16]


def test_sort_lookups_by_row_is_stable_with_segment_ends():
    rows = torch.tensor([[3, 1], [1, 3], [0, 1]], device=DEVICE)
    sorted_rows, order, seg_end = value_grad.sort_lookups_by_row(rows)
    assert sorted_rows.tolist() == [0, 1, 1, 1, 3, 3]
    assert order.tolist() == [4, 1, 2, 5, 0, 3]  # ties keep token order
    assert seg_end.tolist() == [1, 4, 4, 4, 6, 6]


def test_impl_switch_and_one_line_errors():
    x_p, table, rows, scores, _ = random_lookup(2, 3, 2, 2, 4, 5)
    expected = lookup.memory_lookup_reference(x_p, table, rows, scores, "gelu")
    assert torch.equal(lookup.memory_lookup(x_p, table, rows, scores, "gelu", impl="torch"), expected)
    if DEVICE == "cpu":  # auto = Triton iff the table is on CUDA
        assert torch.equal(lookup.memory_lookup(x_p, table, rows, scores, "gelu"), expected)
    bad = {"act": dict(act="relu"), "impl": dict(impl="cuda")}
    call = dict(x_p_BP=x_p, table_TD=table, rows_BM=rows, scores_BMC=scores, act="none", impl="triton")
    for name, change in bad.items():
        with pytest.raises(ValueError, match=name):
            lookup.memory_lookup(**{**call, **change})
    wide = torch.randn(5, 12, device=DEVICE)[:, :6]  # rows of a wider tensor: not contiguous
    with pytest.raises(ValueError, match="table must be contiguous"):
        lookup.memory_lookup(**{**call, "table_TD": wide})
    with pytest.raises(ValueError, match="one float dtype"):
        lookup.memory_lookup(**{**call, "scores_BMC": scores.double()})
    with pytest.raises(ValueError, match="divisible by C=3"):
        lookup.memory_lookup(**{**call, "scores_BMC": torch.randn(2, 3, 3, device=DEVICE)})
    with pytest.raises(ValueError, match="int32 or int64"):
        lookup.memory_lookup(**{**call, "rows_BM": rows.float()})


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert type(lookup._mem_fwd_kernel).__name__ == "InterpretedFunction"
        assert type(value_grad._value_grad_rows_kernel).__name__ == "InterpretedFunction"
