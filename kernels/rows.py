"""What the lookup kernels (K2 and the x_p pass in lookup.py, K34 in value_grad.py) share: the row
layout, the neuron's activation, segment sums, and how many lookups one program loads at once.

A table row is ``[P (D_p) | V (D_v)]``, and V is read as a ``[C, W]`` tile: chunk c (W = D_v / C
elements) belongs to core c (multi-core scoring). Lookup ℓ = t·m + j of token t reads row
p_ℓ = rows[t, j] with the per-core scores s[ℓ, 0..C). Rows are addressed in int64, since
T·(D_p + D_v) can exceed 2³¹; loads widen to fp32, where every kernel accumulates, so the table,
the activations and the scores may each come in their own float dtype.

The kernels load a tile of lookups at a time, ``[J, C, W]`` values and ``[J, D_p]`` pre-values:
J rows in flight per program, and many one-warp programs per SM, keep short rows (576 B in
bf16) near copy bandwidth.
"""

import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/√2 (constexpr: jit code reads no plain globals)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)
TILE_ELEMENTS = 1024
"""fp32 elements of one [J, C, W] tile: 32 registers a thread at NUM_WARPS warps."""
NUM_WARPS = 1
"""Warps per program of the forward (K2) and the x_p pass: one token per one-warp program, so
every sum over its lookups stays within the warp. Measured on an H100 (bf16 rows, m = 32,
BENCHMARKS.md run 5): 4 lookups a tile at one warp took 0.139 ms at 576 B rows over 10⁶ rows and
0.133 ms at ultramemv2-227m's table (768 B rows), against 0.343 and 0.367 ms at the former 16
lookups and 4 warps; 2, 4 and 8 warps were slower at every tile size tried."""


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
def gelu(h):
    """Exact (erf) GELU, as F.gelu's default: h·Φ(h)."""
    return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def gelu_grad(h):
    """d GELU / dh = Φ(h) + h·φ(h)."""
    return 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * _INV_SQRT_2PI * tl.exp(-0.5 * h * h)


@triton.jit
def segment_sum(a, id_a, b, id_b):
    """Scan operator: running sums that restart where the (sorted) id changes."""
    return tl.where(id_a == id_b, a + b, b), id_b


def launch_dims(C: int, P: int, V: int) -> dict:
    """The shared launch arguments of the lookup kernels: sizes, D_p > 0, power-of-two blocks,
    lookups per tile (a [TILE, C, W] tile of about TILE_ELEMENTS) and warps."""
    W = V // C
    block_p = max(16, triton.next_power_of_2(max(P, 1)))
    block_c, block_w = triton.next_power_of_2(C), max(16, triton.next_power_of_2(W))
    tile = max(1, min(32, TILE_ELEMENTS // (block_c * block_w)))
    return dict(D_P=P, D_V=V, W=W, C=C, HAS_P=P > 0, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_W=block_w,
                TILE=tile, num_warps=NUM_WARPS)
