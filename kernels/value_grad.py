"""The table gradient of the value lookup (K4, `mem_bwd_rows`): row-major and deterministic.

Math (the table half of the VJP of `memory_lookup_reference`, kernels/lookup.py). Lookup
ℓ = (t, j) of token t reads row p_ℓ = rows[t, j]; with z_ℓ the post-activation neuron (1 when
D_p = 0) and dz_ℓ its gradient (from K3, `mem_bwd_tokens`):

    dV[p, chunk c] = Σ_{ℓ : p_ℓ = p} s_{ℓ,c} · z_ℓ · do[t_ℓ, chunk c]
    dP[p]          = Σ_{ℓ : p_ℓ = p} dz_ℓ · x_p[t_ℓ]

written into one dense ``[T, D_p + D_v]`` gradient laid out like the table (``[dP | dV]``).

Deterministic path (`value_grad(..., deterministic=True)`):
  1. sort the B·m lookups by row with torch ops, not a Triton counting sort: a *stable*
     ``torch.sort`` of the flat row ids gives the order (ties keep token order, so every row
     sums its occurrences in the same order on every call), and ``torch.searchsorted`` gives
     each sorted position the end of its row's segment. No host sync, no [T]-sized scratch.
  2. one program per sorted position; the program that sits at the start of a segment owns
     that row, loops over its occurrences accumulating dV and dP in fp32 registers, and writes
     the row once. The others exit at once.
  3. rows nobody touched stay zero: one memset of the dense gradient.
Bytes: sort of B·m ids; per occurrence reads D_v (do) + D_p (x_p) + C + 3 scalars; writes each
touched row once (D_p + D_v); plus the T·(D_p + D_v) memset, which dominates at small B·m.

Atomics fallback (`deterministic=False`): one program per token adds its m contributions with
fp32 ``tl.atomic_add`` into an fp32 buffer (cast to `out_dtype` after). Same bytes but no sort,
and read-modify-write traffic on the gradient; the sum order, and so the low bits, vary.

Left for later: hot-row splitting and strided row sets for load balance, a compact
(touched rows, grad) output for a row-wise sparse optimizer, K3+K4 fused in the atomic path.
"""

import torch
import triton
import triton.language as tl

from umv2cli.kernels.rows import launch_dims, load_row, lookup_at, row_tile


