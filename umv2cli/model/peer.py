"""PEER: Parameter Efficient Expert Retrieval (He 2024, arXiv 2407.04153; docs/fidelity.md §8.2).

A pool of N = knum² singleton experts, each one hidden neuron with an input and an output vector,
addressed through product keys. PEER replaces a block's FFN (the paper: the middle block) and
reads that block's normed FFN input u. Per token, following Algorithm 1 of the paper:

    1. queries (eq. 7): `heads` independent query networks q_i(u) = W_q,i u ∈ R^dk, each
       RMS-normalized with a learnable weight;
    2. product keys (eq. 1): sub-keys K ∈ R^{2, knum, dk/2} shared by all heads score the two
       query halves; top-k on each half, then top-k of the k² sums, which is exact because the
       score of the full key [K_1,i ; K_2,j] is additive; expert index i·knum + j;
    3. router weights (eq. 2): g = softmax over each head's k selected scores;
    4. singleton experts (eq. 6): e_x(u) = act(<w_down[x], u>) · w_up[x], act = GELU or ReLU;
    5. output (eq. 7): y = Σ_heads Σ_{x selected by the head} g_x · e_x(u).

The paper's experiments apply BatchNorm to the queries. We use a per-head RMSNorm instead: BatchNorm in
training mode normalizes with statistics over the whole batch, future tokens of the same sequence
included, so a token's output would depend on tokens it must not see.
"""

