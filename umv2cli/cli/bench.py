"""`umv2 bench …`: speed on this device as ratios to references (results go to BENCHMARKS.md)."""

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Speed on this device, as ratios to references and rooflines.", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table or text.")]

TINY = ["tiny-dense", "tiny-ultramemv2", "tiny-ultramem", "tiny-memoryplus", "tiny-peer", "tiny-moe"]


@app.command("train-overhead")
def train_overhead(
    presets: Annotated[list[str] | None, typer.Argument(help="Model presets (default: the tiny ones).")] = None,
    steps: Annotated[int, typer.Option(min=5, help="Timed steps per preset.")] = 40,
    as_json: AsJson = False,
) -> None:
    """The training loop's cost over bare forward/backward/step, on CPU (goal: under 5%)."""
    from rich.console import Console
    from rich.table import Table

    from umv2cli.bench import train_overhead as measure

    rows = [measure(p, steps=steps) for p in presets or TINY]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("preset", "bare step (ms)", "loop step (ms)", "overhead")
    for r in rows:
        table.add_row(r["preset"], f"{r['bare_ms']:.2f}", f"{r['loop_ms']:.2f}", f"{100 * r['overhead']:+.1f}%")
    Console().print(table)


@app.command()
def plan(
    side: Annotated[int, typer.Option(min=1, help="The grid is SIDE sizes × SIDE top-m.")] = 100,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the median is reported).")] = 3,
    match: Annotated[str, typer.Option(help="The recipe's matching: iso-flop, iso-activated or fixed-backbone.")]
    = "iso-flop",
    as_json: AsJson = False,
) -> None:
    """Reading and planning a SIDE × SIDE recipe of distinct configs (goal: 10,000 runs under 2 s)."""
    from umv2cli.bench import plan_seconds

    r = plan_seconds(side, repeats, match)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    typer.echo(f"{r['runs']} runs ({r['match']}): read {r['load_s']:.3f} s, plan {r['plan_s']:.2f} s, rows to JSON "
               f"{r['json_s']:.2f} s; {r['total_s']:.2f} s in all; the 80-column table {r['table_s']:.2f} s, "
               f"with --all {r['table_all_s']:.2f} s")


@app.command()
def aggregate(
    runs: Annotated[int, typer.Option(min=1, help="Runs in the synthetic sweep.")] = 1000,
    rows: Annotated[int, typer.Option(min=2, help="Metrics lines per run.")] = 10_000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the median is reported).")] = 3,
    as_json: AsJson = False,
) -> None:
    """`umv2 sweep aggregate` over a synthetic sweep built in a temporary directory (goal: 1,000 runs ×
    10,000 metrics lines under 3 s), by default and at 3 FLOP budgets, against parsing every line."""
    from umv2cli.bench import aggregate_seconds

    r = aggregate_seconds(runs, rows, repeats)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    typer.echo(f"{r['runs']} runs × {r['rows_per_run']} metrics lines ({r['metrics_bytes'] / 1e9:.2f} GB, built in "
               f"{r['build_s']:.1f} s): aggregate {r['default_s']:.2f} s, at {r['budgets']} FLOP budgets "
               f"{r['at_flops_s']:.2f} s; parsing every line instead: {r['parse_every_line_s']:.2f} s")


@app.command()
def fit(
    resamples: Annotated[int, typer.Option(min=1, help="Bootstrap resamples.")] = 2000,
    seeds: Annotated[int, typer.Option(min=1, help="Runs per configuration of the 4 × 4 grid.")] = 4,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the median is reported).")] = 3,
    as_json: AsJson = False,
) -> None:
    """The case bootstrap of a loglinear fit of 64 runs (goal: 2,000 resamples under 10 s on 2 cores), and the
    whole `umv2 fit` computation around it."""
    from umv2cli.bench import fit_seconds

    r = fit_seconds(resamples, seeds, repeats)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    typer.echo(f"loglinear, {r['runs']} runs, {r['resamples']} resamples: bootstrap {r['bootstrap_s']:.2f} s "
               f"({r['failed']} failed), whole fit {r['run_fit_s']:.2f} s; R = {r['R']:.3g} "
               f"[{r['R_ci'][0]:.3g}, {r['R_ci'][1]:.3g}]")


