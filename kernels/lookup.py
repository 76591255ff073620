"""The UltraMemV2 value lookup: pre-value neurons, then a per-core weighted gather-sum.

Math (per token; docs/fidelity.md §2.2 steps 8-9; eq. 13-15). Each table row holds a pre-value and a
value side by side, ``table[p] = [P[p] (D_p) | V[p] (D_v)]``, so one lookup is one contiguous read:

    z_j = act(<P[p_j], x_p>)                              pre-value neuron (eq. 15: act = identity)
    o[chunk c] = Σ_j s_{j,c} · z_j · V[p_j, chunk c]       chunk c of D_v/C weighted by core c (MCS)

With D_p = 0 there is no neuron (z_j = 1): plain score-weighted values, as in UltraMem v1.

VJP: ∂s_{j,c} = z_j <V[p_j, c], ∂o[c]>;  ∂z_j = act'·Σ_c s_{j,c} <V[p_j, c], ∂o[c]>;
∂x_p = Σ_j ∂z_j P[p_j];  ∂V[p_j, c] += s_{j,c} z_j ∂o[c];  ∂P[p_j] += ∂z_j x_p (scatter-add by row).

Bytes per token: reads m·(D_p + D_v) table elements (the memory traffic that sets the speed
limit), D_p inputs and m·C scores; writes D_v outputs.
"""

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
# Triton kernels (docs/kernels.md: K2 mem_fwd, K3 mem_bwd_tokens; K4 in value_grad.py).
# Names follow the math above: h_j = <P[p_j], x_p> (pre-activation), z_j = act(h_j), dw_{j,c} =
# <V[p_j, chunk c], do[chunk c]>. One program per token; the row layout and its int64 addressing
# are rows.py's; everything accumulates in fp32 (no tl.dot, so bf16 is exact under the
# interpreter too).

import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from umv2cli.kernels.rows import launch_dims, load_row, lookup_at, row_tile  # noqa: E402
from umv2cli.kernels.value_grad import value_grad  # noqa: E402

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/√2 (constexpr: jit code reads no plain globals)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)


@triton.jit
def _gelu(h):
    """Exact (erf) GELU, as F.gelu's default: h·Φ(h)."""
    return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def _gelu_grad(h):
    """d GELU / dh = Φ(h) + h·φ(h)."""
    return 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * _INV_SQRT_2PI * tl.exp(-0.5 * h * h)


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
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    t = tl.program_id(0).to(tl.int64)  # one token
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
    x = tl.load(X_P + t * D_P + offs_p, mask=mask_p, other=0.0).to(tl.float32)  # read D_p once
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    for j in range(0, M):
        ell = t * M + j
        row, s = lookup_at(ROWS, S, ell, C, offs_c, mask_c)
        base = TABLE + row * (D_P + D_V)  # one contiguous row [P | V]
        pre, v = load_row(base, base + D_P, offs_p, mask_p, offs_cw, mask_cw)  # read D_p + D_v
        if HAS_P:  # step 8: z_j = act(<P[p_j], x_p>)
            h = tl.sum(pre * x, axis=0)
            tl.store(H + ell, h)
            if GELU:
                s = s * _gelu(h)
            else:
                s = s * h
        acc += s[:, None] * v  # step 9: o[chunk c] += s_{j,c} z_j V[p_j, chunk c]
    tl.store(O + t * D_V + offs_cw, acc.to(O.dtype.element_ty), mask=mask_cw)  # write D_v