import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import PEERConfig
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B batch  T sequence  H hidden (d_model)  Q query heads (the paper's h)  D query dim dk
# S product-key side (2)  P half-query / sub-key dim dk/2  N sub-keys per side knum
# K experts per head, also the top-k of each side (topm; the paper's k)  C grid candidates K²
# X experts knum² (the paper's N)

_NORM_EPS = 1e-5  # ModelConfig.norm_eps default
_ACTS = {"gelu": F.gelu, "relu": F.relu}  # σ of eq. 6; the paper uses either


class PEER(nn.Module):
    """Multi-head product-key retrieval over knum² single-neuron experts (PEER eq. 1-7).
    Parameters are allocated uninitialized; the owner calls `reset_parameters`."""

    def __init__(self, cfg: PEERConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        q, d, n, h = cfg.heads, cfg.dk, cfg.knum, d_model
        self.w_q_QDH = nn.Parameter(torch.empty(q, d, h))  # `heads` query networks
        self.g_q_QD = nn.Parameter(torch.empty(q, d))  # query RMSNorm weight, per head
        self.keys_SNP = nn.Parameter(torch.empty(2, n, d // 2))  # shared by all heads
        self.w_down_XH = nn.Parameter(torch.empty(n * n, h))  # expert input vectors (u_i of eq. 6)
        self.w_up_XH = nn.Parameter(torch.empty(n * n, h))  # expert output vectors (v_i of eq. 6)

    def reset_parameters(self, ctx: InitContext) -> None:
        """Neither the PEER paper nor UltraMemV2 App. A gives this layer its own init, so `paper`
        and `official` coincide here: small init for the query projection (the only linear layer),
        lucidrains' PEER-pytorch keys (docs/fidelity.md §8.6), and the expert tables treated as the FFN
        that PEER replaces, one row each of its input and output projections (PEER-pytorch leaves
        them at nn.Embedding's N(0, 1), so <w_down, u> has variance H and the output is O(√H))."""
        normal_(self.w_q_QDH, ctx.small_std)  # App. A; scale-free after the RMSNorm but for gradients
        nn.init.ones_(self.g_q_QD)
        normal_(self.keys_SNP, 0.02)  # PEER-pytorch: keys N(0, 0.02²)
        normal_(self.w_down_XH, ctx.d_model**-0.5)  # <w_down, u> has unit variance for unit-RMS u
        normal_(self.w_up_XH, ctx.out_proj_std)  # residual-branch output projection (full_megatron)

    def route(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2: each head's top-K expert scores and expert indices, both [B, T, Q, K], best first."""
        B, T, _ = u_BTH.shape
        Q, D, N, K = self.cfg.heads, self.cfg.dk, self.cfg.knum, self.cfg.topm

        # step 1: per-head queries, RMS-normalized (eq. 7; RMSNorm in place of the paper's BatchNorm)
        q_BTQD = torch.einsum("bth,qdh->btqd", u_BTH, self.w_q_QDH)
        q_BTQD = F.rms_norm(q_BTQD, (D,), eps=_NORM_EPS) * self.g_q_QD
        q_BTQSP = q_BTQD.view(B, T, Q, 2, D // 2)

        # step 2: product keys (eq. 1); top-K per side, then top-K of the K² additive sums
        s_BTQSN = torch.einsum("btqsp,snp->btqsn", q_BTQSP, self.keys_SNP)
        side_BTQSK, idx_BTQSK = s_BTQSN.topk(K, dim=-1)
        grid_BTQC = (side_BTQSK[..., 0, :, None] + side_BTQSK[..., 1, None, :]).flatten(-2)
        grid_idx_BTQC = (idx_BTQSK[..., 0, :, None] * N + idx_BTQSK[..., 1, None, :]).flatten(-2)
        s_BTQK, pos_BTQK = grid_BTQC.topk(K, dim=-1)
        return s_BTQK, grid_idx_BTQC.gather(-1, pos_BTQK)

    def tables(self) -> list[nn.Parameter]:
        """The memory tables, for the value-lr parameter group (docs/fidelity.md §4)."""
        return [self.w_down_XH, self.w_up_XH]

    def forward(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_BTH: the block's normed FFN input [B, T, H].
        Returns (y_BTH, aux) with aux a 0-dim zero tensor (PEER has no auxiliary loss)."""
        B, T, H = u_BTH.shape
        Q, K = self.cfg.heads, self.cfg.topm
        s_BTQK, idx_BTQK = self.route(u_BTH)  # steps 1-2

        # step 3: router weights, softmax over each head's K scores (eq. 2)
        g_BTQK = s_BTQK.softmax(dim=-1)

        # step 4: singleton experts (eq. 6): the neuron act(<w_down[x], u>) of each selected expert
        down_BTQKH = F.embedding(idx_BTQK, self.w_down_XH)
        z_BTQK = _ACTS[self.cfg.act](torch.einsum("btqkh,bth->btqk", down_BTQKH, u_BTH))

        # step 5: y = Σ_heads Σ_k g · act(z) · w_up (eq. 7); embedding_bag sums the Q·K gathered
        # rows without materializing them as a [B, T, Q, K, H] tensor
        gz_BTQK = (g_BTQK * z_BTQK).to(self.w_up_XH.dtype)  # embedding_bag wants one dtype (autocast)
        y_BH = F.embedding_bag(idx_BTQK.reshape(B * T, Q * K), self.w_up_XH, mode="sum",
                               per_sample_weights=gz_BTQK.reshape(B * T, Q * K))
        return y_BH.view(B, T, H), u_BTH.new_zeros(())


def peer_costs(cfg: PEERConfig, d_model: int) -> LayerCosts:
    """Exact per-token costs of one PEER layer. MACs count multiply-accumulates of the matrix
    products; each of the heads·topm² candidate sums of step 2 counts as one. The RMSNorm,
    top-k, softmax and activation are not counted."""
    h, q, d, n, k = d_model, cfg.heads, cfg.dk, cfg.knum, cfg.topm
    return LayerCosts(
        dense_params=q * d * h + 2 * n * (d // 2) + q * d,  # query networks, sub-keys, norm weight
        sparse_params=2 * n * n * h,  # w_down, w_up
        activated_sparse_params=q * k * 2 * h,  # one w_down and one w_up row per selected expert
        macs={
            "query": h * q * d,
            "keys": q * 2 * n * (d // 2),
            "candidates": q * k * k,
            "experts": q * k * 2 * h,
        },
        shared_sparse=False,
    )