def _print_rows(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may lack columns (an error, a skipped part)
    table = Table(*keys, title=title)
    for r in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.get(k, "") for k in keys)))
    Console().print(table)


def _require_cuda() -> None:
    import torch

    from umv2cli.errors import UserError

    if not torch.cuda.is_available():
        raise UserError("umv2 bench kernels|layer|train: needs a CUDA device; run it on a GPU machine")


@app.command()
def kernels(as_json: AsJson = False) -> None:
    """The value lookup's forward over paper-like shapes against copy bandwidth, PyTorch and F.embedding_bag, its
    backward over its forward and in parts; the selection against PyTorch and torch.compile (CUDA)."""
    _require_cuda()
    from umv2cli.kernel_bench import bench_kernels

    result = bench_kernels()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['device']}: copy {result['copy_TBps']:.2f} TB/s")
    _print_rows([r for r in result["lookup"] if "skipped" not in r and "error" not in r], "memory lookup, bf16")
    _print_rows(result["select"], "TDQKR selection, fp32 scores")


@app.command()
def layer(
    preset: Annotated[str, typer.Option(help="An UltraMemV2 or MoE preset; its first sparse layer is timed.")] = "ultramemv2-227m",
    tokens: Annotated[int, typer.Option(min=1, help="Tokens per call.")] = 16384,
    as_json: AsJson = False,
) -> None:
    """One sparse layer, forward and forward+backward under bf16 autocast (CUDA). UltraMemV2: Triton, PyTorch,
    torch.compile. MoE: grouped GEMM and the loop over experts, each against float64, and their determinism."""
    _require_cuda()
    from umv2cli.config import MoEConfig
    from umv2cli.kernel_bench import bench_layer, bench_moe_layer
    from umv2cli.model.presets import get_preset

    moe = isinstance(get_preset(preset).sparse, MoEConfig)
    rows = (bench_moe_layer if moe else bench_layer)(preset, tokens)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _print_rows(rows, f"{preset}: one memory layer")


@app.command(name="all")
def all_sections(
    out: Annotated[str, typer.Option(help="Folder for results.json and results.txt (written after each section).")],
    preset: Annotated[str, typer.Option(help="The UltraMemV2 preset of the layer and training sections.")]
    = "ultramemv2-227m",
    sections: Annotated[list[str] | None, typer.Option("--section", help="Run only these sections, in this order "
                                                       "(kernels, layer, train, curves, curves_moe, train_compiled, train_graphed, select).")] = None,
    budget_s: Annotated[float, typer.Option(min=0, help="Start no section after this many seconds.")] = 420.0,
) -> None:
    """Every speed of issue 15 in one run (CUDA): the lookup's backward over its forward and its forward against
    copy bandwidth; one layer against PyTorch and torch.compile; training tokens/s of UltraMemV2, MoE and dense,
    eager, compiled and as one CUDA graph; the loss curves of the Triton path against the references; the goals met
    or not."""
    _require_cuda()
    from umv2cli.errors import UserError
    from umv2cli.kernel_bench import SECTIONS, render, run_all

    unknown = sorted(set(sections or []) - set(SECTIONS))
    if unknown:
        raise UserError(f"--section {', '.join(unknown)}: unknown; use some of {', '.join(SECTIONS)}")
    typer.echo(render(run_all(out, preset, sections or SECTIONS, budget_s)))


@app.command(name="train")
def train_speed(
    preset: Annotated[str, typer.Option(help="The UltraMemV2 preset; MoE and dense match its activated params.")] = "ultramemv2-227m",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=16)] = 2048,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per model.")] = 10,
    as_json: AsJson = False,
) -> None:
    """Training tokens/s of UltraMemV2 (Triton and reference), MoE 8/64 (grouped GEMM and loop) and dense at equal
    activated params (CUDA), eagerly (`umv2 bench all` adds compiled and CUDA-graph runs)."""
    _require_cuda()
    from umv2cli.kernel_bench import bench_train

    rows = bench_train(preset, batch_size, seq_len, steps)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _print_rows(rows, "training tokens/s, bf16 autocast")


