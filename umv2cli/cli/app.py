"""The `umv2` command: one Typer app, one sub-app per command group.

This is the one place where a `UserError` becomes ``error: …`` on stderr and exit code 2. Any
other exception is a bug and keeps its traceback (locals hidden). Heavy imports (torch, polars,
plotly) happen inside the commands, so `umv2 --help` stays fast.
"""

import sys

import typer

from umv2cli.cli import bench, data, fit, model, report, sweep, train, tune
from umv2cli.errors import UserError

app = typer.Typer(
    help="umv2: scaling-law research on UltraMemV2 memory-layer language models (arXiv 2508.18756).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(sweep.app, name="sweep")
app.command(name="train")(train.train)
app.command(name="tune")(tune.tune)
app.command(name="fit")(fit.fit)
app.command(name="report")(report.report)
app.add_typer(bench.app, name="bench")


def main() -> None:
    try:
        app()  # standalone: Typer itself answers --help and usage errors (exit code 2)
    except UserError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
