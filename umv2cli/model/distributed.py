"""Model layers of a run on several processes: memory tables split by columns over a group of
processes ("memory parallel"), and MoE routers that balance the whole batch.

Tokens stay data-parallel: every process trains on its own slice of each batch. Within a
memory-parallel group of G processes, each holds 1/G of the columns of every row of the UltraMemV2
pool or the Memory+ value table, as Meta's ColwiseEmbeddingBag and the official UltraMemV2 code's
ImplicitValueExpansionParallel do. A lookup is a local lookup between exchanges within the group:

  1. all-gather: the rows each token selected and their scores, for the G·B tokens of the group;
  2. local lookup: this process's columns of those rows, for every token of the group;
     UltraMemV2's pre-value neuron z = <P[p], x_p> (eq. 13-15) needs all of P's columns, so each
     process adds up its columns' share of the dot product, over its columns of x_p (which an
     all-to-all delivers), and an all-reduce sums the shares before z weights the values;
  3. all-to-all: each token's column slices go back to the process that owns the token.

Backward exchanges the gradients the other way (an all-gather's is a reduce-scatter, an
all-reduce's an all-reduce, an all-to-all's the reverse all-to-all). Each process ends with the
gradient of its own tokens' loss for the dense weights, and of the whole group's tokens' loss for
its columns; the trainer averages the columns' gradients over the data-parallel replicas.

Column layout. UltraMemV2 values are C chunks of W = D_v/C columns, chunk c weighted by core c's
score (multi-core scoring); process g holds columns [g·W/G, (g+1)·W/G) of every chunk, so its local
values are again C chunks and the lookup kernel runs on them unchanged. It holds pre-value columns
[g·D_p/G, (g+1)·D_p/G) as a second table. Memory+ values: columns [g·D_v/G, (g+1)·D_v/G).
Checkpoints store the tables in their whole shapes (`table_pieces`), so a run may resume under
another memory-parallel size.

MoE experts are data-parallel (whole on every process). The load-balance loss E·Σ_i f_i·P_i is not
a mean over tokens, so each process's share of the batch would give another loss than the whole
batch; `GlobalBatchRouter` sums f and P over all processes first, so that every process computes
the whole batch's loss.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from umv2cli.kernels.lookup import memory_lookup
from umv2cli.model.moe import MoE, Router
from umv2cli.model.pkm import ProductKeyMemory
from umv2cli.model.ultramemv2 import UltraMemV2, Window

# B this process's tokens  G processes of the group  N the group's tokens G·B  M selected rows m
# C cores  P pre-value columns of this process  V value columns of this process  T table rows

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch ≥ 2.13 / older
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------
# exchanges within the group, differentiable


class _GatherTokens(torch.autograd.Function):
    """[B, …] on each process → [G·B, …], the group's tokens in process order. Backward: each
    process gets the sum over the group of its tokens' gradients (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((group.size() * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // ctx.group.size(), *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


class _SumOverGroup(torch.autograd.Function):
    """The sum of every process's x (an all-reduce); each process uses the sum, so backward sums
    their gradients the same way."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class _Exchange(torch.autograd.Function):
    """x [G, …]: block h goes to process h, and block h of the result comes from process h (an
    all-to-all). Backward sends the gradients' blocks back the same way."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_tokens(x_B: torch.Tensor, group) -> torch.Tensor:
    """[B, …] on each process → [G·B, …]: the group's tokens, in process order."""
    return _GatherTokens.apply(x_B, group)


def my_columns_of_every_token(x_BD: torch.Tensor, group) -> torch.Tensor:
    """[B, D] on each process → [G·B, D/G]: column block g (this process's) of the group's tokens."""
    G, B = group.size(), x_BD.shape[0]
    return _Exchange.apply(x_BD.reshape(B, G, -1).transpose(0, 1), group).reshape(G * B, -1)


