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
