"""TDQKR: Tucker-decomposed query-key retrieval, the top-m selection of UltraMem v1 and V2.

Math (per token; docs/fidelity.md §2.2 steps 4-6; UltraMemV2 eq. 7/11, v1 TDQKR):

    a = u^T S_row,  b = v^T S_col                  rank-1 prefilter scores over the n keys per side
    I = topk(a, k_rc),  J = topk(b, k_rc)            row and column candidates
    G_c[i, j] = S_row[:, I_i]^T C_c S_col[:, J_j]     grid re-scoring with each core c (eq. 7/11)
    (i, j)_1..m = topm(Σ_c G_c)                      final selection on raw scores, no softmax
    s_{·,c} = G_c at the selected cells              per-core scores, kept for multi-core scoring

where S_row, S_col ∈ R^{r×n} are the per-rank row/column scores and (u, v) are the leading
singular vectors of C̄ = Σ_c C_c, refreshed once per optimizer step with no gradient
(`rank1_vectors`). With k_rc = n the prefilter keeps every key and the selection is the exact
top-m of the n² grid.

VJP: the indices are constants; s = gather(G), so ∂s flows to S_row[:, I], S_col[:, J] and C_c
through the bilinear form, and nothing reaches u, v (buffers) or the indices.

Bytes per token: reads 2·r·n scores, writes m·(2 indices + C scores); the k_rc²·C grid is the
intermediate a fused kernel must keep on chip.
"""

import torch


