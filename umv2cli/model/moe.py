"""Fine-grained mixture of SwiGLU experts: the OLMoE baseline (arXiv 2409.02060; docs/fidelity.md §8.5).

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

Step 3 runs one of two ways (`MoEConfig.experts`), which compute the same products: a loop with one
matmul per expert (the reference), or one grouped GEMM per projection over all experts at once
(`torch._grouped_mm` on CUDA, as torchtitan runs MoE on Hopper), which needs no host sync. Steps 2
and 4 are gathers whose gradients are gathers too, so both directions are deterministic.

Auxiliary losses (Switch Transformer, arXiv 2101.03961; ST-MoE, arXiv 2202.08906), per layer:
    L_balance = E · Σ_i f_i · P_i, with f_i the fraction of the N·K routing slots sent to expert i
                (no gradient) and P_i the mean of p_i over tokens;
    L_z = mean over tokens of logsumexp(logits)².
A model with L MoE layers adds, as OLMoE's training code does (MegaBlocks' batched loss, in the
version OLMoE pins): lb_coef · (1/L)·Σ_l L_balance,l + z_coef · (1/(L·K))·Σ_l L_z,l. Both are means
over the layers, not sums: the balance loss of a 16-layer model is as strong as a 1-layer one's.
The z term shares the balance term's normalization L·N·K in that code, hence its extra 1/K: OLMoE's
z_coef = 0.001 at K = 8 acts as 1.25·10⁻⁴ on the layer mean of L_z.
Each layer returns its share, already weighted; the transformer sums the layers' shares.
"""

import torch
import torch.nn.functional as F
from torch import nn

from umv2cli.config import MoEConfig
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B batch  T sequence  N tokens B·T  H hidden (d_model)  E experts  K top-k (experts per token)
# S routing slots N·K  R the rows of one expert  F expert inner width (the shared expert is a
# one-expert `Experts` whose F is shared_expert_hidden)  I, O a grouped product's input and
# output widths  Q the rows of a permutation's source  J the rows it writes (Q·copies)


