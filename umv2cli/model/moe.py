"""Fine-grained mixture of SwiGLU experts: the OLMoE baseline (arXiv 2409.02060; paper-notes §2.3).

The layer replaces a block's FFN and reads that block's normed FFN input u. A linear router scores
E small SwiGLU experts; each token goes to its top-K experts, and their outputs are summed weighted
by their softmax probabilities over all E experts, not renormalized over the K (OLMoE:
norm_topk_prob = False). An optional shared expert sees every token and is added. The forward:

    1. route: logits = W_r u, p = softmax(logits), top-K of p;
    2. dispatch: sort the N·K (token, slot) pairs by expert, so each expert's rows are contiguous;
    3. experts: expert e computes w2(silu(w1 x) ⊙ w3 x) on its slice of the sorted rows;
    4. combine: undo the sort, then y = Σ_k p_k · expert_k(u);
    5. shared expert: y += w2(silu(w1 u) ⊙ w3 u), always on.

Dropless (MegaBlocks dMoE, which OLMoE trains with): there is no capacity factor. Every token
reaches all K of its experts however unbalanced the routing is; an expert processes as many rows
as were sent to it, so no token is dropped or padded.

Auxiliary loss, returned already weighted (OLMoE: lb_coef = 0.01, z_coef = 0.001):
    L_balance = E · Σ_i f_i · P_i, with f_i the fraction of the N·K routing slots sent to expert i
                (no gradient) and P_i the mean of p_i over tokens (Switch Transformer, arXiv 2101.03961);
    L_z = mean over tokens of logsumexp(logits)² (ST-MoE, arXiv 2202.08906).
"""

import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import MoEConfig
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B batch  T sequence  N tokens B·T  H hidden (d_model)  E experts  K top-k (experts per token)
# S routing slots N·K  R the rows of one expert  F expert inner width (the shared expert is a
# one-expert `Experts` whose F is shared_expert_hidden)


