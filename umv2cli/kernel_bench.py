"""Speed of the memory layer on a CUDA device (issue 6): its kernels, one layer (or one MoE layer,
grouped GEMM against the loop over experts), and training.

Benchmarks, not tests: nothing here asserts. Every time is the median of
`triton.testing.do_bench` (warm-up and cache flushes included), and every speed is set against
something measured in the same process:

- the copy bandwidth of this device (read + write of a 1 GiB bf16 buffer), the roofline of a
  gather whose every byte is read once;
- the plain-PyTorch reference, `torch.compile` of it, and `F.embedding_bag` where it applies.

The lookup moves m·(D_p + D_v) table elements per token, so its forward's bandwidth is
``B·m·(D_p + D_v)·bytes / time``. Its backward also writes the dense table gradient,
``T·(D_p + D_v)`` elements, however few rows were read: with T ≫ B·m that write alone outweighs
the forward (`bwd_floor_over_fwd`: a zero-fill of the table's shape, over the forward).
"""

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

# (D_p, D_v, m, tokens B, table rows T): rows of 576 B to 2.3 KB in bf16, m 32-256 (issue 6)
LOOKUP_SHAPES = [
    (96, 192, 32, 16384, 10**6),
    (192, 192, 32, 16384, 10**6),
    (256, 768, 32, 16384, 10**6),
    (384, 768, 128, 16384, 10**6),
    (192, 192, 256, 16384, 10**6),
    (192, 192, 32, 262144, 10**6),
    (96, 192, 32, 65536, 10**8),
]


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn)


