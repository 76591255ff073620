"""UltraMem v1 memory layer (Huang et al., ByteDance, "Ultra-Sparse Memory Network", arXiv 2411.12364,
ICLR 2025; docs/fidelity.md §8.1; the official `olmo/ultramem_layer.py`).

A few large memory layers in skip-layer pairs: the layer reads the normed FFN input of block a and
the transformer adds its output after block b (`placement = "2:5/6:9/…"`). Per token, per head:

    1  queries: W_q u → one row and one column query of D_k, RMS-normed (the code: LayerNorm)
    2  keys [heads, 2, r, n, D_k], RMS-normed; n = √E·knum (IVE grows the key grid)
    3  per-rank row/column scores S_row, S_col ∈ R^{r×n}
    4  rank-1 prefilter: top-m rows by u^T S_row and columns by v^T S_col ((u, v) of Σ_c C_c)
    5  grid re-scoring of the m × m candidates with each Tucker core C_c (TDQKR)
    6  top-m of Σ_c S_row^T C_c S_col on raw scores (no softmax); keep each core's score
    7  virtual cell i·n + j of E·knum² → fixed shuffle → virtual block p, physical row (IVE)
    8  value split into C chunks, chunk c weighted by core c's score (MCS); summed per block p
    9  output y = Σ_p W_p^T o_p with one projector W_p: D_v → H per virtual block; heads summed

Steps 4-6 are `select_topm_reference` (kernels/tdqkr.py) with k_rc = m, as in v1. Step 8 is not
`memory_lookup_reference`: that kernel sums all m selections into one D_v vector, while v1 needs
one sum per virtual block.

The aux loss is the Tucker penalty α/(r−1)·Σ_{i≥2} max(0, λ_i(Σ_c C_c) − τ)² on the singular
values of the summed core (v1 Table 5: α = 0.001, τ = 0.15). The sum is the matrix whose leading
singular pair is the prefilter's (u, v) and whose score Σ_c S_row^T C_c S_col ranks the cells in
step 6, so the penalty keeps exactly that matrix near rank 1, where the rank-1 prefilter of step 4
finds the true top-m. (The cores one by one may be far from rank 1 while their sum is not.)

Where we differ from the official v1 code: each head has its own row/column query (the code
shares one query between the 2 heads), the cores and (u, v) are shared by all heads (the code
has one set per head), RMSNorm replaces LayerNorm, and the penalty is applied (the code computes
relu(σ₂(Σ_c C_c) − τ)² on the same summed core, averaged over heads, and leaves it commented out).

What V2 later changed (docs/fidelity.md §8.1): one projector W instead of E (eq. 12), a layer in every
block instead of skip-layer pairs, no aux loss, per-rank queries, 1 head, PEER pre-values.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import UltraMemV1Config
from umv2cli.kernels.tdqkr import rank1_vectors, select_topm_reference
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B batch  T sequence  K tokens B·T  H hidden h  A heads  S side (row, col)  R Tucker rank r
# C cores  D key dim D_k  N keys per side √E·knum  M selected values m  G (token, head) pairs K·A
# J a token's selections A·m  E virtual blocks  V value dim D_v  W value chunk D_v/C
# P physical table rows knum²  X virtual cells E·knum²

NORM_EPS = 1e-5
"""ε of the query and key RMSNorms (the backbone's default `norm_eps`)."""


class UltraMemV1(nn.Module):
    """One UltraMem v1 layer; reads block a's normed FFN input, returns what is added after block b."""

    def __init__(self, cfg: UltraMemV1Config, d_model: int):
        super().__init__()
        self.cfg = cfg
        A, R, D, E = cfg.heads, cfg.rank, cfg.dk, cfg.value_expand
        self.n_keys = math.isqrt(E) * cfg.knum  # IVE: key_num = √E·knum (docs/fidelity.md §8.1)
        self.w_q = nn.Linear(d_model, A * 2 * D, bias=False)
        self.g_q_D = nn.Parameter(torch.empty(D))
        self.keys_ASRND = nn.Parameter(torch.empty(A, 2, R, self.n_keys, D))
        self.g_k_D = nn.Parameter(torch.empty(D))
        self.cores_CRR = nn.Parameter(torch.empty(cfg.cores, R, R))
        self.values_PV = nn.Parameter(torch.empty(cfg.knum**2, cfg.dv))
        self.w_out = nn.Linear(E * cfg.dv, d_model, bias=False)  # the E projectors W_p, concatenated
        # drawn by reset_parameters, persistent so a resumed run reads the same rows
        self.register_buffer("shuffle_X", torch.zeros(E * cfg.knum**2, dtype=torch.int32),
                             persistent=True)
        # written by refresh_rank1() once per optimizer step; detached, persistent for exact resume
        self.register_buffer("rank1_u_R", torch.zeros(R), persistent=True)
        self.register_buffer("rank1_v_R", torch.zeros(R), persistent=True)

    def tables(self) -> list[nn.Parameter]:
        """The memory tables, for the value-lr parameter group (docs/fidelity.md §4)."""
        return [self.values_PV]

    def forward(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_BTH: normed FFN input of the read block [B, T, H]. Returns (y_BTH, aux): aux is the
        0-dim, already α-weighted Tucker singular-value penalty
        α/(r−1)·Σ_{i≥2} max(0, λ_i(Σ_c C_c) − τ)² (v1; docs/fidelity.md §2.5, §8.1)."""
        B, T, H = u_BTH.shape
        K, J, E, P = B * T, self.cfg.heads * self.cfg.topm, self.cfg.value_expand, self.cfg.knum**2
        rows_GM, cols_GM, scores_GMC = self.select(u_BTH.reshape(K, H))  # steps 1-6
        # step 7: virtual cell → shuffled cell → (virtual block, physical row)
        cell_GM = self.shuffle_X[rows_GM * self.n_keys + cols_GM].long()
        block_KJ, row_KJ = (cell_GM // P).view(K, J), (cell_GM % P).view(K, J)
        # step 8: chunk c of each value weighted by core c's raw score, summed per block (and head)
        v_KJCW = F.embedding(row_KJ, self.values_PV).view(K, J, self.cfg.cores, -1)  # deterministic backward
        onehot_KJE = F.one_hot(block_KJ, E).to(v_KJCW.dtype)
        o_KECW = torch.einsum("kje,kjc,kjcw->kecw", onehot_KJE, scores_GMC.reshape(K, J, -1), v_KJCW)
        # step 9: y = Σ_p W_p^T o_p
        y_KH = self.w_out(o_KECW.reshape(K, -1))
        return y_KH.view(B, T, H), self.aux_loss()

    def select(self, u_KH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-6 for K tokens: rows_GM, cols_GM (keys per side) and scores_GMC of the m best
        grid cells of each (token, head) pair, best first; G = K·A, head-minor."""
        K, A, R, D = u_KH.shape[0], self.cfg.heads, self.cfg.rank, self.cfg.dk
        # step 1: per head a row and a column query (v1: one per side, shared by the r ranks)
        q_KASD = F.rms_norm(self.w_q(u_KH).view(K, A, 2, D), (D,), self.g_q_D, NORM_EPS)
        # step 2: keys, normed with their own weight
        k_ASRND = F.rms_norm(self.keys_ASRND, (D,), self.g_k_D, NORM_EPS)
        # step 3: per-rank row and column scores
        s_KASRN = torch.einsum("kasd,asrnd->kasrn", q_KASD, k_ASRND)
        s_row_GRN, s_col_GRN = s_KASRN.reshape(K * A, 2, R, self.n_keys).unbind(1)
        # steps 4-6: TDQKR with the cores shared by the heads
        return select_topm_reference(s_row_GRN, s_col_GRN, self.cores_CRR, self.rank1_u_R,
                                     self.rank1_v_R, k_rc=self.cfg.topm, topm=self.cfg.topm)

    def aux_loss(self) -> torch.Tensor:
        """α/(r−1)·Σ_{i≥2} max(0, λ_i(Σ_c C_c) − τ)² on the summed core, the one `rank1_vectors`
        takes (u, v) from; 0 for r = 1, where there is no λ_2."""
        # svdvals needs float32 or wider; a float64 layer keeps float64 (gradcheck)
        core_RR = self.cores_CRR.sum(0).to(torch.promote_types(self.cores_CRR.dtype, torch.float32))
        lam_R = torch.linalg.svdvals(core_RR)  # descending
        excess = F.relu(lam_R[1:] - self.cfg.aux_tau).pow(2).sum()
        return self.cfg.aux_coef / max(self.cfg.rank - 1, 1) * excess

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute the persistent buffers rank1_u_R, rank1_v_R from the cores with
        `rank1_vectors` (called once per optimizer step by the trainer)."""
        u_R, v_R = rank1_vectors(self.cores_CRR, self.rank1_u_R, self.rank1_v_R)
        self.rank1_u_R.copy_(u_R)
        self.rank1_v_R.copy_(v_R)

    @torch.no_grad()
    def reset_parameters(self, ctx: InitContext) -> None:
        """`official` (the v1 code, docs/fidelity.md §8.1): values N(0, 0.02²), W_q N(0, 1/D_k), out
        projection N(0, 1/(E·D_v)). `paper` (v1's improved init, §8.1): values N(0, E/(2·m·heads·L)),
        so the output variance is about 1/(2L) as for an MLP; W_q and out projection small init.
        Both: norm weights D_k^-0.33, keys N(0, 1/D_k) (they are normed anyway), cores U(0, 1),
        a fresh shuffle, then (u, v) from zero previous vectors."""
        cfg, D, E = self.cfg, self.cfg.dk, self.cfg.value_expand
        self.g_q_D.fill_(D**-0.33)
        self.g_k_D.fill_(D**-0.33)
        normal_(self.keys_ASRND, D**-0.5)
        nn.init.uniform_(self.cores_CRR, 0.0, 1.0)
        if ctx.scheme == "paper":
            normal_(self.values_PV, math.sqrt(E / (2 * cfg.topm * cfg.heads * ctx.n_layers)))
            normal_(self.w_q.weight, ctx.small_std)
            normal_(self.w_out.weight, ctx.small_std)
        else:
            normal_(self.values_PV, 0.02)
            normal_(self.w_q.weight, D**-0.5)
            normal_(self.w_out.weight, (E * cfg.dv) ** -0.5)
        X, device = self.shuffle_X.numel(), self.shuffle_X.device
        self.shuffle_X.copy_(torch.randperm(X, dtype=torch.int32, device=device))
        self.rank1_u_R.zero_()
        self.rank1_v_R.zero_()
        self.refresh_rank1()


def ultramem_v1_costs(cfg: UltraMemV1Config, d_model: int) -> LayerCosts:
    """Per-token costs of ONE UltraMem v1 layer.

    Parameters: dense = W_q + keys + the two norm weights + cores + the E projectors; sparse = the
    knum² × D_v table; activated = the heads·m value rows a token reads.
    MACs count the multiply-accumulates of the matmuls and einsums a token runs through: norms,
    top-k, gathers, the one-hot block sum and the SVDs (per step, not per token) are not counted.
    The grid forms C_c S_col and then S_row^T (·) for each core: C·(r²·m + r·m²) per head. The
    lookup is one MAC per value element read. The out projection always takes all E·D_v inputs.
    """
    H, A, R, C, D, V = d_model, cfg.heads, cfg.rank, cfg.cores, cfg.dk, cfg.dv
    E, M = cfg.value_expand, cfg.topm
    N = math.isqrt(E) * cfg.knum
    macs = {
        "query": H * A * 2 * D,
        "keys": A * 2 * R * N * D,
        "prefilter": A * 2 * R * N,
        "grid": A * C * (R * R * M + R * M * M),
        "lookup": A * M * V,
        "out": E * V * H,
    }
    dense = H * A * 2 * D + A * 2 * R * N * D + 2 * D + C * R * R + E * V * H
    return LayerCosts(dense_params=dense, sparse_params=cfg.knum**2 * V, activated_sparse_params=A * M * V,
                      macs=macs, shared_sparse=False)