@app.command()
def dist(
    preset: Annotated[str, typer.Option(help="A model preset.")] = "ultramemv2-227m",
    processes: Annotated[int, typer.Option(min=1, help="Processes of the run (GPUs), started by torchrun.")] = 1,
    memory_parallel: Annotated[int, typer.Option(min=1, help="Processes that split each memory table.")] = 1,
    data_parallel: Annotated[str, typer.Option(help="ddp or fsdp.")] = "ddp",
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences a micro-batch, over all processes.")] = 8,
    seq_len: Annotated[int, typer.Option(min=16)] = 2048,
    steps: Annotated[int, typer.Option(min=2, help="Steps of each run.")] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="First steps left out of the median.")] = 5,
    baseline: Annotated[bool, typer.Option(help="Also run it as one process without torch.distributed.")] = True,
    profile: Annotated[bool, typer.Option(help="Rank 0's NCCL kernel time by collective, as a share of a step.")] = False,
    as_json: AsJson = False,
) -> None:
    """Tokens/s of a run under torchrun on PROCESSES processes against one process without torch.distributed
    (goal at 1 process: within 3%), the loss gap between them, and with --profile the collectives' share of a step.
    `python -m umv2cli.bench dist …` does the same without the CLI's packages."""
    from umv2cli.bench import distributed_speed

    r = distributed_speed(preset, processes=processes, memory_parallel=memory_parallel, data_parallel=data_parallel,
                          batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, baseline=baseline,
                          profile=profile)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    _print_rows([{k: v for k, v in r.items() if k != "collective_share"}], f"{preset} on {processes} processes")
    if profile:
        _print_rows([r["collective_share"]], "share of a step in NCCL kernels (rank 0)")


@app.command()
def curves(
    preset: Annotated[str, typer.Option(help="An UltraMemV2 or MoE preset small enough to train a few hundred steps.")] = "tiny-ultramemv2",
    steps: Annotated[int, typer.Option(min=1)] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, the curves included.")] = False,
) -> None:
    """Train one model on its fast path and on its reference on CUDA (UltraMemV2: Triton kernels and references;
    MoE: grouped GEMM and the loop over experts); compare the loss curves."""
    _require_cuda()
    from umv2cli.kernel_bench import training_curves

    result = training_curves(preset, steps)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    fast, reference = result["paths"]
    typer.echo(f"{preset}, {steps} steps: largest per-step loss gap {result['max_abs_gap']:.4f}; mean of the last "
               f"20 losses: {fast} {result['final'][fast]:.4f}, {reference} {result['final'][reference]:.4f}")


@app.command()
def pack(
    recipe: Annotated[Path | None, typer.Argument(
        help="A recipe: its middle grid point is the packed run (default: --preset on the builtin corpus, "
             "32 × 128 tokens a step).")] = None,
    runs_per_gpu: Annotated[str, typer.Option(help="The values of K to measure, comma-separated.")] = "1,2,4,8",
    preset: Annotated[str, typer.Option(help="The model of the default run.")] = "tiny-ultramemv2",
    seconds: Annotated[float, typer.Option(min=1, help="Training time of each run after its first step.")] = 20,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds after the last run's first step that are not "
                                                      "counted.")] = 2,
    as_json: AsJson = False,
) -> None:
    """Tokens/s of K runs at once on one GPU (the first of CUDA_VISIBLE_DEVICES), placed as `umv2 sweep run
    --runs-per-gpu K` places them, for each K: how many small runs to pack onto a GPU."""
    from umv2cli.bench import pack_spec, pack_throughput
    from umv2cli.errors import UserError
    from umv2cli.sweeps.workers import visible_gpus

    ks = [k.strip() for k in runs_per_gpu.split(",")]
    if not all(k.isdigit() and int(k) > 0 for k in ks):
        raise UserError(f"--runs-per-gpu {runs_per_gpu}: expected positive integers separated by commas, e.g. 1,2,4,8")
    gpus = visible_gpus()
    if not gpus:
        raise UserError("umv2 bench pack: needs a GPU; run it on a GPU machine")
    rows = pack_throughput(pack_spec(recipe, preset), [int(k) for k in ks], gpus[0], seconds, warmup)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _print_rows([{"K": r["runs_per_gpu"], "tokens/s in all": r["tokens_per_s"],
                  "tokens/s per run": r["tokens_per_s_per_run"], "× K=1": r["speedup"],
                  "window (s)": r["window_s"], "GPU memory per run (GB)": r["gpu_reserved_gb"]} for r in rows],
                f"{recipe or preset}: K runs on GPU {gpus[0]}")
