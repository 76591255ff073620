"""Slurm launching against a real cluster (`sudo .ci/slurm-up` starts a one-node one; .ci/run does
in CI): job arrays under MaxArraySize, no duplicate submissions, one scheduler query per status,
requeue and preemption resuming from the checkpoint with no lost step, cancel and resume.
Without a reachable cluster these tests skip (and under CI=true a skip fails)."""

import functools
import json
import math
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from umv2cli.sweeps.ledger import last_step
from umv2cli.sweeps.slurm import QUEUED, RUNNING, job_states, max_array_size, minutes

import waiting

RECIPE = """name = "{name}"
model = "tiny-dense"
[train]
steps = {steps}
batch_size = 4
seq_len = 32
eval_batches = 1
task_samples = 0
device = "cpu"
[grid]
ffn_hidden = {sizes}
[slurm]
{slurm}
"""


@functools.cache
def _no_cluster() -> str:
    """Why no Slurm cluster is reachable ("" if one is); asked once per session."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (no sinfo); `sudo .ci/slurm-up` starts a one-node cluster"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer in 15 s; `sudo .ci/slurm-up` starts a one-node cluster"
    if sinfo.returncode != 0:
        return f"sinfo fails ({sinfo.stderr.strip()}); `sudo .ci/slurm-up` starts a one-node cluster"
    if not {"idle", "mixed", "allocated"} & set(sinfo.stdout.split()):
        return f"no Slurm node is up (sinfo: {sinfo.stdout.strip()}); `sudo .ci/slurm-up`"
    return ""


@pytest.fixture
def cluster() -> int:
    """Skips without a reachable cluster; the CPUs of its (first) node."""
    reason = _no_cluster()
    if reason:
        pytest.skip(reason)
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])


def write_recipe(tmp_path: Path, name: str, steps: int, sizes: list[int], slurm: str = "cpus = 1") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(RECIPE.format(name=name, steps=steps, sizes=sizes, slurm=slurm))
    return path


def jobs_of(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]


def squeue() -> str:
    return "; squeue:\n" + subprocess.run(["squeue", "-t", "all"], capture_output=True, text=True).stdout


def wait_until(condition, what: str, timeout: float = 300.0) -> None:
    """waiting.wait_until, printing the Slurm queue on a timeout."""
    waiting.wait_until(condition, what, timeout, squeue)


def status(umv2, sweep: Path) -> dict:
    code, out, err = umv2("sweep", "status", sweep, "--json")
    assert code == 0, err
    return json.loads(out)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(run: Path) -> int:
    import torch

    return torch.load(run / "ckpt" / "last.pt", map_location="cpu", weights_only=False)["step"]


# ----------------------------------------------------------------------------------------------
# with a cluster


def test_a_sweep_runs_as_job_arrays_is_never_submitted_twice_and_status_asks_slurm_once(
        cluster, tmp_path, umv2, monkeypatch):
    recipe = write_recipe(tmp_path, "micro", steps=4, sizes=[32, 48, 64, 80])
    code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0 and "submitted 4 runs to Slurm" in out, err
    sweep = tmp_path / "out" / "micro"
    jobs = jobs_of(sweep)
    arrays = Counter(job["job_id"].split("_")[0] for job in jobs)
    assert len(jobs) == 4 and len(arrays) == math.ceil(4 / max_array_size())  # split under MaxArraySize
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0 and "queued or running on Slurm; nothing to launch" in out  # not again …
    assert jobs_of(sweep) == jobs

    calls = tmp_path / "calls"
    shims = tmp_path / "bin"
    shims.mkdir()
    for command in ("squeue", "sacct"):  # log each call, then run the real command
        (shims / command).write_text(f"#!/bin/sh\necho {command} >> {calls}\nexec {shutil.which(command)} \"$@\"\n")
        (shims / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    state = status(umv2, sweep)
    assert state["total"] == 4 and state["failed"] == 0 and state["queued"] + state["running"] >= 1
    assert calls.read_text().split() == ["squeue"]  # one query for all four jobs

    wait_until(lambda: status(umv2, sweep)["done"] == 4, "all 4 runs done")
    calls.unlink()
    state = status(umv2, sweep)
    assert not calls.exists()  # a finished sweep asks Slurm nothing
    assert [r["job_id"] for r in state["runs"]] == [job["job_id"] for job in jobs]
    assert all(steps_logged(sweep / "runs" / job["run_id"]) == [1, 2, 3, 4] for job in jobs)
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert "4 of 4 runs already done; nothing to launch" in out and jobs_of(sweep) == jobs


def test_a_requeued_then_preempted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        cluster, tmp_path, umv2, monkeypatch):
    import torch

    from umv2cli.rundir import read_run_spec
    from umv2cli.train import read_metrics, train

    recipe = write_recipe(tmp_path, "long", steps=600, sizes=[32])
    code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0, err
    sweep = tmp_path / "out" / "long"
    [job] = jobs_of(sweep)
    run, job_id = sweep / "runs" / job["run_id"], job["job_id"]

    def job_state() -> str:
        return job_states([job_id]).get(job_id, "")

    wait_until(lambda: last_step(run) >= 20, "the run's first steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM, then Slurm requeues
    wait_until(lambda: job_state() in QUEUED, "the requeue")
    stopped = last_step(run)
    assert checkpoint_step(run) == stopped and steps_logged(run) == list(range(1, stopped + 1))

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # one thread, as in the job
    threads = torch.get_num_threads()
    reference = train(read_run_spec(run), tmp_path / "reference")  # uninterrupted, while the job waits
    torch.set_num_threads(threads)

    wait_until(lambda: job_state() in RUNNING and last_step(run) >= stopped + 20, "the run to resume")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", str(cluster), "-o", os.devnull,
                             "--wrap", "sleep 1"],
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: job_states([urgent]).get(urgent) == "COMPLETED", "the preempting job")
    wait_until(lambda: status(umv2, sweep)["done"] == 1, "the run to finish")

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 601))  # no step lost or repeated
    assert metrics[-1]["train_loss"] == reference.final["train_loss"]
    assert metrics[-1]["eval_loss"] == reference.final["eval_loss"]
    log = (sweep / job["log"]).read_text()
    assert "this job is preempted" in log and f"Requeued job {job_id}" in log  # submitit's checkpoint path
    show = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=2" in show


def test_a_run_of_two_tasks_trains_together_is_requeued_and_preempted_and_resumes_with_no_lost_or_repeated_step(
        cluster, tmp_path, umv2):
    recipe = write_recipe(tmp_path, "two", steps=400, sizes=[32], slurm="cpus = 1\ntasks = 2")
    code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0, err
    sweep = tmp_path / "out" / "two"
    [job] = jobs_of(sweep)
    run, job_id = sweep / "runs" / job["run_id"], job["job_id"]

    def sharded() -> dict:
        path = run / "ckpt" / "sharded.json"
        return json.loads(path.read_text()) if path.exists() else {}

    wait_until(lambda: last_step(run) >= 20, "the run's first steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM to both tasks, then Slurm requeues
    wait_until(lambda: job_states([job_id]).get(job_id, "") in QUEUED, "the requeue")
    stopped = last_step(run)
    assert sharded()["step"] == stopped and steps_logged(run) == list(range(1, stopped + 1))
    wait_until(lambda: job_states([job_id]).get(job_id, "") in RUNNING and last_step(run) >= stopped + 20,
               "the run to resume")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", str(cluster), "-o", os.devnull,
                             "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: job_states([urgent]).get(urgent) == "COMPLETED", "the preempting job")
    wait_until(lambda: status(umv2, sweep)["done"] == 1, "the run to finish")
    assert steps_logged(run) == list(range(1, 401))  # no step lost or repeated
    assert sharded()["world_size"] == 2 and sharded()["step"] == 400  # both tasks trained it, to the end
    log = (sweep / job["log"]).read_text()  # rank 0's: it requeues the job on preemption
    assert "this job is preempted" in log and f"Requeued job {job_id}" in log
    show = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=2" in show and "NumTasks=2" in show


def test_cancel_stops_every_job_of_a_sweep_and_resume_finishes_it(cluster, tmp_path, umv2):
    recipe = write_recipe(tmp_path, "pair", steps=300, sizes=[32, 48], slurm="cpus = 1\narray_parallelism = 1")
    code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0, err
    sweep = tmp_path / "out" / "pair"
    runs = [sweep / "runs" / job["run_id"] for job in jobs_of(sweep)]
    wait_until(lambda: last_step(runs[0]) >= 10, "the first run's first steps")

    code, out, _ = umv2("sweep", "cancel", sweep)
    assert code == 0 and out.startswith("cancelled 2 Slurm jobs")
    wait_until(lambda: status(umv2, sweep)["pending"] == 2, "both runs to stop")
    stopped = last_step(runs[0])
    assert checkpoint_step(runs[0]) == stopped and 10 <= stopped < 300  # it checkpointed on the way out
    assert last_step(runs[1]) == 0
    code, out, _ = umv2("sweep", "cancel", sweep)
    assert out.startswith("cancelled nothing")

    code, out, err = umv2("sweep", "resume", sweep, "--wait")
    assert code == 0 and "launched 2 runs (0 not done)" in out, err
    assert len(jobs_of(sweep)) == 4  # resumed on Slurm, as recorded in launch.json
    assert all(steps_logged(run) == list(range(1, 301)) for run in runs)


# ----------------------------------------------------------------------------------------------
# without a cluster


def test_slurm_times_read_as_slurm_reads_them():
    assert [minutes(v) for v in (90, "90", "1:30:00", "2-0", "1-12:00:00", "0:30", "1-1:1")] == \
        [90, 90, 90, 2880, 2160, 1, 1501]
    for bad in ("soon", "1:2:3:4", "0", 0, -5, 1.5, True):
        with pytest.raises(ValueError):
            minutes(bad)


def test_bad_slurm_options_exit_2_with_one_line_each_and_write_nothing(tmp_path, umv2):
    recipe = write_recipe(tmp_path, "bad", steps=4, sizes=[32], slurm='cpus = 0\ntime = "soon"\ncolour = "red"')
    code, _, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 2 and len(err.splitlines()) == 3 and "Traceback" not in err
    assert "slurm.cpus=0" in err and "slurm.time='soon'" in err and "slurm.colour: unknown key" in err
    good = write_recipe(tmp_path, "good", steps=4, sizes=[32])
    code, _, err = umv2("sweep", "run", good, "--out", tmp_path / "out", "--executor", "slurm", "--time", "1:2:3:4")
    assert code == 2 and err.startswith("error: command line: slurm.time='1:2:3:4'")
    code, _, err = umv2("sweep", "run", good, "--out", tmp_path / "out", "--executor", "kubernetes")
    assert code == 2 and "--executor kubernetes: unknown; use one of local, slurm" in err
    assert not (tmp_path / "out").exists()