class Router(nn.Module):
    """Token-choice top-K router with the load-balance and z auxiliary losses."""

    def __init__(self, d_model: int, n_experts: int, topk: int, lb_coef: float, z_coef: float):
        super().__init__()
        self.topk, self.lb_coef, self.z_coef = topk, lb_coef, z_coef
        self.w_EH = nn.Parameter(torch.empty(n_experts, d_model))  # linear, no bias

    def forward(self, x_NH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (experts_NK, probs_NK, counts_E, aux): each token's K experts, their softmax
        probabilities over all E experts, the slots routed to each expert, the weighted aux loss."""
        E = self.w_EH.shape[0]
        logits_NE = x_NH @ self.w_EH.T
        logits_NE = logits_NE.to(torch.promote_types(x_NH.dtype, torch.float32))  # softmax in ≥ fp32
        p_NE = logits_NE.softmax(dim=-1)
        probs_NK, experts_NK = p_NE.topk(self.topk, dim=-1)
        counts_E = torch.bincount(experts_NK.flatten(), minlength=E)
        f_E, P_E = self.batch_means(counts_E, p_NE)
        balance = E * torch.dot(f_E, P_E)  # E · Σ_i f_i · P_i
        z = logits_NE.logsumexp(dim=-1).square().mean()  # mean over tokens of logsumexp²
        return experts_NK, probs_NK, counts_E, self.lb_coef * balance + self.z_coef * z

    def batch_means(self, counts_E: torch.Tensor, p_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_E, the fraction of the batch's N·K routing slots sent to each expert (no gradient), and
        P_E, each expert's probability averaged over the batch's tokens."""
        return counts_E.to(p_NE.dtype) / (p_NE.shape[0] * self.topk), p_NE.mean(dim=0)


class Experts(nn.Module):
    """E SwiGLU experts w2(silu(w1 x) ⊙ w3 x), stored as batched weight tensors without biases."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EHF = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate projection
        self.w3_EHF = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up projection
        self.w2_EFH = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down projection

    def forward(self, x_SH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """x_SH: rows grouped by expert, the first counts_E[0] for expert 0 and so on. Returns y_SH.

        One loop over experts, never over tokens. torch._grouped_mm would run it as one grouped
        GEMM, but on CPU (torch 2.13) it rejects float64 and fails in backward, so the gradient
        tests could not reach it."""
        y_RH = []
        weights = zip(self.w1_EHF, self.w3_EHF, self.w2_EFH)
        for x_RH, (w1_HF, w3_HF, w2_FH) in zip(x_SH.split(counts_E), weights):
            y_RH.append((F.silu(x_RH @ w1_HF) * (x_RH @ w3_HF)) @ w2_FH)
        return torch.cat(y_RH)


class MoE(nn.Module):
    """Dropless top-K mixture of SwiGLU experts with an optional shared expert (OLMoE)."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg.n_experts, cfg.topk, cfg.lb_coef, cfg.z_coef)
        self.experts = Experts(cfg.n_experts, d_model, cfg.expert_hidden)
        g = cfg.shared_expert_hidden
        self.shared_expert = Experts(1, d_model, g) if g else None  # one expert that every token reaches

    def reset_parameters(self, ctx: InitContext) -> None:
        """`paper` and `official` coincide here: OLMo's full_megatron, experts treated as FFNs
        (App. A). Small init for the router and the gate/up projections, small init × 1/sqrt(2L)
        for the down projections, which write to the residual stream."""
        normal_(self.router.w_EH, ctx.small_std)
        for experts in (self.experts, self.shared_expert):
            if experts is not None:
                normal_(experts.w1_EHF, ctx.small_std)
                normal_(experts.w3_EHF, ctx.small_std)
                normal_(experts.w2_EFH, ctx.out_proj_std)

    def forward(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_BTH: the block's normed FFN input [B, T, H]. Returns (y_BTH, aux), aux the 0-dim
        weighted auxiliary loss lb_coef·L_balance + z_coef·L_z."""
        B, T, H = u_BTH.shape
        N, K = B * T, self.cfg.topk
        x_NH = u_BTH.reshape(N, H)

        # step 1: route: softmax over all E experts, keep the top K probabilities as they are
        experts_NK, probs_NK, counts_E, aux = self.router(x_NH)

        # step 2: dispatch: sort the slots by expert (stable: token order within an expert);
        # slot s = n·K + k belongs to token n = s // K
        order_S = experts_NK.flatten().argsort(stable=True)
        x_SH = x_NH.index_select(0, order_S // K)  # deterministic backward, unlike x_NH[…] on CPU

        # step 3: experts, each on all the rows sent to it (dropless); .tolist() syncs with the device
        y_SH = self.experts(x_SH, counts_E.tolist())

        # step 4: combine: undo the sort, then a weighted sum over each token's K slots, without
        # atomics, so it is deterministic on GPU too
        y_NKH = y_SH.index_select(0, order_S.argsort()).view(N, K, H)
        y_NH = torch.einsum("nk,nkh->nh", probs_NK.to(y_NKH.dtype), y_NKH)

        # step 5: shared expert, always on
        if self.shared_expert is not None:
            y_NH = y_NH + self.shared_expert(x_NH, [N])
        return y_NH.view(B, T, H), aux


def moe_costs(cfg: MoEConfig, d_model: int) -> LayerCosts:
    """Exact per-token costs of one MoE layer. MACs count the matrix products and the weighted
    combine of step 4; the softmax, top-k, sort, SiLU and gating product are not counted. Every key
    of `macs` is always present (0 without a shared expert)."""
    h, e, k, f, g = d_model, cfg.n_experts, cfg.topk, cfg.expert_hidden, cfg.shared_expert_hidden
    return LayerCosts(
        dense_params=h * e + 3 * h * g,  # router and shared expert: every token uses them
        sparse_params=e * 3 * h * f,  # w1, w3, w2 of every routed expert
        activated_sparse_params=k * 3 * h * f,  # the K experts one token reaches
        macs={
            "router": h * e,
            "experts": k * 3 * h * f,
            "combine": k * h,
            "shared_expert": 3 * h * g,
        },
        shared_sparse=False,
    )
