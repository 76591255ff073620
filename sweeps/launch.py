"""Launch: a recipe → its sweep directory and the runs that are not done yet.

Reads the recipe; writes `<out>/<name>/recipe.toml` (a copy), `plan.parquet`, `launch.json` (the
executor and its options, which `resume` reuses) and, through `umv2cli.train`, one
`runs/<run-id>/` per run. Launching is idempotent: a run whose STATUS is `done` is never launched
again, nor one whose Slurm job is queued or running, nor one another live process trains (it holds
the run's lock: a second `sweep run` of the same sweep reports it "running elsewhere"); a failed one
only with `retry_failed`; a started one resumes from its checkpoint. A run whose files are damaged
is marked failed, and the others go on.

Executors (`launch_runs`):
    local   a pool of worker processes on this machine (`sweeps.workers`): one per GPU, or
            `runs_per_gpu` sharing each GPU, or one per CPU without GPU, each pinned to its own
            share of the CPUs; returns when every run has ended. The workers die with this process,
            and an error or Ctrl-C stops them: queued runs don't start, running ones checkpoint.
            With `gpus_per_run` N > 1, each run is N processes under torchrun
            (`launch_local_distributed`).
    slurm   job arrays through submitit (`sweeps.slurm`); returns once they are submitted, or with
            `wait` when every run has ended (it polls the ledger: one squeue call per poll).
"""

import dataclasses
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from umv2cli.config import RunSpec
from umv2cli.errors import UserError
from umv2cli.files import Damaged, make_dir, read_json, write_atomic
from umv2cli.rundir import last_step
from umv2cli.sweeps.ledger import RunState, plan_steps, run_states
from umv2cli.sweeps.plan import MAX_RUNS, PlannedRun, build_plan
from umv2cli.sweeps.recipe import Recipe, load_recipe
from umv2cli.sweeps.slurm import SlurmOptions, cancel, slurm_options, submit
from umv2cli.sweeps.workers import WorkerPool, first_done, place, pool_stopping, stop_if_pool_stops

EXECUTORS = ("local", "slurm")
POLL_S = 3.0
"""Seconds between two looks at a waited-for Slurm sweep."""

OnDone = Callable[[str, str], None] | None
"""Called with (run_id, final status line) as each run ends."""


@dataclass(frozen=True)
class LaunchOptions:
    workers: int | None = None
    """Local: worker processes (default: one per GPU × runs_per_gpu, or one per CPU without GPU)."""
    runs_per_gpu: int = 1
    """Local, on GPUs: workers that share each GPU."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = False
    """Slurm: return only when every run has ended (local runs always do)."""
    gpus_per_run: int = 1
    """Local: processes (GPUs, or CPU processes without any) of each run; above 1, torchrun starts them."""

    def processes(self, executor: str) -> int:
        """The processes of each run on `executor`: `gpus_per_run` locally, the Slurm job's tasks on Slurm."""
        return self.gpus_per_run if executor == "local" else self.slurm.processes


def prepare_sweep(recipe_path: Path, out: Path, force: bool = False, check_data: bool = False,
                  processes: int | None = None, recipe: Recipe | None = None) -> tuple[Path, Recipe, list[PlannedRun]]:
    """Plan the recipe (any number of runs with `force`) for runs of `processes` processes each (default: its
    [slurm] table's) and write the sweep directory's recipe copy and plan.parquet; with `check_data`, open the
    runs' data first (nothing is written if it cannot be used). `recipe`: the file, already loaded."""
    import polars as pl

    recipe = recipe or load_recipe(recipe_path)
    runs = build_plan(recipe, max_runs=None if force else MAX_RUNS, processes=processes)
    if check_data:
        check_run_data(runs)
    sweep = out / recipe.name
    make_dir(sweep / "runs")
    write_atomic(sweep / "recipe.toml", recipe_path.read_bytes())
    rows = [{**run.row, "steps": run.spec.train.steps} for run in runs]
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    write_atomic(sweep / "plan.parquet", buffer.getvalue())
    return sweep, recipe, runs