def my_tokens_from_every_process(o_NV: torch.Tensor, group) -> torch.Tensor:
    """[G·B, V] (this process's columns of the group's tokens) → [G, B, V]: every process's columns
    of this process's B tokens, in process order."""
    G = group.size()
    return _Exchange.apply(o_NV.view(G, -1, o_NV.shape[-1]), group)


# ----------------------------------------------------------------------------------------------
# the layers


class ColumnShardedUltraMemV2(UltraMemV2):
    """An UltraMemV2 layer holding this process's columns of the shared pool: values `pool_TD`
    [T, D_v/G] (C chunks) and pre-values `pre_TP` [T, D_p/G]. Steps 1-7 and 10 are the layer's own;
    steps 8-9 (`lookup`) run over the group."""

    group: dist.ProcessGroup
    pre_TP: nn.Parameter | None

    def lookup(self, x_p_BP: torch.Tensor, p_BM: torch.Tensor, scores_BMC: torch.Tensor, *,
               window: Window | None = None) -> torch.Tensor:
        """Steps 8-9 for this process's B tokens → o [B, D_v]. In the tables' dtype, as the whole
        layer's lookup (autocast off: the partial pre-value dots must add up in fp32). `window` (the
        whole layer's per-layer view of the pool, `ultramemv2.pool_windows`) is not used: this
        process's columns are read whole, rows as the whole pool numbers them."""
        group, B, C = self.group, p_BM.shape[0], self.cfg.cores
        dtype = self.pool_TD.dtype
        with torch.autocast(p_BM.device.type, enabled=False):
            p_NM = gather_tokens(p_BM, group)
            w_NMC = gather_tokens(scores_BMC.to(dtype), group)
            if self.pre_TP is not None:  # step 8: z = <P[p], x_p>, summed over the group's column shares
                x_p_NP = my_columns_of_every_token(x_p_BP.to(dtype), group)
                z_NM = _SumOverGroup.apply(torch.einsum("nmp,np->nm", F.embedding(p_NM, self.pre_TP), x_p_NP), group)
                z_NM = F.gelu(z_NM) if self.cfg.pre_value_act == "gelu" else z_NM
                w_NMC = w_NMC * z_NM[..., None]
            # step 9 on this process's columns: no pre-values left, the weights carry z
            o_NV = memory_lookup(w_NMC.new_zeros(w_NMC.shape[0], 0), self.pool_TD, p_NM, w_NMC,
                                 impl=self.cfg.kernels)
            o_GBCW = my_tokens_from_every_process(o_NV, group).view(group.size(), B, C, -1)
            o_BV = o_GBCW.permute(1, 2, 0, 3).reshape(B, -1)  # chunk c = the processes' slices of it, in order
        return o_BV.to(scores_BMC.dtype)

    def tables(self) -> list[nn.Parameter]:
        return [self.pool_TD] if self.pre_TP is None else [self.pre_TP, self.pool_TD]


class ColumnShardedPKM(ProductKeyMemory):
    """A Memory+ / PKM layer holding this process's columns of its value table, `values` [n², dv/G];
    the rest of the layer is the whole layer's."""

    group: dist.ProcessGroup

    def bag(self, rows_NL: torch.Tensor, w_NL: torch.Tensor) -> torch.Tensor:
        group, N = self.group, rows_NL.shape[0]
        y_GNV = F.embedding_bag(gather_tokens(rows_NL, group), self.values,
                                per_sample_weights=gather_tokens(w_NL, group), mode="sum")
        return my_tokens_from_every_process(y_GNV, group).transpose(0, 1).reshape(N, -1)


class GlobalBatchRouter(Router):
    """A router whose load-balance statistics are those of the batch of all processes."""

    group: dist.ProcessGroup

    def batch_means(self, counts_E: torch.Tensor, p_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=self.group)
        tokens = p_NE.shape[0] * self.group.size()  # every process has as many
        return counts_E.to(p_NE.dtype) / (tokens * self.topk), _SumOverGroup.apply(p_NE.sum(dim=0), self.group) / tokens


