"""`umv2 bench …`: speed on this device as ratios to references (results go to BENCHMARKS.md)."""

import json
from typing import Annotated

import typer

app = typer.Typer(help="Speed on this device, as ratios to references and rooflines.", no_args_is_help=True)

TINY = ["tiny-dense", "tiny-ultramemv2", "tiny-ultramem", "tiny-memoryplus", "tiny-peer", "tiny-moe"]


@app.command("train-overhead")
def train_overhead(
    presets: Annotated[list[str] | None, typer.Argument(help="Model presets (default: the tiny ones).")] = None,
    steps: Annotated[int, typer.Option(min=5, help="Timed steps per preset.")] = 40,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
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
def aggregate(
    runs: Annotated[int, typer.Option(min=1, help="Runs in the synthetic sweep.")] = 1000,
    rows: Annotated[int, typer.Option(min=2, help="Metrics lines per run.")] = 10_000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the median is reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
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
