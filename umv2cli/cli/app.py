"""The `umv2` command: one Typer app, one sub-app per command group.

This is the one place where bad input becomes one line on stderr and exit code 2: a `UserError`
(``error: …``, a line per problem) and a usage error of Click's (an unknown option, a value of the
wrong type: ``error: …; see umv2 CMD --help``). Any other exception is a bug and keeps its traceback
(locals hidden). Help is plain text (no Rich markup), so bracketed words such as ``[train]`` print as
written. Heavy imports (torch, polars, plotly) happen inside the commands, so `umv2 --help` stays fast.
"""

import sys

import typer
from typer._click.exceptions import NoArgsIsHelpError  # Typer ≥ 0.28 vendors Click; its errors are TyperExceptions

from umv2cli.cli import bench, data, fit, model, report, sweep, train, tune
from umv2cli.errors import UserError

app = typer.Typer(
    help="umv2: scaling-law research on UltraMemV2 memory-layer language models (arXiv 2508.18756).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # inherited by every sub-app
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
        code = app(standalone_mode=False)  # returns a typer.Exit's code; --help returns 0
    except UserError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except NoArgsIsHelpError as e:  # `umv2`, `umv2 sweep`: their help
        e.show()
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # Click's usage errors: an unknown option, a value of the wrong type
        where = f"; see {e.ctx.command_path} --help" if getattr(e, "ctx", None) else ""
        print(f"error: {e.format_message().rstrip('.')}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    sys.exit(code or 0)
