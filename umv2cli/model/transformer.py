"""The decoder-only transformer that hosts every sparse layer.

Pre-norm blocks with RMSNorm, rotary position embeddings, causal attention through
`F.scaled_dot_product_attention`, and a SwiGLU FFN; tied or untied embeddings. A sparse layer
reads the normed FFN input u of its read block and its output joins the residual after its write
block (docs/fidelity.md §2.1):

    h       = x_l + Attn(RMSNorm(x_l))
    u       = RMSNorm(h)                               shared input of FFN and memory
    x_{l+1} = h + FFN(u) + Σ outputs written at block l   (FFN absent where a sparse layer replaces it)

so UltraMemV2 ("all", FFN kept) adds Mem(u) beside the FFN, Memory+/PEER/MoE ("a:a", replace_ffn)
take the FFN's place, and UltraMem v1's skip pairs "a:b" read at block a and write after block b.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from umv2cli.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig, UltraMemV1Config, UltraMemV2Config
from umv2cli.kernels.tdqkr import rank1_vectors
from umv2cli.model import pkm, ultramemv2
from umv2cli.model.ffn import SwiGLU
from umv2cli.model.init import InitContext, normal_
from umv2cli.model.moe import MoE
from umv2cli.model.peer import PEER
from umv2cli.model.ultramem_v1 import UltraMemV1

# B batch  T sequence  H hidden  A attention heads  E head dim  V vocabulary


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, E/2] of the rotary embedding (Su et al. 2021)."""
    freqs_F = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_TF = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs_F[None, :]
    return angles_TF.cos().float(), angles_TF.sin().float()


def apply_rope(x_BATE: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head dim (the "rotate half" layout of GPT-NeoX/Llama)."""
    x1, x2 = x_BATE.chunk(2, dim=-1)
    cos, sin = cos_TF.to(x_BATE.dtype), sin_TF.to(x_BATE.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTH: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
        B, T, H = x_BTH.shape
        q, k, v = self.w_qkv(x_BTH).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # 3 × (B, A, T, E)
        q, k = apply_rope(q, cos_TF[:T], sin_TF[:T]), apply_rope(k, cos_TF[:T], sin_TF[:T])
        y_BATE = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.w_out(y_BATE.transpose(1, 2).reshape(B, T, H))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_ffn: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden) if has_ffn else None


def build_sparse_layers(cfg: ModelConfig) -> tuple[nn.ModuleList, nn.Parameter | None]:
    """One sparse layer per placement pair, and the value pool they share (or None)."""
    sparse, h, n = cfg.sparse, cfg.d_model, len(cfg.sparse_pairs())
    pool = None
    if isinstance(sparse, UltraMemV2Config):
        pool = ultramemv2.new_value_pool(sparse, n)
        layers = [ultramemv2.UltraMemV2(sparse, h, pool=pool, home=i) for i in range(n)]
    elif isinstance(sparse, PKMConfig):
        pool = pkm.new_value_pool(sparse) if sparse.shared_pool else None
        layers = [pkm.ProductKeyMemory(sparse, h, values=pool) for _ in range(n)]
    elif isinstance(sparse, UltraMemV1Config):
        layers = [UltraMemV1(sparse, h) for _ in range(n)]
    elif isinstance(sparse, PEERConfig):
        layers = [PEER(sparse, h) for _ in range(n)]
    elif isinstance(sparse, MoEConfig):
        layers = [MoE(sparse, h, n_layers=n) for _ in range(n)]  # aux: the layers' mean
    else:
        layers = []
    return nn.ModuleList(layers), pool


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        ffn_blocks = cfg.ffn_blocks()
        self.blocks = nn.ModuleList(Block(cfg, i in ffn_blocks) for i in range(cfg.n_layers))
        self.sparse, pool = build_sparse_layers(cfg)
        if pool is not None:
            self.memory_pool = pool  # the same Parameter object as each layer's table
        self.pairs = cfg.sparse_pairs()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos_TF, sin_TF = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos_TF, persistent=False)
        self.register_buffer("rope_sin", sin_TF, persistent=False)
        self.reset_parameters()

    def forward(self, idx_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] → (logits [B, T, V], the sparse layers' summed, weighted aux loss)."""
        x = self.embed(idx_BT)
        aux = x.new_zeros(())
        written: dict[int, torch.Tensor] = {}  # write block → sum of sparse outputs due after it
        windows = (ultramemv2.pool_windows(self.memory_pool, list(self.sparse))
                   if isinstance(self.cfg.sparse, UltraMemV2Config) else None)
        for i, block in enumerate(self.blocks):
            h = x + block.attn(block.attn_norm(x), self.rope_cos, self.rope_sin)
            u = block.ffn_norm(h)
            x = h + block.ffn(u) if block.ffn is not None else h
            for k, (layer, (read, write)) in enumerate(zip(self.sparse, self.pairs)):
                if read == i:
                    y, layer_aux = layer(u) if windows is None else layer(u, window=windows[k])
                    written[write] = written.get(write, 0) + y
                    aux = aux + layer_aux
            if i in written:
                x = x + written.pop(i)
        x = self.norm(x)
        logits = x @ self.embed.weight.T if self.lm_head is None else self.lm_head(x)
        return logits, aux

    def memory_tables(self) -> list[nn.Parameter]:
        """Every memory table of the sparse layers, once each (a shared pool is one table)."""
        tables = {id(t): t for layer in self.sparse if hasattr(layer, "tables") for t in layer.tables()}
        return list(tables.values())

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Refresh the TDQKR prefilter vectors of every layer that has them; call once per
        optimizer step (docs/fidelity.md §2.2 step 4). One batched SVD for all the layers (each
        SVD on a GPU waits for the device), the same vectors as each layer's `refresh_rank1`."""
        layers = [layer for layer in self.sparse if hasattr(layer, "refresh_rank1")]
        if not layers:
            return
        u_LR, v_LR = rank1_vectors(torch.stack([layer.cores_CRR for layer in layers]),
                                   torch.stack([layer.rank1_u_R for layer in layers]),
                                   torch.stack([layer.rank1_v_R for layer in layers]))
        torch._foreach_copy_([layer.rank1_u_R for layer in layers], list(u_LR.unbind(0)))
        torch._foreach_copy_([layer.rank1_v_R for layer in layers], list(v_LR.unbind(0)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize under `cfg.init` (see `umv2cli.model.init`); the sparse layers do their own."""
        cfg = self.cfg
        ctx = InitContext(cfg.init, cfg.d_model, cfg.n_layers, cfg.ffn_hidden)
        normal_(self.embed.weight, ctx.small_std)
        if self.lm_head is not None:
            normal_(self.lm_head.weight, ctx.small_std)
        for block in self.blocks:
            normal_(block.attn.w_qkv.weight, ctx.small_std)
            normal_(block.attn.w_out.weight, ctx.out_proj_std)
            if block.ffn is not None:
                block.ffn.reset_parameters(ctx)
        for layer in self.sparse:
            layer.reset_parameters(ctx)


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialized model; the same seed gives the same weights on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(cfg)
    return model.to(device)

