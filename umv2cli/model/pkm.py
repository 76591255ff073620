"""Product-key memory (Lample et al. 2019, arXiv 1907.05242) and Memory+ (Berges et al. 2024,
"Memory Layers at Scale", arXiv 2412.09764, eq. 2); docs/fidelity.md §8.3-8.4.

A large value table of knum² rows is addressed by the Cartesian product of two sub-key tables of
knum rows each, so finding the best k of knum² keys costs two searches over knum sub-keys plus k²
candidate sums. Per token, for each head (the heads' outputs are summed, as in XLM's memory):

  1. query: q = W_q u, split into half-queries q1, q2 of dk/2; with `qk_norm`, RMSNorm on each half.
  2. sub-keys K1, K2 (knum × dk/2 per head); with `qk_norm` they are RMS-normalized too. The
     UltraMem repo's Memory+ computes the key norm and then overwrites it with the raw keys, so
     only its query is normalized (docs/fidelity.md §8.4); we normalize both.
  3. half scores s1 = K1 q1, s2 = K2 q2; top-k of each.
  4. the k×k candidate sums s1[i] + s2[j]; top-k of them, at table row i·knum + j. This is exactly
     the top-k of q·[K1_i ; K2_j] over all knum² full keys.
  5. softmax over the k scores; y = Σ_heads Σ_k softmax_k · V[row_k] (an embedding bag).
  6. output: with `swilu` (Memory+, eq. 2) out = W2 (y ⊙ silu(W1 u)); without it out = W2 y.

With `shared_pool` every PKM layer of the model reads one value table: the transformer makes it
with `new_value_pool` and hands the same `nn.Parameter` to each layer, like tied embeddings.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import PKMConfig
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B batch  T sequence  H hidden d_model  A heads  S half (1st, 2nd)  N sub-keys per half knum
# K top-k topm  D half-query dim dk/2  V value dim dv

NORM_EPS = 1e-5
"""ε of the query and key RMSNorms (the backbone's default `norm_eps`)."""


def new_value_pool(cfg: PKMConfig) -> nn.Parameter:
    """An uninitialized [knum², dv] value table; the transformer shares one among all PKM layers."""
    return nn.Parameter(torch.empty(cfg.knum**2, cfg.dv))


def product_key_topk(q_BTASD: torch.Tensor, keys_ASND: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4: the k best scores q·[K1_i ; K2_j] and their rows i·N + j, both [B, T, A, K]."""
    n = keys_ASND.shape[2]
    s_BTASN = torch.einsum("btasd,asnd->btasn", q_BTASD, keys_ASND)
    s_BTASK, i_BTASK = s_BTASN.topk(k, dim=-1)
    # (i, j) in the overall top-k needs i in the top-k of s1 and j in the top-k of s2
    cand_BTAKK = s_BTASK[..., 0, :, None] + s_BTASK[..., 1, None, :]
    score_BTAK, pick_BTAK = cand_BTAKK.flatten(-2).topk(k, dim=-1)
    # candidate p = a·k + b pairs the a-th of the first half with the b-th of the second
    i_BTAK = i_BTASK[..., 0, :].gather(-1, pick_BTAK // k)
    j_BTAK = i_BTASK[..., 1, :].gather(-1, pick_BTAK % k)
    return score_BTAK, i_BTAK * n + j_BTAK


class ProductKeyMemory(nn.Module):
    """One PKM / Memory+ layer; reads the block's normed FFN input, returns its contribution."""

    def __init__(self, cfg: PKMConfig, d_model: int, values: nn.Parameter | None = None):
        """values: the shared value pool [knum², dv] when cfg.shared_pool (the transformer creates
        one nn.Parameter and passes the same object to every PKM layer); None → own table."""
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        A, N, D, V = cfg.heads, cfg.knum, cfg.dk // 2, cfg.dv
        if values is not None and values.shape != (N * N, V):
            raise ValueError(f"values: expected shape [{N * N}, {V}] (knum², dv), got {list(values.shape)}")
        self.w_q = nn.Linear(d_model, A * cfg.dk, bias=False)
        self.keys_ASND = nn.Parameter(torch.empty(A, 2, N, D))
        if cfg.qk_norm:
            self.g_q_D = nn.Parameter(torch.empty(D))
            self.g_k_D = nn.Parameter(torch.empty(D))
        self.values = new_value_pool(cfg) if values is None else values
        if cfg.swilu:
            self.w1 = nn.Linear(d_model, V, bias=False)
        self.w2 = nn.Linear(V, d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, ctx: InitContext) -> None:
        """`official`: Meta's reference code (docs/fidelity.md §8.4); `paper`: small init for every linear.
        Tables and keys are the same in both. A shared pool is re-drawn by each layer (same law)."""
        normal_(self.values, self.cfg.dv**-0.5)
        bound = 1 / math.sqrt(self.cfg.dk)  # Meta: 1/sqrt(k_dim), the full query dim (XLM: 1/sqrt(dk/2))
        nn.init.uniform_(self.keys_ASND, -bound, bound)
        if self.cfg.qk_norm:
            nn.init.ones_(self.g_q_D)
            nn.init.ones_(self.g_k_D)
        if ctx.scheme == "paper":
            for linear in (self.w_q, self.w2) + ((self.w1,) if self.cfg.swilu else ()):
                normal_(linear.weight, ctx.small_std)
            return
        nn.init.xavier_uniform_(self.w_q.weight)
        normal_(self.w2.weight, self.d_model**-0.5)
        if self.cfg.swilu:
            normal_(self.w1.weight, self.d_model**-0.5)  # Meta: the layer's output_dim for both projections

    def tables(self) -> list[nn.Parameter]:
        """The memory tables, for the value-lr parameter group (docs/fidelity.md §4)."""
        return [self.values]

    def forward(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_BTH: the block's normed FFN input. Returns (y_BTH, aux), aux a 0-dim zero (no aux loss)."""
        B, T, _ = u_BTH.shape
        A, K, D = self.cfg.heads, self.cfg.topm, self.cfg.dk // 2

        # step 1: queries, split into halves
        q_BTASD = self.w_q(u_BTH).view(B, T, A, 2, D)
        keys_ASND = self.keys_ASND
        if self.cfg.qk_norm:
            # in the weights' dtype: fp32 under autocast, where the projection gives bf16
            q_BTASD = F.rms_norm(q_BTASD.to(self.g_q_D.dtype), (D,), self.g_q_D, NORM_EPS)
            # step 2: normalized sub-keys
            keys_ASND = F.rms_norm(keys_ASND, (D,), self.g_k_D, NORM_EPS)

        # steps 3-4: half scores, top-k per half, top-k of the k² candidate sums
        score_BTAK, rows_BTAK = product_key_topk(q_BTASD, keys_ASND, K)

        # step 5: softmax over the k scores (in fp32 at least), one bag of A·K rows per token
        w_BTAK = score_BTAK.softmax(-1, dtype=torch.promote_types(score_BTAK.dtype, torch.float32))
        w_BTAK = w_BTAK.to(self.values.dtype)
        y_BTV = self.bag(rows_BTAK.reshape(B * T, A * K), w_BTAK.reshape(B * T, A * K)).view(B, T, -1)

        # step 6: Memory+ gate (eq. 2) and the output projection
        if self.cfg.swilu:
            y_BTV = y_BTV * F.silu(self.w1(u_BTH))
        return self.w2(y_BTV), u_BTH.new_zeros(())

    def bag(self, rows_NL: torch.Tensor, w_NL: torch.Tensor) -> torch.Tensor:
        """Step 5's embedding bag: each of the N tokens' sum of its L = heads·k weighted rows, [N, dv]."""
        return F.embedding_bag(rows_NL, self.values, per_sample_weights=w_NL, mode="sum")


def pkm_costs(cfg: PKMConfig, d_model: int) -> LayerCosts:
    """Exact per-token costs of one layer, written beside the parameters they count.

    MACs are the matrix products (query, sub-key scores, the weighted value sum, gate, output)
    plus the k² candidate additions of each head, one each. RMSNorms, top-k, softmax and the
    elementwise gate product are not counted; the sub-key norm does not depend on the token.
    """
    H, A, N, K, D, V = d_model, cfg.heads, cfg.knum, cfg.topm, cfg.dk // 2, cfg.dv
    dense = (H * A * 2 * D            # w_q
             + A * 2 * N * D          # keys_ASND
             + 2 * D * cfg.qk_norm    # g_q_D, g_k_D
             + H * V * cfg.swilu      # w1
             + V * H)                 # w2
    macs = {"query": H * A * 2 * D, "keys": A * 2 * N * D, "candidates": A * K * K, "lookup": A * K * V}
    if cfg.swilu:
        macs["gate"] = H * V
    macs["out"] = V * H
    return LayerCosts(dense_params=dense, sparse_params=N * N * V, activated_sparse_params=A * K * V,
                      macs=macs, shared_sparse=cfg.shared_pool)
