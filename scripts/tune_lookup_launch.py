"""Launch configurations of the lookup kernels (lookups per tile × warps) against the raw gather
(`index_select`) and a read-only roofline (each token sums its m rows: the forward's reads with
no arithmetic), and a torch.profiler table of one ultramemv2-227m layer's forward+backward, on
one CUDA device; the measurements behind `kernels/rows.py`'s NUM_WARPS and TILE_ELEMENTS.
Usage: OUT=DIR python scripts/tune_lookup_launch.py (writes DIR/tune.json after each part; on a
machine without CUDA, under TRITON_INTERPRET=1, it runs one tiny shape untimed, as a dry run).
"""
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import umv2cli  # noqa: E402

umv2cli.__path__.append(str(ROOT))  # a bare checkout: kernels/ as umv2cli.kernels (see bench_speed.py)
from umv2cli.kernels.lookup import _mem_bwd_x_kernel, _mem_fwd_kernel, mem_fwd  # noqa: E402
from umv2cli.kernels.rows import launch_dims  # noqa: E402
from umv2cli.kernels.value_grad import mem_bwd_rows, sort_by_row  # noqa: E402

CPU = not torch.cuda.is_available()
DEVICE = "cpu" if CPU else "cuda"
OUT = Path(os.environ.get("OUT", "/tmp"))
# (D_p, D_v, m, tokens B, table rows T): ultramemv2-227m's home table, then 576 B rows over 10⁶
SHAPES = [(16, 32, 4, 8, 50)] if CPU else [(192, 192, 32, 16384, 129600), (96, 192, 32, 16384, 10**6)]
# (lookups per tile, warps) of the forward and the x_p pass
CONFIGS = [(4, 1), (8, 2)] if CPU else [(4, 1), (8, 1), (16, 1), (32, 1), (8, 2), (32, 2), (16, 4), (32, 8)]
results = {}


@triton.jit
def _read_rows_kernel(TABLE, ROWS, O, M, D, TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Roofline of the forward's reads: token t sums its m whole rows [D] and writes the sum."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, M, TILE):
        offs_j = j0 + tl.arange(0, TILE)
        row = tl.load(ROWS + t * M + offs_j, mask=offs_j < M, other=0).to(tl.int64)
        acc += tl.sum(tl.load(TABLE + row[:, None] * D + offs_d[None, :],
                              mask=(offs_j < M)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32), axis=0)
    tl.store(O + t * D + offs_d, acc.to(O.dtype.element_ty), mask=offs_d < D)


def save():
    (OUT / "tune.json").write_text(json.dumps(results, indent=1))


def bench(fn) -> float:
    """Milliseconds of fn (triton's do_bench, short); on CPU one untimed call."""
    if CPU:
        fn()
        return 0.0
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40)


def profile_one_layer() -> str:
    """torch.profiler's table of 5 forward+backward passes of one ultramemv2-227m layer, 16k
    tokens, bf16 autocast, after 3 warm-up passes."""
    from torch.profiler import ProfilerActivity, profile

    from umv2cli.kernel_bench import one_memory_layer

    layer = one_memory_layer("ultramemv2-227m", "triton")
    u = torch.randn(1, 16384, 768, device="cuda", requires_grad=True)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(u)[0]
        y.float().square().mean().backward()

    for _ in range(3):
        forward_backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            forward_backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)


def sweep(row: dict, kernel: str, configs, launch) -> None:
    """row["<kernel> T<tile> w<warps>"] = ms of launch(tile, warps), or the error it raised."""
    for tile, warps in configs:
        try:
            row[f"{kernel} T{tile} w{warps}"] = bench(lambda: launch(tile, warps))
        except Exception as e:  # noqa: BLE001 (a configuration that does not compile: note it, go on)
            row[f"{kernel} T{tile} w{warps}"] = repr(e)[:200]


def tune_shape(row: dict, P: int, V: int, M: int, B: int, T: int) -> None:
    """The raw gather and the three lookup kernels of one shape at every configuration (C = 2)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, P, device=DEVICE, generator=g).bfloat16()
    table = torch.randn(T, P + V, device=DEVICE, generator=g).bfloat16()
    rows = torch.randint(0, T, (B, M), device=DEVICE, generator=g)
    s = torch.randn(B, M, 2, device=DEVICE, generator=g).bfloat16()
    row["index_select_ms"] = bench(lambda: table.index_select(0, rows.flatten()))
    row["gather_bytes"] = B * M * (P + V) * 2
    sums = torch.empty(B, P + V, device=DEVICE, dtype=torch.bfloat16)
    sweep(row, "read-only", CONFIGS, lambda tile, warps: _read_rows_kernel[(B,)](
        table, rows, sums, M, P + V, TILE=tile, BLOCK_D=triton.next_power_of_2(P + V), num_warps=warps))
    row["rows_int32_fwd_ms"] = bench(lambda: mem_fwd(x, table, rows.int(), s))
    row["default_fwd_ms"] = bench(lambda: mem_fwd(x, table, rows, s))
    dims = launch_dims(2, P, V)
    row["default_dims"] = {k: dims[k] for k in ("TILE", "num_warps")}

    o = torch.empty(B, V, device=DEVICE, dtype=torch.bfloat16)
    h = torch.empty(B, M, device=DEVICE)
    sweep(row, "fwd", CONFIGS, lambda tile, warps: _mem_fwd_kernel[(B,)](
        x, table, rows, s, o, h, M, **dict(dims, TILE=tile, num_warps=warps), GELU=False))
    save()

    _, h = mem_fwd(x, table, rows, s)
    sorted_L, order_L = sort_by_row(rows, T)
    do = torch.randn(B, V, device=DEVICE, generator=g).bfloat16()
    grad = torch.zeros(T, P + V, device=DEVICE)
    row["k34_ms"] = bench(lambda: mem_bwd_rows(table, sorted_L, order_L, s, h, x, do, grad))  # no launch knobs
    _, dz = mem_bwd_rows(table, sorted_L, order_L, s, h, x, do, grad)
    save()

    dx = torch.empty_like(x)
    sweep(row, "dx", CONFIGS, lambda tile, warps: _mem_bwd_x_kernel[(B,)](
        table, rows, dz, dx, M, P, V, BLOCK_P=max(16, triton.next_power_of_2(P)), TILE=tile, num_warps=warps))
    save()


if not CPU:
    try:
        results["profile"] = profile_one_layer()
    except Exception:  # noqa: BLE001 (a measurement: keep the others)
        results["profile_error"] = traceback.format_exc()[-1500:]
    save()
for P, V, M, B, T in SHAPES:
    row = results[f"{P}+{V} m{M} B{B} T{T}"] = {}
    try:
        tune_shape(row, P, V, M, B, T)
    except Exception:  # noqa: BLE001
        row["error"] = traceback.format_exc()[-1500:]
    save()
    if not CPU:
        torch.cuda.empty_cache()
print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))
print(results.get("profile", ""))
