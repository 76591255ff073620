"""TDQKR: Tucker-decomposed query-key retrieval, the top-m selection of UltraMem v1 and V2.

Math (per token; paper-notes §1.3 steps 4-6; UltraMemV2 eq. 7/11, v1 TDQKR):

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
    """Leading singular vectors (u, v) of Σ_c C_c for the prefilter (paper-notes §1.3 step 4).

    An SVD fixes u and v only up to a common sign; like the official code ("must maintain
    smoothness") we pick the sign that moves (u, v) least in L1 from the previous step's vectors,
    so the prefilter does not flip between optimizer steps. u σ v^T is the same either way.
    """
    U_RR, _, Vh_RR = torch.linalg.svd(cores_CRR.detach().float().sum(0))
    u_R, v_R = U_RR[:, 0], Vh_RR[0]
    keep = (u_R - prev_u_R).abs().sum() + (v_R - prev_v_R).abs().sum()
    flip = (u_R + prev_u_R).abs().sum() + (v_R + prev_v_R).abs().sum()
    sign = -1.0 if flip < keep else 1.0
    return (sign * u_R).to(prev_u_R.dtype), (sign * v_R).to(prev_v_R.dtype)
