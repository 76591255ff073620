"""`umv2 tune RECIPE`: Optuna studies over the recipe's [tune] table; the best values go to best.toml."""

from pathlib import Path
from typing import Annotated

import typer


def tune(
    recipe: Annotated[Path, typer.Argument(help="A recipe .toml with a tune table (see the README).")],
    out: Annotated[Path, typer.Option(help="Studies, trials and best.toml go to OUT/<recipe name>/.")] = Path("out"),
    executor: Annotated[str, typer.Option(help="Where trials train: local (a pool of workers here) or slurm "
                                                "(a job per trial, options from the recipe's slurm table).")] = "local",
    workers: Annotated[int | None, typer.Option(min=1, help="Trials at once (default here: one per GPU × "
                                                             "--runs-per-gpu, or one per CPU without GPU; "
                                                             "4 on Slurm).")] = None,
    runs_per_gpu: Annotated[int, typer.Option(min=1, help="Local, on GPUs: trials per GPU.")] = 1,
    n_trials: Annotated[int | None, typer.Option(min=1, help="Trials per study (default: the recipe's).")] = None,
    storage: Annotated[str | None, typer.Option(help="A PostgreSQL/MySQL URL instead of the journal file "
                                                     "OUT/<name>/tune.journal.")] = None,
) -> None:
    """Search the fields of RECIPE's tune table (e.g. the learning rate per size group); run it again to continue."""
    from umv2cli.sweeps.tune import tune as run_studies

    def show(group: str, trial) -> None:
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        result = f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else trial.user_attrs.get("reason", "")
        typer.echo(f"{group}: trial {trial.number} {values}: {trial.state.name.lower()}, {result}")

    folder, summary = run_studies(recipe, out, executor=executor, storage=storage, workers=workers,
                                  runs_per_gpu=runs_per_gpu, n_trials=n_trials, on_trial=show)
    for group, s in summary.items():
        best = "no trial completed" if s["best_value"] is None else f"best {s['best_value']:.4f} {s['best_params']}"
        typer.echo(f"{group}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed; {best}")
    if any(s["best_value"] is not None for s in summary.values()):
        typer.echo(f"best values in {folder / 'best.toml'}; a recipe uses them with tuned = \"<that path>\"")
    if any(s["best_value"] is None for s in summary.values()):
        raise typer.Exit(1)