class Router(nn.Module):
    """Token-choice top-K router with the load-balance and z auxiliary losses."""

    def __init__(self, d_model: int, n_experts: int, topk: int, lb_coef: float, z_coef: float):
        super().__init__()
        self.topk, self.lb_coef, self.z_coef = topk, lb_coef, z_coef
        self.w_EH = nn.Parameter(torch.empty(n_experts, d_model))  # linear, no bias

    def forward(self, x_NH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (experts_NK, probs_NK, counts_E, aux): each token's K experts, their softmax
        probabilities over all E experts, the slots routed to each expert, and this layer's
        weighted aux loss lb_coef·L_balance + z_coef/K·L_z (before the 1/L of the layer mean)."""
        E = self.w_EH.shape[0]
        logits_NE = x_NH @ self.w_EH.T
        logits_NE = logits_NE.to(torch.promote_types(x_NH.dtype, torch.float32))  # softmax in ≥ fp32
        p_NE = logits_NE.softmax(dim=-1)
        probs_NK, experts_NK = p_NE.topk(self.topk, dim=-1)
        counts_E = torch.bincount(experts_NK.flatten(), minlength=E)
        f_E, P_E = self.batch_means(counts_E, p_NE)
        balance = E * torch.dot(f_E, P_E)  # E · Σ_i f_i · P_i
        z = logits_NE.logsumexp(dim=-1).square().mean()  # mean over tokens of logsumexp²
        return experts_NK, probs_NK, counts_E, self.lb_coef * balance + self.z_coef / self.topk * z

    def batch_means(self, counts_E: torch.Tensor, p_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_E, the fraction of the batch's N·K routing slots sent to each expert (no gradient), and
        P_E, each expert's probability averaged over the batch's tokens."""
        return counts_E.to(p_NE.dtype) / (p_NE.shape[0] * self.topk), p_NE.mean(dim=0)


def swiglu(x_RH: torch.Tensor, w1_HF: torch.Tensor, w3_HF: torch.Tensor, w2_FH: torch.Tensor) -> torch.Tensor:
    """One expert on its rows: w2(silu(w1 x) ⊙ w3 x)."""
    return (F.silu(x_RH @ w1_HF) * (x_RH @ w3_HF)) @ w2_FH


def grouped_mm(x_SI: torch.Tensor, w_EIO: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x_SI (rows ends_E[e-1] to ends_E[e], cumulative int32 ends) times w_EIO[e];
    empty blocks allowed. On CUDA one `torch._grouped_mm`, in the autocast dtype when autocast is
    on (its bf16 kernel; other dtypes take torch's own fallback), which needs 16-byte-aligned rows
    (I and O multiples of 8) but no padding of the blocks. Elsewhere each block's own matmul, the
    loop's products exactly: torch's CPU kernel rejects float64 and some gradient layouts."""
    if x_SI.is_cuda:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x_SI.dtype
        return torch._grouped_mm(x_SI.to(dtype), w_EIO.to(dtype), offs=ends_E)
    blocks = x_SI.tensor_split(ends_E[:-1].tolist())  # .tolist(): CPU only, no device sync
    return torch.cat([x_RI @ w_IO for x_RI, w_IO in zip(blocks, w_EIO)])


class Experts(nn.Module):
    """E SwiGLU experts w2(silu(w1 x) ⊙ w3 x), stored as batched weight tensors without biases."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EHF = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate projection
        self.w3_EHF = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up projection
        self.w2_EFH = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down projection

    def loop(self, x_SH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """The reference. x_SH: rows grouped by expert, the first counts_E[0] for expert 0 and so
        on. One matmul per expert and projection, never a loop over tokens. Returns y_SH."""
        weights = zip(self.w1_EHF, self.w3_EHF, self.w2_EFH)
        return torch.cat([swiglu(x_RH, *w) for x_RH, w in zip(x_SH.split(counts_E), weights)])

    def grouped(self, x_SH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The same products as `loop`, each projection one grouped GEMM over all experts; the
        counts stay on the device (no host sync)."""
        ends_E = counts_E.cumsum(0, dtype=torch.int32)
        h_SF = F.silu(grouped_mm(x_SH, self.w1_EHF, ends_E)) * grouped_mm(x_SH, self.w3_EHF, ends_E)
        return grouped_mm(h_SF, self.w2_EFH, ends_E)


class PermuteRows(torch.autograd.Function):
    """y[j] = x[perm[j] // G]: the rows of x, each repeated G times (row r as copies r·G … r·G + G − 1),
    in the order perm of those copies. The gradient gathers by inv = perm⁻¹ and sums each row's G
    copies in a fixed order: gathers and a sum, never a scatter-add with atomics, so forward and
    backward are deterministic on every device."""

    @staticmethod
    def forward(ctx, x_QH: torch.Tensor, perm_J: torch.Tensor, inv_J: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inv_J)
        ctx.copies = copies
        return x_QH.index_select(0, perm_J // copies if copies > 1 else perm_J)

    @staticmethod
    def backward(ctx, dy_JH: torch.Tensor):
        (inv_J,) = ctx.saved_tensors
        dy_JH = dy_JH.index_select(0, inv_J)
        dx_QH = dy_JH.view(-1, ctx.copies, dy_JH.shape[-1]).sum(1) if ctx.copies > 1 else dy_JH
        return dx_QH, None, None, None


class MoE(nn.Module):
    """Dropless top-K mixture of SwiGLU experts with an optional shared expert (OLMoE)."""

    def __init__(self, cfg: MoEConfig, d_model: int, n_layers: int):
        """n_layers: the MoE layers of the model, whose aux losses are averaged (1 if alone)."""
        super().__init__()
        self.cfg, self.n_layers = cfg, n_layers
        self.router = Router(d_model, cfg.n_experts, cfg.topk, cfg.lb_coef, cfg.z_coef)
        self.experts = Experts(cfg.n_experts, d_model, cfg.expert_hidden)
        g = cfg.shared_expert_hidden
        self.shared_expert = Experts(1, d_model, g) if g else None  # one expert that every token reaches
        # grouped GEMMs on CUDA need 16-byte-aligned rows: "auto" keeps the loop otherwise
        self.grouped_on_cuda = d_model % 8 == 0 and cfg.expert_hidden % 8 == 0

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

    def use_grouped(self, x: torch.Tensor) -> bool:
        """`cfg.experts`: "grouped", "loop", or "auto" = grouped on CUDA when the shapes allow."""
        if self.cfg.experts == "auto":
            return x.is_cuda and self.grouped_on_cuda
        return self.cfg.experts == "grouped"

    def forward(self, u_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_BTH: the block's normed FFN input [B, T, H]. Returns (y_BTH, aux), aux this layer's
        0-dim share (lb_coef·L_balance + z_coef/K·L_z)/L of the model's aux loss."""
        B, T, H = u_BTH.shape
        N, K = B * T, self.cfg.topk
        x_NH = u_BTH.reshape(N, H)

        # step 1: route: softmax over all E experts, keep the top K probabilities as they are
        experts_NK, probs_NK, counts_E, aux = self.router(x_NH)

        # step 2: dispatch: sort the slots by expert (stable: token order within an expert);
        # slot s = n·K + k belongs to token n = s // K, sorted position j holds slot order_S[j]
        order_S = experts_NK.flatten().argsort(stable=True)
        inv_S = order_S.argsort()  # the sorted position of each slot
        x_SH = PermuteRows.apply(x_NH, order_S, inv_S, K)

        # step 3: experts, each on all the rows sent to it (dropless)
        if self.use_grouped(x_NH):
            y_SH = self.experts.grouped(x_SH, counts_E)
        else:
            y_SH = self.experts.loop(x_SH, counts_E.tolist())  # .tolist() syncs with the device

        # step 4: combine: undo the sort, then a weighted sum over each token's K slots
        y_NKH = PermuteRows.apply(y_SH, inv_S, order_S, 1).view(N, K, H)
        y_NH = torch.einsum("nk,nkh->nh", probs_NK.to(y_NKH.dtype), y_NKH)

        # step 5: shared expert, always on
        if self.shared_expert is not None:
            y_NH = y_NH + self.shared_expert.loop(x_NH, [N])
        return y_NH.view(B, T, H), aux / self.n_layers


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
