"""Ledger: the state of every run of a sweep, from the sweep's files and one scheduler query
(writes nothing).

A sweep directory holds `recipe.toml`, `plan.parquet` (one row per run), `runs/<run-id>/` and,
for Slurm, `jobs.jsonl` (each run's job). A run is

    done           its STATUS says so, and its metrics reach its last step
    failed         its STATUS says so; or its Slurm job ended in a failure (FAILED, OUT_OF_MEMORY,
                   TIMEOUT, …) before the run wrote a STATUS; or a file of it is damaged ("damaged
                   STATUS (…)", or a done run whose metrics.jsonl ends early)
    running        a live process holds its lock (`umv2cli.rundir.holder`), or its Slurm job runs; or,
                   with no job Slurm knows of, it has logged steps (it was stopped and will resume)
    queued         its Slurm job waits in the queue (submitted, or requeued after a preemption)
    pending        nothing runs it: not started, or its job was cancelled (it resumes when launched)

Slurm is asked once for all the sweep's unfinished jobs (`slurm.job_states`); a finished sweep
costs no query at all. Each run costs two small reads, STATUS and the tail of metrics.jsonl, and a
run that is not done a look at its lock.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from umv2cli.errors import UserError
from umv2cli.files import Damaged, read_parquet
from umv2cli.rundir import damage_reason, holder, last_step, read_status
from umv2cli.sweeps.slurm import FAILED, QUEUED, RUNNING, job_states, read_jobs

STATES = ("done", "failed", "running", "queued", "pending")


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str
    """One of STATES."""
    step: int
    steps: int
    reason: str = ""
    job_id: str = ""
    """The run's current Slurm job ("" if it never had one)."""
    job_state: str = ""
    """Slurm's state of that job ("" if Slurm does not know it)."""
    holder: str = ""
    """The live process that holds the run's lock, as its LOCK names it ("" if none)."""

    @property
    def scheduled(self) -> bool:
        """Its Slurm job is alive (queued or running): launching the run again would duplicate it."""
        return self.job_state in RUNNING | QUEUED


def run_states(sweep: Path, steps: dict[str, int]) -> list[RunState]:
    """The state of each run in `steps` ({run_id: the run's total steps}), in that order."""
    jobs = read_jobs(sweep)
    files = {run_id: _status(sweep / "runs" / run_id) for run_id in steps}
    open_jobs = [jobs[r]["job_id"] for r, status in files.items() if r in jobs and not status]
    scheduler = job_states(open_jobs)
    states = []
    for run_id, total in steps.items():
        job, run = jobs.get(run_id, {}), sweep / "runs" / run_id
        job_id = job.get("job_id", "")
        states.append(_state(run_id, files[run_id], last_step(run), total, job_id, scheduler.get(job_id, ""),
                             job.get("log", ""), holder(run) if files[run_id] != "done" else ""))
    return states


def _status(run: Path) -> str:
    """The run's STATUS line, "" if it has none; a damaged STATUS is the run's failure."""
    try:
        return read_status(run)
    except Damaged as e:
        return f"failed: {damage_reason(run, e)}"


def _state(run_id: str, status: str, step: int, steps: int, job_id: str, job_state: str, log: str,
           held_by: str) -> RunState:
    def state(name: str, reason: str = "") -> RunState:
        return RunState(run_id, name, step, steps, reason, job_id, job_state, held_by)

    if status == "done" and step < steps:
        return state("failed", f"damaged metrics.jsonl (done, but its last valid line is step {step} of {steps})")
    if status == "done":
        return state("done")
    if held_by:
        return state("running")
    if status.startswith("failed"):
        return state("failed", status.removeprefix("failed: "))
    if job_state in RUNNING:
        return state("running")
    if job_state in QUEUED:
        return state("queued")
    if job_state in FAILED:
        return state("failed", f"Slurm job {job_id} ended {job_state} at step {step}; see {log}")
    if job_state:  # COMPLETED, CANCELLED, PREEMPTED without a STATUS: stopped, resumable
        return state("pending")
    return state("running" if step else "pending")


def read_plan(sweep: Path) -> "pl.DataFrame":
    """The sweep's plan.parquet, checked: a run_id (text) and steps (an integer) column."""
    import polars as pl

    path = sweep / "plan.parquet"
    if not path.exists():
        raise UserError(f"{sweep}: no plan.parquet; is it a sweep directory made by `umv2 sweep run`?")
    fix = "plan the sweep again with `umv2 sweep run` (done runs are kept)"
    plan = read_parquet(path, ["run_id", "steps"], fix)
    if plan.schema["run_id"] != pl.String or not plan.schema["steps"].is_integer():
        raise Damaged(path, f"run_id is {plan.schema['run_id']} and steps {plan.schema['steps']}, not text and "
                            "integers", fix)
    return plan


def plan_steps(sweep: Path) -> dict[str, int]:
    """{run_id: its total steps} of every run of the sweep's plan."""
    return dict(read_plan(sweep).select("run_id", "steps").iter_rows())


def sweep_status(sweep: Path) -> dict:
    """Counts by state, failures with reasons, each run's state and job, progress in steps and an
    ETA from the pace so far."""
    states = run_states(sweep, plan_steps(sweep))
    steps_done, steps_total = sum(r.step for r in states), sum(r.steps for r in states)
    return {
        "sweep": str(sweep), "total": len(states), **{s: sum(r.state == s for r in states) for s in STATES},
        "failures": [{"run_id": r.run_id, "reason": r.reason} for r in states if r.state == "failed"],
        "progress": steps_done / steps_total if steps_total else 1.0,
        "eta_s": _eta(sweep, steps_done, steps_total),
        "runs": [{"run_id": r.run_id, "state": r.state, "step": r.step, "steps": r.steps, "job_id": r.job_id,
                  "job_state": r.job_state} for r in states],
    }


def _eta(sweep: Path, steps_done: int, steps_total: int) -> float | None:
    """Remaining steps at the pace since the sweep directory was made (None before any step)."""
    elapsed = time.time() - (sweep / "plan.parquet").stat().st_mtime
    if steps_done == 0 or steps_done >= steps_total:
        return None if steps_done == 0 else 0.0
    return elapsed / steps_done * (steps_total - steps_done)