def check_run_data(runs: list[PlannedRun]) -> None:
    """Open each distinct data folder of `runs` against its models (`umv2cli.train.open_run_data`):
    a missing or unfit folder is a `UserError` before any run starts."""
    from umv2cli.train import open_run_data

    distinct = {(r.spec.data, r.spec.model.vocab_size, r.spec.model.seq_len, r.spec.train.seq_len): r for r in runs}
    for run in distinct.values():
        open_run_data(run.spec)


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
    is damaged). In a local worker, it does not start once the pool stops, and stops at a step's end
    when it does."""
    from umv2cli.rundir import RunBusy, damage_reason, read_status
    from umv2cli.train import RunFailed, train

    if pool_stopping():
        return "not started: the sweep stopped"
    try:
        return train(spec, run_dir, resume=None, on_step=stop_if_pool_stops).status
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
    if executor == "local" and options.gpus_per_run > 1:
        return launch_local_distributed(sweep, runs, options.gpus_per_run, on_done)
    if executor == "local":
        return launch_local(sweep, runs, options, on_done)
    job_ids = submit(sweep, runs, options.slurm)
    if not options.wait:
        return {run.run_id: f"queued as Slurm job {job}" for run, job in zip(runs, job_ids)}
    return wait_for(sweep, runs, on_done)


def launch_local(sweep: Path, runs: list[PlannedRun], options: LaunchOptions, on_done: OnDone = None) -> dict[str, str]:
    """Run `runs` in a pool of workers placed on this machine's GPUs or CPUs; returns {run_id: status}."""
    slots = place([run.spec.train.device for run in runs], options.workers, options.runs_per_gpu, len(runs))
    results = {}
    with WorkerPool(slots) as pool:
        pending = {pool.submit(execute_run, run.spec, sweep / "runs" / run.run_id): run.run_id for run in runs}
        while pending:
            for future in first_done(pending):
                run_id = pending.pop(future)
                results[run_id] = future.result()
                if on_done:
                    on_done(run_id, results[run_id])
    return results


# ----------------------------------------------------------------------------------------------
# runs of several processes on this machine


def launch_local_distributed(sweep: Path, runs: list[PlannedRun], processes: int,
                             on_done: OnDone = None) -> dict[str, str]:
    """Run `runs`, each as `processes` processes under torchrun: on `processes` GPUs of its own
    (as many runs at a time as this machine has GPUs for), or, without GPUs, one run at a time on
    the CPUs. Returns {run_id: status}."""
    import torch

    gpus = torch.cuda.device_count()
    slots: queue.Queue = queue.Queue()
    for first in range(0, gpus - processes + 1, processes) if gpus else [None]:
        slots.put(None if first is None else ",".join(map(str, range(first, first + processes))))
    if gpus and slots.empty():
        raise UserError(f"--gpus-per-run {processes}: this machine has {gpus} GPUs; lower it")

    def run(planned: PlannedRun) -> str:
        devices = slots.get()
        try:
            return execute_distributed_run(planned.spec, sweep / "runs" / planned.run_id, processes, devices)
        finally:
            slots.put(devices)

    results = {}
    with ThreadPoolExecutor(slots.qsize()) as pool:
        futures = {pool.submit(run, planned): planned.run_id for planned in runs}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if on_done:
                on_done(futures[future], results[futures[future]])
    return results


def execute_distributed_run(spec: RunSpec, run_dir: Path, processes: int, devices: str | None = None) -> str:
    """One run, fresh or resumed, as `processes` processes under torchrun on this machine (on the
    GPUs `devices`, e.g. "0,1", if given); its final status line. torchrun gets SIGTERM if the
    sweep's process dies (kill -9 included), and stops its processes with it."""
    from umv2cli.rundir import damage_reason, hold, is_new, read_status
    from umv2cli.sweeps.workers import signal_at_parent_death
    from umv2cli.train import create_run_dir

    with hold(run_dir):  # its spec.json, for `umv2 train --resume`; rank 0 then takes the lock
        if is_new(run_dir):
            create_run_dir(spec, run_dir)
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "umv2cli", "train", "--resume", str(run_dir)]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal_at_parent_death(signal.SIGTERM))
    try:
        status = read_status(run_dir)
    except Damaged as e:
        return f"failed: {damage_reason(run_dir, e)}"
    if status:
        return status
    return f"stopped at step {last_step(run_dir)}: {torchrun_failure(result.returncode, result.stdout + result.stderr)}"