def copy_bandwidth(device: str = "cuda", elements: int = 2**29) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    a = torch.empty(elements, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = _bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def lookup_inputs(P: int, V: int, M: int, B: int, T: int, dtype=torch.bfloat16, C: int = 2, seed: int = 0):
    """x_p [B, D_p], table [T, D_p + D_v], rows [B, m] (uniform, one duplicate per token), scores [B, m, C]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_p = torch.randn(B, P, device="cuda", generator=g).to(dtype)
    table = torch.empty(T, P + V, device="cuda", dtype=dtype).normal_(0.0, 0.1, generator=g)  # no fp32 copy
    rows = torch.randint(0, T, (B, M), device="cuda", generator=g)
    rows[:, 1] = rows[:, 0]
    scores = torch.randn(B, M, C, device="cuda", generator=g).to(dtype)
    return x_p, table, rows, scores


def _forward_backward_ms(fn, x_p, table, rows, scores, do) -> float:
    leaves = [t.detach().requires_grad_(True) for t in (x_p, table, scores)]

    def step():
        for t in leaves:
            t.grad = None
        fn(leaves[0], leaves[1], rows, leaves[2]).backward(do)

    return _bench_ms(step)


def backward_parts_ms(x_p, table, rows, scores, do) -> dict:
    """The backward's pieces: K3 (token-major), the sort by row, and K4 with its zero-fill and sort."""
    from umv2cli.kernels.lookup import mem_bwd_tokens, mem_fwd
    from umv2cli.kernels.value_grad import sort_lookups_by_row, value_grad

    _, h = mem_fwd(x_p, table, rows, scores)  # act "none": z = h
    _, _, dz = mem_bwd_tokens(x_p, table, rows, scores, h, do)
    z, dz = (h, dz) if x_p.shape[1] else (None, None)
    return {
        "k3_ms": _bench_ms(lambda: mem_bwd_tokens(x_p, table, rows, scores, h, do)),
        "sort_ms": _bench_ms(lambda: sort_lookups_by_row(rows)),
        "k4_ms": _bench_ms(lambda: value_grad(x_p, rows, scores, z, dz, do, table.shape[0], out_dtype=table.dtype)),
        "zero_fill_ms": _bench_ms(lambda: torch.zeros_like(table)),  # the dense table gradient's floor
    }


def bench_lookup(shape: tuple, copy_bps: float) -> dict:
    """One shape of the value lookup: forward and forward+backward, Triton against references.
    Tables too big for their gradients and the references' copies get the forward alone."""
    from umv2cli.kernels.lookup import memory_lookup, memory_lookup_reference

    P, V, M, B, T = shape
    x_p, table, rows, scores = lookup_inputs(P, V, M, B, T)
    triton_fn = lambda *a: memory_lookup(*a, impl="triton")  # noqa: E731
    torch._dynamo.reset()  # a fresh compile cache per shape: past the recompile limit, dynamo runs eager
    compiled = torch.compile(memory_lookup_reference)
    row_bytes = (P + V) * table.element_size()
    gathered = B * M * row_bytes
    fwd = _bench_ms(lambda: triton_fn(x_p, table, rows, scores))
    ref = _bench_ms(lambda: memory_lookup_reference(x_p, table, rows, scores))
    comp = _bench_ms(lambda: compiled(x_p, table, rows, scores))
    bag = _bench_ms(lambda: F.embedding_bag(rows, table[:, P:], per_sample_weights=scores[..., 0], mode="sum"))
    row = {
        "row_bytes": row_bytes, "m": M, "tokens": B, "rows": T,
        "fwd_ms": fwd, "fwd_TBps": gathered / fwd / 1e9, "fwd_of_copy": gathered / (fwd * 1e-3) / copy_bps,
        "fwd_vs_torch": ref / fwd, "fwd_vs_compile": comp / fwd, "fwd_vs_embedding_bag": bag / fwd,
    }
    if 4 * table.numel() * table.element_size() > torch.cuda.mem_get_info()[0]:
        return row
    do = torch.randn(B, V, device="cuda", dtype=table.dtype)
    fb = _forward_backward_ms(triton_fn, x_p, table, rows, scores, do)
    fb_ref = _forward_backward_ms(memory_lookup_reference, x_p, table, rows, scores, do)
    fb_comp = _forward_backward_ms(compiled, x_p, table, rows, scores, do)
    parts = backward_parts_ms(x_p, table, rows, scores, do)
    return {**row, "fb_ms": fb, "bwd_over_fwd": (fb - fwd) / fwd,
            "bwd_floor_over_fwd": parts["zero_fill_ms"] / fwd, **parts,
            "fb_vs_torch": fb_ref / fb, "fb_vs_compile": fb_comp / fb}


def bench_kernels(shapes: list[tuple] = LOOKUP_SHAPES) -> dict:
    """The copy bandwidth, every lookup shape (shapes that do not fit in memory are skipped) and
    every selection shape."""
    copy_bps = copy_bandwidth()
    rows = []
    for shape in shapes:
        try:
            rows.append(bench_lookup(shape, copy_bps))
        except torch.OutOfMemoryError:
            rows.append({"shape": shape, "skipped": "out of memory"})
        torch.cuda.empty_cache()
    select = [bench_select(shape) for shape in SELECT_SHAPES]
    return {"device": torch.cuda.get_device_name(), "copy_TBps": copy_bps / 1e12, "lookup": rows, "select": select}


# (rank r, keys per side n, k_rc, m, tokens B), C = 2 cores: the 227M row (n 360, m 32) and denser ones
SELECT_SHAPES = [(2, 360, 32, 32, 16384), (2, 360, 64, 64, 16384), (2, 360, 128, 128, 16384), (2, 1024, 128, 256, 16384)]


def bench_select(shape: tuple) -> dict:
    """TDQKR selection (steps 4-6): forward and forward+backward, fused Triton against references."""
    from umv2cli.kernels.tdqkr import rank1_vectors, select_topm, select_topm_reference

    R, N, k_rc, M, B = shape
    s_row, s_col = torch.randn(2, B, R, N, device="cuda").unbind(0)
    cores = torch.rand(2, R, R, device="cuda")
    u, v = rank1_vectors(cores, torch.zeros(R, device="cuda"), torch.zeros(R, device="cuda"))
    torch._dynamo.reset()
    paths = {"triton": lambda *a: select_topm(*a, impl="triton"), "torch": select_topm_reference,
             "compile": torch.compile(select_topm_reference)}
    row = {"r": R, "n": N, "k_rc": k_rc, "m": M, "tokens": B}
    for name, fn in paths.items():
        leaves = [t.detach().requires_grad_(True) for t in (s_row, s_col, cores)]

        def fb():
            for t in leaves:
                t.grad = None
            fn(*leaves, u, v, k_rc, M)[2].float().square().sum().backward()

        row[f"fwd_ms_{name}"] = _bench_ms(lambda: fn(s_row, s_col, cores, u, v, k_rc, M))
        row[f"fb_ms_{name}"] = _bench_ms(fb)
    for name in ("torch", "compile"):
        row[f"fwd_vs_{name}"] = row[f"fwd_ms_{name}"] / row["fwd_ms_triton"]
        row[f"fb_vs_{name}"] = row[f"fb_ms_{name}"] / row["fb_ms_triton"]
    return row


# ------------------------------------------------------------------------------------------------
# One UltraMemV2 layer and whole training steps, with the Triton path against the reference


def _with_kernels(cfg, kernels: str):
    return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, kernels=kernels))