@triton.jit
def _mem_bwd_tokens_kernel(
    X_P,  # pointer to the pre-value input x_p [B, D_p]
    TABLE,  # pointer to the table [T, D_p + D_v], rows [P | V]
    ROWS,  # pointer to the row ids p [B, m] (int32 or int64)
    S,  # pointer to the scores s [B, m, C]
    H,  # pointer to the saved pre-activations h (fp32) [B, m]; unused when not HAS_P
    DO,  # pointer to the output gradient do [B, D_v]
    DX_P,  # pointer to dx_p [B, D_p]
    DS,  # pointer to ds [B, m, C]
    DZ,  # pointer to dz_j = act'(h_j) Σ_c s_{j,c} dw_{j,c} (fp32) [B, m]; unused when not HAS_P
    M,  # m, selections per token
    D_P,  # pre-value dim
    D_V,  # value dim
    W,  # chunk width D_v / C
    C,  # cores
    HAS_P: tl.constexpr,  # D_p > 0 (else z_j = 1)
    GELU: tl.constexpr,  # act = exact GELU (else identity)
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    t = tl.program_id(0).to(tl.int64)  # one token
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
    do = tl.load(DO + t * D_V + offs_cw, mask=mask_cw, other=0.0).to(tl.float32)  # read D_v
    dx = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for j in range(0, M):
        ell = t * M + j
        row, s = lookup_at(ROWS, S, ell, C, offs_c, mask_c)
        base = TABLE + row * (D_P + D_V)
        pre, v = load_row(base, base + D_P, offs_p, mask_p, offs_cw, mask_cw)  # read D_p + D_v
        dw = tl.sum(v * do, axis=1)  # dw_{j,c} = <V[p_j, chunk c], do[chunk c]>
        if HAS_P:
            h = tl.load(H + ell)
            if GELU:
                z = _gelu(h)
                dz = _gelu_grad(h) * tl.sum(s * dw, axis=0)  # dz_j = act'(h_j) Σ_c s_{j,c} dw_{j,c}
            else:
                z = h
                dz = tl.sum(s * dw, axis=0)
            tl.store(DZ + ell, dz)
            dx += dz * pre  # dx_p = Σ_j dz_j P[p_j]
            dw = z * dw  # ds_{j,c} = z_j dw_{j,c}
        tl.store(DS + ell * C + offs_c, dw.to(DS.dtype.element_ty), mask=mask_c)
    if HAS_P:
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
    if not (x_p_BP.dtype == table_TD.dtype == scores_BMC.dtype and table_TD.dtype.is_floating_point):
        raise ValueError(f"memory_lookup: x_p, table, scores must share one float dtype; got "
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
        _mem_fwd_kernel[(B,)](x_p_BP, table_TD, rows_BM, scores_BMC, o_BV, h_BM if P else o_BV,
                              **launch_dims(M, C, P, V), GELU=act == "gelu")
    return o_BV, h_BM


def mem_bwd_tokens(x_p_BP, table_TD, rows_BM, scores_BMC, h_BM, do_BV, act="none"):
    """K3. Returns (dx_p_BP, ds_BMC in the inputs' dtypes, dz_BM = ∂L/∂h fp32; [B, 0] if D_p = 0)."""
    B, M, C, P, V = _check_lookup_args(x_p_BP, table_TD, rows_BM, scores_BMC, act)
    if tuple(do_BV.shape) != (B, V) or not do_BV.is_contiguous():
        raise ValueError(f"mem_bwd_tokens: do must be contiguous [B, D_v] = {(B, V)}, got {tuple(do_BV.shape)}")
    if P and (tuple(h_BM.shape) != (B, M) or h_BM.dtype != torch.float32 or not h_BM.is_contiguous()):
        raise ValueError(f"mem_bwd_tokens: h must be contiguous fp32 [B, m] = {(B, M)}")
    dx_BP = torch.empty_like(x_p_BP)
    ds_BMC = torch.empty_like(scores_BMC)
    dz_BM = torch.empty(B, M if P else 0, dtype=torch.float32, device=table_TD.device)
    if B:
        dummy = ds_BMC  # never touched when D_p = 0
        _mem_bwd_tokens_kernel[(B,)](
            x_p_BP, table_TD, rows_BM, scores_BMC, h_BM if P else dummy, do_BV,
            dx_BP if P else dummy, ds_BMC, dz_BM if P else dummy,
            **launch_dims(M, C, P, V), GELU=act == "gelu")
    return dx_BP, ds_BMC, dz_BM


class MemoryLookup(torch.autograd.Function):
    """K2 forward; backward K3 (dx_p, ds, dz) then K4 (the table, value_grad.py)."""

    @staticmethod
    def forward(ctx, x_p_BP, table_TD, rows_BM, scores_BMC, act, deterministic):
        o_BV, h_BM = mem_fwd(x_p_BP, table_TD, rows_BM, scores_BMC, act)
        ctx.save_for_backward(x_p_BP, table_TD, rows_BM, scores_BMC, h_BM)
        ctx.act, ctx.deterministic = act, deterministic
        return o_BV

    @staticmethod
    def backward(ctx, do_BV):
        x_p_BP, table_TD, rows_BM, scores_BMC, h_BM = ctx.saved_tensors
        need_x, need_table, _, need_s = ctx.needs_input_grad[:4]
        P = x_p_BP.shape[1]
        do_BV = do_BV.contiguous()
        dx_BP = ds_BMC = dtable_TD = None
        if need_x or need_s or (need_table and P):
            dx_BP, ds_BMC, dz_BM = mem_bwd_tokens(x_p_BP, table_TD, rows_BM, scores_BMC, h_BM,
                                                  do_BV, ctx.act)
        if need_table:
            z_BM = (F.gelu(h_BM) if ctx.act == "gelu" else h_BM) if P else None
            dtable_TD = value_grad(x_p_BP, rows_BM, scores_BMC, z_BM, dz_BM if P else None, do_BV,
                                   table_TD.shape[0], deterministic=ctx.deterministic,
                                   out_dtype=table_TD.dtype)
        return (dx_BP if need_x else None), dtable_TD, None, (ds_BMC if need_s else None), None, None


def memory_lookup(
    x_p_BP: torch.Tensor,  # pre-value input W_pre^T u            [B, D_p]
    table_TD: torch.Tensor,  # rows [pre-value | value]             [T, D_p + D_v]
    rows_BM: torch.Tensor,  # physical rows to read (int32/int64)  [B, m]
    scores_BMC: torch.Tensor,  # per-core scores of those rows        [B, m, C]
    act: str = "none",  # "none" or "gelu"
    impl: str = "auto",  # "auto" (Triton iff the table is on CUDA), "triton", "torch"
    *,
    deterministic: bool = True,  # table grad: sorted row-major (True) or fp32 atomics (False)
) -> torch.Tensor:
    """The value lookup, o_BV [B, D_v]; differentiable in x_p, table and scores.

    The Triton path makes x_p, rows and scores contiguous (small); the table must already be.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"memory_lookup: impl={impl!r}; use 'auto', 'triton' or 'torch'")
    if impl == "torch" or (impl == "auto" and not table_TD.is_cuda):
        return memory_lookup_reference(x_p_BP, table_TD, rows_BM, scores_BMC, act)
    return MemoryLookup.apply(x_p_BP.contiguous(), table_TD, rows_BM.contiguous(),
                              scores_BMC.contiguous(), act, deterministic)
