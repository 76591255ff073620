"""What the lookup kernels cost an H100 before they run: registers and spills per thread, shared
memory, PTX instructions (barriers, vector loads), and the programs that fit on one SM, for each
launch configuration (lookups per tile × warps). Triton compiles each kernel for sm_90a and ptxas
(shipped with Triton) allocates its registers, so this runs on a machine without a GPU; it
specializes the integer arguments as Triton's launcher does (divisible by 16 or not).
Usage: python scripts/kernel_resources.py [--json FILE]

It explains timings, it does not replace them: a kernel at 255 registers holds two programs of 4
warps per SM, and latency it cannot hide shows up only on the device (BENCHMARKS.md).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import umv2cli  # noqa: E402

umv2cli.__path__.append(str(ROOT))  # a bare checkout: kernels/ as umv2cli.kernels (see bench_speed.py)
from umv2cli.kernels.lookup import _mem_bwd_x_kernel, _mem_fwd_kernel  # noqa: E402
from umv2cli.kernels.rows import launch_dims  # noqa: E402
from umv2cli.kernels.value_grad import CHUNK, _add_chunks_kernel, _mem_bwd_rows_kernel, rows_launch_dims  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SM_REGISTERS, SM_SHARED, SM_WARPS, SM_PROGRAMS = 65536, 233472, 64, 32  # per SM of an H100
# pointer arguments and their element types (bf16 rows, scores and activations; fp32 gradient and h)
POINTERS = {"TABLE": "bf16", "X_P": "bf16", "S": "bf16", "O": "bf16", "DO": "bf16", "DS": "bf16", "DX_P": "bf16",
            "H": "fp32", "GRAD": "fp32", "DZ": "fp32", "PART": "fp32", "ROWS": "i64", "ROW_PTR": "i32", "ORDER": "i32",
            "EXTRA_END": "i32", "EXTRA_ROW": "i32"}
# (D_p, D_v, m): the ultramemv2-227m layer's rows (768 B), and 576 B rows
SHAPES = [(192, 192, 32), (96, 192, 32)]
CONFIGS = [(4, 1), (8, 1), (32, 1), (16, 4)]  # (lookups per tile, warps); 16 at 4 warps: before run 5


def compile_for_h100(kernel, ints: dict, constexprs: dict, num_warps: int):
    """The kernel compiled for sm_90a with these integer arguments' specialization."""
    signature, divisible = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{POINTERS[name]}" if name in POINTERS else "i32"
        if name in POINTERS or ints[name] % 16 == 0:  # torch's allocations are 16-byte aligned
            divisible[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=divisible)
    return triton.compile(source, target=H100, options={"num_warps": num_warps})


def resources(compiled, num_warps: int, tile: int) -> dict:
    """Registers, spills (ptxas -v), shared memory, instruction counts and programs per SM."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    os.unlink(f.name)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    shared = compiled.metadata.shared
    per_warp = -(-registers * 32 // 256) * 256  # registers are given to a warp 256 at a time
    programs = min(SM_PROGRAMS, SM_WARPS // num_warps, SM_REGISTERS // (per_warp * num_warps),
                   SM_SHARED // (shared + 1024) if shared else SM_PROGRAMS)
    ptx = compiled.asm["ptx"]
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": shared,
            "ptx_lines": len(ptx.splitlines()), "barriers": ptx.count("bar.sync"),
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx)),
            "programs_per_sm": programs, "warps_per_sm": programs * num_warps, "lookups_per_sm": programs * tile}


def kernel_rows(P: int, V: int, M: int, C: int = 2) -> list[dict]:
    dims = launch_dims(C, P, V)
    ints = {"D_P": P, "D_V": V, "W": dims["W"], "C": C, "M": M, "T": 10**6, "D": P + V}
    blocks = {k: dims[k] for k in ("HAS_P", "BLOCK_P", "BLOCK_C", "BLOCK_W")}
    warps = rows_launch_dims(C, P, V)["num_warps"]
    launches = [("row-major backward (K34)", 1, warps, _mem_bwd_rows_kernel, dict(blocks, GELU=False, CHUNK=CHUNK)),
                ("K34's further chunks", 1, warps, _add_chunks_kernel,
                 {"CHUNK": CHUNK, "BLOCK_D": triton.next_power_of_2(P + V)})]
    for tile, warps in CONFIGS:
        launches += [("forward (K2)", tile, warps, _mem_fwd_kernel, dict(blocks, GELU=False, TILE=tile)),
                     ("x_p pass", tile, warps, _mem_bwd_x_kernel, {"BLOCK_P": dims["BLOCK_P"], "TILE": tile})]
    rows = []
    for name, tile, warps, kernel, constexprs in launches:
        row = {"kernel": name, "row_bytes": 2 * (P + V), "tile": tile, "warps": warps}
        row.update(resources(compile_for_h100(kernel, ints, constexprs, warps), warps, tile))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r[k]) for k in keys) for r in sorted(rows, key=lambda r: (r["kernel"], r["row_bytes"]))]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [r for shape in SHAPES for r in kernel_rows(*shape)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
