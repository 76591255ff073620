"""Ledger: the state of every run of a sweep, from the sweep's files and one scheduler query
(writes nothing).

A sweep directory holds `recipe.toml`, `plan.parquet` (one row per run), `runs/<run-id>/` and,
for Slurm, `jobs.jsonl` (each run's job). A run is

    done, failed   its STATUS says so; or failed when its Slurm job ended in a failure
                   (FAILED, OUT_OF_MEMORY, TIMEOUT, …) before the run wrote a STATUS
    running        its Slurm job runs; or, with no job Slurm knows of, it has logged steps (it is
                   running here, or was stopped and will resume)
    queued         its Slurm job waits in the queue (submitted, or requeued after a preemption)
    pending        nothing runs it: not started, or its job was cancelled (it resumes when launched)

Slurm is asked once for all the sweep's unfinished jobs (`slurm.job_states`); a finished sweep
costs no query at all. Each run costs two small reads: STATUS and the tail of metrics.jsonl.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from umv2cli.errors import UserError
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
        job = jobs.get(run_id, {})
        job_id = job.get("job_id", "")
        states.append(_state(run_id, files[run_id], last_step(sweep / "runs" / run_id), total, job_id,
                             scheduler.get(job_id, ""), job.get("log", "")))
    return states


def _status(run: Path) -> str:
    """The run's STATUS line, "" if it has none."""
    try:
        return (run / "STATUS").read_text().strip()
    except FileNotFoundError:
        return ""


def _state(run_id: str, status: str, step: int, steps: int, job_id: str, job_state: str, log: str) -> RunState:
    def state(name: str, reason: str = "") -> RunState:
        return RunState(run_id, name, step, steps, reason, job_id, job_state)

    if status == "done":
        return state("done")
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


def tail_metrics(run: Path, n: int = 1, tail_bytes: int = 65536) -> list[dict]:
    """The last ``n`` complete lines of the run's metrics.jsonl, oldest first, read from the file's
    end: a line cut short by a kill (or by the window's start) is skipped, the rest never read."""
    try:
        with (run / "metrics.jsonl").open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail_bytes))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    tail = []
    for line in reversed(lines[1:-1] if size > tail_bytes else lines[:-1]):  # whole lines only
        try:
            tail.append(json.loads(line))
        except ValueError:
            continue
        if len(tail) == n:
            break
    return tail[::-1]


def last_step(run: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 if none)."""
    tail = tail_metrics(run)
    return tail[-1]["step"] if tail else 0


def read_plan(sweep: Path) -> list[dict]:
    import polars as pl

    if not (sweep / "plan.parquet").exists():
        raise UserError(f"{sweep}: no plan.parquet; is it a sweep directory made by `umv2 sweep run`?")
    return pl.read_parquet(sweep / "plan.parquet", columns=["run_id", "steps"]).to_dicts()


def sweep_status(sweep: Path) -> dict:
    """Counts by state, failures with reasons, each run's state and job, progress in steps and an
    ETA from the pace so far."""
    states = run_states(sweep, {row["run_id"]: row["steps"] for row in read_plan(sweep)})
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
