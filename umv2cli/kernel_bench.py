"""Speed of the memory layer on a CUDA device: its kernels, one layer (or one MoE layer, grouped GEMM
against the loop over experts), training, loss curves.

Benchmarks, not tests: nothing here asserts. Every time is `triton.testing.do_bench` (warm-up and
cache flushes included), and every speed is set against something measured in the same process:

- the copy bandwidth of this device (read + write of a 1 GiB bf16 buffer), the roofline of a
  gather whose every byte is read once;
- the plain-PyTorch reference, `torch.compile` of it, and `F.embedding_bag` where it applies.

The lookup moves m·(D_p + D_v) table elements per token, so its forward's bandwidth is
``B·m·(D_p + D_v)·bytes / time``. Its backward writes every row of the fp32 table gradient
(zeros where untouched), so with T ≫ B·m it is bounded below by one write of the gradient:
`zero_fill_ms`, a memset of the same buffer, is reported beside it as that floor.

`run_all` runs every section in one process and writes results.json and results.txt into a
folder after each section, so a run cut short keeps what it measured; `done_when` sets the
results against the goals of issue 15.
"""

import dataclasses
import json
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

# (D_p, D_v, m, tokens B, table rows T, crowd): rows of 576 B to 2.3 KB in bf16, m 32-256 (issue 6);
# crowd: how many of each token's lookups read one of POPULAR_ROWS rows (the rest are uniform)
LOOKUP_SHAPES = [
    (96, 192, 32, 16384, 10**6, 0),
    (192, 192, 32, 16384, 10**6, 0),
    (256, 768, 32, 16384, 10**6, 0),
    (384, 768, 128, 16384, 10**6, 0),
    (192, 192, 256, 16384, 10**6, 0),
    (192, 192, 32, 262144, 10**6, 0),
    (96, 192, 32, 65536, 10**8, 0),
    (192, 192, 32, 16384, 129600, 8),  # ultramemv2-227m's table, a quarter of the lookups on 32 rows
]
POPULAR_ROWS = 32
# (rank r, keys per side n, k_rc, m, tokens B), C = 2 cores: the 227M row (n 360, m 32) and denser ones
SELECT_SHAPES = [(2, 360, 32, 32, 16384), (2, 360, 64, 64, 16384), (2, 360, 128, 128, 16384), (2, 1024, 128, 256, 16384)]


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn)


def _host_ms(fn, calls: int = 20) -> float:
    """Host time to issue one call (no synchronization inside): above the GPU time, the call is
    bound by its launches."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return 1e3 * host


def copy_bandwidth(device: str = "cuda", elements: int = 2**29) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    a = torch.empty(elements, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = _bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


# ------------------------------------------------------------------------------------------------
# the value lookup and the selection


def lookup_inputs(P: int, V: int, M: int, B: int, T: int, crowd: int = 0, dtype=torch.bfloat16, C: int = 2,
                  seed: int = 0):
    """x_p [B, D_p], table [T, D_p + D_v], rows [B, m] (uniform, one duplicate per token, the next
    `crowd` of each token among POPULAR_ROWS rows), scores [B, m, C]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_p = torch.randn(B, P, device="cuda", generator=g).to(dtype)
    table = torch.empty(T, P + V, device="cuda", dtype=dtype).normal_(0.0, 0.1, generator=g)  # no fp32 copy
    rows = torch.randint(0, T, (B, M), device="cuda", generator=g)
    rows[:, 1] = rows[:, 0]
    rows[:, 2 : 2 + crowd] = torch.randint(0, POPULAR_ROWS, (B, crowd), device="cuda", generator=g)
    scores = torch.randn(B, M, C, device="cuda", generator=g).to(dtype)
    return x_p, table, rows, scores


def backward_parts_ms(x_p, table, rows, scores, do) -> dict:
    """The model's backward (bf16 rows read, an fp32 gradient), whole and in parts: the sort by
    row, K34, the x_p pass; and a memset of the gradient, the floor of K34's writes."""
    from umv2cli.kernels.lookup import mem_bwd, mem_bwd_x, mem_fwd
    from umv2cli.kernels.value_grad import mem_bwd_rows, sort_by_row

    T, D = table.shape
    _, h = mem_fwd(x_p, table, rows, scores)  # act "none"
    grad = torch.empty(T, D, dtype=torch.float32, device="cuda")  # K34 writes every row
    sorted_L, order_L = sort_by_row(rows, T)
    _, dz = mem_bwd_rows(table, sorted_L, order_L, scores, h, x_p, do, grad)
    dx = torch.empty_like(x_p)

    parts = {
        "bwd_ms": _bench_ms(lambda: mem_bwd(x_p, table, rows, scores, h, do)),
        "sort_ms": _bench_ms(lambda: sort_by_row(rows, T)),
        "k34_ms": _bench_ms(lambda: mem_bwd_rows(table, sorted_L, order_L, scores, h, x_p, do, grad)),
        "zero_fill_ms": _bench_ms(lambda: grad.zero_()),
    }
    if x_p.shape[1]:
        parts["dx_ms"] = _bench_ms(lambda: mem_bwd_x(table, rows, dz, dx))
    return parts


