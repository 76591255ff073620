"""`umv2 sweep plan|run|status|cancel|resume`: a recipe's grid of runs, planned, launched and followed."""

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Grids of runs from a recipe.", no_args_is_help=True)
SLURM = "Slurm (these override the recipe's slurm table)"
WAIT = "Slurm: return when the launched runs have ended, not once submitted."
WORKERS = ("Local: worker processes in all, each running one run at a time (default: one per GPU × "
           "--runs-per-gpu, or one per CPU without GPU).")
RUNS_PER_GPU = "Local, on GPUs: workers per GPU, to pack small runs onto each GPU."
SHOWN = 20
"""Runs on Slurm that `status` lists before it counts the rest."""
FORCE = "Plan a grid larger than the limit (100,000 runs; sweeps.plan.MAX_RUNS)."


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="A recipe .toml (see recipes/ and the README).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows (every field) instead of a table.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column at full length, whatever the terminal's "
                                                      "width.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="Every run of a long plan, not its first and last "
                                                         "ones.")] = False,
    mfu: Annotated[float, typer.Option(min=0.01, max=1.0, help="Model FLOPs utilization for the GPU-hour estimate.")] = 0.3,
    gpus_per_run: Annotated[int | None, typer.Option(
        min=1, help="GPUs a run (default: the recipe's slurm nodes × gpus, or 1).")] = None,
    force: Annotated[bool, typer.Option("--force", help=FORCE)] = False,
) -> None:
    """Expand RECIPE into runs; print P, m, density, params, FLOPs/token, tokens and GPU-hours of each, and the
    wall-clock hours of the longest run on its GPUs."""
    import shutil

    from umv2cli.cli.plan_table import plan_lines
    from umv2cli.sweeps.plan import MAX_RUNS, build_plan
    from umv2cli.sweeps.recipe import load_recipe

    rows = [run.row for run in build_plan(load_recipe(recipe), mfu=mfu, max_runs=None if force else MAX_RUNS,
                                          processes=gpus_per_run)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    lines = plan_lines(rows, str(recipe), shutil.get_terminal_size().columns, wide=wide, show_all=show_all)
    print("\n".join(lines))
    typer.echo(f"longest run: {max(r['wall_hours'] for r in rows):.3g} wall-clock hours on {rows[0]['gpus']} GPU"
               f"{'s' * (rows[0]['gpus'] != 1)} (each as fast as one alone)")
    typer.echo(f"total: {len(rows)} runs, {sum(r['gpu_hours'] for r in rows):.3g} GPU-hours at MFU {mfu:.0%} on an H100")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe .toml.")],
    out: Annotated[Path, typer.Option(help="Sweeps go to OUT/<recipe name>/.")] = Path("out"),
    executor: Annotated[str, typer.Option(
        help="Where runs execute: local (a pool of workers here) or slurm (job arrays through submitit).")] = "local",
    workers: Annotated[int | None, typer.Option(min=1, help=WORKERS)] = None,
    runs_per_gpu: Annotated[int, typer.Option(min=1, help=RUNS_PER_GPU)] = 1,
    gpus_per_run: Annotated[int, typer.Option(
        min=1, help="Local: processes of each run (one per GPU; CPU processes without GPUs), started by torchrun.")] = 1,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also re-run failed runs.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT)] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE)] = False,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.", rich_help_panel=SLURM)] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account.", rich_help_panel=SLURM)] = None,
    qos: Annotated[str | None, typer.Option(help="Slurm QOS.", rich_help_panel=SLURM)] = None,
    time: Annotated[str | None, typer.Option(help="Per job: minutes, or a Slurm time such as 4:00:00 (default 60).",
                                             rich_help_panel=SLURM)] = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="Nodes per run.", rich_help_panel=SLURM)] = None,
    gpus: Annotated[int | None, typer.Option(min=1, help="GPUs per node of a run (one process each).",
                                             rich_help_panel=SLURM)] = None,
    cpus: Annotated[int | None, typer.Option(min=1, help="CPUs per process of a run.", rich_help_panel=SLURM)] = None,
    mem_gb: Annotated[float | None, typer.Option(min=0.001, help="Memory per run in GB.",
                                                 rich_help_panel=SLURM)] = None,
    constraint: Annotated[str | None, typer.Option(help="Slurm node constraint.", rich_help_panel=SLURM)] = None,
) -> None:
    """Launch every run of RECIPE that is not done, queued or running; Slurm: submit and return (or --wait)."""
    from umv2cli.sweeps.launch import launch

    slurm = {"partition": partition, "account": account, "qos": qos, "time": time, "nodes": nodes, "gpus": gpus, "cpus": cpus,
             "mem_gb": mem_gb, "constraint": constraint}
    sweep, results = launch(recipe, out, executor=executor, workers=workers, runs_per_gpu=runs_per_gpu,
                            gpus_per_run=gpus_per_run, slurm=slurm, wait=wait, retry_failed=retry_failed, force=force,
                            on_done=_print_done)
    _summary(sweep, results)


def _print_done(run_id: str, status: str) -> None:
    typer.echo(f"{run_id}: {status}")