def value_grad_reference(
    x_p_BP: torch.Tensor,  # pre-value input                         [B, D_p]
    rows_BM: torch.Tensor,  # rows read                              [B, m]
    scores_BMC: torch.Tensor,  # per-core scores                     [B, m, C]
    z_BM: torch.Tensor | None,  # post-activation neurons (None: D_p = 0)  [B, m]
    dz_BM: torch.Tensor | None,  # their gradients (None: D_p = 0)       [B, m]
    do_BV: torch.Tensor,  # output gradient                          [B, D_v]
    num_rows: int,  # T
) -> torch.Tensor:
    """Plain-PyTorch table gradient [T, D_p + D_v] with index_add_ (order not fixed on CUDA)."""
    B, M, C = scores_BMC.shape
    P, V = x_p_BP.shape[-1], do_BV.shape[-1]
    w_BMC = scores_BMC * z_BM[..., None] if P else scores_BMC
    dv_BMV = (w_BMC[..., None] * do_BV.view(B, 1, C, V // C)).reshape(B * M, V)  # B·m·D_v
    grad_TD = do_BV.new_zeros(num_rows, P + V)  # write T·(D_p + D_v)
    grad_TD[:, P:].index_add_(0, rows_BM.reshape(-1), dv_BMV)
    if P:
        dp_BMP = (dz_BM[..., None] * x_p_BP[:, None, :]).reshape(B * M, P)  # B·m·D_p
        grad_TD[:, :P].index_add_(0, rows_BM.reshape(-1), dp_BMP)
    return grad_TD


@triton.jit
def _value_grad_rows_kernel(
    X_P,  # pointer to x_p [B, D_p]
    S,  # pointer to the scores s [B, m, C]
    Z,  # pointer to z (post-activation, fp32) [B, m]; unused when not HAS_P
    DZ,  # pointer to dz (fp32) [B, m]; unused when not HAS_P
    DO,  # pointer to the output gradient do [B, D_v]
    SORTED_ROWS,  # pointer to the flat row ids sorted (stable) [B·m]
    ORDER,  # pointer to the lookup ids ℓ = t·m + j in sorted order [B·m]
    SEG_END,  # pointer to the end (exclusive) of each sorted position's row segment [B·m]
    GRAD,  # pointer to the dense table gradient [T, D_p + D_v], zeroed
    M,  # m, lookups per token
    D_P,  # pre-value dim
    D_V,  # value dim
    W,  # chunk width D_v / C
    C,  # cores
    HAS_P: tl.constexpr,  # D_p > 0
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    k = tl.program_id(0).to(tl.int64)  # a position in the sorted order
    row = tl.load(SORTED_ROWS + k).to(tl.int64)
    prev = tl.load(SORTED_ROWS + k - 1, mask=k > 0, other=-1).to(tl.int64)
    if row != prev:  # this program owns the row: k is its segment's first occurrence
        end = tl.load(SEG_END + k)
        offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
        acc_v = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)  # dV[row]
        acc_p = tl.zeros((BLOCK_P,), dtype=tl.float32)  # dP[row]
        for q in range(k, end):  # occurrences in token order: a fixed sum order
            ell = tl.load(ORDER + q).to(tl.int64)
            t = ell // M
            s = tl.load(S + ell * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            x, do = load_row(X_P + t * D_P, DO + t * D_V, offs_p, mask_p, offs_cw, mask_cw)
            if HAS_P:
                s = s * tl.load(Z + ell)
                acc_p += tl.load(DZ + ell) * x
            acc_v += s[:, None] * do
        base = GRAD + row * (D_P + D_V)
        tl.store(base + offs_p, acc_p.to(GRAD.dtype.element_ty), mask=mask_p)
        tl.store(base + D_P + offs_cw, acc_v.to(GRAD.dtype.element_ty), mask=mask_cw)


@triton.jit
def _value_grad_atomic_kernel(
    X_P,  # pointer to x_p [B, D_p]
    ROWS,  # pointer to the row ids [B, m] (int32 or int64)
    S,  # pointer to the scores s [B, m, C]
    Z,  # pointer to z (post-activation, fp32) [B, m]; unused when not HAS_P
    DZ,  # pointer to dz (fp32) [B, m]; unused when not HAS_P
    DO,  # pointer to the output gradient do [B, D_v]
    GRAD,  # pointer to the fp32 dense table gradient [T, D_p + D_v], zeroed
    M,  # m, lookups per token
    D_P,  # pre-value dim
    D_V,  # value dim
    W,  # chunk width D_v / C
    C,  # cores
    HAS_P: tl.constexpr,  # D_p > 0
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    t = tl.program_id(0).to(tl.int64)  # one token
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
    x, do = load_row(X_P + t * D_P, DO + t * D_V, offs_p, mask_p, offs_cw, mask_cw)
    for j in range(0, M):
        ell = t * M + j
        row, s = lookup_at(ROWS, S, ell, C, offs_c, mask_c)
        base = GRAD + row * (D_P + D_V)
        if HAS_P:
            s = s * tl.load(Z + ell)
            tl.atomic_add(base + offs_p, tl.load(DZ + ell) * x, mask=mask_p)
        tl.atomic_add(base + D_P + offs_cw, s[:, None] * do, mask=mask_cw)


def sort_lookups_by_row(rows_BM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the B·m lookups by row: (sorted row ids, lookup ids ℓ = t·m + j in that
    order, end of each position's row segment), all [B·m]. Torch ops; deterministic."""
    sorted_L, order_L = torch.sort(rows_BM.reshape(-1), stable=True)
    seg_end_L = torch.searchsorted(sorted_L, sorted_L, right=True)
    return sorted_L.contiguous(), order_L.contiguous(), seg_end_L.contiguous()


def value_grad(
    x_p_BP: torch.Tensor,  # pre-value input                         [B, D_p]
    rows_BM: torch.Tensor,  # rows read (int32 or int64)             [B, m]
    scores_BMC: torch.Tensor,  # per-core scores                     [B, m, C]
    z_BM: torch.Tensor | None,  # post-activation neurons, fp32 (None: D_p = 0)  [B, m]
    dz_BM: torch.Tensor | None,  # their gradients, fp32 (None: D_p = 0)       [B, m]
    do_BV: torch.Tensor,  # output gradient                          [B, D_v]
    num_rows: int,  # T
    *,
    deterministic: bool = True,  # row-major sorted kernel; False: token-major fp32 atomics
    out_dtype: torch.dtype = torch.float32,  # dtype of the returned gradient
) -> torch.Tensor:
    """Dense table gradient [T, D_p + D_v] (see the module docstring), by Triton kernels."""
    B, M, C = scores_BMC.shape
    P, V = x_p_BP.shape[-1], do_BV.shape[-1]
    if rows_BM.shape != (B, M) or x_p_BP.shape[0] != B or do_BV.shape[0] != B:
        raise ValueError(f"value_grad: shapes disagree: x_p {tuple(x_p_BP.shape)}, rows "
                         f"{tuple(rows_BM.shape)}, scores {tuple(scores_BMC.shape)}, do {tuple(do_BV.shape)}")
    if V % C:
        raise ValueError(f"value_grad: D_v={V} is not divisible by C={C} cores")
    if rows_BM.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"value_grad: rows must be int32 or int64, got {rows_BM.dtype}")
    if P and (z_BM is None or dz_BM is None or z_BM.dtype != torch.float32 or dz_BM.dtype != torch.float32):
        raise ValueError("value_grad: D_p > 0 needs z_BM and dz_BM as fp32 [B, m] tensors")
    tensors = (x_p_BP, rows_BM, scores_BMC, do_BV) + ((z_BM, dz_BM) if P else ())
    for name, t in zip(("x_p", "rows", "scores", "do", "z", "dz"), tensors):
        if not t.is_contiguous():
            raise ValueError(f"value_grad: {name} must be contiguous; call .contiguous() first")
    dummy = scores_BMC  # never read when D_p = 0
    z, dz = (z_BM, dz_BM) if P else (dummy, dummy)
    dims = launch_dims(M, C, P, V)
    if deterministic:
        grad_TD = torch.zeros(num_rows, P + V, dtype=out_dtype, device=do_BV.device)
        if B * M == 0:
            return grad_TD
        sorted_L, order_L, seg_end_L = sort_lookups_by_row(rows_BM)
        _value_grad_rows_kernel[(B * M,)](
            x_p_BP, scores_BMC, z, dz, do_BV, sorted_L, order_L, seg_end_L, grad_TD,
            **dims)
        return grad_TD
    grad_TD = torch.zeros(num_rows, P + V, dtype=torch.float32, device=do_BV.device)
    if B * M:
        _value_grad_atomic_kernel[(B,)](
            x_p_BP, rows_BM, scores_BMC, z, dz, do_BV, grad_TD, **dims)
    return grad_TD if out_dtype == torch.float32 else grad_TD.to(out_dtype)