# ----------------------------------------------------------------------------------------------
# splitting a built model, and the tables' whole shapes for checkpoints


def balance_whole_batches(model: nn.Module, group) -> None:
    """Make the MoE routers of `model` compute the load-balance loss of the whole batch of `group`."""
    for layer in model.sparse:
        if isinstance(layer, MoE):
            layer.router.__class__ = GlobalBatchRouter
            layer.router.group = group


def split_memory_tables(model: nn.Module, group) -> None:
    """Keep this process's columns of `model`'s memory tables (see the module docstring) and make
    its memory layers look up over `group`. The model must be freshly built: every process holds
    the same whole tables (same seed), and each keeps its share."""
    G, g = group.size(), group.rank()
    pools: dict[int, list[nn.Parameter]] = {}  # a shared table → its local tables, once

    def own(columns: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(columns.detach().clone(memory_format=torch.contiguous_format))

    for layer in model.sparse:
        if isinstance(layer, UltraMemV2):
            pool, dp, C = layer.pool_TD, layer.cfg.dp, layer.cfg.cores
            if id(pool) not in pools:
                T, W = pool.shape[0], layer.cfg.dv // C
                pre = own(pool[:, g * dp // G:(g + 1) * dp // G]) if dp else None
                values = own(pool[:, dp:].view(T, C, W)[:, :, g * W // G:(g + 1) * W // G].reshape(T, -1))
                pools[id(pool)] = [pre, values]
            layer.__class__ = ColumnShardedUltraMemV2
            layer.pre_TP, layer.pool_TD = pools[id(pool)]
        elif isinstance(layer, ProductKeyMemory):
            values, dv = layer.values, layer.cfg.dv
            if id(values) not in pools:
                pools[id(values)] = [own(values[:, g * dv // G:(g + 1) * dv // G])]
            layer.__class__ = ColumnShardedPKM
            layer.values = pools[id(values)][0]
        else:
            raise ValueError(f"split_memory_tables: {type(layer).__name__} has no table to split by columns")
        layer.group = group
    if hasattr(model, "memory_pool"):  # the model's own handle on a shared table follows its layers
        first = model.sparse[0]
        model.memory_pool = first.pool_TD if isinstance(first, UltraMemV2) else first.values


Piece = tuple[str | None, Callable[[torch.Tensor], torch.Tensor], int | None]
"""(checkpoint key, or None for the table's own name; the view of a table-shaped tensor stored
under it; the dim split over the memory-parallel group, or None)."""


def table_pieces(model: nn.Module) -> dict[int, list[Piece]]:
    """{id(table): its pieces} for the memory tables that checkpoints store in their whole shapes:
    the UltraMemV2 pool as "memory_pool.pre" [T, D_p] and "memory_pool.values" [T, C, D_v/C], and
    split Memory+ tables. The whole shapes do not depend on the split, so a checkpoint reshards.
    Tensors shaped like a table (its optimizer state) are stored the same way."""
    pieces: dict[int, list[Piece]] = {}
    for layer in model.sparse:
        if isinstance(layer, ColumnShardedUltraMemV2):
            C = layer.cfg.cores
            if layer.pre_TP is not None:
                pieces[id(layer.pre_TP)] = [("memory_pool.pre", lambda t: t, 1)]
            pieces[id(layer.pool_TD)] = [("memory_pool.values", lambda t, C=C: t.view(t.shape[0], C, -1), 2)]
        elif isinstance(layer, UltraMemV2):
            dp, C = layer.cfg.dp, layer.cfg.cores
            pre = [("memory_pool.pre", lambda t, dp=dp: t[:, :dp], None)] if dp else []
            pieces[id(layer.pool_TD)] = pre + [("memory_pool.values",
                                                lambda t, dp=dp, C=C: t[:, dp:].view(t.shape[0], C, -1), None)]
        elif isinstance(layer, ColumnShardedPKM):
            pieces[id(layer.values)] = [(None, lambda t: t, 1)]
    return pieces