def _summary(sweep: Path, results: dict[str, str]) -> None:
    """The launch's last line; exit code 1 if a run ended without finishing, or runs elsewhere."""
    queued = [s.removeprefix("queued as Slurm job ") for s in results.values() if s.startswith("queued as Slurm job ")]
    if queued:
        arrays = Counter(job.split("_")[0] for job in queued)  # "812_4" → array 812
        jobs = ", ".join(f"{array} ({n} run{'s' if n > 1 else ''})" for array, n in arrays.items())
        typer.echo(f"submitted {len(queued)} runs to Slurm as jobs {jobs}; follow them with: umv2 sweep status {sweep}")
        return
    if not results:
        _nothing_to_launch(sweep)
        return
    elsewhere = sum(s.startswith("running elsewhere") for s in results.values())
    failed = sum(not s.startswith(("done", "running elsewhere")) for s in results.values())
    skipped = f"; {elsewhere} running elsewhere, left to them" if elsewhere else ""
    typer.echo(f"launched {len(results) - elsewhere} runs ({failed} not done){skipped}; sweep in {sweep}/")
    if failed or elsewhere:
        raise typer.Exit(1)


def _nothing_to_launch(sweep: Path) -> None:
    """E.g. "6 of 6 runs already done; nothing to launch", naming the runs that are not done and why."""
    from umv2cli.sweeps.ledger import sweep_status

    state = sweep_status(sweep)
    others = [f"{state['failed']} failed (--retry-failed runs them again)"] if state["failed"] else []
    if state["running"] + state["queued"]:
        others.append(f"{state['running'] + state['queued']} queued or running on Slurm")
    typer.echo(f"{state['done']} of {state['total']} runs already done{''.join(', ' + o for o in others)}; "
               f"nothing to launch; sweep in {sweep}/")


@app.command()
def status(
    sweep: Annotated[Path, typer.Argument(help="A sweep directory (OUT/<recipe name>).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Counts by state (Slurm asked once for all jobs), runs on Slurm, failures with reasons, progress, ETA."""
    from umv2cli.sweeps.ledger import sweep_status

    state = sweep_status(sweep)
    if as_json:
        print(json.dumps(state, indent=2))
        return
    eta = "" if state["eta_s"] is None else f", ETA {state['eta_s'] / 60:.1f} min"
    typer.echo(f"{state['total']} runs: {state['done']} done, {state['failed']} failed, {state['running']} running, "
               f"{state['queued']} queued, {state['pending']} pending ({100 * state['progress']:.0f}% of steps{eta})")
    on_slurm = [r for r in state["runs"] if r["job_state"] and r["state"] in ("running", "queued")]
    for r in on_slurm[:SHOWN]:
        typer.echo(f"  {r['state']} {r['run_id']}: Slurm job {r['job_id']} {r['job_state']}, "
                   f"step {r['step']}/{r['steps']}")
    if len(on_slurm) > SHOWN:
        typer.echo(f"  … and {len(on_slurm) - SHOWN} more on Slurm (--json lists every run)")
    for failure in state["failures"]:
        typer.echo(f"  failed {failure['run_id']}: {failure['reason']}")


@app.command()
def cancel(sweep: Annotated[Path, typer.Argument(help="A sweep directory (OUT/<recipe name>).")]) -> None:
    """Cancel the sweep's queued and running Slurm jobs (one scancel); running runs checkpoint first."""
    from umv2cli.sweeps.launch import cancel_sweep

    jobs = cancel_sweep(sweep)
    typer.echo(f"cancelled {len(jobs)} Slurm jobs: {' '.join(jobs)}" if jobs
               else "cancelled nothing: no run of the sweep is queued or running on Slurm")


@app.command()
def resume(
    sweep: Annotated[Path, typer.Argument(help="A sweep directory (OUT/<recipe name>).")],
    wait: Annotated[bool, typer.Option("--wait", help=WAIT)] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also re-run failed runs.")] = False,
) -> None:
    """Launch the runs of SWEEP that are not done, from its recipe copy, on the executor it was launched with."""
    from umv2cli.sweeps.launch import resume as relaunch

    _summary(sweep, relaunch(sweep, wait=wait, retry_failed=retry_failed, on_done=_print_done))


@app.command()
def aggregate(
    sweep: Annotated[Path, typer.Argument(help="A sweep directory (OUT/<recipe name>).")],
    at_flops: Annotated[list[float] | None, typer.Option(
        "--at-flops", help="Loss at this training-FLOP budget, interpolated between eval steps, instead of the "
                           "final eval loss; repeat for several budgets (one row per run and budget).")] = None,
) -> None:
    """Collect every run (done, failed, running, pending) into SWEEP/results.parquet, the table `umv2 fit` reads."""
    from umv2cli.sweeps.aggregate import aggregate as collect
    from umv2cli.sweeps.aggregate import summary

    results = collect(sweep, at_flops or ())
    s = summary(results)
    done = results.filter(results["status"] == "done")
    outside = f", {done['loss'].null_count()} budget rows of done runs outside their evals" if at_flops else ""
    typer.echo(f"{s['total']} runs: {s['done']} done, {s['failed']} failed, {s['running']} running, "
               f"{s['pending']} pending{outside}; wrote {sweep / 'results.parquet'} ({results.height} rows)")
    for failure in s["failures"]:
        typer.echo(f"  failed {failure['run_id']}: {failure['reason']}")
