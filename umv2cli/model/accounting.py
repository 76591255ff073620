"""Parameters, FLOPs, memory compute share and decode bytes of any config, without building it.

`account(cfg)` is the one function the CLI (`umv2 model info`) and the sweep planner call. It adds
up the backbone analytically and asks each sparse layer's own ``*_costs`` function (written beside
its parameters) for the rest; `tests/model/test_accounting.py` checks every count against an
instantiated model.

Conventions (stated once, here):
- Parameters are counted once when shared (tied embeddings, a shared value pool).
- "embedding" = the token embedding, plus the LM head when untied.
- activated params = parameters one token uses: everything dense, plus the sparse parameters it
  reads (m·(D_v + D_p) per memory layer, k experts' weights per MoE layer); "with embedding"
  adds the embedding as above.
- The paper's Table 10 (227M rows) counts activated params with the embedding and total params
  without it; `paper_convention` gives those two numbers under that name.
- FLOPs are forward FLOPs per token, 2 per multiply-accumulate, of every matmul: attention
  projections, attention scores at the full context `seq_len` (QKᵀ and AV, no causal halving,
  as Chinchilla counts), FFNs, sparse layers and the LM head. A training step costs ≈ 3× that.
- MCP (memory computational proportion, paper §4.2.4; docs/fidelity.md §5) = sparse-layer MACs /
  (attention-projection + FFN + sparse-layer MACs): the per-token linear compute, without
  attention scores or the LM head.
- decode bytes = sparse-table bytes fetched per token at batch 1 (activated sparse params ×
  bytes per element; bf16 = 2).
"""

from dataclasses import asdict, dataclass

from umv2cli.config import (ModelConfig, MoEConfig, PEERConfig, PKMConfig, UltraMemV1Config,
                            UltraMemV2Config)
from umv2cli.model.costs import LayerCosts
from umv2cli.model.ffn import swiglu_macs


@dataclass(frozen=True)
class Accounting:
    kind: str
    activated_params: int
    activated_params_no_embedding: int
    total_params: int
    total_params_no_embedding: int
    embedding_params: int
    sparse_params: int
    n_sparse_layers: int
    flops_per_token: int
    """Forward FLOPs per token (see the module docstring)."""
    flops_by_component: dict[str, int]
    mcp: float
    decode_bytes_per_token: int
    paper_convention: dict[str, int | str]

    def to_dict(self) -> dict:
        return asdict(self)


def sparse_layer_costs(cfg: ModelConfig) -> LayerCosts | None:
    """The cost of one sparse layer of `cfg`, from the function beside that layer's module."""
    from umv2cli.model.moe import moe_costs
    from umv2cli.model.peer import peer_costs
    from umv2cli.model.pkm import pkm_costs
    from umv2cli.model.ultramem_v1 import ultramem_v1_costs
    from umv2cli.model.ultramemv2 import ultramemv2_costs

    sparse, h = cfg.sparse, cfg.d_model
    if isinstance(sparse, UltraMemV2Config):
        return ultramemv2_costs(sparse, h)
    if isinstance(sparse, UltraMemV1Config):
        return ultramem_v1_costs(sparse, h)
    if isinstance(sparse, PKMConfig):
        return pkm_costs(sparse, h)
    if isinstance(sparse, PEERConfig):
        return peer_costs(sparse, h)
    if isinstance(sparse, MoEConfig):
        return moe_costs(sparse, h)
    return None


def account(cfg: ModelConfig, bytes_per_element: int = 2) -> Accounting:
    h, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    n_ffn, n_sparse = len(cfg.ffn_blocks()), len(cfg.sparse_pairs())
    embedding = V * h * (1 if cfg.tie_embeddings else 2)
    backbone = L * (4 * h * h + 2 * h) + n_ffn * 3 * h * cfg.ffn_hidden + h  # attn, 2 norms, FFNs, final norm
    macs = {
        "attention_proj": L * 4 * h * h,
        "attention_scores": L * 2 * cfg.seq_len * h,
        "ffn": n_ffn * swiglu_macs(h, cfg.ffn_hidden),
        "lm_head": V * h,
    }
    layer = sparse_layer_costs(cfg)
    sparse_dense = sparse_total = sparse_activated = 0
    if layer is not None:
        sparse_dense = n_sparse * layer.dense_params
        sparse_total = layer.sparse_params * (1 if layer.shared_sparse else n_sparse)
        sparse_activated = n_sparse * layer.activated_sparse_params
        macs |= {f"sparse.{name}": n_sparse * m for name, m in layer.macs.items()}
    total_no_emb = backbone + sparse_dense + sparse_total
    activated_no_emb = backbone + sparse_dense + sparse_activated
    sparse_macs = sum(m for name, m in macs.items() if name.startswith("sparse."))
    linear_macs = macs["attention_proj"] + macs["ffn"] + sparse_macs
    return Accounting(
        kind="dense" if cfg.sparse is None else cfg.sparse.kind,
        activated_params=activated_no_emb + embedding,
        activated_params_no_embedding=activated_no_emb,
        total_params=total_no_emb + embedding,
        total_params_no_embedding=total_no_emb,
        embedding_params=embedding,
        sparse_params=sparse_total,
        n_sparse_layers=n_sparse,
        flops_per_token=2 * sum(macs.values()),
        flops_by_component={name: 2 * m for name, m in macs.items()},
        mcp=sparse_macs / linear_macs,
        decode_bytes_per_token=sparse_activated * bytes_per_element,
        paper_convention={
            "activated": activated_no_emb + embedding,
            "total": total_no_emb,
            "note": "Table 10 (227M rows): activated with the embedding, total without",
        },
    )