def _with_experts(cfg, experts: str):
    return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, experts=experts))


def path_and_reference(cfg) -> dict:
    """The two configs of `cfg` that `training_curves` and `bench_moe_layer` set side by side, the
    fast path first: the Triton kernels and the references (UltraMemV2), one grouped GEMM per
    projection and the loop over experts (MoE)."""
    from umv2cli.config import MoEConfig, UltraMemV2Config
    from umv2cli.errors import UserError

    if isinstance(cfg.sparse, MoEConfig):
        return {"grouped": _with_experts(cfg, "grouped"), "loop": _with_experts(cfg, "loop")}
    if isinstance(cfg.sparse, UltraMemV2Config):
        return {"triton": _with_kernels(cfg, "triton"), "torch": _with_kernels(cfg, "torch")}
    raise UserError(f"preset: sparse kind {cfg.sparse.kind if cfg.sparse else None!r} has one path; "
                    "use an UltraMemV2 or MoE preset")


def one_memory_layer(preset: str, kernels: str) -> torch.nn.Module:
    """The first UltraMemV2 layer of a one-block copy of `preset`, on CUDA, fp32 weights."""
    from umv2cli.model.presets import get_preset
    from umv2cli.model.transformer import build_model
    from umv2cli.model.ultramemv2 import UltraMemV2

    cfg = dataclasses.replace(_with_kernels(get_preset(preset), kernels), n_layers=1)
    model = build_model(cfg, device="cuda")
    return next(m for m in model.modules() if isinstance(m, UltraMemV2))


def bench_layer(preset: str = "ultramemv2-227m", tokens: int = 16384) -> list[dict]:
    """Forward and forward+backward of one memory layer under bf16 autocast, per path."""
    rows = []
    for name in ("triton", "torch", "torch+compile"):
        layer = one_memory_layer(preset, "triton" if name == "triton" else "torch")
        fn = torch.compile(layer) if name.endswith("compile") else layer
        u = torch.randn(1, tokens, layer.w_q.in_features, device="cuda", requires_grad=True)

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(u)[0]

        def forward_backward():
            layer.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()

        rows.append({"path": name, "tokens": tokens, "fwd_ms": _bench_ms(forward), "fb_ms": _bench_ms(forward_backward)})
        del layer, fn
        torch.cuda.empty_cache()
    base = next(r for r in rows if r["path"] == "triton")
    for r in rows:
        r["fb_vs_triton"] = r["fb_ms"] / base["fb_ms"]
    return rows