def bench_lookup(shape: tuple, copy_bps: float) -> dict:
    """One shape of the value lookup, bf16 rows: forward against the copy bandwidth and the
    references; the backward (with an fp32 gradient, as the model's) over the forward. Tables too
    big for a gradient get the forward alone."""
    from umv2cli.kernels.lookup import memory_lookup, memory_lookup_reference

    P, V, M, B, T, crowd = shape
    x_p, table, rows, scores = lookup_inputs(P, V, M, B, T, crowd)
    row_bytes = (P + V) * table.element_size()
    gathered = B * M * row_bytes
    fwd = _bench_ms(lambda: memory_lookup(x_p, table, rows, scores, impl="triton"))
    ref = _bench_ms(lambda: memory_lookup_reference(x_p, table, rows, scores))
    bag = _bench_ms(lambda: F.embedding_bag(rows, table[:, P:], per_sample_weights=scores[..., 0], mode="sum"))
    row = {
        "row_bytes": row_bytes, "D_p": P, "D_v": V, "m": M, "tokens": B, "rows": T, "crowd": crowd,
        "fwd_ms": fwd, "fwd_TBps": gathered / fwd / 1e9, "fwd_of_copy": gathered / (fwd * 1e-3) / copy_bps,
        "fwd_vs_torch": ref / fwd, "fwd_vs_embedding_bag": bag / fwd,
    }
    if 10 * table.numel() * table.element_size() > torch.cuda.mem_get_info()[0]:
        return row
    do = torch.randn(B, V, device="cuda", dtype=table.dtype)
    parts = backward_parts_ms(x_p, table, rows, scores, do)
    return {**row, **parts, "bwd_over_fwd": parts["bwd_ms"] / fwd, "zero_fill_over_fwd": parts["zero_fill_ms"] / fwd}


def bench_select(shape: tuple, with_compile: bool = True) -> dict:
    """TDQKR selection (steps 4-6): forward and forward+backward, fused Triton against references;
    and the host time to issue the Triton forward+backward (launch-bound where above its GPU time)."""
    from umv2cli.kernels.tdqkr import rank1_vectors, select_topm, select_topm_reference

    R, N, k_rc, M, B = shape
    s_row, s_col = torch.randn(2, B, R, N, device="cuda").unbind(0)
    cores = torch.rand(2, R, R, device="cuda")
    u, v = rank1_vectors(cores, torch.zeros(R, device="cuda"), torch.zeros(R, device="cuda"))
    torch._dynamo.reset()
    paths = {"triton": lambda *a: select_topm(*a, impl="triton"), "torch": select_topm_reference}
    if with_compile:
        paths["compile"] = torch.compile(select_topm_reference)
    row = {"r": R, "n": N, "k_rc": k_rc, "m": M, "tokens": B}
    for name, fn in paths.items():
        leaves = [t.detach().requires_grad_(True) for t in (s_row, s_col, cores)]

        def fb():
            for t in leaves:
                t.grad = None
            fn(*leaves, u, v, k_rc, M)[2].float().square().sum().backward()

        row[f"fwd_ms_{name}"] = _bench_ms(lambda: fn(s_row, s_col, cores, u, v, k_rc, M))
        row[f"fb_ms_{name}"] = _bench_ms(fb)
        if name == "triton":
            row["fb_host_ms_triton"] = _host_ms(fb)
    for name in paths.keys() - {"triton"}:
        row[f"fwd_vs_{name}"] = row[f"fwd_ms_{name}"] / row["fwd_ms_triton"]
        row[f"fb_vs_{name}"] = row[f"fb_ms_{name}"] / row["fb_ms_triton"]
    return row


