"""The UltraMemV2 value lookup: pre-value neurons, then a per-core weighted gather-sum.

Math (per token; docs/fidelity.md §2.2 steps 8-9; eq. 13-15). Each table row holds a pre-value and a
value side by side, ``table[p] = [P[p] (D_p) | V[p] (D_v)]``, so one lookup is one contiguous read:

    z_j = act(<P[p_j], x_p>)                              pre-value neuron (eq. 15: act = identity)
    o[chunk c] = Σ_j s_{j,c} · z_j · V[p_j, chunk c]       chunk c of D_v/C weighted by core c (MCS)

With D_p = 0 there is no neuron (z_j = 1): plain score-weighted values, as in UltraMem v1.

VJP: ∂s_{j,c} = z_j <V[p_j, c], ∂o[c]>;  ∂z_j = act'·Σ_c s_{j,c} <V[p_j, c], ∂o[c]>;
∂x_p = Σ_j ∂z_j P[p_j];  ∂V[p_j, c] += s_{j,c} z_j ∂o[c];  ∂P[p_j] += ∂z_j x_p (scatter-add by row).

Bytes per token: reads m·(D_p + D_v) table elements (the memory traffic that sets the speed
limit), D_p inputs and m·C scores; writes D_v outputs. The table may be read in a narrower dtype
than it is kept in (`read_dtype`: bf16 rows of an fp32 table, whose fp32 copy the optimizer
updates), which halves those bytes; its gradient keeps the table's dtype.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def memory_lookup_reference(
    x_p_BP: torch.Tensor,  # pre-value input W_pre^T u            [B, D_p]
    table_TD: torch.Tensor,  # rows [pre-value | value]             [T, D_p + D_v]
    rows_BM: torch.Tensor,  # physical rows to read                [B, m]
    scores_BMC: torch.Tensor,  # per-core scores of those rows        [B, m, C]
    act: str = "none",  # "none" (eq. 15) or "gelu" (the code's mem_use_glu_act)
) -> torch.Tensor:
    """Plain-PyTorch lookup. Returns o_BV [B, D_v]."""
    B, M, C = scores_BMC.shape
    P = x_p_BP.shape[-1]
    V = table_TD.shape[-1] - P
    # read m·(D_p + D_v) per token; F.embedding, not table[rows]: on CPU the backward of advanced
    # indexing accumulates repeated rows in a thread-dependent order, embedding's does not
    row_BMD = F.embedding(rows_BM, table_TD)
    pre_BMP, val_BMV = row_BMD.split([P, V], dim=-1)
    if P:  # step 8: pre-value neuron (eq. 13-15)
        z_BM = torch.einsum("bmp,bp->bm", pre_BMP, x_p_BP)
        z_BM = F.gelu(z_BM) if act == "gelu" else z_BM
        w_BMC = scores_BMC * z_BM[..., None]
    else:
        w_BMC = scores_BMC
    # step 9: chunk c of every value is weighted by core c's score (eq. 15, MCS)
    o_BCW = torch.einsum("bmc,bmcw->bcw", w_BMC, val_BMV.reshape(B, M, C, V // C))
    return o_BCW.reshape(B, V)  # write D_v


# ------------------------------------------------------------------------------------------------
# Triton kernels (K2 mem_fwd; the backward is K34 in value_grad.py, which reads the lookups in row
# order (value_grad.sort_by_row), then a token-major pass for x_p). Names
# follow the math above: h_j = <P[p_j], x_p> (pre-activation), z_j = act(h_j). One program per
# token loads TILE lookups at a time; the row layout and its int64 addressing are rows.py's;
# everything accumulates in fp32 (no tl.dot, so bf16 is exact under the interpreter too).
#
# Backward, per call: sort the B·m lookups by row (a stable torch.sort); K34 reads each touched row's
# value once and gives ds, dz = ∂L/∂h and every row of the table gradient (zeros where untouched,
# so there is no memset); then, per token, dx_p = Σ_j dz_j P[p_j] gathers the D_p pre-values
# again (the only second read of the table). Bytes: U·D_v + B·m·D_p table elements read (U
# touched rows ≤ B·m), against the forward's B·m·(D_p + D_v); T·(D_p + D_v) gradient written.

import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from umv2cli.kernels import resolve_impl  # noqa: E402
from umv2cli.kernels.rows import NUM_WARPS, TILE_ELEMENTS, gelu, launch_dims, row_tile  # noqa: E402
from umv2cli.kernels.value_grad import mem_bwd_rows, sort_by_row  # noqa: E402


@triton.jit
def _mem_fwd_kernel(
    X_P,  # pointer to the pre-value input x_p [B, D_p]
    TABLE,  # pointer to the table [T, D_p + D_v], rows [P | V]
    ROWS,  # pointer to the row ids p [B, m] (int32 or int64)
    S,  # pointer to the scores s [B, m, C]
    O,  # pointer to the output o [B, D_v]
    H,  # pointer to the saved pre-activations h (fp32) [B, m]; unused when not HAS_P
    M,  # m, selections per token
    D_P,  # pre-value dim
    D_V,  # value dim
    W,  # chunk width D_v / C
    C,  # cores
    HAS_P: tl.constexpr,  # D_p > 0 (else z_j = 1)
    GELU: tl.constexpr,  # act = exact GELU (else identity)
    TILE: tl.constexpr,  # lookups loaded at once, a power of two
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    t = tl.program_id(0).to(tl.int64)  # one token
    D = D_P + D_V
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
    x = tl.load(X_P + t * D_P + offs_p, mask=mask_p, other=0.0).to(tl.float32)  # read D_p once
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    offs_j = tl.arange(0, TILE)
    for j0 in range(0, M, TILE):
        mask_j = j0 + offs_j < M
        ell = t * M + j0 + offs_j
        row = tl.load(ROWS + ell, mask=mask_j, other=0).to(tl.int64)
        s = tl.load(S + ell[:, None] * C + offs_c[None, :], mask=mask_j[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        if HAS_P:  # step 8: z_j = act(<P[p_j], x_p>)                    read TILE·D_p
            pre = tl.load(TABLE + row[:, None] * D + offs_p[None, :], mask=mask_j[:, None] & mask_p[None, :],
                          other=0.0).to(tl.float32)
            h = tl.sum(pre * x[None, :], axis=1)
            tl.store(H + ell, h, mask=mask_j)
            if GELU:
                s = s * gelu(h)[:, None]
            else:
                s = s * h[:, None]
        v = tl.load(TABLE + row[:, None, None] * D + D_P + offs_cw[None, :, :],  # read TILE·D_v
                    mask=mask_j[:, None, None] & mask_cw[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(s[:, :, None] * v, axis=0)  # step 9: o[chunk c] += s_{j,c} z_j V[p_j, chunk c]
    tl.store(O + t * D_V + offs_cw, acc.to(O.dtype.element_ty), mask=mask_cw)  # write D_v


@triton.jit
def _mem_bwd_x_kernel(
    TABLE,  # pointer to the table [T, D_p + D_v]
    ROWS,  # pointer to the row ids p [B, m] (int32 or int64)
    DZ,  # pointer to dz = ∂L/∂h (fp32) [B, m], from K34
    DX_P,  # pointer to dx_p [B, D_p]
    M,  # m, selections per token
    D_P,  # pre-value dim
    D_V,  # value dim
    TILE: tl.constexpr,  # lookups loaded at once, a power of two
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
):
    t = tl.program_id(0).to(tl.int64)  # one token
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < D_P
    dx = tl.zeros((BLOCK_P,), dtype=tl.float32)
    offs_j = tl.arange(0, TILE)
    for j0 in range(0, M, TILE):
        mask_j = j0 + offs_j < M
        ell = t * M + j0 + offs_j
        row = tl.load(ROWS + ell, mask=mask_j, other=0).to(tl.int64)
        dz = tl.load(DZ + ell, mask=mask_j, other=0.0)
        pre = tl.load(TABLE + row[:, None] * (D_P + D_V) + offs_p[None, :],  # read TILE·D_p
                      mask=mask_j[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        dx += tl.sum(dz[:, None] * pre, axis=0)  # dx_p = Σ_j dz_j P[p_j]
    tl.store(DX_P + t * D_P + offs_p, dx.to(DX_P.dtype.element_ty), mask=mask_p)


def _check_lookup_args(x_p_BP, table_TD, rows_BM, scores_BMC, act) -> tuple[int, int, int, int, int]:
    """One-line ValueErrors for what the kernels cannot take; returns (B, M, C, D_p, D_v)."""
    if act not in ("none", "gelu"):
        raise ValueError(f"memory_lookup: act={act!r}; use 'none' or 'gelu'")
    if x_p_BP.dim() != 2 or table_TD.dim() != 2 or rows_BM.dim() != 2 or scores_BMC.dim() != 3:
        raise ValueError(f"memory_lookup: expected x_p [B, D_p], table [T, D_p + D_v], rows [B, m], "
                         f"scores [B, m, C]; got {tuple(x_p_BP.shape)}, {tuple(table_TD.shape)}, "
                         f"{tuple(rows_BM.shape)}, {tuple(scores_BMC.shape)}")
    B, M, C = scores_BMC.shape
    P = x_p_BP.shape[1]
    V = table_TD.shape[1] - P
    if x_p_BP.shape[0] != B or tuple(rows_BM.shape) != (B, M):
        raise ValueError(f"memory_lookup: x_p {tuple(x_p_BP.shape)} and rows {tuple(rows_BM.shape)} "
                         f"disagree with scores [B, m, C] = {tuple(scores_BMC.shape)}")
    if V <= 0 or V % C:
        raise ValueError(f"memory_lookup: D_v = {table_TD.shape[1]} - D_p({P}) = {V} must be > 0 "
                         f"and divisible by C={C}")
    if rows_BM.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"memory_lookup: rows must be int32 or int64, got {rows_BM.dtype}")
    if not all(t.dtype.is_floating_point for t in (x_p_BP, table_TD, scores_BMC)):
        raise ValueError(f"memory_lookup: x_p, table, scores must be float tensors; got "
                         f"{x_p_BP.dtype}, {table_TD.dtype}, {scores_BMC.dtype}")
    devices = {t.device for t in (x_p_BP, table_TD, rows_BM, scores_BMC)}
    if len(devices) != 1:
        raise ValueError(f"memory_lookup: tensors on several devices {sorted(map(str, devices))}")
    if not table_TD.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("memory_lookup: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before umv2cli.kernels.lookup is imported; or use impl='torch'")
    for name, t in (("x_p", x_p_BP), ("table", table_TD), ("rows", rows_BM), ("scores", scores_BMC)):
        if not t.is_contiguous():
            raise ValueError(f"memory_lookup: {name} must be contiguous; call .contiguous() first")
    return B, M, C, P, V


def mem_fwd(x_p_BP, table_TD, rows_BM, scores_BMC, act="none") -> tuple[torch.Tensor, torch.Tensor]:
    """K2. Returns (o_BV in the table's dtype, h_BM the fp32 pre-activations; [B, 0] if D_p = 0)."""
    B, M, C, P, V = _check_lookup_args(x_p_BP, table_TD, rows_BM, scores_BMC, act)
    o_BV = torch.empty(B, V, dtype=table_TD.dtype, device=table_TD.device)
    h_BM = torch.empty(B, M if P else 0, dtype=torch.float32, device=table_TD.device)
    if B:
        _mem_fwd_kernel[(B,)](x_p_BP, table_TD, rows_BM, scores_BMC, o_BV, h_BM if P else o_BV, M,
                              **launch_dims(C, P, V), GELU=act == "gelu")
    return o_BV, h_BM


def mem_bwd(x_p_BP, table_TD, rows_BM, scores_BMC, h_BM, do_BV, act="none", grad_TD=None):
    """The backward of K2 from its saved inputs and the output gradient do [B, D_v]. Returns
    (dx_p_BP, dtable_TD, ds_BMC): dx_p and ds in x_p's and the scores' dtypes, dtable fp32 of the
    table's shape: `grad_TD` if given (a contiguous fp32 buffer, every row of it written), else new."""
    B, M, C, P, V = _check_lookup_args(x_p_BP, table_TD, rows_BM, scores_BMC, act)
    if tuple(do_BV.shape) != (B, V) or not do_BV.is_contiguous():
        raise ValueError(f"mem_bwd: do must be contiguous [B, D_v] = {(B, V)}, got {tuple(do_BV.shape)}")
    if P and (tuple(h_BM.shape) != (B, M) or h_BM.dtype != torch.float32 or not h_BM.is_contiguous()):
        raise ValueError(f"mem_bwd: h must be contiguous fp32 [B, m] = {(B, M)}")
    T = table_TD.shape[0]
    if grad_TD is None:
        grad_TD = torch.empty(T, P + V, dtype=torch.float32, device=do_BV.device)  # K34 writes every row
    elif grad_TD.shape != table_TD.shape or grad_TD.dtype != torch.float32 or not grad_TD.is_contiguous():
        raise ValueError(f"mem_bwd: grad_TD must be contiguous fp32 {tuple(table_TD.shape)}, got "
                         f"{grad_TD.dtype} {tuple(grad_TD.shape)}")
    sorted_L, order_L = sort_by_row(rows_BM, T)
    ds_BMC, dz_BM = mem_bwd_rows(table_TD, sorted_L, order_L, scores_BMC, h_BM, x_p_BP, do_BV, grad_TD, act)
    return mem_bwd_x(table_TD, rows_BM, dz_BM, torch.empty_like(x_p_BP)), grad_TD, ds_BMC


def mem_bwd_x(table_TD, rows_BM, dz_BM, dx_BP):
    """The x_p pass: dx_p = Σ_j dz_j P[p_j] into dx_BP [B, D_p] (nothing to do when D_p = 0)."""
    (B, M), P = rows_BM.shape, dx_BP.shape[1]
    if P and B:
        block_p = max(16, triton.next_power_of_2(P))
        _mem_bwd_x_kernel[(B,)](table_TD, rows_BM, dz_BM, dx_BP, M, P, table_TD.shape[1] - P, BLOCK_P=block_p,
                                TILE=max(1, min(16, TILE_ELEMENTS // block_p)), num_warps=NUM_WARPS)
    return dx_BP


# ------------------------------------------------------------------------------------------------
# Autograd, twice over one implementation: eagerly an autograd.Function (the cheapest call to
# launch); under torch.compile the custom op umv2::memory_lookup with a fake (shapes only) and
# its backward registered, so the compiled graph holds the kernels without a break.


def _read(table_TD, read_TD):
    return table_TD if read_TD is None else read_TD


def _table_grad(dtable_TD, table_TD):
    return dtable_TD if dtable_TD.dtype == table_TD.dtype else dtable_TD.to(table_TD.dtype)


class MemoryLookup(torch.autograd.Function):
    """K2 forward; backward: sort by row, K34, the x_p pass (see above). The table's gradient
    goes into the buffer `grad_rows()` gives, where there is one."""

    @staticmethod
    def forward(ctx, x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, act, grad_rows):
        o_BV, h_BM = mem_fwd(x_p_BP, _read(table_TD, read_TD), rows_BM, scores_BMC, act)
        ctx.save_for_backward(x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, h_BM)
        ctx.act, ctx.grad_rows = act, grad_rows
        return o_BV

    @staticmethod
    def backward(ctx, do_BV):
        x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, h_BM = ctx.saved_tensors
        grad_TD = ctx.grad_rows() if ctx.grad_rows else None
        dx_BP, dtable_TD, ds_BMC = mem_bwd(x_p_BP, _read(table_TD, read_TD), rows_BM, scores_BMC, h_BM,
                                           do_BV.contiguous(), ctx.act, grad_TD)
        return dx_BP, _table_grad(dtable_TD, table_TD), None, None, ds_BMC, None, None


@torch.library.custom_op("umv2::memory_lookup", mutates_args=())
def memory_lookup_op(x_p_BP: torch.Tensor, table_TD: torch.Tensor, read_TD: torch.Tensor | None,
                     rows_BM: torch.Tensor, scores_BMC: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K2 as a custom op: (o_BV, h_BM). table_TD is differentiated; read_TD (None: table_TD) is read."""
    return mem_fwd(x_p_BP, _read(table_TD, read_TD), rows_BM, scores_BMC, act)


@memory_lookup_op.register_fake
def _(x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, act):
    read_TD = _read(table_TD, read_TD)
    B, M, _ = scores_BMC.shape
    P = x_p_BP.shape[1]
    return (read_TD.new_empty(B, read_TD.shape[1] - P),
            read_TD.new_empty(B, M if P else 0, dtype=torch.float32))


@torch.library.custom_op("umv2::memory_lookup_backward", mutates_args=())
def memory_lookup_backward_op(x_p_BP: torch.Tensor, table_TD: torch.Tensor, read_TD: torch.Tensor | None,
                              rows_BM: torch.Tensor, scores_BMC: torch.Tensor, h_BM: torch.Tensor,
                              do_BV: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mem_bwd` as a custom op: (dx_p_BP, dtable_TD in the table's dtype, ds_BMC)."""
    dx_BP, dtable_TD, ds_BMC = mem_bwd(x_p_BP, _read(table_TD, read_TD), rows_BM, scores_BMC, h_BM,
                                       do_BV, act)
    return dx_BP, _table_grad(dtable_TD, table_TD), ds_BMC


@memory_lookup_backward_op.register_fake
def _(x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, h_BM, do_BV, act):
    return torch.empty_like(x_p_BP), torch.empty_like(table_TD), torch.empty_like(scores_BMC)


def _setup_lookup(ctx, inputs, output):
    x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, act = inputs
    ctx.save_for_backward(x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, output[1])
    ctx.act = act


def _backward_lookup(ctx, do_BV, _dh_BM):
    x_p_BP, table_TD, read_TD, rows_BM, scores_BMC, h_BM = ctx.saved_tensors
    dx_BP, dtable_TD, ds_BMC = memory_lookup_backward_op(x_p_BP, table_TD, read_TD, rows_BM, scores_BMC,
                                                         h_BM, do_BV.contiguous(), ctx.act)
    return dx_BP, dtable_TD, None, None, ds_BMC, None


memory_lookup_op.register_autograd(_backward_lookup, setup_context=_setup_lookup)


def memory_lookup(
    x_p_BP: torch.Tensor,  # pre-value input W_pre^T u            [B, D_p]
    table_TD: torch.Tensor,  # rows [pre-value | value]             [T, D_p + D_v]
    rows_BM: torch.Tensor,  # physical rows to read (int32/int64)  [B, m]
    scores_BMC: torch.Tensor,  # per-core scores of those rows        [B, m, C]
    act: str = "none",  # "none" or "gelu"
    impl: str = "auto",  # "auto" (Triton iff the table is on CUDA), "triton", "torch"
    *,
    read_dtype: torch.dtype | None = None,  # read the rows in this dtype (None: the table's)
    grad_rows: Callable[[], torch.Tensor] | None = None,  # Triton, eager: where the table's gradient goes
) -> torch.Tensor:
    """The value lookup, o_BV [B, D_v] in the dtype the rows are read in; differentiable in x_p,
    table and scores. With `read_dtype` the table is read as a rounded copy (bf16 rows of an fp32
    table: half the bytes) and its gradient is the table's own dtype, as if the rounding were not
    there (a straight-through cast, as mixed precision treats fp32 master weights).

    The Triton path makes x_p, rows and scores contiguous (small); the table must already be.
    Eagerly it can write the table's gradient into a buffer of the caller's, which `grad_rows()`
    gives when the backward runs (contiguous fp32 of the table's shape; every row is written), and
    return that buffer as the gradient (`umv2cli.model.ultramemv2.pool_windows` gives each layer
    its rows of the pool's gradient this way); the references and torch.compile ignore it.
    """
    same = read_dtype in (None, table_TD.dtype)
    if resolve_impl(impl, table_TD, "memory_lookup") == "torch":
        if same:
            return memory_lookup_reference(x_p_BP, table_TD, rows_BM, scores_BMC, act)
        dtype = table_TD.dtype  # rows rounded to read_dtype, arithmetic in the table's dtype, as the kernels
        read_TD = table_TD.to(read_dtype).to(dtype)
        return memory_lookup_reference(x_p_BP.to(dtype), read_TD, rows_BM, scores_BMC.to(dtype), act).to(read_dtype)
    read_TD = None if same else table_TD.detach().to(read_dtype)
    args = (x_p_BP.contiguous(), table_TD, read_TD, rows_BM.contiguous(), scores_BMC.contiguous(), act)
    if torch.compiler.is_compiling():
        return memory_lookup_op(*args)[0]
    return MemoryLookup.apply(*args, grad_rows)
