"""The UltraMemV2 value lookup: pre-value neurons, then a per-core weighted gather-sum.

Math (per token; paper-notes §1.3 steps 8-9; eq. 13-15). Each table row holds a pre-value and a
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
