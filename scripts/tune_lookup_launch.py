"""Launch configurations of the lookup kernels (lookups per tile × warps) against the raw gather
(`index_select`), and a torch.profiler table of one ultramemv2-227m layer's forward+backward, on
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

import umv2cli  # noqa: E402

umv2cli.__path__.append(str(ROOT))  # a bare checkout: kernels/ as umv2cli.kernels (see bench_speed.py)
from umv2cli.kernels.lookup import _mem_bwd_x_kernel, _mem_fwd_kernel, mem_fwd  # noqa: E402
from umv2cli.kernels.value_grad import _mem_bwd_rows_kernel, sort_by_row  # noqa: E402
from umv2cli.kernels.rows import launch_dims  # noqa: E402

CPU = not torch.cuda.is_available()
dev = "cpu" if CPU else "cuda"
OUT = Path(os.environ.get("OUT", "/tmp"))
res = {}


def save():
    (OUT / "tune.json").write_text(json.dumps(res, indent=1))


def bench(fn) -> float:
    """Milliseconds of fn (triton's do_bench, short); on CPU one untimed call."""
    if CPU:
        fn()
        return 0.0
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40)


SHAPES = [(192, 192, 32, 16384, 129600), (96, 192, 32, 16384, 10**6)] if not CPU else [(16, 32, 4, 8, 50)]
CFG = [(4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8)] if not CPU else [(4, 2), (8, 4)]
# profile of one ultramemv2-227m layer, fwd+bwd, 16k tokens, bf16 autocast
if not CPU:
    try:
        from umv2cli.kernel_bench import one_memory_layer
        layer = one_memory_layer("ultramemv2-227m", "triton")
        u = torch.randn(1, 16384, 768, device="cuda", requires_grad=True)
        def fb():
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(u)[0]
            y.float().square().mean().backward()
        for _ in range(3): fb()
        torch.cuda.synchronize()
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fb()
            torch.cuda.synchronize()
        res["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    except Exception:
        res["profile_error"] = traceback.format_exc()[-1500:]
    save()
for P, V, M, B, T in SHAPES:
    key = f"{P}+{V} m{M} B{B} T{T}"; r = res[key] = {}
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, P, device=dev, generator=g).bfloat16()
    table = torch.randn(T, P + V, device=dev, generator=g).bfloat16()
    rows = torch.randint(0, T, (B, M), device=dev, generator=g)
    s = torch.randn(B, M, 2, device=dev, generator=g).bfloat16()
    gathered = B * M * (P + V) * 2
    try:
        r["index_select_ms"] = bench(lambda: table.index_select(0, rows.flatten()))
        r["gather_bytes"] = gathered
        r["rows_int32_fwd_ms"] = bench(lambda: mem_fwd(x, table, rows.int(), s))
        r["default_fwd_ms"] = bench(lambda: mem_fwd(x, table, rows, s))
        d = launch_dims(2, P, V); r["default_dims"] = {k: d[k] for k in ("TILE", "num_warps")}
        o = torch.empty(B, V, device=dev, dtype=torch.bfloat16); h = torch.empty(B, M, device=dev)
        for tile, warps in CFG:
            dd = dict(d, TILE=tile, num_warps=warps)
            try:
                r[f"fwd T{tile} w{warps}"] = bench(lambda: _mem_fwd_kernel[(B,)](x, table, rows, s, o, h, M, **dd, GELU=False))
            except Exception as e: r[f"fwd T{tile} w{warps}"] = repr(e)[:200]
        save()
        _, hh = mem_fwd(x, table, rows, s)
        srt, order = sort_by_row(rows, T)
        do = torch.randn(B, V, device=dev, generator=g).bfloat16()
        grad = torch.zeros(T, P + V, device=dev); ds = torch.empty_like(s); dz = torch.empty(B, M, device=dev)
        d2 = launch_dims(2, P, V); r["default_k34_dims"] = {k: d2[k] for k in ("TILE", "num_warps")}
        for tile, warps in CFG:
            dd = dict(d2, TILE=tile, num_warps=warps)
            try:
                r[f"k34 T{tile} w{warps}"] = bench(lambda: _mem_bwd_rows_kernel[(triton.cdiv(B * M, tile),)](
                    table, srt, order, s, hh, x, do, grad, ds, dz, B * M, M, **dd, GELU=False))
            except Exception as e: r[f"k34 T{tile} w{warps}"] = repr(e)[:200]
        save()
        dx = torch.empty_like(x)
        for tile, warps in CFG[1::2]:
            try:
                r[f"dx T{tile} w{warps}"] = bench(lambda: _mem_bwd_x_kernel[(B,)](table, rows, dz, dx, M, P, V,
                                                  BLOCK_P=max(16, triton.next_power_of_2(P)), TILE=tile, num_warps=warps))
            except Exception as e: r[f"dx T{tile} w{warps}"] = repr(e)[:200]
        save()
    except Exception:
        r["error"] = traceback.format_exc()[-1500:]; save()
    if not CPU: torch.cuda.empty_cache()

print(json.dumps({k: v for k, v in res.items() if k != "profile"}, indent=1)); print(res.get("profile", ""))
