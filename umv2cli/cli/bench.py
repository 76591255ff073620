"""`umv2 bench …`: speed on this device as ratios to references (results go to BENCHMARKS.md)."""

import json
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
               f"{r['json_s']:.2f} s; {r['total_s']:.2f} s in all")


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

    table = Table(*rows[0].keys(), title=title)
    for r in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)


def _require_cuda() -> None:
    import torch

    from umv2cli.errors import UserError

    if not torch.cuda.is_available():
        raise UserError("umv2 bench kernels|layer|train: needs a CUDA device; run it on a GPU machine")


@app.command()
def kernels(as_json: AsJson = False) -> None:
    """The value lookup's forward and forward+backward over paper-like shapes, against copy bandwidth,
    PyTorch, torch.compile and F.embedding_bag (CUDA)."""
    _require_cuda()
    from umv2cli.kernel_bench import bench_kernels

    result = bench_kernels()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['device']}: copy {result['copy_TBps']:.2f} TB/s")
    _print_rows([r for r in result["lookup"] if "skipped" not in r], "memory lookup, bf16")
    _print_rows(result["select"], "TDQKR selection, fp32 scores")


@app.command()
def layer(
    preset: Annotated[str, typer.Option(help="An UltraMemV2 preset; its first memory layer is timed.")] = "ultramemv2-227m",
    tokens: Annotated[int, typer.Option(min=1, help="Tokens per call.")] = 16384,
    as_json: AsJson = False,
) -> None:
    """One UltraMemV2 layer, forward and forward+backward under bf16 autocast: Triton, PyTorch, torch.compile (CUDA)."""
    _require_cuda()
    from umv2cli.kernel_bench import bench_layer

    rows = bench_layer(preset, tokens)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _print_rows(rows, f"{preset}: one memory layer")


@app.command(name="train")
def train_speed(
    preset: Annotated[str, typer.Option(help="The UltraMemV2 preset; MoE and dense match its activated params.")] = "ultramemv2-227m",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=16)] = 2048,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per model.")] = 10,
    as_json: AsJson = False,
) -> None:
    """Training tokens/s of UltraMemV2 (Triton and reference), MoE 8/64 and dense at equal activated params (CUDA)."""
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
    preset: Annotated[str, typer.Option(help="An UltraMemV2 preset small enough to train a few hundred steps.")] = "tiny-ultramemv2",
    steps: Annotated[int, typer.Option(min=1)] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, the curves included.")] = False,
) -> None:
    """Train one model with the Triton kernels and with the references on CUDA; compare the loss curves."""
    _require_cuda()
    from umv2cli.kernel_bench import training_curves

    result = training_curves(preset, steps)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    typer.echo(f"{preset}, {steps} steps: largest per-step loss gap {result['max_abs_gap']:.4f}; mean of the last "
               f"20 losses: Triton {result['final']['triton']:.4f}, reference {result['final']['torch']:.4f}")
