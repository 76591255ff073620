"""The row-major half of the value lookup's backward (K34, `mem_bwd_rows`): the table gradient,
and on the way the score and neuron gradients, reading each touched table row once.

Math (the VJP of `memory_lookup_reference`, kernels/lookup.py). Lookup ℓ = (t, j) of token t
reads row p_ℓ; h_ℓ = <P[p_ℓ], x_p[t]> is its neuron's pre-activation (saved by the forward) and
z_ℓ = act(h_ℓ) (z = 1 when D_p = 0):

    dw_{ℓ,c}   = <V[p_ℓ, chunk c], do[t, chunk c]>
    ds_{ℓ,c}   = z_ℓ · dw_{ℓ,c}                               score gradient
    dz_ℓ       = act'(h_ℓ) · Σ_c s_{ℓ,c} dw_{ℓ,c}             ∂L/∂h_ℓ, for x_p's gradient (lookup.py)
    dV[p, c]   = Σ_{ℓ : p_ℓ = p} s_{ℓ,c} z_ℓ · do[t_ℓ, chunk c]
    dP[p]      = Σ_{ℓ : p_ℓ = p} dz_ℓ · x_p[t_ℓ]

ds and dz need V[p_ℓ], which is the row the table gradient is summed for: so one pass over the
lookups in row order (`sort_by_row`, stable: ascending ℓ within a row) computes all of them, and
the rows are gathered once for the whole backward (K3 and K4 used to gather them twice).

Each one-warp program takes one chunk of a table row's lookups, at most CHUNK of them, and walks
them in sorted order, one at a time (row p's lookups sit at positions `row_ptr[p]` ..
`row_ptr[p + 1]`, from a `searchsorted` of the sorted ids): it gathers each lookup's s, h, do and
x_p (the row's V is the same for all of them), stores ds and dz, and adds the lookup's
contribution to the chunk's sums. Program p < T takes row p's first chunk and writes its sums to
the gradient's row p (zeros if nobody looked the row up); a row with more than CHUNK lookups has
its further chunks taken by programs after the T first, which write their sums to a scratch
buffer, and a second kernel adds those to the row in chunk order. So no program walks more than
CHUNK lookups however the lookups crowd onto a few rows (a program walking a row's every lookup
one after another takes as long as its row is popular), and every row is still summed in one
fixed order, with no atomics: the gradient is the same bit for bit on every call.
(One one-warp program per row and lookup at a time took less time than programs of 2-16 rows
or 2-8 lookups a step, and than 2 or 4 warps, at every shape measured on an H100:
BENCHMARKS.md, run 5.)

Bytes: reads U·D_v table elements (U touched rows), and per lookup D_v (do) + D_p (x_p) + C + 3
scalars, mostly from L2 (the B tokens' activations are small); writes all T·(D_p + D_v) gradient
elements (zeros in the rows nobody looked up, so the gradient needs no memset first) and
L·(C + 1) scalars; a further chunk's sums, D_p + D_v, are written once more and read back.
"""

import torch
import triton
import triton.language as tl

from umv2cli.kernels.rows import gelu, gelu_grad, launch_dims, row_tile

CHUNK = 32
"""Most lookups one program of K34 walks: a row with more is split into chunks of CHUNK."""


