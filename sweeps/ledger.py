"""Ledger: the state of every run of a sweep, read from the sweep's files (writes nothing).

A sweep directory holds `recipe.toml`, `plan.parquet` (one row per run) and `runs/<run-id>/`.
A run is `done` or `failed` when its STATUS says so, `running` when it has started (it has
metrics but no STATUS: it is running, or was stopped and will resume), and `pending` otherwise.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from umv2cli.errors import UserError
from umv2cli.train import read_metrics


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str
    """"done", "failed", "running" or "pending"."""
    step: int
    steps: int
    reason: str = ""


def run_state(sweep: Path, run_id: str, steps: int) -> RunState:
    run = sweep / "runs" / run_id
    status = (run / "STATUS").read_text().strip() if (run / "STATUS").exists() else ""
    metrics = read_metrics(run)
    step = metrics[-1]["step"] if metrics else 0
    if status == "done":
        return RunState(run_id, "done", step, steps)
    if status.startswith("failed"):
        return RunState(run_id, "failed", step, steps, status.removeprefix("failed: "))
    return RunState(run_id, "running" if metrics else "pending", step, steps)


def read_plan(sweep: Path) -> list[dict]:
    import polars as pl

    if not (sweep / "plan.parquet").exists():
        raise UserError(f"{sweep}: no plan.parquet; is it a sweep directory made by `umv2 sweep run`?")
    return pl.read_parquet(sweep / "plan.parquet").to_dicts()


def sweep_status(sweep: Path) -> dict:
    """Counts by state, failures with reasons, progress in steps and an ETA from the pace so far."""
    plan = read_plan(sweep)
    states = [run_state(sweep, row["run_id"], row["steps"]) for row in plan]
    counts = {s: sum(r.state == s for r in states) for s in ("done", "failed", "running", "pending")}
    steps_done, steps_total = sum(r.step for r in states), sum(r.steps for r in states)
    return {
        "sweep": str(sweep), "total": len(states), **counts,
        "failures": [{"run_id": r.run_id, "reason": r.reason} for r in states if r.state == "failed"],
        "progress": steps_done / steps_total if steps_total else 1.0,
        "eta_s": _eta(sweep, steps_done, steps_total),
    }


def _eta(sweep: Path, steps_done: int, steps_total: int) -> float | None:
    """Remaining steps at the pace since the sweep directory was made (None before any step)."""
    elapsed = time.time() - (sweep / "plan.parquet").stat().st_mtime
    if steps_done == 0 or steps_done >= steps_total:
        return None if steps_done == 0 else 0.0
    return elapsed / steps_done * (steps_total - steps_done)
