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
    leverage = "leverage"


def fit(
    path: Annotated[Path, typer.Argument(help="A runs table (.csv/.parquet) or a sweep directory.")],
    form: Annotated[Form, typer.Option(help="loglinear (F1, primary), chinchilla (F0), modulated (F2) or "
                                            "leverage (F4: compute multiplier over a dense ladder).")] = Form.loglinear,
    bootstrap: Annotated[int, typer.Option(min=1, help="Case-bootstrap resamples (runs, never checkpoints).")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Elasticities e_m, e_P and R = e_m/e_P with 95% intervals, held-out error vs seed noise, and the verdict."""
    import json

    from umv2cli.errors import UserError
    from umv2cli.files import make_dir, write_atomic
    from umv2cli.fit import run_fit

    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out}: is a directory; give a file name such as {json_out / 'fit.json'}")
    report = run_fit(path, form.value, bootstrap, seed)
    if json_out is not None:
        make_dir(json_out.parent)
        write_atomic(json_out, json.dumps(report, indent=2))
    typer.echo(f"{report['form']}: {report['n_runs']} runs, {report['n_configs']} configs; params "
               + ", ".join(f"{k}={v:.6g}" for k, v in report["params"].items())
               + f"; converged={report['converged']}, start spread {report['start_objective_spread']:.2g}, "
               + f"{report['bootstrap']['failed']} of {bootstrap} resamples failed")
    typer.echo(f"held-out RMSE (nats, leave-one-config-out / extrapolation corner; seed σ "
               f"{_g(report['seed_sigma'])}): " + "; ".join(
                   f"{name} skipped" if "skipped" in v else f"{name} {_g(v['loco_rmse'])} / {_g(v['extrap_rmse'])}"
                   for name, v in report["forms_heldout"].items()))
    if report["sign_test"]:
        s = report["sign_test"]
        typer.echo(f"iso-cost pairs (P, k·m) vs (k·P, m): density has the lower loss in {s['density_wins']} of "
                   f"{s['pairs']} (sign test p = {s['p_value']:.2g})")
    typer.echo(f"verdict: {report['verdict']}")
    typer.echo(report["sentence"])


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