def sort_by_row(
    rows: torch.Tensor,  # row ids of the lookups, int32 or int64, any shape of L elements
    num_rows: int,  # T: every id is in [0, T)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids sorted, lookup ids ℓ in that order), both int32 [L]: a stable sort, so equal rows
    keep ascending ℓ, and the order is the same on every call (each row's gradient then sums its
    lookups in the same order: bit-identical gradients). torch.sort's radix sort: on an H100 it
    took less time, even followed by a searchsorted, than a counting sort in Triton at every shape
    measured (BENCHMARKS.md)."""
    L = rows.numel()
    if L >= 2**31 or num_rows > 2**31:
        raise ValueError(f"sort_by_row: {L} lookups of {num_rows} rows; ids must fit in int32")
    sorted_L, order_L = torch.sort(rows.reshape(-1).to(torch.int32), stable=True)
    return sorted_L, order_L.to(torch.int32)


def value_grad_reference(
    x_p_BP: torch.Tensor,  # pre-value input                         [B, D_p]
    rows_BM: torch.Tensor,  # rows read                              [B, m]
    scores_BMC: torch.Tensor,  # per-core scores                     [B, m, C]
    z_BM: torch.Tensor | None,  # post-activation neurons (None: D_p = 0)  [B, m]
    dz_BM: torch.Tensor | None,  # their gradients ∂L/∂h (None: D_p = 0)  [B, m]
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
def _lookup_grads(
    v,  # the row's value V[p], fp32 [BLOCK_C, BLOCK_W]
    ell,  # the lookup ℓ = t·m + j, int64 scalar
    S, H, X_P, DO,  # pointers as in the kernel below
    M, D_P, D_V, C,
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw,
    HAS_P: tl.constexpr, GELU: tl.constexpr,
):
    """One lookup's contributions to dV [BLOCK_C, BLOCK_W] and to dP [BLOCK_P], its ds [BLOCK_C]
    and dz (a scalar; 0 when D_p = 0)."""
    t = ell // M
    s = tl.load(S + ell * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    do = tl.load(DO + t * D_V + offs_cw, mask=mask_cw, other=0.0).to(tl.float32)
    dw = tl.sum(v * do, axis=1)  # dw_{ℓ,c} = <V[p_ℓ, chunk c], do[t, chunk c]>
    if HAS_P:
        h = tl.load(H + ell)
        if GELU:
            z = gelu(h)
            dz = gelu_grad(h) * tl.sum(s * dw, axis=0)
        else:
            z = h
            dz = tl.sum(s * dw, axis=0)
        x = tl.load(X_P + t * D_P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        dp = dz * x  # dz_ℓ x_p[t]
        ds = z * dw
        s = s * z
    else:
        dz = 0.0
        dp = tl.zeros_like(offs_p).to(tl.float32)
        ds = dw
    return s[:, None] * do, dp, ds, dz  # s_{ℓ,c} z_ℓ do[t, chunk c]


@triton.jit
def _chunk(ROW_PTR, EXTRA_END, EXTRA_ROW, i, T, CHUNK: tl.constexpr):
    """Program i's chunk: (row p, its chunk index k, the row's further chunks, the chunk's first
    and end positions in sorted order, does it exist). Programs i < T take row i's first chunk
    (k = 0); program T + e takes the e-th further chunk over the rows in order (EXTRA_END: the
    running count of further chunks up to each row; EXTRA_ROW: the row of each, T past the last)."""
    p = tl.where(i < T, i, tl.load(EXTRA_ROW + i - T, mask=i >= T, other=0)).to(tl.int64)
    exists = p < T
    start = tl.load(ROW_PTR + p, mask=exists, other=0)
    end = tl.load(ROW_PTR + p + 1, mask=exists, other=0)
    further = tl.maximum(end - start - 1, 0) // CHUNK  # chunks after the row's first
    k = tl.where(i < T, 0, i - T - (tl.load(EXTRA_END + p, mask=exists, other=0) - further) + 1)
    lo = tl.minimum(start + k * CHUNK, end)
    hi = tl.where(exists, tl.minimum(lo + CHUNK, end), lo)
    return p, k, further, lo, hi, exists


@triton.jit
def _mem_bwd_rows_kernel(
    TABLE,  # pointer to the table as the forward read it [T, D_p + D_v]
    ROW_PTR,  # pointer to row p's first position in sorted order, int32 [T + 1]
    ORDER,  # pointer to the lookup ids ℓ = t·m + j in sorted order, int32 [L]
    EXTRA_END,  # pointer to the running count of further chunks up to row p, int32 [T]
    EXTRA_ROW,  # pointer to the row of each further chunk (T past the last), int32 [E]
    S,  # pointer to the scores s [B·m, C]
    H,  # pointer to the pre-activations h (fp32) [B·m]; unused when not HAS_P
    X_P,  # pointer to x_p [B, D_p]
    DO,  # pointer to the output gradient do [B, D_v]
    GRAD,  # pointer to the table gradient [T, D_p + D_v]: every row is written
    PART,  # pointer to the further chunks' sums, fp32 [E, D_p + D_v]
    DS,  # pointer to ds [B·m, C]
    DZ,  # pointer to dz = ∂L/∂h (fp32) [B·m]; unused when not HAS_P
    T,  # table rows
    M,  # m, lookups per token
    D_P,  # pre-value dim
    D_V,  # value dim
    W,  # chunk width D_v / C
    C,  # cores
    HAS_P: tl.constexpr,  # D_p > 0
    GELU: tl.constexpr,  # act = exact GELU (else identity)
    CHUNK: tl.constexpr,  # most lookups a program walks
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    i = tl.program_id(0).to(tl.int64)
    D = D_P + D_V
    offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw = row_tile(D_P, W, C, BLOCK_P, BLOCK_C, BLOCK_W)
    p, k, _, lo, hi, exists = _chunk(ROW_PTR, EXTRA_END, EXTRA_ROW, i, T, CHUNK)
    v = tl.load(TABLE + p * D + D_P + offs_cw, mask=mask_cw & (hi > lo), other=0.0).to(tl.float32)  # read U·D_v
    dv_sum = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    dp_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for pos in range(lo, hi):  # the chunk's lookups in ascending ℓ
        ell = tl.load(ORDER + pos).to(tl.int64)
        dv, dp, ds, dz = _lookup_grads(v, ell, S, H, X_P, DO, M, D_P, D_V, C,
                                       offs_p, mask_p, offs_c, mask_c, offs_cw, mask_cw, HAS_P, GELU)
        tl.store(DS + ell * C + offs_c, ds.to(DS.dtype.element_ty), mask=mask_c)
        if HAS_P:
            tl.store(DZ + ell, dz)
        dv_sum += dv
        dp_sum += dp
    # a first chunk goes to its row of the gradient (zeros where nobody looked the row up), a
    # further one to its row of PART
    out = tl.where(k == 0, GRAD + p * D, PART + (i - T) * D)
    tl.store(out + D_P + offs_cw, dv_sum.to(GRAD.dtype.element_ty), mask=mask_cw & exists)
    if HAS_P:
        tl.store(out + offs_p, dp_sum.to(GRAD.dtype.element_ty), mask=mask_p & exists)


@triton.jit
def _add_chunks_kernel(
    ROW_PTR, EXTRA_END, EXTRA_ROW,  # as above
    GRAD,  # pointer to the table gradient [T, D]: rows hold their first chunk's sums
    PART,  # pointer to the further chunks' sums [E, D]
    T,  # table rows
    D,  # D_p + D_v
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two ≥ D
):
    """Program e: if further chunk e is its row's first further chunk, add all of that row's
    further chunks to its gradient row, in chunk order."""
    e = tl.program_id(0).to(tl.int64)
    p, k, further, _, _, exists = _chunk(ROW_PTR, EXTRA_END, EXTRA_ROW, T + e, T, CHUNK)
    count = tl.where(exists & (k == 1), further, 0)  # only the row's first further chunk adds
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = (offs_d < D) & (count > 0)
    acc = tl.load(GRAD + p * D + offs_d, mask=mask_d, other=0.0)
    for j in range(0, count):
        acc += tl.load(PART + (e + j) * D + offs_d, mask=mask_d, other=0.0)
    tl.store(GRAD + p * D + offs_d, acc, mask=mask_d)


def mem_bwd_rows(
    table_TD: torch.Tensor,  # the table as the forward read it     [T, D_p + D_v]
    sorted_L: torch.Tensor,  # row ids in sorted order, int32        [B·m]  (sort_by_row)
    order_L: torch.Tensor,  # lookup ids in that order, int32        [B·m]
    scores_BMC: torch.Tensor,  # per-core scores                     [B, m, C]
    h_BM: torch.Tensor,  # fp32 pre-activations ([B, 0] if D_p = 0)  [B, m]
    x_p_BP: torch.Tensor,  # pre-value input                         [B, D_p]
    do_BV: torch.Tensor,  # output gradient                          [B, D_v]
    grad_TD: torch.Tensor,  # table gradient, every row written (need not be zeroed first)
    act: str = "none",  # "none" or "gelu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """K34. Writes every row of grad_TD; returns (ds_BMC in the scores' dtype,
    dz_BM = ∂L/∂h fp32; [B, 0] if D_p = 0). All tensors contiguous, on one device."""
    B, M, C = scores_BMC.shape
    P, V = x_p_BP.shape[1], do_BV.shape[1]
    T = table_TD.shape[0]
    ds_BMC = torch.empty_like(scores_BMC)
    dz_BM = torch.empty(B, M if P else 0, dtype=torch.float32, device=do_BV.device)
    L = B * M
    if L:
        row_ptr, extra_end_T, extra_row_E = row_chunks(sorted_L, T)
        E = extra_row_E.numel()
        part_ED = torch.empty(E, P + V, dtype=torch.float32, device=grad_TD.device)
        dims = rows_launch_dims(C, P, V)
        _mem_bwd_rows_kernel[(T + E,)](
            table_TD, row_ptr, order_L, extra_end_T, extra_row_E, scores_BMC, h_BM if P else ds_BMC, x_p_BP,
            do_BV, grad_TD, part_ED, ds_BMC, dz_BM if P else ds_BMC, T, M, **dims, GELU=act == "gelu", CHUNK=CHUNK)
        _add_chunks_kernel[(E,)](row_ptr, extra_end_T, extra_row_E, grad_TD, part_ED, T, P + V, CHUNK=CHUNK,
                                 BLOCK_D=triton.next_power_of_2(P + V), num_warps=dims["num_warps"])
    else:
        grad_TD.zero_()
    return ds_BMC, dz_BM


def row_chunks(sorted_L: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where K34's chunks are, all int32: row p's lookups sit at sorted positions row_ptr[p] ..
    row_ptr[p + 1] [T + 1]; the running count of further chunks (after each row's first) up to
    each row [T]; and the row of each further chunk [E], T past the last. E = ⌈L / CHUNK⌉ is at
    least the further chunks of all rows together, known without reading the lookups back."""
    device = sorted_L.device
    row_ptr = torch.searchsorted(sorted_L, torch.arange(T + 1, dtype=torch.int32, device=device), out_int32=True)
    further_T = (row_ptr.diff() - 1).clamp_(min=0) // CHUNK
    extra_end_T = further_T.cumsum(0, dtype=torch.int32)
    E = triton.cdiv(sorted_L.numel(), CHUNK)
    extra_row_E = torch.searchsorted(extra_end_T, torch.arange(E, dtype=torch.int32, device=device), right=True,
                                     out_int32=True)
    return row_ptr, extra_end_T, extra_row_E


def rows_launch_dims(C: int, P: int, V: int) -> dict:
    """K34's launch arguments: sizes, D_p > 0, power-of-two blocks, one warp a program."""
    dims = launch_dims(C, P, V)
    return {k: dims[k] for k in ("D_P", "D_V", "W", "C", "HAS_P", "BLOCK_P", "BLOCK_C", "BLOCK_W")} | dict(num_warps=1)