def torchrun_failure(returncode: int, output: str) -> str:
    """Why a torchrun of `umv2 train` ended without a STATUS: rank 0's own word ("stopped: …"),
    else torchrun's first failed rank and its exit code or signal."""
    ours = [line.removeprefix("stopped: ") for line in output.splitlines() if line.startswith("stopped: ")]
    if ours:
        return ours[-1]
    cause = output[output.find("Root Cause"):]
    rank, code = re.search(r"rank\s*:\s*(\d+)", cause), re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    died = re.search(r"\((SIG[A-Z0-9]+)\)", cause)
    if rank and code:
        return f"rank {rank[1]} exited with code {code[1]}" + (f" ({died[1]})" if died else "")
    return f"torchrun exited with code {returncode}"


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
           runs_per_gpu: int = 1, gpus_per_run: int = 1, slurm: dict | None = None, wait: bool = False,
           retry_failed: bool = False, force: bool = False,
           on_done: OnDone = None) -> tuple[Path, dict[str, str]]:
    """Plan, write the sweep directory, and launch every run that is not done. `slurm` holds
    command-line job options; they override the recipe's [slurm] table. `gpus_per_run`: local
    runs of several processes. `force` plans a grid of more than `MAX_RUNS` runs."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: unknown; use one of {', '.join(EXECUTORS)}")
    overrides = {k: v for k, v in (slurm or {}).items() if v is not None}
    slurm_options(overrides, where="command line")  # its own problems, named as such
    recipe = load_recipe(recipe_path)
    recipe_slurm = slurm_options({**recipe.slurm, **overrides}, where=str(recipe_path))
    options = LaunchOptions(workers, runs_per_gpu, recipe_slurm, wait, gpus_per_run)
    sweep, _, runs = prepare_sweep(recipe_path, out, force, check_data=executor == "local",
                                   processes=options.processes(executor), recipe=recipe)
    write_atomic(sweep / "launch.json", json.dumps({"executor": executor, "workers": workers,
                                                    "runs_per_gpu": runs_per_gpu, "gpus_per_run": gpus_per_run,
                                                    "recipe_dir": str(recipe_path.parent.resolve()),
                                                    "slurm": dataclasses.asdict(options.slurm)}, indent=2) + "\n")
    todo, elsewhere = runs_to_launch(sweep, runs, retry_failed)
    return sweep, _report(elsewhere, on_done) | (launch_runs(sweep, todo, executor, options, on_done) if todo else {})


def resume(sweep: Path, *, wait: bool = False, retry_failed: bool = False,
           on_done: OnDone = None) -> dict[str, str]:
    """Launch the runs of `sweep` that are not done, from its own recipe copy, on the executor
    and with the options it was last launched with."""
    last = read_launch(sweep)
    options = LaunchOptions(last["workers"], last.get("runs_per_gpu", 1),
                            slurm_options(last["slurm"], where=str(sweep / "launch.json")), wait,
                            last.get("gpus_per_run", 1))
    recipe = load_recipe(sweep / "recipe.toml", base=last.get("recipe_dir"))  # its paths, as the original's
    runs = build_plan(recipe, max_runs=None, processes=options.processes(last["executor"]))  # planned once already
    if last["executor"] == "local":
        check_run_data(runs)
    todo, elsewhere = runs_to_launch(sweep, runs, retry_failed)
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
    workers, per_gpu = last.get("workers"), last.get("runs_per_gpu", 1)
    if last.get("executor") not in EXECUTORS or not isinstance(last.get("slurm"), dict) or not (
            workers is None or (type(workers) is int and workers > 0)) or not (type(per_gpu) is int and per_gpu > 0):
        raise Damaged(path, "expected an executor, workers, runs_per_gpu and slurm options, as `umv2 sweep run` writes", fix)
    return last


def cancel_sweep(sweep: Path) -> list[str]:
    """Cancel the Slurm jobs of `sweep`'s runs that are queued or running (one squeue, one
    scancel); returns their ids."""
    states = run_states(sweep, plan_steps(sweep))
    jobs = [state.job_id for state in states if state.scheduled]
    cancel(jobs)
    return jobs
