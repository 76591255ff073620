"""The dense SwiGLU FFN of every block (Shazeer 2020): y = W_2 (silu(W_1 u) ⊙ W_3 u).

`ffn_hidden` is the inner width F of each branch (OLMo's mlp_hidden_size is 2F). It is also the
sparse-kind "dense" baseline: a model with no sparse layer is the FFN alone.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from umv2cli.model.init import InitContext, normal_


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate branch
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # linear branch
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # output projection

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(u)) * self.w3(u))

    @torch.no_grad()
    def reset_parameters(self, ctx: InitContext) -> None:
        normal_(self.w1.weight, ctx.small_std)
        normal_(self.w3.weight, ctx.small_std)
        normal_(self.w2.weight, ctx.out_proj_std)


def swiglu_macs(d_model: int, hidden: int) -> int:
    """Multiply-accumulates per token: three h×F matmuls (the gate product is not counted)."""
    return 3 * d_model * hidden
