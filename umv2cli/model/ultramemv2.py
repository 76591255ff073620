"""UltraMemV2 memory layer (Huang et al., ByteDance Seed, arXiv 2508.18756, §3).

Every transformer block holds one, beside its SwiGLU FFN: both read the same normed input u and
their outputs are added to the residual, x_{l+1} = h + FFN(u) + Mem(u) (docs/fidelity.md §2.1).
The forward follows docs/fidelity.md §2.2:

     1  queries: one per side (row, column) and per Tucker rank, RMS-normed (eq. 6/10)
     2  keys: RMS-normed row/column keys, one set per rank
     3  row/column scores per rank: S_row, S_col ∈ R^{r×n} (eq. 6/10)
     4  rank-1 prefilter: top-k_rc rows by u^T S_row and columns by v^T S_col
     5  grid re-scoring of the k_rc² candidates with each Tucker core C_c (eq. 7/11)
     6  top-m of Σ_c G_c on raw scores (no softmax); keep each core's score
     7  virtual address → fixed shuffle → physical row of the value pool (eq. 8)
     8  pre-value neuron z = <P[p], W_pre^T u>, no activation by default (eq. 13-15)
     9  value split into C chunks, chunk c weighted by core c's score (eq. 15, MCS)
    10  one output projection W_o (eq. 12/15)

Steps 4-6 are `select_topm_reference` (kernels/tdqkr.py) and steps 8-9 `memory_lookup_reference`
(kernels/lookup.py), so this file plus those two references is the whole math. `cfg.kernels`
swaps in the Triton kernels beside them, which equal the references (the selection kernel ranks
in fp32 and breaks ties toward the lower id, see kernels/tdqkr.py).

Value pool. All UltraMemV2 layers of a model read one parameter `pool` of L_m·n² rows, each row
``[pre-value (D_p) | value (D_v)]``. Layer l's home table is rows [l·n², (l+1)·n²); without ring
sharing the model hands each layer its home table as a view of its own (`pool_windows`). With ring
sharing over g tables (§4.2.8, Sg-Ring) its window is n_w² = isqrt(g·n²)² rows centred on its home
table, wrapping around the pool; the keys per side grow to E_k·n_w. Key expansion E_k (§3.3)
enlarges the virtual grid to (E_k·n_w)² cells that the shuffle maps onto the window; with one
projector the per-group sums of the code are simply summed, so a cell's group does not matter.

Paper vs official code (each difference has a switch):
- per-rank queries (paper §3.2); the code shares one row and one column query across ranks
  (docs/fidelity.md §9.3): `shared_rank_query = true`.
- pre-value neuron without activation (eq. 15); the code's `mem_use_glu_act`: `pre_value_act = "gelu"`.
- row/column candidates k_rc = min(m, 128) (paper §4.1); the code uses k_rc = m: set `k_rc`.
- ring windows centred on the layer (paper §4.2.8); the code's window runs forward only (docs/fidelity.md §9.12).
- init: App. A (`init = "paper"`, see `reset_parameters`) or the code's constants (`"official"`).
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from umv2cli.config import UltraMemV2Config
from umv2cli.kernels import resolve_impl
from umv2cli.kernels.lookup import memory_lookup
from umv2cli.kernels.tdqkr import rank1_vectors, select_topm, select_topm_reference
from umv2cli.model.costs import LayerCosts
from umv2cli.model.init import InitContext, normal_

# B tokens (batch·seq)  H hidden h  S side (row, col)  R Tucker rank r  C cores
# D key dim D_k  N keys per side  M selected values m
# P pre-value dim D_p  V value dim D_v  T pool rows  K Monte-Carlo samples
NORM_EPS = 1e-6


def new_value_pool(cfg: UltraMemV2Config, n_mem_layers: int) -> nn.Parameter:
    """The [L_m·n², D_p + D_v] pool every UltraMemV2 layer of a model shares; layers fill it."""
    return nn.Parameter(torch.empty(n_mem_layers * cfg.knum**2, cfg.dp + cfg.dv))


class UltraMemV2(nn.Module):
    def __init__(self, cfg: UltraMemV2Config, d_model: int, *, pool: nn.Parameter, home: int):
        super().__init__()
        self.cfg, self.home = cfg, home
        R, D, N = cfg.rank, cfg.dk, cfg.keys_per_side
        query_slots = 1 if cfg.shared_rank_query else R
        self.w_q = nn.Linear(d_model, 2 * query_slots * D, bias=False)
        self.g_q_D = nn.Parameter(torch.ones(D))
        self.keys_SRND = nn.Parameter(torch.empty(2, R, N, D))
        self.g_k_D = nn.Parameter(torch.ones(D))
        self.cores_CRR = nn.Parameter(torch.empty(cfg.cores, R, R))
        self.w_pre = nn.Linear(d_model, cfg.dp, bias=False) if cfg.dp else None
        self.w_o = nn.Linear(cfg.dv, d_model, bias=False)
        self.pool_TD = pool  # shared with the other layers, like tied embeddings
        # written at init, persistent so a resumed run reads the same rows
        self.register_buffer("shuffle", torch.empty(N * N, dtype=torch.int32))
        # written by refresh_rank1() once per optimizer step; detached, persistent for exact resume
        self.register_buffer("rank1_u_R", torch.zeros(R))
        self.register_buffer("rank1_v_R", torch.zeros(R))

    # ------------------------------------------------------------------------------------------
    # forward, steps 1-10

    def forward(self, u: torch.Tensor, window: "Window | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """u: the block's normed FFN input [batch, seq, H] → (Mem(u) [batch, seq, H], zero aux loss).
        `window`: this layer's rows of the pool as their own tensor (see `pool_windows`)."""
        u_BH = u.reshape(-1, u.shape[-1])
        p_BM, scores_BMC = self.select(u_BH)  # steps 1-7
        x_p_BP = self.w_pre(u_BH) if self.w_pre is not None else u_BH.new_zeros(u_BH.shape[0], 0)
        o_BV = self.lookup(x_p_BP, p_BM, scores_BMC, window=window)  # steps 8-9
        y_BH = self.w_o(o_BV)  # step 10 (eq. 12/15)
        return y_BH.view(u.shape), u.new_zeros(())

    def lookup(self, x_p_BP: torch.Tensor, p_BM: torch.Tensor, scores_BMC: torch.Tensor, *,
               window: "Window | None" = None) -> torch.Tensor:
        """Steps 8-9 by `cfg.kernels` → o [B, D_v] in the scores' dtype (bf16 under autocast, the
        one the reference's einsums give). `window` (rows of the pool, index of its first row,
        where their gradient goes) stands in for the whole pool, which the rows p_BM index.

        Triton: the rows are read in the scores' dtype, so under autocast the kernels read bf16
        rows of the fp32 pool (half the bytes) and return the pool's gradient in fp32 for the
        optimizer; x_p and the scores go in as they are. References: x_p and the scores join the
        pool's dtype (fp32); without autocast every cast is a no-op."""
        table_TD, first, grad_rows = window if window is not None else (self.pool_TD, 0, None)
        rows_BM = p_BM - first if first else p_BM
        act = self.cfg.pre_value_act
        if resolve_impl(self.cfg.kernels, table_TD, "UltraMemV2") == "triton":
            return memory_lookup(x_p_BP, table_TD, rows_BM, scores_BMC, act, impl="triton",
                                 read_dtype=scores_BMC.dtype, grad_rows=grad_rows)
        dtype = table_TD.dtype
        o_BV = memory_lookup(x_p_BP.to(dtype), table_TD, rows_BM, scores_BMC.to(dtype), act, impl="torch")
        return o_BV.to(scores_BMC.dtype)

    def select(self, u_BH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-7: the m pool rows each token reads [B, m] and their per-core scores [B, m, C]."""
        s_row_BRN, s_col_BRN = self.scores(u_BH).unbind(1)  # steps 1-3 (unbind: one gradient, stacked)
        rows_BM, cols_BM, scores_BMC = select_topm(  # steps 4-6
            s_row_BRN, s_col_BRN, self.cores_CRR, self.rank1_u_R, self.rank1_v_R,
            self.cfg.k_rc, self.cfg.topm, impl=self.cfg.kernels)
        return self.physical_rows(rows_BM * self.cfg.keys_per_side + cols_BM), scores_BMC  # step 7

    def scores(self, u_BH: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: per-side, per-rank scores S [B, 2, r, n] (eq. 6/10).

        The query norm's weight is applied on the key side, <g_q ⊙ q̂, g_k ⊙ k̂> = <q̂, g_q ⊙ g_k ⊙ k̂>:
        the same scores, with g_q's gradient summed over the 2·r·n keys instead of the B·2·r
        queries (a reduction over every token, slower than the rest of the norm's backward)."""
        q_BSRD = self.normed_queries(self.w_q(u_BH))  # step 1, q̂ (its weight g_q: below)
        k_SRND = F.rms_norm(self.keys_SRND, (self.cfg.dk,), self.g_q_D * self.g_k_D, NORM_EPS)  # step 2
        return torch.einsum("bsrd,srnd->bsrn", q_BSRD, k_SRND)  # step 3

    def normed_queries(self, q_flat: torch.Tensor) -> torch.Tensor:
        """[B, 2·slots·D] → RMS-normed [B, 2, r, D] without a weight (`scores` applies g_q on the
        key side); a shared rank query is repeated over ranks. The norm runs in the weights'
        dtype (fp32 under bf16 autocast), which steadies top-k."""
        B, R, D = q_flat.shape[0], self.cfg.rank, self.cfg.dk
        q_BSRD = q_flat.to(self.g_q_D.dtype).view(B, 2, -1, D).expand(B, 2, R, D)
        return F.rms_norm(q_BSRD, (D,), None, NORM_EPS)

    def physical_rows(self, cell_BM: torch.Tensor) -> torch.Tensor:
        """Step 7 (eq. 8): virtual grid cell → shuffled slot → row of this layer's pool window."""
        n2, window = self.cfg.knum**2, self.cfg.window_knum**2
        start = (self.home - (self.cfg.share_layers - 1) // 2) * n2  # window centred on home table
        slot_BM = self.shuffle[cell_BM].long() % window
        return (start + slot_BM) % self.pool_TD.shape[0]

    def tables(self) -> list[nn.Parameter]:
        """The memory tables, for the value-lr parameter group (docs/fidelity.md §4)."""
        return [self.pool_TD]

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Step 4's (u, v) from the current cores; the trainer calls it once per optimizer step."""
        u_R, v_R = rank1_vectors(self.cores_CRR, self.rank1_u_R, self.rank1_v_R)
        self.rank1_u_R.copy_(u_R)
        self.rank1_v_R.copy_(v_R)

    # ------------------------------------------------------------------------------------------
    # initialization (paper App. A, or the official code)

    @torch.no_grad()
    def reset_parameters(self, ctx: InitContext) -> None:
        """`paper` (App. A): small-init W_q, W_pre, W_o; q/k norm weights calibrated so the mean
        top-m score is 1 (A.2); pool rows drawn with σ_V from eq. 26. `official`: the code's
        constants (docs/fidelity.md §3.2). Both: keys N(0, 1/D_k), cores U(0, 1), a fresh shuffle.
        Each layer initializes its own home table of the shared pool."""
        cfg, D = self.cfg, self.cfg.dk
        normal_(self.keys_SRND, D**-0.5)
        nn.init.uniform_(self.cores_CRR, 0.0, 1.0)
        self.shuffle.copy_(torch.randperm(self.shuffle.numel(), dtype=torch.int32))
        self.rank1_u_R.zero_()
        self.rank1_v_R.zero_()
        self.refresh_rank1()
        if ctx.scheme == "paper":
            for linear in (self.w_q, self.w_pre, self.w_o):
                if linear is not None:
                    normal_(linear.weight, ctx.small_std)
            g, second_moment = self.calibrate_norm_weight()
            self.g_q_D.fill_(g)
            self.g_k_D.fill_(g)
            table_std = paper_table_std(cfg, ctx, second_moment)
        else:
            normal_(self.w_q.weight, D**-0.5)
            if self.w_pre is not None:
                normal_(self.w_pre.weight, ctx.d_model**-0.5)
            normal_(self.w_o.weight, cfg.dv**-0.5)
            self.g_q_D.fill_(D**-0.4)
            self.g_k_D.fill_(D**-0.4)
            table_std = 0.02
        n2 = cfg.knum**2
        normal_(self.pool_TD[self.home * n2 : (self.home + 1) * n2], table_std)

    @torch.no_grad()
    def calibrate_norm_weight(self, samples: int = 512) -> tuple[float, float]:
        """App. A.2: feed random RMS-normed queries through TDQKR with this layer's keys and cores
        at norm weight 1; every grid score is bilinear in two norm-weighted dot products, so it
        scales as g⁴ and g = mean_top_m^(-1/4) brings the mean selected score to 1.

        Returns g and E[s²] = 1 + σ_s² of the selected (summed) scores after scaling, for eq. 26.
        """
        gen = torch.Generator().manual_seed(0)
        D = self.cfg.dk
        q_flat = torch.randn(samples, self.w_q.out_features, generator=gen).to(self.keys_SRND)
        q_KSRD = self.normed_queries(q_flat)
        k_SRND = F.rms_norm(self.keys_SRND, (D,), None, NORM_EPS)
        s_KSRN = torch.einsum("ksrd,srnd->ksrn", q_KSRD, k_SRND)
        _, _, scores_KMC = select_topm_reference(
            s_KSRN[:, 0], s_KSRN[:, 1], self.cores_CRR, self.rank1_u_R, self.rank1_v_R,
            self.cfg.k_rc, self.cfg.topm)
        top_KM = scores_KMC.sum(-1)
        g4 = 1.0 / top_KM.mean().item()
        return g4**0.25, (top_KM * g4).pow(2).mean().item()


class Window(NamedTuple):
    """One layer's home table as a tensor of its own (`pool_windows`)."""

    table_TD: torch.Tensor  # its rows of the pool [n², D_p + D_v]
    first: int  # index of its first row in the pool
    grad_rows: Callable[[], torch.Tensor] | None  # its rows of the pool's gradient, for its lookup to write


class PoolGradient:
    """The pool's gradient as one buffer, made when the first layer's backward asks for its rows
    (made at the forward, it would add to the activations' peak). It lets go of the buffer once
    every layer has its rows, so that only they hold it and autograd can take it as the pool's
    .grad without a copy (`SplitPool`)."""

    def __init__(self, pool_TD: torch.Tensor, n2: int, layers: int):
        self.pool_TD, self.n2, self.waiting = pool_TD, n2, layers
        self.buffer_TD: torch.Tensor | None = None

    def rows(self, home: int) -> torch.Tensor:
        """Table `home`'s rows of the buffer [n², D_p + D_v], for one layer's backward."""
        if self.buffer_TD is None:
            self.buffer_TD = torch.empty_like(self.pool_TD, memory_format=torch.contiguous_format)
        rows_TD, self.waiting = self.buffer_TD[home * self.n2 : (home + 1) * self.n2], self.waiting - 1
        if self.waiting == 0:
            self.buffer_TD = None
        return rows_TD


class SplitPool(torch.autograd.Function):
    """The pool → its home tables (views of it); backward: the pool's gradient. When the tables'
    gradients are, in order, the rows of one buffer of the pool's shape (their lookups wrote
    them there), that buffer is the pool's gradient as it stands; otherwise they are
    concatenated, as `torch.split`'s backward would."""

    @staticmethod
    def forward(ctx, pool_TD: torch.Tensor, n2: int):
        ctx.n2, ctx.shape = n2, pool_TD.shape
        return pool_TD.split(n2)

    @staticmethod
    def backward(ctx, *grads_TD):
        whole_TD = grads_TD[0]._base if grads_TD[0] is not None else None
        if (whole_TD is not None and whole_TD.shape == ctx.shape and whole_TD.is_contiguous()
                and all(_is_rows_of(g, whole_TD, k * ctx.n2) for k, g in enumerate(grads_TD))):
            return whole_TD, None
        like = next(g for g in grads_TD if g is not None)  # a table no layer read gets zeros
        return torch.cat([like.new_zeros(like.shape) if g is None else g for g in grads_TD]), None


def _is_rows_of(part: torch.Tensor | None, whole: torch.Tensor, first: int) -> bool:
    """Is `part` a view of the rows of `whole` that start at row `first`?"""
    return (part is not None and part._base is whole and part.is_contiguous()
            and part.storage_offset() - whole.storage_offset() == first * whole.stride(0))


def pool_windows(pool_TD: nn.Parameter, layers: list[UltraMemV2]) -> list[Window] | None:
    """Each layer's home table as a tensor of its own, for `UltraMemV2.forward(u, window=…)`;
    None where the layers must read the whole pool.

    Without ring sharing (g = 1) a layer reads only its home table, so one split of the pool per
    forward lets each layer's backward return the gradient of its n² rows (given the whole pool
    instead, every layer would return a gradient of the whole pool and autograd would add L_m of
    them). Eagerly, with the pool in fp32, each layer also gets its rows of one gradient buffer
    (`PoolGradient`): the lookups write their tables' gradients there (every row, so the buffer
    needs no memset) and it becomes the pool's gradient without the concatenation of L_m
    gradients, a read and a write of the pool's whole gradient per step (`SplitPool`). Used
    with the Triton kernels; the references keep the whole pool.

    The gradient stays dense (each window's untouched rows are zeros) for plain AdamW, which
    moves every row every step (weight decay, and the momentum of rows touched before): a
    row-sparse update equal to it would have to replay the skipped steps of each row. At the
    paper's batch sizes a step touches nearly every row anyway (16k tokens × m = 32 lookups over
    a 360² table: about 4 per row), so it would save little."""
    cfg = layers[0].cfg
    if cfg.share_layers != 1 or resolve_impl(cfg.kernels, pool_TD, "UltraMemV2") != "triton":
        return None
    n2 = cfg.knum**2
    writes_grad = (pool_TD.requires_grad and torch.is_grad_enabled() and pool_TD.dtype == torch.float32
                   and not torch.compiler.is_compiling())
    if not writes_grad:
        tables = pool_TD.split(n2)
        return [Window(tables[layer.home], layer.home * n2, None) for layer in layers]
    tables, grad = SplitPool.apply(pool_TD, n2), PoolGradient(pool_TD, n2, len(layers))
    return [Window(tables[layer.home], layer.home * n2, functools.partial(grad.rows, layer.home)) for layer in layers]


@torch.no_grad()
def selection_health(layer: UltraMemV2, u_BH: torch.Tensor) -> dict[str, float]:
    """How one layer uses its window (the official code logs the same): the mean selected score
    Σ_c s_c, the share of the window's rows touched by these tokens, and KL(usage ‖ uniform)
    over those rows (0 = perfectly even; log W = every lookup on one row)."""
    p_BM, scores_BMC = layer.select(u_BH)
    window, n2 = layer.cfg.window_knum**2, layer.cfg.knum**2
    start = (layer.home - (layer.cfg.share_layers - 1) // 2) * n2
    slot = (p_BM.flatten() - start) % layer.pool_TD.shape[0]
    q_W = torch.bincount(slot, minlength=window).double() / slot.numel()
    used = q_W > 0
    return {
        "mean_topm_score": scores_BMC.sum(-1).mean().item(),
        "values_touched": used.double().mean().item(),
        "usage_kl": (q_W[used] * (q_W[used] * window).log()).sum().item(),
    }


def paper_table_std(cfg: UltraMemV2Config, ctx: InitContext, score_second_moment: float) -> float:
    """σ_V of the value and pre-value tables from App. A eq. 26, read as σ_V⁴ (docs/fidelity.md §9.1):

        σ_V⁴ = 0.2 · k_inner · h / (k · n_head · (1 + σ_s²) · d_prev · d_v · L)

    with k = m, n_head = 1, k_inner = FFN inner / h. It sets the memory output variance
    0.16 (1+σ_s²) σ_V⁴ d_prev k d_v / h (eq. 22) equal to the FFN's 0.064 k_inner / (2L) (eq. 25).
    Without a pre-value neuron (D_p = 0) eq. 22 loses its factor 0.4 σ_V² d_prev, giving
    σ_V² = 0.08 · k_inner · h / (k · (1 + σ_s²) · d_v · L) by the same steps.

    Two approximations of the printed derivation, kept for fidelity: eq. 25 takes the SwiGLU inner
    variance as 0.16 where the exact value for N(0, 0.4) inputs is 0.049, and eq. 22 weights each
    value by the whole score where multi-core scoring gives each chunk one core's share. They
    pull in opposite directions; `tests/model/test_ultramemv2.py` measures the resulting
    std(Mem(u)) / std(FFN(u)).
    """
    k_inner = ctx.ffn_hidden / ctx.d_model
    common = k_inner * ctx.d_model / (cfg.topm * score_second_moment * cfg.dv * ctx.n_layers)
    if cfg.dp == 0:
        return math.sqrt(0.08 * common)
    return (0.2 * common / cfg.dp) ** 0.25


# ----------------------------------------------------------------------------------------------
# accounting


def ultramemv2_costs(cfg: UltraMemV2Config, d_model: int) -> LayerCosts:
    """Per-token cost of one layer (docs/fidelity.md §2.3, §5). Its home table is its sparse share of
    the pool (L_m home tables make the pool, so layer counts add up with or without sharing).

    MACs: query projection h·2·slots·D_k; key scoring 2·r·N·D_k (dense over all keys, the MCP
    term of §3); prefilter 2·r·N; grid C·(k_rc·r² + k_rc²·r); pre-values m·D_p and W_pre h·D_p;
    lookup m·D_v; W_o D_v·h.
    """
    h, R, C, D, N = d_model, cfg.rank, cfg.cores, cfg.dk, cfg.keys_per_side
    slots = 1 if cfg.shared_rank_query else R
    krc, m = cfg.k_rc, cfg.topm
    macs = {
        "query": h * 2 * slots * D,
        "keys": 2 * R * N * D,
        "prefilter": 2 * R * N,
        "grid": C * (krc * R * R + krc * krc * R),
        "pre_values": m * cfg.dp + h * cfg.dp,
        "lookup": m * cfg.dv,
        "out": cfg.dv * h,
    }
    dense = h * 2 * slots * D + 2 * D + 2 * R * N * D + C * R * R + h * cfg.dp + cfg.dv * h
    return LayerCosts(
        dense_params=dense,
        sparse_params=cfg.knum**2 * (cfg.dp + cfg.dv),
        activated_sparse_params=m * (cfg.dp + cfg.dv),
        macs=macs,
    )
