"""Initialization schemes shared by every module (paper App. A; docs/fidelity.md §3).

`paper`: every linear layer gets the "small init" std sqrt(2/(5h)) of Nguyen & Salazar; output
projections of attention and FFNs (experts included) additionally get × 1/sqrt(2L); tables follow
each layer's own rule (UltraMemV2: eq. 26). `official`: the official code's choices where it
differs (docs/fidelity.md §3.2); for the dense backbone it is the same (OLMo's `full_megatron`).
Normal draws are truncated at 3σ, as in OLMo.
"""

import math
from dataclasses import dataclass

import torch

from umv2cli.config import InitScheme


@dataclass(frozen=True)
class InitContext:
    """What a layer needs to know about the model around it to initialize itself."""

    scheme: InitScheme
    d_model: int
    n_layers: int
    ffn_hidden: int
    """SwiGLU inner width of the backbone FFN; k_inner = ffn_hidden / d_model in eq. 25-26."""

    @property
    def small_std(self) -> float:
        """sqrt(2 / (5h)): 0.022822 for h = 768 (App. A; the official README's init_std)."""
        return math.sqrt(2 / (5 * self.d_model))

    @property
    def out_proj_std(self) -> float:
        """Small init × 1/sqrt(2L) for residual-branch output projections (full_megatron)."""
        return self.small_std / math.sqrt(2 * self.n_layers)


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) truncated at ±3σ, in place."""
    return torch.nn.init.trunc_normal_(tensor, 0.0, std, -3 * std, 3 * std)
