"""`umv2 fit`: fit a scaling law to a runs table, bootstrap it, print the verdict."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Form(str, Enum):
    """The laws `umv2 fit` offers (scaling-anchors §1.10); loglinear is the primary one."""

    loglinear = "loglinear"
    chinchilla = "chinchilla"
    modulated = "modulated"


def fit(
    path: Annotated[Path, typer.Argument(help="A runs table (.csv/.parquet) or a sweep directory with results.parquet.")],
    form: Annotated[Form, typer.Option(help="loglinear (F1, primary), chinchilla (F0) or modulated (F2).")] = Form.loglinear,
    bootstrap: Annotated[int, typer.Option(min=1, help="Case-bootstrap resamples (runs, never checkpoints).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Elasticities e_m, e_P and R = e_m/e_P with 95% intervals, held-out error vs seed noise, and the verdict."""
    from umv2cli.fit import run_fit, write_json_atomic

    report = run_fit(path, form.value, bootstrap, seed)
    if json_out is not None:
        write_json_atomic(report, json_out)
    typer.echo(f"{report['form']}: {report['n_runs']} runs, {report['n_configs']} configs; params "
               + ", ".join(f"{k}={v:.6g}" for k, v in report["params"].items())
               + f"; converged={report['converged']}, start spread {report['start_objective_spread']:.2g}")
    typer.echo(f"verdict: {report['verdict']}")
    typer.echo(report["sentence"])
