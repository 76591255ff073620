"""The row layout that the lookup kernels (K2, K3 in lookup.py) and the table gradient (K4 in
value_grad.py) share: one place for how a lookup finds its row, its scores and its elements.

A table row is ``[P (D_p) | V (D_v)]``, and V is read as a ``[C, W]`` tile: chunk c (W = D_v / C
elements) belongs to core c (multi-core scoring). Lookup ℓ = t·m + j of token t reads row
p_ℓ = rows[t, j] with the per-core scores s[ℓ, 0..C). Rows are addressed in int64, since
T·(D_p + D_v) can exceed 2³¹; loads widen to fp32, where every kernel accumulates.

The same ``[D_p | C×W]`` view serves a token's ``(x_p, do)`` pair in K4, whose output row has the
table's layout.
"""

import triton
import triton.language as tl


@triton.jit
def row_tile(
    D_P,  # pre-value dim
    W,  # chunk width D_v / C
    C,  # cores
    BLOCK_P: tl.constexpr,  # power of two ≥ D_p
    BLOCK_C: tl.constexpr,  # power of two ≥ C
    BLOCK_W: tl.constexpr,  # power of two ≥ W
):
    """Offsets and masks of a row: the D_p part [BLOCK_P], the scores [BLOCK_C] and the value
    tile [BLOCK_C, BLOCK_W] (chunk c, element w at c·W + w)."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    mask_c = offs_c < C
    offs_cw = offs_c[:, None] * W + offs_w[None, :]
    mask_cw = mask_c[:, None] & (offs_w[None, :] < W)
    return offs_p, offs_p < D_P, offs_c, mask_c, offs_cw, mask_cw


@triton.jit
def lookup_at(ROWS, S, ell, C, offs_c, mask_c):
    """Lookup ℓ (int64): its row id p_ℓ (int64) and its C scores s[ℓ, :] (fp32)."""
    row = tl.load(ROWS + ell).to(tl.int64)
    s = tl.load(S + ell * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return row, s


@triton.jit
def load_row(P_AT, V_AT, offs_p, mask_p, offs_cw, mask_cw):
    """The D_p elements at P_AT (none when D_p = 0: all masked) and the [C, W] tile at V_AT, fp32."""
    p = tl.load(P_AT + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    v = tl.load(V_AT + offs_cw, mask=mask_cw, other=0.0).to(tl.float32)
    return p, v


def launch_dims(M: int, C: int, P: int, V: int) -> dict:
    """The shared launch arguments of K2-K4: sizes, D_p > 0, power-of-two blocks, warps."""
    W = V // C
    return dict(M=M, D_P=P, D_V=V, W=W, C=C, HAS_P=P > 0,
                BLOCK_P=max(16, triton.next_power_of_2(max(P, 1))), BLOCK_C=triton.next_power_of_2(C),
                BLOCK_W=max(16, triton.next_power_of_2(W)), num_warps=4 if P + V >= 512 else 2)
