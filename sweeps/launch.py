"""Launch: a recipe → its sweep directory and the runs that are not done yet.

Reads the recipe; writes `<out>/<name>/recipe.toml` (a copy), `plan.parquet`, `launch.json` (the
executor and its options, which `resume` reuses) and, through `umv2cli.train`, one
`runs/<run-id>/` per run. Launching is idempotent: a run whose STATUS is `done` is never launched
again, nor one whose Slurm job is queued or running, nor one another live process trains (it holds
the run's lock: a second `sweep run` of the same sweep reports it "running elsewhere"); a failed one
only with `retry_failed`; a started one resumes from its checkpoint. A run whose files are damaged
is marked failed, and the others go on.

Executors (`launch_runs`):
    local   a pool of worker processes on this machine, each pinned to its own share of the CPUs
            (so torch in each uses only those); returns when every run has ended.
    slurm   job arrays through submitit (`sweeps.slurm`); returns once they are submitted, or with
            `wait` when every run has ended (it polls the ledger: one squeue call per poll).
"""

import dataclasses
import io
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from umv2cli.config import RunSpec
from umv2cli.errors import UserError
from umv2cli.files import Damaged, make_dir, read_json, write_atomic
from umv2cli.sweeps.ledger import RunState, plan_steps, run_states
from umv2cli.sweeps.plan import MAX_RUNS, PlannedRun, build_plan
from umv2cli.sweeps.recipe import Recipe, load_recipe
from umv2cli.sweeps.slurm import SlurmOptions, cancel, slurm_options, submit

EXECUTORS = ("local", "slurm")
POLL_S = 3.0
"""Seconds between two looks at a waited-for Slurm sweep."""

OnDone = Callable[[str, str], None] | None
"""Called with (run_id, final status line) as each run ends."""


@dataclass(frozen=True)
class LaunchOptions:
    workers: int | None = None
    """Local: worker processes (default: one per CPU)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = False
    """Slurm: return only when every run has ended (local runs always do)."""


def prepare_sweep(recipe_path: Path, out: Path, force: bool = False) -> tuple[Path, Recipe, list[PlannedRun]]:
    """Plan the recipe (any number of runs with `force`) and write the sweep directory's recipe copy and
    plan.parquet."""
    import polars as pl

    recipe = load_recipe(recipe_path)
    runs = build_plan(recipe, max_runs=None if force else MAX_RUNS)
    sweep = out / recipe.name
    make_dir(sweep / "runs")
    write_atomic(sweep / "recipe.toml", recipe_path.read_bytes())
    rows = [{**run.row, "steps": run.spec.train.steps} for run in runs]
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    write_atomic(sweep / "plan.parquet", buffer.getvalue())
    return sweep, recipe, runs


def runs_to_launch(sweep: Path, runs: list[PlannedRun], retry_failed: bool) -> tuple[list[PlannedRun], dict[str, str]]:
    """The runs that are neither done, nor queued or running on Slurm, nor trained by another live
    process (nor failed, unless `retry_failed`: their STATUS is removed so that they run again); and
    {run_id: "running elsewhere: <its lock's holder>"} of those another process trains."""
    todo, elsewhere = [], {}
    for run, state in zip(runs, run_states(sweep, {run.run_id: run.spec.train.steps for run in runs})):
        if state.state == "done" or state.scheduled:
            continue
        if state.holder:
            elsewhere[run.run_id] = f"running elsewhere: {state.holder}"
            continue
        if state.state == "failed" and not retry_failed:
            continue
        (sweep / "runs" / run.run_id / "STATUS").unlink(missing_ok=True)
        todo.append(run)
    return todo, elsewhere


def execute_run(spec: RunSpec, run_dir: Path) -> str:
    """One run, fresh or resumed from its checkpoint; returns its final status line ("running
    elsewhere: …" when another process holds the run; "failed: damaged <file> (…)" when a file of it
    is damaged)."""
    from umv2cli.rundir import RunBusy, damage_reason, read_status
    from umv2cli.train import RunFailed, train

    try:
        return train(spec, run_dir, resume=None).status
    except RunBusy as e:
        return f"running elsewhere: {e.holder}"
    except Damaged as e:
        return f"failed: {damage_reason(run_dir, e)}"
    except RunFailed as e:
        return read_status(run_dir) or f"failed: {e}"


# ----------------------------------------------------------------------------------------------
# executors


def launch_runs(sweep: Path, runs: list[PlannedRun], executor: str, options: LaunchOptions,
                on_done: OnDone = None) -> dict[str, str]:
    """Run `runs` (each into `sweep/runs/<run-id>/`) on `executor`; {run_id: status line}: the
    final one ("done", "failed: …", "stopped …"), or "queued as Slurm job <id>" when submitted
    without `wait`."""
    if executor == "local":
        return launch_local(sweep, runs, options.workers or len(os.sched_getaffinity(0)), on_done)
    job_ids = submit(sweep, runs, options.slurm)
    if not options.wait:
        return {run.run_id: f"queued as Slurm job {job}" for run, job in zip(runs, job_ids)}
    return wait_for(sweep, runs, on_done)


def _pin_worker(cpu_sets: "multiprocessing.Queue") -> None:
    os.sched_setaffinity(0, cpu_sets.get())


def pinned_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` spawned processes, each pinned to its own share of this process's CPUs (so torch
    in each uses only those)."""
    cpus = sorted(os.sched_getaffinity(0))
    shares = multiprocessing.get_context("spawn").Queue()
    for w in range(workers):
        shares.put(set(cpus[w::workers]))
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pin_worker,
                               initargs=(shares,))


