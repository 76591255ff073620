"""Launch: a recipe → its sweep directory and the runs that are not done yet.

Reads the recipe; writes `<out>/<name>/recipe.toml` (a copy), `plan.parquet`, `launch.json` (the
executor and its options, which `resume` reuses) and, through `umv2cli.train`, one
`runs/<run-id>/` per run. Launching is idempotent: a run whose STATUS is `done` is never launched
again, nor one whose Slurm job is queued or running; a failed one only with `retry_failed`; a
started one resumes from its checkpoint.

Executors (`launch_runs`):
    local   a pool of worker processes on this machine, each pinned to its own share of the CPUs
            (so torch in each uses only those); returns when every run has ended. With
            `gpus_per_run` N > 1, each run is N processes under torchrun (`launch_local_distributed`).
    slurm   job arrays through submitit (`sweeps.slurm`); returns once they are submitted, or with
            `wait` when every run has ended (it polls the ledger: one squeue call per poll).
"""

import dataclasses
import io
import json
import multiprocessing
import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from umv2cli.config import RunSpec
from umv2cli.errors import UserError
from umv2cli.files import write_atomic
from umv2cli.sweeps.ledger import RunState, last_step, read_plan, run_states
from umv2cli.sweeps.plan import PlannedRun, build_plan
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
    gpus_per_run: int = 1
    """Local: processes (GPUs, or CPU processes without any) of each run; above 1, torchrun starts them."""


def prepare_sweep(recipe_path: Path, out: Path, processes: int | None = None) -> tuple[Path, Recipe, list[PlannedRun]]:
    """Plan the recipe for runs of `processes` processes each (default: its [slurm] table's) and
    write the sweep directory's recipe copy and plan.parquet."""
    import polars as pl

    recipe = load_recipe(recipe_path)
    runs = build_plan(recipe, processes=processes)
    sweep = out / recipe.name
    (sweep / "runs").mkdir(parents=True, exist_ok=True)
    write_atomic(sweep / "recipe.toml", recipe_path.read_bytes())
    rows = [{**run.row, "steps": run.spec.train.steps} for run in runs]
    buffer = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buffer)
    write_atomic(sweep / "plan.parquet", buffer.getvalue())
    return sweep, recipe, runs


def runs_to_launch(sweep: Path, runs: list[PlannedRun], retry_failed: bool) -> list[PlannedRun]:
    """The runs that are neither done nor queued or running on Slurm (nor failed, unless
    `retry_failed`: their STATUS is removed so that they run again)."""
    todo = []
    for run, state in zip(runs, run_states(sweep, {run.run_id: run.spec.train.steps for run in runs})):
        if state.state == "done" or state.scheduled or (state.state == "failed" and not retry_failed):
            continue
        (sweep / "runs" / run.run_id / "STATUS").unlink(missing_ok=True)
        todo.append(run)
    return todo


def execute_run(spec: RunSpec, run_dir: Path) -> str:
    """One run, fresh or resumed from its checkpoint; returns its final status line."""
    from umv2cli.train import RunFailed, train

    try:
        return train(spec, run_dir, resume=(run_dir / "spec.json").exists()).status
    except RunFailed:
        return (run_dir / "STATUS").read_text().strip()


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
    GPUs `devices`, e.g. "0,1", if given); its final status line."""
    from umv2cli.train import create_run_dir

    if not (run_dir / "spec.json").exists():
        create_run_dir(spec, run_dir)
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "umv2cli", "train", "--resume", str(run_dir)]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if (run_dir / "STATUS").exists():
        return (run_dir / "STATUS").read_text().strip()
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
           gpus_per_run: int = 1, slurm: dict | None = None, wait: bool = False, retry_failed: bool = False,
           on_done: OnDone = None) -> tuple[Path, dict[str, str]]:
    """Plan, write the sweep directory, and launch every run that is not done. `slurm` holds
    command-line job options; they override the recipe's [slurm] table. `gpus_per_run`: local
    runs of several processes."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: unknown; use one of {', '.join(EXECUTORS)}")
    overrides = {k: v for k, v in (slurm or {}).items() if v is not None}
    slurm_options(overrides, where="command line")  # its own problems, named as such
    recipe_slurm = slurm_options({**load_recipe(recipe_path).slurm, **overrides}, where=str(recipe_path))
    processes = gpus_per_run if executor == "local" else recipe_slurm.processes
    sweep, recipe, runs = prepare_sweep(recipe_path, out, processes)
    options = LaunchOptions(workers, recipe_slurm, wait, gpus_per_run)
    write_atomic(sweep / "launch.json", json.dumps({"executor": executor, "workers": workers,
                                                    "gpus_per_run": gpus_per_run,
                                                    "recipe_dir": str(recipe_path.parent.resolve()),
                                                    "slurm": dataclasses.asdict(options.slurm)}, indent=2) + "\n")
    todo = runs_to_launch(sweep, runs, retry_failed)
    return sweep, launch_runs(sweep, todo, executor, options, on_done) if todo else {}


def resume(sweep: Path, *, wait: bool = False, retry_failed: bool = False,
           on_done: OnDone = None) -> dict[str, str]:
    """Launch the runs of `sweep` that are not done, from its own recipe copy, on the executor
    and with the options it was last launched with."""
    if not (sweep / "launch.json").exists():
        raise UserError(f"{sweep}: no launch.json; is it a sweep directory made by `umv2 sweep run`?")
    last = json.loads((sweep / "launch.json").read_text())
    options = LaunchOptions(last["workers"], SlurmOptions(**last["slurm"]), wait, last.get("gpus_per_run", 1))
    recipe = load_recipe(sweep / "recipe.toml", base=last.get("recipe_dir"))  # its paths, as the original's
    processes = options.gpus_per_run if last["executor"] == "local" else options.slurm.processes
    todo = runs_to_launch(sweep, build_plan(recipe, processes=processes), retry_failed)
    return launch_runs(sweep, todo, last["executor"], options, on_done) if todo else {}


def cancel_sweep(sweep: Path) -> list[str]:
    """Cancel the Slurm jobs of `sweep`'s runs that are queued or running (one squeue, one
    scancel); returns their ids."""
    states = run_states(sweep, {row["run_id"]: row["steps"] for row in read_plan(sweep)})
    jobs = [state.job_id for state in states if state.scheduled]
    cancel(jobs)
    return jobs
