"""What one sparse layer costs per token: the unit `accounting.py` sums over a model.

Each sparse-layer module ends with a ``*_costs(cfg, d_model) -> LayerCosts`` function written
beside the parameters it counts, and a test checks it against the instantiated module.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCosts:
    """Per-token cost of one sparse layer. Counts are exact integers; MACs are multiply-accumulates
    (FLOPs = 2·MACs)."""

    dense_params: int
    """Parameters every token uses: projections, keys, norms, cores, router."""
    sparse_params: int
    """Memory-table rows or expert weights this layer reads from (a shared pool: the whole pool)."""
    activated_sparse_params: int
    """Sparse parameters one token reads, e.g. m·(D_v + D_p) or k experts' weights. At decode with
    batch 1 these are the table elements fetched per token."""
    macs: dict[str, int]
    """Multiply-accumulates per token, by component (e.g. "query", "keys", "grid", "lookup")."""
    shared_sparse: bool = False
    """True when `sparse_params` is one pool shared by every layer of this kind (counted once)."""
