"""`umv2 fit`: fit a scaling law to a runs table, bootstrap it, print the decision."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Form(str, Enum):
    """The laws `umv2 fit` offers (docs/fitting.md); loglinear is the primary one."""

    loglinear = "loglinear"
    chinchilla = "chinchilla"
    modulated = "modulated"
    leverage = "leverage"


def fit(
    path: Annotated[Path, typer.Argument(help="A runs table (.csv/.parquet) or a sweep directory.")],
    form: Annotated[Form, typer.Option(help="loglinear (F1, primary), chinchilla (F0), modulated (F2) or "
                                            "leverage (F4: compute multiplier over a dense ladder).")] = Form.loglinear,
    bootstrap: Annotated[int, typer.Option(min=1, help="Case-bootstrap resamples: configurations with all their "
                                                       "runs, never checkpoints.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
    at_flops: Annotated[list[float] | None, typer.Option(
        "--at-flops", help="Also refit at this training-FLOP budget (a sweep directory is aggregated there; a table "
                           "needs rows at it) and say whether the verdict holds; repeat for several.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Elasticities e_m, e_P and Δ = e_m − e_P with 95% intervals, the verdict and its reason, the paper's trade,
    refits on other losses and budgets, held-out error vs seed noise, and the iso-cost pairs."""
    import json

    from umv2cli.errors import UserError
    from umv2cli.files import make_dir, write_atomic
    from umv2cli.fit import robustness_text, run_fit, show, show_ci, trade_text

    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out}: is a directory; give a file name such as {json_out / 'fit.json'}")
    r = run_fit(path, form.value, bootstrap, seed, at_flops=at_flops or ())
    if json_out is not None:
        make_dir(json_out.parent)
        write_atomic(json_out, json.dumps(r, indent=2))
    typer.echo(f"{r['form']} on {r['fitted_on']}: {r['n_runs']} runs, {r['n_configs']} configs; params "
               + ", ".join(f"{k}={v:.6g}" for k, v in r["params"].items())
               + f"; converged={r['converged']}, start spread {r['start_objective_spread']:.2g}, "
               + f"{r['resamples_failed']} of {bootstrap} resamples failed")
    seed_noise = f"seed σ {show(r['seed_sigma'])}" if r["seed_sigma"] is not None else \
        "seed noise not measured: no configuration has two seeds"
    typer.echo(f"held-out RMSE (nats, leave-one-config-out / extrapolation corner; {seed_noise}): " + "; ".join(
        f"{name} skipped" if "skipped" in v else f"{name} {show(v['loco_rmse'])} / {show(v['extrap_rmse'])}"
        for name, v in r["forms_heldout"].items()))
    if r["sign_test"]:
        s = r["sign_test"]
        typer.echo(f"iso-cost pairs (P, k·m) vs (k·P, m): density has the lower loss in {s['density_wins']} of "
                   f"{s['pairs']} (descriptive: pairs share configurations); in {s['independent_density_wins']} of "
                   f"the {s['independent_pairs']} that share none (sign test p = {s['p_value']:.2g})")
    if r["e_P"] is not None:
        typer.echo(f"e_m = {show(r['e_m'])} {show_ci(r['e_m_ci'])}, e_P = {show(r['e_P'])} {show_ci(r['e_P_ci'])}, "
                   f"Δ = e_m − e_P = {show(r['delta'])} {show_ci(r['delta_ci'])}, "
                   + ("R not reported" if r["R"] is None else f"R = {show(r['R'])} {show_ci(r['R_ci'])}"))
        typer.echo(trade_text(r))
    typer.echo(robustness_text(r))
    for ref in r["references"]:
        typer.echo(f"reference {ref['label']} ({ref['kind']}, {ref['runs']} run{'s' * (ref['runs'] != 1)}): loss "
                   f"{ref['loss']:.4f} at {ref['flops_per_token']:.3g} FLOPs/token; the grid's configurations "
                   f"{ref['grid_best']:.4f} (best) / {ref['grid_median']:.4f} (median) / {ref['grid_worst']:.4f} (worst)")
    typer.echo(f"verdict: {r['verdict']}: {r['verdict_reason']}")
    typer.echo(r["sentence"])

