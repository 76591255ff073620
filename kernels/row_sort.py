"""Counting sort of the B·m lookups by table row: the order in which the row-major backward
(K34, value_grad.py) reads them.

A least-significant-digit radix sort. Each pass is a stable counting sort of the row ids on one
digit of b ≤ 11 bits, so ⌈log₂T / b⌉ passes (two up to 4M rows) order the lookups by row, and
the lookups of one row keep their ascending lookup order ℓ = t·m + j. No pass uses atomics or
depends on timing, so every call gives the same order and each row of the table gradient sums its
occurrences in the same order: the gradient is reproducible bit for bit.

One pass over L ids, in blocks of BLOCK ids (one program each), K = 2^b digit values:
  1. histogram:  h[d, blk] = ids of block blk whose digit is d                      reads L ids
  2. cumsum:     H = inclusive cumsum of h in digit-major order (torch)               [K · blocks]
  3. scatter:    an id of block blk with digit d goes to H[d, blk] − h[d, blk] + its rank among
                 the block's ids with digit d; the rank comes from sorting (d, position) pairs
                 of the block in registers                                         reads, writes L

Bytes per pass: 3·L·4 read + 2·L·4 written + 2·K·blocks·4 (the histograms). It replaces a stable
`torch.sort` of int64 ids (8 radix passes over 16-byte pairs) plus a `searchsorted`.
"""

import torch
import triton
import triton.language as tl

MAX_DIGIT_BITS = 11
BLOCK = 1024


@triton.jit
def _digit_histogram_kernel(
    KEYS,  # pointer to the row ids of this pass, int32 [L]
    HIST,  # pointer to h, int32 [K, blocks]
    L,  # ids
    BLOCKS,  # programs
    SHIFT,  # the digit is (id >> SHIFT) & (K - 1)
    K: tl.constexpr,  # digit values, a power of two
    BLOCK: tl.constexpr,  # ids per program, a power of two
):
    blk = tl.program_id(0)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < L
    digit = tl.where(valid, (tl.load(KEYS + offs, mask=valid, other=0) >> SHIFT) & (K - 1), K - 1)
    offs_k = tl.arange(0, K)
    padding = BLOCK - tl.sum(valid.to(tl.int32), axis=0)  # counted in the last digit value
    h = tl.histogram(digit, K) - tl.where(offs_k == K - 1, padding, 0)
    tl.store(HIST + offs_k.to(tl.int64) * BLOCKS + blk, h)


@triton.jit
def _digit_scatter_kernel(
    KEYS,  # pointer to the row ids, int32 [L]
    VALS,  # pointer to their lookup ids ℓ, int32 [L]; unused when not HAS_VALS (first pass: ℓ = position)
    CUM,  # pointer to H, the inclusive cumsum of h, int32 [K, blocks]
    KEYS_OUT,  # pointer to the row ids after this pass, int32 [L]
    VALS_OUT,  # pointer to their lookup ids, int32 [L]
    L,  # ids
    BLOCKS,  # programs
    SHIFT,  # the digit is (id >> SHIFT) & (K - 1)
    HAS_VALS: tl.constexpr,  # False on the first pass
    K: tl.constexpr,  # digit values, a power of two
    BLOCK: tl.constexpr,  # ids per program, a power of two
    LOG_BLOCK: tl.constexpr,  # log₂ BLOCK
):
    blk = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK)
    offs = blk.to(tl.int64) * BLOCK + offs_i
    valid = offs < L
    key = tl.load(KEYS + offs, mask=valid, other=0)
    if HAS_VALS:
        val = tl.load(VALS + offs, mask=valid, other=0)
    else:
        val = offs.to(tl.int32)
    # padding takes the last digit value; its positions come after every valid id of the block
    digit = tl.where(valid, (key >> SHIFT) & (K - 1), K - 1)
    packed = tl.sort(digit * BLOCK + offs_i)  # stable within the block: ties keep their position
    digit_sorted = packed >> LOG_BLOCK
    i_sorted = packed & (BLOCK - 1)
    h = tl.histogram(digit, K)
    first = tl.cumsum(h, axis=0) - h  # where each digit value's run starts in `packed`
    offs_k = tl.arange(0, K)
    start = tl.load(CUM + offs_k.to(tl.int64) * BLOCKS + blk) - tl.where(
        offs_k == K - 1, h - (BLOCK - tl.sum(valid.to(tl.int32), axis=0)), h)  # H − h: valid ids only
    slot = tl.gather(start, digit_sorted, 0) + offs_i - tl.gather(first, digit_sorted, 0)
    keep = offs_i < tl.sum(valid.to(tl.int32), axis=0)  # the sorted positions of valid ids
    tl.store(KEYS_OUT + slot, tl.gather(key, i_sorted, 0), mask=keep)
    tl.store(VALS_OUT + slot, tl.gather(val, i_sorted, 0), mask=keep)


def digit_plan(num_rows: int, max_digit_bits: int = MAX_DIGIT_BITS) -> tuple[int, int]:
    """(passes, bits per digit) that cover row ids below num_rows, as few passes as possible."""
    bits = max(1, (num_rows - 1).bit_length())
    passes = -(-bits // max_digit_bits)
    return passes, -(-bits // passes)


def sort_by_row(
    rows: torch.Tensor,  # row ids of the lookups, int32 or int64, any shape of L elements
    num_rows: int,  # T: every id is in [0, T)
    *,
    max_digit_bits: int = MAX_DIGIT_BITS,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids sorted, lookup ids ℓ in that order), both int32 [L]: stable, so equal rows keep
    ascending ℓ. Triton kernels on the rows' device (under the interpreter on CPU)."""
    keys = rows.reshape(-1).to(torch.int32).contiguous()
    L = keys.numel()
    if L >= 2**31 or num_rows > 2**31:
        raise ValueError(f"sort_by_row: {L} lookups of {num_rows} rows; ids must fit in int32")
    vals = torch.empty_like(keys)  # not read by the first pass
    if L == 0:
        return keys, vals
    passes, bits = digit_plan(num_rows, max_digit_bits)
    block = min(block, max(16, triton.next_power_of_2(L)))
    blocks = triton.cdiv(L, block)
    K = 1 << bits
    for p in range(passes):
        hist = torch.empty(K * blocks, dtype=torch.int32, device=keys.device)
        _digit_histogram_kernel[(blocks,)](keys, hist, L, blocks, p * bits, K=K, BLOCK=block)
        cum = torch.cumsum(hist, 0, dtype=torch.int32)
        keys_out, vals_out = torch.empty_like(keys), torch.empty_like(keys)
        _digit_scatter_kernel[(blocks,)](keys, vals, cum, keys_out, vals_out, L, blocks, p * bits,
                                         HAS_VALS=p > 0, K=K, BLOCK=block,
                                         LOG_BLOCK=block.bit_length() - 1, num_warps=4)
        keys, vals = keys_out, vals_out
    return keys, vals