def bench_moe_layer(preset: str = "olmoe-227m", tokens: int = 16384) -> list[dict]:
    """One MoE layer of `preset` on CUDA, fp32 weights, per path (grouped GEMM, loop): forward and
    forward+backward under bf16 autocast; the relative L2 difference of the output and of the
    gradients (the largest over the input and every parameter) from the loop's, in fp32 and under
    bf16 autocast (the same weights, inputs and routing, so this checks the grouped kernel against
    the loop on the device itself); and whether two forward+backward passes give bit-identical
    output and gradients."""
    from umv2cli.model.moe import MoE
    from umv2cli.model.presets import get_preset
    from umv2cli.model.transformer import build_model

    layers = {name: next(m for m in build_model(dataclasses.replace(cfg, n_layers=1), device="cuda").modules()
                         if isinstance(m, MoE))
              for name, cfg in path_and_reference(get_preset(preset)).items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(1, tokens, layers["loop"].router.w_EH.shape[1], device="cuda", generator=g)
    dy = torch.randn(u.shape, device="cuda", generator=g)

    def output_and_grads(layer, bf16: bool) -> list[torch.Tensor]:
        u_in = u.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y, aux = layer(u_in)
        ((y.float() * dy).sum() + aux).backward()
        return [y.detach().float(), u_in.grad, *(p.grad for p in layer.parameters())]

    def differences(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
        rel = [((a - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]
        return rel[0], max(rel[1:])

    loop = {bf16: output_and_grads(layers["loop"], bf16) for bf16 in (False, True)}
    rows = []
    for name, layer in layers.items():
        fp32_out, fp32_grad = differences(output_and_grads(layer, False), loop[False])
        got = output_and_grads(layer, True)
        bf16_out, bf16_grad = differences(got, loop[True])

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return layer(u)[0]

        def forward_backward():
            layer.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()

        rows.append({"path": name, "tokens": tokens, "fwd_ms": _bench_ms(forward), "fb_ms": _bench_ms(forward_backward),
                     "fp32_out_vs_loop": fp32_out, "fp32_grad_vs_loop": fp32_grad,
                     "bf16_out_vs_loop": bf16_out, "bf16_grad_vs_loop": bf16_grad,
                     "deterministic": all(torch.equal(a, b) for a, b in zip(got, output_and_grads(layer, True)))})
    for r in rows:
        r["fb_vs_grouped"] = r["fb_ms"] / rows[0]["fb_ms"]
    return rows


def train_models(preset: str = "ultramemv2-227m") -> dict:
    """The models `bench train` compares, at the activated parameters of `preset`."""
    from umv2cli.model.accounting import account
    from umv2cli.model.presets import get_preset
    from umv2cli.sweeps.plan import hold_match

    memory, moe = get_preset(preset), get_preset("olmoe-227m")
    dense, _ = hold_match(dataclasses.replace(memory, sparse=None), account(memory), "iso-activated")
    return {
        f"{preset} (Triton)": _with_kernels(memory, "triton"),
        f"{preset} (reference)": _with_kernels(memory, "torch"),
        "olmoe-227m (MoE 8/64, grouped GEMM)": _with_experts(moe, "grouped"),
        "olmoe-227m (MoE 8/64, loop over experts)": _with_experts(moe, "loop"),
        "dense (iso-activated)": dense,
    }


def train_tokens_per_s(cfg, batch_size: int, seq_len: int, steps: int, warmup: int = 3) -> float:
    """Median tokens/s of bare AdamW training steps under bf16 autocast, fp32 weights."""
    from umv2cli.model.transformer import build_model

    model = build_model(cfg, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device="cuda")
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, aux = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()) + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch_size * seq_len / statistics.median(times[warmup:])


def bench_train(preset: str = "ultramemv2-227m", batch_size: int = 8, seq_len: int = 2048, steps: int = 10) -> list[dict]:
    """Training tokens/s of the memory model, MoE and dense at equal activated parameters."""
    from umv2cli.model.accounting import account

    rows = []
    for name, cfg in train_models(preset).items():
        tps = train_tokens_per_s(cfg, batch_size, seq_len, steps)
        rows.append({"model": name, "activated_params": account(cfg).activated_params, "tokens_per_s": tps})
        torch.cuda.empty_cache()
    return rows


def training_curves(preset: str = "tiny-ultramemv2", steps: int = 300, batch_size: int = 32, seq_len: int = 128,
                    lr: float = 3e-3, seed: int = 0) -> dict:
    """Loss curves of one model trained on its fast path and on its reference (`path_and_reference`:
    Triton kernels or references for UltraMemV2, grouped GEMMs or the loop for MoE), on CUDA under
    bf16 autocast: same init, same batches (bytes of umv2's own sources), AdamW, rank-1 refresh
    every step. A check that the paths agree within bf16 tolerance, not a speed."""
    from pathlib import Path

    from umv2cli.model.presets import get_preset
    from umv2cli.model.transformer import build_model

    sources = sorted(Path(__file__).parent.rglob("*.py"))
    text_N = torch.tensor(list(b"".join(p.read_bytes() for p in sources)), device="cuda")
    curves = {}
    for path, cfg in path_and_reference(get_preset(preset)).items():
        model = build_model(cfg, seed=seed, device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        batches = torch.Generator(device="cuda").manual_seed(seed)
        curves[path] = []
        for _ in range(steps):
            start_B = torch.randint(0, len(text_N) - seq_len - 1, (batch_size,), device="cuda", generator=batches)
            window_BT = text_N[start_B[:, None] + torch.arange(seq_len + 1, device="cuda")]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, aux = model(window_BT[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), window_BT[:, 1:].flatten()) + aux
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.refresh_rank1()
            curves[path].append(loss.item())
    gap = [abs(a - b) for a, b in zip(*curves.values())]
    return {"preset": preset, "steps": steps, "paths": list(curves), "curves": curves, "max_abs_gap": max(gap),
            "final": {k: statistics.mean(v[-20:]) for k, v in curves.items()}}