def launch_local(sweep: Path, runs: list[PlannedRun], workers: int, on_done: OnDone = None) -> dict[str, str]:
    """Run `runs` in a pool of `workers` processes; returns {run_id: status}."""
    workers = max(1, min(workers, len(os.sched_getaffinity(0)), len(runs)))
    results = {}
    with pinned_pool(workers) as pool:
        futures = {pool.submit(execute_run, run.spec, sweep / "runs" / run.run_id): run.run_id for run in runs}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done:
                on_done(futures[future], results[futures[future]])
    return results


def wait_for(sweep: Path, runs: list[PlannedRun], on_done: OnDone = None, poll_s: float = POLL_S) -> dict[str, str]:
    """Poll the ledger until no run of `runs` is queued or running on Slurm; {run_id: status}."""
    waiting = {run.run_id: run.spec.train.steps for run in runs}
    results: dict[str, str] = {}
    while waiting:
        for state in run_states(sweep, waiting):
            if state.state in ("done", "failed") or not state.scheduled:
                results[state.run_id] = _final(state)
                del waiting[state.run_id]
                if on_done:
                    on_done(state.run_id, results[state.run_id])
        if waiting:
            time.sleep(poll_s)
    return results


def _final(state: RunState) -> str:
    if state.state == "done":
        return "done"
    if state.state == "failed":
        return f"failed: {state.reason}"
    return f"stopped at step {state.step}: Slurm job {state.job_id} {state.job_state or 'unknown to Slurm'}"


# ----------------------------------------------------------------------------------------------
# what `umv2 sweep run` and `umv2 sweep resume` do


def launch(recipe_path: Path, out: Path, *, executor: str = "local", workers: int | None = None,
           slurm: dict | None = None, wait: bool = False, retry_failed: bool = False, force: bool = False,
           on_done: OnDone = None) -> tuple[Path, dict[str, str]]:
    """Plan, write the sweep directory, and launch every run that is not done. `slurm` holds
    command-line job options; they override the recipe's [slurm] table. `force` plans a grid of
    more than `MAX_RUNS` runs."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: unknown; use one of {', '.join(EXECUTORS)}")
    overrides = {k: v for k, v in (slurm or {}).items() if v is not None}
    slurm_options(overrides, where="command line")  # its own problems, named as such
    sweep, recipe, runs = prepare_sweep(recipe_path, out, force)
    options = LaunchOptions(workers, slurm_options({**recipe.slurm, **overrides}, where=str(recipe_path)), wait)
    write_atomic(sweep / "launch.json", json.dumps({"executor": executor, "workers": workers,
                                                    "recipe_dir": str(recipe_path.parent.resolve()),
                                                    "slurm": dataclasses.asdict(options.slurm)}, indent=2) + "\n")
    todo, elsewhere = runs_to_launch(sweep, runs, retry_failed)
    return sweep, _report(elsewhere, on_done) | (launch_runs(sweep, todo, executor, options, on_done) if todo else {})


def resume(sweep: Path, *, wait: bool = False, retry_failed: bool = False,
           on_done: OnDone = None) -> dict[str, str]:
    """Launch the runs of `sweep` that are not done, from its own recipe copy, on the executor
    and with the options it was last launched with."""
    last = read_launch(sweep)
    options = LaunchOptions(last["workers"], slurm_options(last["slurm"], where=str(sweep / "launch.json")), wait)
    recipe = load_recipe(sweep / "recipe.toml", base=last.get("recipe_dir"))  # its paths, as the original's
    todo, elsewhere = runs_to_launch(sweep, build_plan(recipe, max_runs=None), retry_failed)  # planned once already
    return _report(elsewhere, on_done) | (launch_runs(sweep, todo, last["executor"], options, on_done) if todo else {})


def _report(elsewhere: dict[str, str], on_done: OnDone) -> dict[str, str]:
    for run_id, status in elsewhere.items() if on_done else ():
        on_done(run_id, status)
    return elsewhere


def read_launch(sweep: Path) -> dict:
    """launch.json, checked: the executor, the local workers and the Slurm options it was last launched with."""
    path = sweep / "launch.json"
    if not path.exists():
        raise UserError(f"{sweep}: no launch.json; is it a sweep directory made by `umv2 sweep run`?")
    fix = "launch the sweep again with `umv2 sweep run RECIPE --out …` (done runs are kept)"
    last = read_json(path, fix)
    workers = last.get("workers")
    if last.get("executor") not in EXECUTORS or not isinstance(last.get("slurm"), dict) or not (
            workers is None or (type(workers) is int and workers > 0)):
        raise Damaged(path, "expected an executor, workers and slurm options, as `umv2 sweep run` writes", fix)
    return last


def cancel_sweep(sweep: Path) -> list[str]:
    """Cancel the Slurm jobs of `sweep`'s runs that are queued or running (one squeue, one
    scancel); returns their ids."""
    states = run_states(sweep, plan_steps(sweep))
    jobs = [state.job_id for state in states if state.scheduled]
    cancel(jobs)
    return jobs
