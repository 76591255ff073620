"""Launch: a recipe → its sweep directory and the runs that are not done yet.

Reads the recipe; writes `<out>/<name>/recipe.toml` (a copy), `plan.parquet` and, through
`umv2cli.train`, one `runs/<run-id>/` per run. Launching is idempotent: a run whose STATUS is
`done` is never launched again, a failed one only with `retry_failed`, and a started one resumes
from its checkpoint. The local executor is a pool of worker processes on this machine, each pinned
to its own share of the CPUs (so torch in each uses only those). Slurm arrives with the sweep issue.
"""

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from umv2cli.config import RunSpec
from umv2cli.errors import UserError
from umv2cli.files import write_atomic
from umv2cli.sweeps.ledger import run_state
from umv2cli.sweeps.plan import PlannedRun, build_plan
from umv2cli.sweeps.recipe import load_recipe


def prepare_sweep(recipe_path: Path, out: Path) -> tuple[Path, list[PlannedRun]]:
    """Plan the recipe and write the sweep directory's recipe copy and plan.parquet."""
    import polars as pl

    recipe = load_recipe(recipe_path)
    runs = build_plan(recipe)
    sweep = out / recipe.name
    (sweep / "runs").mkdir(parents=True, exist_ok=True)
    write_atomic(sweep / "recipe.toml", recipe_path.read_bytes())
    rows = [{**run.row, "steps": run.spec.train.steps} for run in runs]
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    write_atomic(sweep / "plan.parquet", buffer.getvalue())
    return sweep, runs


def runs_to_launch(sweep: Path, runs: list[PlannedRun], retry_failed: bool) -> list[PlannedRun]:
    todo = []
    for run in runs:
        state = run_state(sweep, run.run_id, run.spec.train.steps).state
        if state == "failed" and retry_failed:
            (sweep / "runs" / run.run_id / "STATUS").unlink()
        if state in ("pending", "running") or (state == "failed" and retry_failed):
            todo.append(run)
    return todo


def execute_run(spec: RunSpec, run_dir: Path) -> str:
    """One run, fresh or resumed from its checkpoint; returns its final status line."""
    from umv2cli.train import RunFailed, train

    try:
        return train(spec, run_dir, resume=(run_dir / "spec.json").exists()).status
    except RunFailed:
        return (run_dir / "STATUS").read_text().strip()


def _pin_worker(cpu_sets: "multiprocessing.Queue") -> None:
    os.sched_setaffinity(0, cpu_sets.get())


def launch_local(sweep: Path, runs: list[PlannedRun], workers: int, on_done=None) -> dict[str, str]:
    """Run `runs` in a pool of `workers` processes; returns {run_id: status}."""
    cpus = sorted(os.sched_getaffinity(0))
    workers = max(1, min(workers, len(cpus), len(runs)))
    shares = multiprocessing.get_context("spawn").Queue()
    for w in range(workers):
        shares.put(set(cpus[w::workers]))
    results = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_pin_worker, initargs=(shares,)) as pool:
        futures = {pool.submit(execute_run, run.spec, sweep / "runs" / run.run_id): run.run_id for run in runs}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done:
                on_done(futures[future], results[futures[future]])
    return results


def launch(recipe_path: Path, out: Path, *, executor: str = "local", workers: int | None = None,
           retry_failed: bool = False, on_done=None) -> tuple[Path, dict[str, str]]:
    """Plan, write the sweep directory, and run every run that is not done."""
    if executor != "local":
        raise UserError(f"--executor {executor}: only 'local' exists yet; Slurm arrives with the sweep issue")
    sweep, runs = prepare_sweep(recipe_path, out)
    todo = runs_to_launch(sweep, runs, retry_failed)
    if not todo:
        return sweep, {}
    return sweep, launch_local(sweep, todo, workers or len(os.sched_getaffinity(0)), on_done)