def select_topm_reference(
    s_row_BRN: torch.Tensor,  # per-rank row scores            [B, r, n]
    s_col_BRN: torch.Tensor,  # per-rank column scores         [B, r, n]
    cores_CRR: torch.Tensor,  # Tucker cores C_1..C_C           [C, r, r]
    u_R: torch.Tensor,  # rank-1 row vector of Σ_c C_c         [r]
    v_R: torch.Tensor,  # rank-1 column vector of Σ_c C_c      [r]
    k_rc: int,
    topm: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch TDQKR. Returns (rows_BM, cols_BM, scores_BMC), best first."""
    B, R, N = s_row_BRN.shape
    # step 4: rank-1 prefilter                                   reads 2·r·n, writes 2·k_rc
    a_BN = torch.einsum("brn,r->bn", s_row_BRN, u_R)
    b_BN = torch.einsum("brn,r->bn", s_col_BRN, v_R)
    i_BI = a_BN.topk(k_rc, dim=-1).indices
    j_BJ = b_BN.topk(k_rc, dim=-1).indices
    # step 5: re-score the k_rc × k_rc grid with every core (eq. 7/11)
    sr_BRI = s_row_BRN.gather(2, i_BI[:, None, :].expand(B, R, k_rc))
    sc_BRJ = s_col_BRN.gather(2, j_BJ[:, None, :].expand(B, R, k_rc))
    g_BCIJ = torch.einsum("bri,crs,bsj->bcij", sr_BRI, cores_CRR, sc_BRJ)
    # step 6: top-m of the summed grid; keep each core's score of the chosen cells
    C = cores_CRR.shape[0]
    cell_BM = g_BCIJ.sum(1).flatten(1).topk(topm, dim=-1).indices
    scores_BMC = g_BCIJ.flatten(2).gather(2, cell_BM[:, None, :].expand(B, C, topm)).transpose(1, 2)
    rows_BM = i_BI.gather(1, cell_BM // k_rc)
    cols_BM = j_BJ.gather(1, cell_BM % k_rc)
    return rows_BM, cols_BM, scores_BMC


@torch.no_grad()
def rank1_vectors(
    cores_CRR: torch.Tensor, prev_u_R: torch.Tensor, prev_v_R: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors (u, v) of Σ_c C_c for the prefilter (docs/fidelity.md §2.2 step 4).
    Any leading dims batch it: cores [..., C, r, r] and previous vectors [..., r], so one SVD serves
    every layer of a model.

    An SVD fixes u and v only up to a common sign; like the official code ("must maintain
    smoothness") we pick the sign that moves (u, v) least in L1 from the previous step's vectors,
    so the prefilter does not flip between optimizer steps. u σ v^T is the same either way. The
    sign is chosen on the device (no host sync).
    """
    U_RR, _, Vh_RR = torch.linalg.svd(cores_CRR.detach().float().sum(-3))
    u_R, v_R = U_RR[..., :, 0], Vh_RR[..., 0, :]
    keep = (u_R - prev_u_R).abs().sum(-1) + (v_R - prev_v_R).abs().sum(-1)
    flip = (u_R + prev_u_R).abs().sum(-1) + (v_R + prev_v_R).abs().sum(-1)
    sign = torch.where(flip < keep, -1.0, 1.0)[..., None]
    return (sign * u_R).to(prev_u_R.dtype), (sign * v_R).to(prev_v_R.dtype)


# ------------------------------------------------------------------------------------------------
# Triton (docs/kernels.md: K1 tdqkr_select). One program per token does steps 4-6 on
# chip: it reads the token's 2·r·n scores once, keeps the k_rc candidates of each side, and writes
# only the m selections; the k_rc² grid never leaves it. Ranking works on packed int64 keys,
#
#     key = (order-preserving bits of the fp32 score) << 32 | (2³² − 1 − id),
#
# so an integer top-k (`tl.topk`, a bitonic network) sorts by score, best first, and breaks ties
# toward the lower id: the lower key id n in the prefilter and the lower virtual cell row·n + col
# in the final top-m. Keys are unique, so the result does not depend on the order in which cells
# are ranked. (`torch.topk`, and so the reference, leaves the order among equal scores
# unspecified.) Scores are ranked in fp32 whatever the input dtype; the per-core scores of the m
# winners are recomputed from the gathered rank scores, which is cheaper than keeping C grids.
#
# The grid streams through in tiles of BLOCK_I × BLOCK_J cells against a running top-m: one
# top-k over all k_rc² cells (16,384 at k_rc = 128) spilled registers and cost a network of
# ~k_rc² log²m compare-swaps. A tile whose best key is below the running m-th key is skipped
# unranked; the others are ranked and merged in (a bitonic merge). The candidates come best
# first by the rank-1 prefilter score, which predicts the grid score (exactly, where Σ_c C_c has
# rank 1), so the running m-th key rises early and most tiles are skipped: at k_rc = 128 ranking
# every tile takes 3.5-3.7× longer, with uniform and with normal random cores (BENCHMARKS.md,
# K1). Inputs whose grid improves tile after tile in that order would be that slow; the result
# is exact either way.
#
# Backward, per token: with the m selections (row_j, col_j) fixed,
#     ∂S_row[r, row_j] += Σ_c ∂s_{j,c} Σ_s C_c[r, s] S_col[s, col_j]
#     ∂S_col[s, col_j] += Σ_c ∂s_{j,c} Σ_r S_row[r, row_j] C_c[r, s]
#     ∂C_c[r, s]       += Σ_j ∂s_{j,c} S_row[r, row_j] S_col[s, col_j]
# A row (or column) can be chosen several times, so the program sorts its selections by id and
# sums each id's segment with a scan in a fixed order before one store per id: deterministic,
# no atomics. ∂C is written per token and summed by torch (also in a fixed order). Bytes per
# token: reads m·(2 ids + C) and gathers 2·r·m scores; writes 2·r·n (zeros written by the
# kernel itself, which saves two memset launches, then ≤ 2·r·m stores) and C·r².

import functools  # noqa: E402
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from umv2cli.kernels import resolve_impl  # noqa: E402
from umv2cli.kernels.rows import segment_sum  # noqa: E402

_INT64_MIN = tl.constexpr(-(2**63))  # below every packed key: padding never ranks
_LOW = tl.constexpr(2**32 - 1)  # the id half of a packed key holds _LOW - id


@triton.jit
def _pack(score, id, valid):
    """fp32 scores and int64 ids (< 2³²) → int64 keys that order by score, ties to the lower id."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)  # -0.0 ties +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return tl.where(valid, (ordered.to(tl.int64) << 32) | (_LOW - id), _INT64_MIN)


@triton.jit
def _unpack_id(key):
    return _LOW - (key & _LOW)


@triton.jit
def _gather_ranks(S, ids, STRIDE_R, offs_r, mask_r, mask):
    """S[r, ids_i] for one token's [r, n] scores (ranks STRIDE_R apart) → [len(ids), BLOCK_R] in fp32."""
    return tl.load(S + offs_r[None, :] * STRIDE_R + ids[:, None], mask=mask[:, None] & mask_r[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _core(CORES, c, R, offs_r, mask_r):
    """C_c → [BLOCK_R, BLOCK_R] in fp32."""
    return tl.load(CORES + c * R * R + offs_r[:, None] * R + offs_r[None, :],
                   mask=mask_r[:, None] & mask_r[None, :], other=0.0).to(tl.float32)


@triton.jit
def _prefilter(S, W, STRIDE_R, N, offs_r, mask_r, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step 4 for one side: the key ids by w^T S[:, n], best first → [BLOCK_K] (the first k_rc count)."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    s_RN = tl.load(S + offs_r[:, None] * STRIDE_R + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                   other=0.0).to(tl.float32)  # read r·n
    w_R = tl.load(W + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    a_N = tl.sum(w_R[:, None] * s_RN, axis=0)  # a = u^T S_row (or b = v^T S_col)
    return _unpack_id(tl.topk(_pack(a_N, offs_n.to(tl.int64), mask_n), BLOCK_K))


@triton.jit
def _kth_key(run_M, k, BLOCK_M: tl.constexpr):
    """The k-th key (1-based, k ≤ BLOCK_M) of a descending run of keys."""
    return tl.max(tl.where(tl.arange(0, BLOCK_M) == k - 1, run_M, _INT64_MIN), axis=0)


@triton.jit
def _merge_top(run_M, top_M):
    """Two descending runs of BLOCK_M keys → the BLOCK_M largest of both, descending. Against the
    other run reversed, the elementwise max holds exactly those and is bitonic (falls, then
    rises), so one bitonic merge sorts it."""
    return tl.bitonic_merge(tl.maximum(run_M, tl.flip(top_M, 0)), descending=True)


@triton.jit
def _tdqkr_fwd_kernel(
    S_ROW,  # pointer to the row scores [B, r, n], each rank's n scores contiguous
    S_COL,  # pointer to the column scores, the same layout
    CORES,  # pointer to the Tucker cores [C, r, r]
    U,  # pointer to the rank-1 row vector u [r]
    V,  # pointer to the rank-1 column vector v [r]
    ROWS,  # pointer to the chosen rows, int64 [B, m]
    COLS,  # pointer to the chosen columns, int64 [B, m]
    SCORES,  # pointer to the per-core scores [B, m, C]
    ROW_B, ROW_R,  # S_ROW's strides: elements between two tokens, between two ranks
    COL_B, COL_R,  # the same for S_COL
    R,  # Tucker rank r
    N,  # keys per side n
    C,  # cores
    K_RC,  # candidates per side
    M,  # selections m
    BLOCK_R: tl.constexpr,  # power of two ≥ r
    BLOCK_N: tl.constexpr,  # power of two ≥ n and ≥ BLOCK_K
    BLOCK_K: tl.constexpr,  # power of two ≥ k_rc
    BLOCK_I: tl.constexpr,  # candidate rows per grid tile, a power of two ≤ BLOCK_K
    BLOCK_J: tl.constexpr,  # candidate columns per grid tile, a power of two ≤ BLOCK_K
    BLOCK_M: tl.constexpr,  # power of two ≥ m, ≤ BLOCK_I · BLOCK_J
):
    b = tl.program_id(0).to(tl.int64)  # one token
    s_row = S_ROW + b * ROW_B
    s_col = S_COL + b * COL_B
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # step 4: rank-1 prefilter, k_rc row and column candidates
    i_K = _prefilter(s_row, U, ROW_R, N, offs_r, mask_r, BLOCK_N, BLOCK_K)
    j_K = _prefilter(s_col, V, COL_R, N, offs_r, mask_r, BLOCK_N, BLOCK_K)
    # steps 5-6, one BLOCK_I × BLOCK_J tile of the grid Σ_c G_c = S̃_row^T C̄ S̃_col at a time
    # (C̄ = Σ_c C_c): keep a running top-m of packed keys, best first, ties to the lower virtual
    # cell row·n + col. A tile whose best key is below the running m-th key cannot change it and
    # is not ranked; the others are ranked (top BLOCK_M of the tile) and merged in.
    cbar_RR = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for c in range(C):
        cbar_RR += _core(CORES, c, R, offs_r, mask_r)
    run_M = tl.full((BLOCK_M,), _INT64_MIN, tl.int64)
    kth = _kth_key(run_M, M, BLOCK_M)
    for i0 in range(0, K_RC, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < K_RC
        i_I = tl.gather(i_K, offs_i, 0)
        sr_IR = _gather_ranks(s_row, i_I, ROW_R, offs_r, mask_r, mask_i)
        t_IR = tl.sum(sr_IR[:, :, None] * cbar_RR[None, :, :], axis=1)  # T[i, s] = Σ_r S̃_row[r, i] C̄[r, s]
        for j0 in range(0, K_RC, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < K_RC
            j_J = tl.gather(j_K, offs_j, 0)
            sc_JR = _gather_ranks(s_col, j_J, COL_R, offs_r, mask_r, mask_j)
            g_IJ = tl.sum(t_IR[:, None, :] * sc_JR[None, :, :], axis=2)  # G[i, j] = Σ_s T[i, s] S̃_col[s, j]
            key_IJ = _pack(g_IJ, i_I[:, None] * N + j_J[None, :], mask_i[:, None] & mask_j[None, :])
            if tl.max(tl.max(key_IJ, axis=1), axis=0) > kth:
                run_M = _merge_top(run_M, tl.topk(tl.reshape(key_IJ, [BLOCK_I * BLOCK_J]), BLOCK_M))
                kth = _kth_key(run_M, M, BLOCK_M)
    cell_M = _unpack_id(run_M)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    row_M = cell_M // N
    col_M = cell_M % N
    tl.store(ROWS + b * M + offs_m, row_M, mask=mask_m)
    tl.store(COLS + b * M + offs_m, col_M, mask=mask_m)
    # each core's score of the winners: s_{j,c} = S_row[:, row_j]^T C_c S_col[:, col_j]
    sr_MR = _gather_ranks(s_row, row_M, ROW_R, offs_r, mask_r, mask_m)
    sc_MR = _gather_ranks(s_col, col_M, COL_R, offs_r, mask_r, mask_m)
    for c in range(C):
        core_RR = _core(CORES, c, R, offs_r, mask_r)
        s_M = tl.sum(tl.sum(sr_MR[:, :, None] * core_RR[None, :, :] * sc_MR[:, None, :], axis=2), axis=1)
        tl.store(SCORES + (b * M + offs_m) * C + c, s_M.to(SCORES.dtype.element_ty), mask=mask_m)


@triton.jit
def _store_summed_by_id(OUT, ids_M, val_MR, mask_m, N, offs_r, mask_r, BLOCK_M: tl.constexpr):
    """OUT[r, id] = Σ_{j : ids_j = id} val[j, r] for one token's [r, n] gradient, every id written
    once: sort the selections by (id, j), sum each id's segment by a scan, store at its end."""
    offs_m = tl.arange(0, BLOCK_M)
    order = tl.sort(tl.where(mask_m, ids_M * BLOCK_M + offs_m, N * BLOCK_M + offs_m))
    j_sorted = order % BLOCK_M
    id_sorted = order // BLOCK_M  # N for the padding past m
    val_sorted = tl.gather(val_MR, tl.broadcast_to(j_sorted[:, None], val_MR.shape), 0)
    id_MR = tl.broadcast_to(id_sorted[:, None], val_MR.shape)
    sum_MR, _ = tl.associative_scan((val_sorted, id_MR), 0, segment_sum)
    next_id = tl.gather(id_sorted, tl.minimum(offs_m + 1, BLOCK_M - 1), 0)
    last = ((id_sorted != next_id) | (offs_m == BLOCK_M - 1)) & (id_sorted < N)
    tl.store(OUT + offs_r[None, :] * N + id_sorted[:, None], sum_MR.to(OUT.dtype.element_ty),
             mask=last[:, None] & mask_r[None, :])


@triton.jit
def _tdqkr_bwd_kernel(
    S_ROW,  # pointer to the row scores [B, r, n] (as in the forward)
    S_COL,  # pointer to the column scores
    CORES,  # pointer to the Tucker cores [C, r, r]
    ROWS,  # pointer to the chosen rows, int64 [B, m]
    COLS,  # pointer to the chosen columns, int64 [B, m]
    DSCORES,  # pointer to ∂s [B, m, C], contiguous
    DS_ROW,  # pointer to ∂S_row [B, r, n], contiguous (every element written)
    DS_COL,  # pointer to ∂S_col [B, r, n], contiguous (every element written)
    DCORES,  # pointer to each token's share of ∂C, fp32 [B, C, r, r]
    ROW_B, ROW_R,  # S_ROW's strides: elements between two tokens, between two ranks
    COL_B, COL_R,  # the same for S_COL
    R,  # Tucker rank r
    N,  # keys per side n
    C,  # cores
    M,  # selections m
    BLOCK_R: tl.constexpr,  # power of two ≥ r
    BLOCK_M: tl.constexpr,  # power of two ≥ m
    BLOCK_Z: tl.constexpr,  # keys zeroed per store, a power of two
):
    b = tl.program_id(0).to(tl.int64)  # one token
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # zero this token's ∂S_row and ∂S_col here (no memset launches); the chosen ids are
    # overwritten below, after a barrier that orders the two stores of an element
    offs_z = tl.arange(0, BLOCK_Z)
    zeros_RZ = tl.zeros((BLOCK_R, BLOCK_Z), dtype=DS_ROW.dtype.element_ty)
    for n0 in range(0, N, BLOCK_Z):
        at_RZ = b * R * N + offs_r[:, None] * N + n0 + offs_z[None, :]
        mask_RZ = mask_r[:, None] & (n0 + offs_z[None, :] < N)
        tl.store(DS_ROW + at_RZ, zeros_RZ, mask=mask_RZ)
        tl.store(DS_COL + at_RZ, zeros_RZ, mask=mask_RZ)
    tl.debug_barrier()
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    row_M = tl.load(ROWS + b * M + offs_m, mask=mask_m, other=0)
    col_M = tl.load(COLS + b * M + offs_m, mask=mask_m, other=0)
    sr_MR = _gather_ranks(S_ROW + b * ROW_B, row_M, ROW_R, offs_r, mask_r, mask_m)
    sc_MR = _gather_ranks(S_COL + b * COL_B, col_M, COL_R, offs_r, mask_r, mask_m)
    dsr_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dsc_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c in range(C):
        core_RR = _core(CORES, c, R, offs_r, mask_r)
        ds_M = tl.load(DSCORES + (b * M + offs_m) * C + c, mask=mask_m, other=0.0).to(tl.float32)
        dsr_MR += ds_M[:, None] * tl.sum(core_RR[None, :, :] * sc_MR[:, None, :], axis=2)
        dsc_MR += ds_M[:, None] * tl.sum(sr_MR[:, :, None] * core_RR[None, :, :], axis=1)
        dcore_RR = tl.sum(ds_M[:, None, None] * sr_MR[:, :, None] * sc_MR[:, None, :], axis=0)
        tl.store(DCORES + ((b * C + c) * R + offs_r[:, None]) * R + offs_r[None, :], dcore_RR,
                 mask=mask_r[:, None] & mask_r[None, :])
    _store_summed_by_id(DS_ROW + b * R * N, row_M, dsr_MR, mask_m, N, offs_r, mask_r, BLOCK_M)
    _store_summed_by_id(DS_COL + b * R * N, col_M, dsc_MR, mask_m, N, offs_r, mask_r, BLOCK_M)


def _keys_contiguous(s_BRN: torch.Tensor) -> torch.Tensor:
    """The kernels read each rank's n scores contiguously; any token and rank strides are fine
    (the scores' einsum gives the two sides as strided views, which need no copy)."""
    return s_BRN if s_BRN.stride(2) == 1 else s_BRN.contiguous()


def _check_select_args(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm) -> tuple[int, ...]:
    """One-line ValueErrors for what K1 cannot take; returns (B, R, N, C)."""
    if s_row_BRN.dim() != 3 or s_row_BRN.shape != s_col_BRN.shape:
        raise ValueError(f"select_topm: s_row and s_col must both be [B, r, n]; got "
                         f"{tuple(s_row_BRN.shape)}, {tuple(s_col_BRN.shape)}")
    B, R, N = s_row_BRN.shape
    C = cores_CRR.shape[0]
    if tuple(cores_CRR.shape) != (C, R, R) or tuple(u_R.shape) != (R,) or tuple(v_R.shape) != (R,):
        raise ValueError(f"select_topm: cores must be [C, {R}, {R}] and u, v [{R}]; got "
                         f"{tuple(cores_CRR.shape)}, {tuple(u_R.shape)}, {tuple(v_R.shape)}")
    if not (1 <= k_rc <= N and 1 <= topm <= k_rc**2):
        raise ValueError(f"select_topm: need 1 ≤ k_rc ≤ n={N} and 1 ≤ topm ≤ k_rc²; got k_rc={k_rc}, topm={topm}")
    if N >= 2**16:
        raise ValueError(f"select_topm: n={N} keys per side; the kernel packs cells row·n + col in 32 bits (n < 65536)")
    kinds = (torch.float32, torch.float16, torch.bfloat16)
    if s_row_BRN.dtype != s_col_BRN.dtype or any(t.dtype not in kinds for t in (s_row_BRN, cores_CRR, u_R, v_R)):
        raise ValueError(f"select_topm: s_row and s_col must share one dtype, and all inputs be fp32, "
                         f"fp16 or bf16; got {s_row_BRN.dtype}, {s_col_BRN.dtype}, {cores_CRR.dtype}, "
                         f"{u_R.dtype}, {v_R.dtype}")
    devices = {t.device for t in (s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R)}
    if len(devices) != 1:
        raise ValueError(f"select_topm: tensors on several devices {sorted(map(str, devices))}")
    if not s_row_BRN.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("select_topm: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "umv2cli.kernels.tdqkr is imported; or use impl='torch'")
    return B, R, N, C


@functools.cache
def _blocks(R: int, N: int, k_rc: int, topm: int) -> dict:
    """Launch sizes of the forward: grid tiles of 16 × 16 cells (grown until one holds BLOCK_M
    cells; block_m ≤ block_k², so it can), 2 warps where k_rc > 32 and m ≤ 128, else 4: the
    fastest of tiles 8-64 cells on a side × 2, 4, 8 warps on an H100 (BENCHMARKS.md, K1)."""
    block_k, block_m = triton.next_power_of_2(k_rc), triton.next_power_of_2(topm)
    block_j = min(block_k, max(16, block_m // 16))
    block_i = min(block_k, max(16, block_m // block_j))
    return dict(BLOCK_R=triton.next_power_of_2(R), BLOCK_N=max(triton.next_power_of_2(N), block_k),
                BLOCK_K=block_k, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_M=block_m,
                num_warps=2 if block_k >= 64 and block_m <= 128 else 4)


def tdqkr_fwd(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm):
    """K1 forward. Returns (rows_BM, cols_BM int64, scores_BMC in s_row's dtype), best first."""
    B, R, N, C = _check_select_args(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
    s_row_BRN, s_col_BRN = _keys_contiguous(s_row_BRN), _keys_contiguous(s_col_BRN)
    device = s_row_BRN.device
    rows_BM = torch.empty(B, topm, dtype=torch.int64, device=device)
    cols_BM = torch.empty(B, topm, dtype=torch.int64, device=device)
    scores_BMC = torch.empty(B, topm, C, dtype=s_row_BRN.dtype, device=device)
    if B:
        _tdqkr_fwd_kernel[(B,)](
            s_row_BRN, s_col_BRN, cores_CRR.contiguous(), u_R.contiguous(), v_R.contiguous(),
            rows_BM, cols_BM, scores_BMC, *s_row_BRN.stride()[:2], *s_col_BRN.stride()[:2], R, N, C, k_rc,
            topm, **_blocks(R, N, k_rc, topm))
    return rows_BM, cols_BM, scores_BMC


def tdqkr_bwd(s_row_BRN, s_col_BRN, cores_CRR, rows_BM, cols_BM, dscores_BMC):
    """K1 backward. Returns (∂S_row, ∂S_col in s_row's dtype, ∂C in the cores' dtype)."""
    s_row_BRN, s_col_BRN = _keys_contiguous(s_row_BRN), _keys_contiguous(s_col_BRN)
    (B, R, N), (C, M) = s_row_BRN.shape, (cores_CRR.shape[0], rows_BM.shape[1])
    ds_row_BRN = torch.empty(B, R, N, dtype=s_row_BRN.dtype, device=s_row_BRN.device)
    ds_col_BRN = torch.empty_like(ds_row_BRN)
    dcores_BCRR = torch.empty(B, C, R, R, dtype=torch.float32, device=s_row_BRN.device)
    if B:
        _tdqkr_bwd_kernel[(B,)](
            s_row_BRN, s_col_BRN, cores_CRR.contiguous(), rows_BM, cols_BM, dscores_BMC.contiguous(),
            ds_row_BRN, ds_col_BRN, dcores_BCRR, *s_row_BRN.stride()[:2], *s_col_BRN.stride()[:2], R, N, C, M,
            BLOCK_R=triton.next_power_of_2(R), BLOCK_M=triton.next_power_of_2(M),
            BLOCK_Z=min(triton.next_power_of_2(N), max(16, 1024 // triton.next_power_of_2(R))))
    return ds_row_BRN, ds_col_BRN, dcores_BCRR.sum(0).to(cores_CRR.dtype)


class TDQKRSelect(torch.autograd.Function):
    """K1 forward and backward; the indices are constants, u and v get no gradient."""

    @staticmethod
    def forward(ctx, s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm):
        rows_BM, cols_BM, scores_BMC = tdqkr_fwd(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
        ctx.save_for_backward(s_row_BRN, s_col_BRN, cores_CRR, rows_BM, cols_BM)
        ctx.mark_non_differentiable(rows_BM, cols_BM)
        return rows_BM, cols_BM, scores_BMC

    @staticmethod
    def backward(ctx, _drows, _dcols, dscores_BMC):
        ds_row_BRN, ds_col_BRN, dcores_CRR = tdqkr_bwd(*ctx.saved_tensors, dscores_BMC)
        need_row, need_col, need_cores = ctx.needs_input_grad[:3]
        return (ds_row_BRN if need_row else None, ds_col_BRN if need_col else None,
                dcores_CRR if need_cores else None, None, None, None, None)


@torch.library.custom_op("umv2::tdqkr_select", mutates_args=())
def tdqkr_select_op(s_row_BRN: torch.Tensor, s_col_BRN: torch.Tensor, cores_CRR: torch.Tensor, u_R: torch.Tensor,
                    v_R: torch.Tensor, k_rc: int, topm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K1 as a custom op, for torch.compile: `tdqkr_fwd`'s results, the scores first
    (scores_BMC, rows_BM, cols_BM)."""
    rows_BM, cols_BM, scores_BMC = tdqkr_fwd(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
    return scores_BMC, rows_BM, cols_BM


@tdqkr_select_op.register_fake
def _(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm):
    B, C = s_row_BRN.shape[0], cores_CRR.shape[0]
    rows_BM = s_row_BRN.new_empty(B, topm, dtype=torch.int64)
    return s_row_BRN.new_empty(B, topm, C), rows_BM, torch.empty_like(rows_BM)


@torch.library.custom_op("umv2::tdqkr_select_backward", mutates_args=())
def tdqkr_select_backward_op(s_row_BRN: torch.Tensor, s_col_BRN: torch.Tensor, cores_CRR: torch.Tensor,
                             rows_BM: torch.Tensor, cols_BM: torch.Tensor,
                             dscores_BMC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K1's backward as a custom op: `tdqkr_bwd`."""
    return tdqkr_bwd(s_row_BRN, s_col_BRN, cores_CRR, rows_BM, cols_BM, dscores_BMC)


@tdqkr_select_backward_op.register_fake
def _(s_row_BRN, s_col_BRN, cores_CRR, rows_BM, cols_BM, dscores_BMC):
    ds_row_BRN = s_row_BRN.new_empty(s_row_BRN.shape)
    return ds_row_BRN, torch.empty_like(ds_row_BRN), torch.empty_like(cores_CRR)


def _setup_select(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output[1:])


def _backward_select(ctx, dscores_BMC, _drows, _dcols):
    ds_row_BRN, ds_col_BRN, dcores_CRR = tdqkr_select_backward_op(*ctx.saved_tensors, dscores_BMC)
    return ds_row_BRN, ds_col_BRN, dcores_CRR, None, None, None, None


tdqkr_select_op.register_autograd(_backward_select, setup_context=_setup_select)


def select_topm(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc: int, topm: int, impl: str = "auto"):
    """TDQKR steps 4-6 with `select_topm_reference`'s arguments and results, differentiable in the
    scores and the cores; impl: "auto" (Triton iff the scores are on CUDA), "triton" or "torch".
    The Triton path ranks in fp32 and breaks ties toward the lower id (see above). Eagerly it is
    an autograd.Function (the cheapest call to launch); under torch.compile the custom op
    umv2::tdqkr_select, so the compiled graph holds the kernels without a break."""
    if resolve_impl(impl, s_row_BRN, "select_topm") == "torch":
        return select_topm_reference(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
    if torch.compiler.is_compiling():
        scores_BMC, rows_BM, cols_BM = tdqkr_select_op(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
        return rows_BM, cols_BM, scores_BMC
    return TDQKRSelect.apply(s_row_BRN, s_col_BRN, cores_CRR, u_R, v_R, k_rc, topm)