def bench_kernels(shapes: list[tuple] = LOOKUP_SHAPES, select_shapes: list[tuple] = SELECT_SHAPES) -> dict:
    """The copy bandwidth, every lookup shape (shapes that do not fit in memory are skipped) and
    every selection shape."""
    copy_bps = copy_bandwidth()
    rows = []
    for shape in shapes:
        try:
            rows.append(bench_lookup(shape, copy_bps))
        except torch.OutOfMemoryError:
            rows.append({"shape": shape, "skipped": "out of memory"})
        except Exception as e:  # noqa: BLE001 (a benchmark: report it, measure the other shapes)
            rows.append({"shape": shape, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()
    select = [bench_select(shape) for shape in select_shapes]
    return {"device": torch.cuda.get_device_name(), "copy_TBps": copy_bps / 1e12, "lookup": rows, "select": select}


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


# kernels + how the layer runs: eagerly or under torch.compile. (No CUDA-graph path: the layer's
# host time is below its GPU time, and mode "reduce-overhead" overwrote a tensor the backward saved.)
LAYER_PATHS = ("triton", "triton+compile", "torch", "torch+compile")


def autocast_steps(layer: torch.nn.Module, fn, u: torch.Tensor):
    """The two steps timed of a layer under bf16 autocast: `fn(u)` (the layer, or its
    torch.compile) forward, and forward+backward of a mean-square loss from cleared gradients."""

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(u)[0]

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        forward().float().square().mean().backward()

    return forward, forward_backward


def layer_path_ms(preset: str, tokens: int, name: str) -> dict:
    """One path of `bench_layer` (kernels, then "+compile" or nothing): its forward and
    forward+backward times, or the error it raised. The layer is freed on return."""
    kernels, _, how = name.partition("+")
    layer = one_memory_layer(preset, kernels)
    torch._dynamo.reset()
    fn = torch.compile(layer) if how else layer
    u = torch.randn(1, tokens, layer.w_q.in_features, device="cuda", requires_grad=True)
    forward, forward_backward = autocast_steps(layer, fn, u)
    try:
        forward_backward()  # compiles, where it does
        return {"path": name, "tokens": tokens, "fwd_ms": _bench_ms(forward),
                "fb_ms": _bench_ms(forward_backward), "fb_host_ms": _host_ms(forward_backward)}
    except Exception as e:  # noqa: BLE001 (a benchmark: report it, measure the other paths)
        return {"path": name, "error": f"{type(e).__name__}: {e}"[:300]}


def bench_layer(preset: str = "ultramemv2-227m", tokens: int = 16384, paths=LAYER_PATHS) -> list[dict]:
    """Forward and forward+backward of one memory layer under bf16 autocast, per path, and the
    Triton paths' speed-ups over the reference and its torch.compile. A path that fails is
    listed with its error."""
    rows = []
    for name in paths:
        rows.append(layer_path_ms(preset, tokens, name))
        torch.cuda.empty_cache()  # the last path's layer is gone: give its memory back
    by_path = {r["path"]: r for r in rows if "fb_ms" in r}
    for r in by_path.values():
        for ref in ("torch", "torch+compile"):
            if r["path"].startswith("triton") and ref in by_path:
                r[f"fb_speedup_over_{ref}"] = by_path[ref]["fb_ms"] / r["fb_ms"]
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
        forward, forward_backward = autocast_steps(layer, layer, u)
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


TRAIN_STEPS = ("eager", "compiled", "CUDA graph")
"""How `train_tokens_per_s` runs a step: as `umv2 train` does by default; with the forward under
torch.compile (`train.compile`); or the whole step captured in one CUDA graph and replayed."""


def train_tokens_per_s(cfg, batch_size: int, seq_len: int, steps: int, warmup: int = 3, step: str = "eager") -> float:
    """Median tokens/s of training steps as `umv2 train` takes them (bf16 autocast, fp32 weights,
    its optimizer and gradient clipping, the rank-1 refresh after each step), run as `step` says
    (`TRAIN_STEPS`). A CUDA graph replays the forward, backward, clipping and optimizer step with
    no launch cost on the host, so it measures the GPU's work alone; the refresh (whose SVD waits
    for the device) runs between replays."""
    from umv2cli.config import TrainConfig
    from umv2cli.model.transformer import build_model
    from umv2cli.train import build_optimizer

    graphed = step == "CUDA graph"
    model = build_model(cfg, device="cuda")
    forward = torch.compile(model) if step == "compiled" else model
    train_cfg = TrainConfig()
    optimizer = build_optimizer(model, train_cfg, capturable=graphed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device="cuda")

    def train_step():
        # a captured step casts the weights every replay: no autocast cache across replays
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            logits, aux = forward(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()) + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()

    if graphed:
        train_step = captured(train_step, optimizer, model.refresh_rank1, warmup).replay
        warmup = 1
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        model.refresh_rank1()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch_size * seq_len / statistics.median(times[warmup:])


def captured(train_step, optimizer, refresh, warmup: int) -> "torch.cuda.CUDAGraph":
    """`train_step` (forward to optimizer step) captured in a CUDA graph, after `warmup` steps on a
    side stream (kernels compiled, workspaces allocated). The gradients are None when it is
    captured, so the captured backward writes them afresh, not onto the last step's."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            train_step()
            optimizer.zero_grad(set_to_none=True)
            refresh()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step()
    return graph


def iter_train(preset: str = "ultramemv2-227m", batch_size: int = 8, seq_len: int = 2048, steps: int = 10,
               runs: list[tuple[str, str]] | None = None):
    """Training tokens/s of the memory model, MoE and dense at equal activated parameters, one
    row per (model name, step) pair of `runs` (by default every model eagerly) as it is measured."""
    from umv2cli.model.accounting import account

    models = train_models(preset)
    for name, step in runs or [(name, "eager") for name in models]:
        cfg = models[name]
        torch._dynamo.reset()
        row = {"model": name, "step": step, "activated_params": account(cfg).activated_params}
        try:
            row["tokens_per_s"] = train_tokens_per_s(cfg, batch_size, seq_len, steps, step=step)
        except Exception as e:  # noqa: BLE001 (a benchmark: report it, measure the other models)
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        torch.cuda.empty_cache()
        yield row


def bench_train(*args, **kwargs) -> list[dict]:
    """`iter_train`'s rows, all of them."""
    return list(iter_train(*args, **kwargs))


def training_curves(preset: str = "tiny-ultramemv2", steps: int = 300, batch_size: int = 32, seq_len: int = 128,
                    lr: float = 3e-3, seed: int = 0) -> dict:
    """Loss curves of one model trained on its fast path and on its reference (`path_and_reference`:
    Triton kernels or references for UltraMemV2, grouped GEMMs or the loop for MoE), on CUDA under
    bf16 autocast: same init, same batches (bytes of umv2's own sources), AdamW, rank-1 refresh
    every step. A check that the paths agree within bf16 tolerance, not a speed."""
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


# ------------------------------------------------------------------------------------------------
# Everything in one run (issue 15): sections in order of need, results written after each


def _environment() -> dict:
    import platform

    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def _sections(preset: str) -> dict:
    """name → what it measures: a zero-argument callable returning the section's result, or a
    generator of its rows (written as each one comes)."""
    return {
        "kernels": lambda: bench_kernels(select_shapes=SELECT_SHAPES[:1]),
        "layer": lambda: bench_layer(preset),
        "train": lambda: iter_train(preset, steps=8),
        "curves": lambda: {k: v for k, v in training_curves().items() if k != "curves"},
        "curves_moe": lambda: {k: v for k, v in training_curves("tiny-moe").items() if k != "curves"},
        "train_compiled": lambda: iter_train(preset, steps=8, runs=[
            (f"{preset} (Triton)", "compiled"), ("dense (iso-activated)", "compiled")]),
        "train_graphed": lambda: iter_train(preset, steps=8, runs=[
            (f"{preset} (Triton)", "CUDA graph"), ("dense (iso-activated)", "CUDA graph")]),
        "select": lambda: (bench_select(shape) for shape in SELECT_SHAPES),
    }


SECTIONS = ("kernels", "layer", "train", "curves", "curves_moe", "train_compiled", "train_graphed", "select")
TRAIN_SECTIONS = ("train", "train_compiled", "train_graphed")


def run_all(out: Path | str, preset: str = "ultramemv2-227m", sections=SECTIONS, budget_s: float = 420.0) -> dict:
    """Run `sections` in order, writing results.json and results.txt into `out` after each; a
    section is not started once `budget_s` seconds have passed (it is listed as skipped)."""
    from umv2cli.files import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"environment": _environment(), "seconds": {}, "skipped": [], "errors": {}}
    todo = _sections(preset)
    for name in sections:
        if time.perf_counter() - start > budget_s:
            results["skipped"].append(name)
            continue
        t0 = time.perf_counter()

        def save():
            results["seconds"][name] = round(time.perf_counter() - t0, 1)
            results["done_when"] = done_when(results)
            write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
            write_atomic(out / "results.txt", render(results))

        try:
            result = todo[name]()
            if isinstance(result, types.GeneratorType):
                results[name] = []
                for row in result:
                    results[name].append(row)
                    save()
            else:
                results[name] = result
        except Exception as e:  # noqa: BLE001 (one failed section must not lose the others' numbers)
            results["errors"][name] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
        save()
    return results


def done_when(results: dict) -> list[dict]:
    """Issue 15's goals against what `results` holds: one row per goal, with the measured ratio."""
    goals = []

    def goal(what, value, target, met):
        goals.append({"goal": what, "measured": value, "target": target, "met": bool(met)})

    kernels = results.get("kernels", {})
    for r in kernels.get("lookup", []):
        if "bwd_over_fwd" in r:
            crowded = f", {r['crowd']} of m on {POPULAR_ROWS} rows" if r.get("crowd") else ""
            goal(f"lookup bwd / fwd, {r['row_bytes']} B rows, m {r['m']}, {r['tokens']} tokens{crowded}",
                 r["bwd_over_fwd"], "≤ 3", r["bwd_over_fwd"] <= 3)
        if r.get("row_bytes") == 576:
            goal(f"lookup fwd of copy bandwidth, 576 B rows, {r['tokens']} tokens, {r['rows']} rows",
                 r["fwd_of_copy"], "≥ 0.8", r["fwd_of_copy"] >= 0.8)
    for r in results.get("layer", []):
        if r["path"].startswith("triton") and "fb_ms" in r:
            for ref, target in (("torch", 4.0), ("torch+compile", 1.5)):
                if f"fb_speedup_over_{ref}" in r:
                    value = r[f"fb_speedup_over_{ref}"]
                    goal(f"layer fwd+bwd, {r['path']} over {ref}", value, f"≥ {target}", value >= target)
    train = [r for section in TRAIN_SECTIONS for r in results.get(section, [])]
    for step in TRAIN_STEPS:
        rows = {r["model"]: r["tokens_per_s"] for r in train if r["step"] == step and "tokens_per_s" in r}
        memory = next((v for k, v in rows.items() if k.endswith("(Triton)")), None)
        dense = rows.get("dense (iso-activated)")
        if memory and dense:
            goal(f"training tokens/s, UltraMemV2 / dense ({step})", memory / dense, "≥ 0.8", memory / dense >= 0.8)
    if "curves" in results:
        c = results["curves"]
        goal(f"curves: largest per-step loss gap over {c['steps']} steps (final means "
             f"{c['final']['triton']:.4f} / {c['final']['torch']:.4f})", c["max_abs_gap"], "bf16 tolerance (≈ 0.05)",
             c["max_abs_gap"] < 0.05)
    return goals


def _table(rows: list[dict], title: str) -> str:
    """A plain fixed-width table of dict rows (no rich: the bench runs where only torch is)."""
    rows = [r for r in rows if "skipped" not in r and "error" not in r]
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [title, "  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n\n"


def render(results: dict) -> str:
    """results.json as text tables, goals first."""
    env = results["environment"]
    text = (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, Python {env['python']}, {env['date']}\n"
            f"seconds per section: {results['seconds']}; skipped: {results['skipped']}; errors: {results['errors']}\n\n")
    text += _table(results.get("done_when", []), "goals (issue 15)")
    kernels = results.get("kernels", {})
    if kernels:
        text += f"copy bandwidth {kernels['copy_TBps']:.2f} TB/s\n\n"
        text += _table(kernels["lookup"], "value lookup, bf16 rows (fp32 gradient)")
        text += "".join(f"lookup {r['shape']}: {r.get('error') or r.get('skipped')}\n" for r in kernels["lookup"]
                        if "error" in r or "skipped" in r)
        text += _table(kernels["select"], "TDQKR selection, fp32 scores")
    layer = results.get("layer", [])
    text += _table(layer, "one UltraMemV2 layer, bf16 autocast")
    text += "".join(f"layer path {r['path']}: {r['error']}\n" for r in layer if "error" in r)
    train = [r for section in TRAIN_SECTIONS for r in results.get(section, [])]
    text += _table(train, "training tokens/s, bf16 autocast")
    text += "".join(f"training {r['model']} ({r['step']}): {r['error']}\n" for r in train if "error" in r)
    text += _table(results.get("select", []), "TDQKR selection, every shape")
    if "curves" in results:
        text += _table([{k: v for k, v in results["curves"].items() if k != "final"} | results["curves"]["final"]],
                       "loss curves, Triton against the references")
    return text
