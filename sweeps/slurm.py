"""Slurm: a sweep's runs as job arrays through submitit, and the scheduler's view of them.

`submit(sweep, runs, options)` sends one `SlurmRun` per run, in job arrays (`map_array`) of at
most the cluster's MaxArraySize tasks, and records each run's job in `<sweep>/jobs.jsonl`:

    {"run_id": "3f9a…", "job_id": "812_4", "log": "slurm/20261122-101500-123456/812_4_0_log.out"}

one line per run and submission; a run's last line names its current job. submitit's files (the
pickled run, its logs) go to `<sweep>/slurm/<submission time>/`, a new folder per submission, so a
cluster that restarts its job ids never meets an old job's files.

A run of several processes (`nodes`, `gpus` or `tasks` per node in `[slurm]`) is one job of nodes ×
tasks Slurm tasks, each a process of the run (`umv2cli.parallel`). A run is `Checkpointable`. When Slurm preempts it or its time limit nears, the job gets submitit's
signal (USR2) `signal_delay_s` (90 s) before the kill; `train` checkpoints after the current step,
and submitit's handler requeues the job, which resumes from the checkpoint. A requeue by an admin
(`scontrol requeue`) or a cancel sends SIGTERM instead: the run checkpoints and the job exits with
code 3, and Slurm requeues it or not.

`job_states` asks squeue once for all of a sweep's jobs, and sacct once for the jobs squeue has
forgotten (never one query per job: many clusters rate-limit their controller). `cancel` is one
scancel. Recipes give options in a `[slurm]` table (`SLURM_KEYS`); the command line overrides them.
"""

import dataclasses
import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umv2cli.errors import UserError
from umv2cli.files import write_atomic

RUNNING = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"})
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING",
                    "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED"})
FAILED = frozenset({"FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"})
"""Slurm job states: alive and on a node, alive and waiting, and ended by a failure (the others,
COMPLETED, CANCELLED, PREEMPTED, leave a run that is not done ready to resume)."""
QUERY_TIMEOUT_S = 60
"""A Slurm command that gets no answer in this time counts as failed (a controller that is down
makes clients retry for minutes)."""


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each run's job; None leaves it to the cluster's defaults."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 60
    """Minutes per job (a requeued job gets them again). At least 60 for preemption to be told
    apart from a timeout: submitit counts a signal after min(0.8·time, time − 10) minutes as one."""
    nodes: int | None = None
    """Nodes per run (default 1)."""
    gpus: int | None = None
    """GPUs per node of a run; a run is one process per GPU (`tasks`)."""
    tasks: int | None = None
    """Processes per node of a run (default: one per GPU, or 1). Above 1 process in all, the run's
    job is nodes × tasks Slurm tasks that train it together (`umv2cli.parallel`)."""
    cpus: int | None = None
    """CPUs per process."""
    mem_gb: float | None = None
    constraint: str | None = None
    array_parallelism: int | None = None
    """At most this many runs of one array at a time."""

    @property
    def tasks_per_node(self) -> int:
        return self.tasks or self.gpus or 1

    @property
    def processes(self) -> int:
        """Processes of one run: nodes × tasks per node."""
        return (self.nodes or 1) * self.tasks_per_node

    def submitit_parameters(self) -> dict[str, Any]:
        """`AutoExecutor.update_parameters` keywords. A run of several processes is one task each;
        srun ends them all when one fails (--kill-on-bad-exit), so none waits on a dead one."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "tasks"}
        generic = {"time": "timeout_min", "nodes": "nodes", "gpus": "gpus_per_node", "cpus": "cpus_per_task",
                   "mem_gb": "mem_gb"}
        parameters = {generic.get(k, f"slurm_{k}"): v for k, v in given.items()}
        if self.processes > 1:
            parameters |= {"tasks_per_node": self.tasks_per_node, "slurm_srun_args": ["--kill-on-bad-exit=1"]}
        return parameters


SLURM_KEYS = tuple(f.name for f in dataclasses.fields(SlurmOptions))


def slurm_options(table: dict[str, Any], where: str = "slurm") -> SlurmOptions:
    """A `[slurm]` table (or the command line's options as one) → `SlurmOptions`; every problem
    at once, one line each."""
    problems = slurm_table_problems(table, where)
    if problems:
        raise UserError(*problems)
    values = {k: v for k, v in table.items() if v is not None}
    if "time" in values:
        values["time"] = minutes(values["time"])
    return SlurmOptions(**values)


def slurm_table_problems(table: Any, where: str) -> list[str]:
    if not isinstance(table, dict):
        return [f"{where}: slurm: expected a table of job options ({', '.join(SLURM_KEYS)})"]
    problems = []
    for key, value in table.items():
        field = f"{where}: slurm.{key}={value!r}"
        if key not in SLURM_KEYS:
            problems.append(f"{where}: slurm.{key}: unknown key; allowed: {', '.join(SLURM_KEYS)}")
        elif value is None:
            continue
        elif key in ("partition", "account", "qos", "constraint") and not (isinstance(value, str) and value):
            problems.append(f"{field}: expected a non-empty string")
        elif key in ("nodes", "gpus", "tasks", "cpus", "array_parallelism") and not (_is_int(value) and value > 0):
            problems.append(f"{field}: expected a positive integer")
        elif key == "mem_gb" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            problems.append(f"{field}: expected a positive number of gigabytes")
        elif key == "time":
            try:
                minutes(value)
            except ValueError:
                problems.append(f"{field}: expected minutes, or a Slurm time such as \"4:00:00\" or \"1-12:00:00\"")
    return problems


def minutes(value: int | str) -> int:
    """A Slurm time limit → whole minutes (rounded up): 90, "90", "1:30:00", "2-0", "1-12:00:00".
    Slurm reads "M", "M:S", "H:M:S", "D-H", "D-H:M" and "D-H:M:S"."""
    if _is_int(value) and value > 0:
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"not a Slurm time: {value!r}")
    days, *clock = match.groups()
    parts = [int(p) for p in clock if p is not None]
    if days is None:  # M, M:S or H:M:S
        seconds = {1: lambda m: 60 * m, 2: lambda m, s: 60 * m + s, 3: lambda h, m, s: 3600 * h + 60 * m + s}
    else:  # D-H, D-H:M or D-H:M:S
        seconds = {1: lambda h: 3600 * h, 2: lambda h, m: 3600 * h + 60 * m, 3: lambda h, m, s: 3600 * h + 60 * m + s}
    total = 86400 * int(days or 0) + seconds[len(parts)](*parts)
    if total <= 0:
        raise ValueError(f"not a positive time: {value!r}")
    return -(-total // 60)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# a run as a job


class SlurmRun:
    """One run as a Slurm job: trains, or resumes from the run's checkpoint after a requeue.
    Checkpointable in submitit's sense (it has `checkpoint`), without importing submitit here.
    A job of several tasks trains one run together: each task is a process of it, its rank and the
    master's address from submitit's JobEnvironment (exported as torch.distributed reads them)."""

    def __call__(self, spec, run_dir: Path) -> str:
        import submitit
        import submitit.helpers

        from umv2cli.sweeps.launch import execute_run

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        status = execute_run(spec, run_dir)
        if status.startswith("stopped by "):  # "stopped by SIGUSR2 at step 40": checkpointed
            signum = signal.Signals[status.split()[2]]
            if signum == getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG):
                if job.global_rank != 0:
                    return status  # rank 0 requeues the job; exiting with an error would have srun end it first
                signal.raise_signal(signum)  # submitit's handler: checkpoint(), requeue, exit
            sys.exit(3)  # SIGTERM: Slurm is ending or requeueing the job; no result file
        return status

    def checkpoint(self, spec, run_dir: Path):
        """Called by submitit on preemption or timeout: resubmit the same call, which resumes
        (`train` saved the state before it returned)."""
        import submitit.helpers

        return submitit.helpers.DelayedSubmission(self, spec, run_dir)


def submit(sweep: Path, runs: list, options: SlurmOptions) -> list[str]:
    """Submit `runs` (`PlannedRun`s) as job arrays; record and return their job ids, in order."""
    import submitit

    _need("sbatch")
    sweep = sweep.resolve()  # the jobs may start in another directory
    chunk = max(1, max_array_size())
    folder = sweep / "slurm" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(name=f"umv2-{sweep.name}", **options.submitit_parameters())
    job_ids = []
    for start in range(0, len(runs), chunk):
        part = runs[start:start + chunk]
        jobs = executor.map_array(SlurmRun(), [r.spec for r in part], [sweep / "runs" / r.run_id for r in part])
        record_jobs(sweep, [{"run_id": r.run_id, "job_id": job.job_id, "log": str(job.paths.stdout.relative_to(sweep))}
                            for r, job in zip(part, jobs)])
        job_ids += [job.job_id for job in jobs]
    return job_ids


def max_array_size() -> int:
    """The cluster's MaxArraySize: an array's task indices must stay below it (0 disables arrays)."""
    config = _slurm("scontrol", "show", "config")
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    return int(match.group(1)) if match else 1001


# ----------------------------------------------------------------------------------------------
# jobs.jsonl


def record_jobs(sweep: Path, lines: list[dict]) -> None:
    path = sweep / "jobs.jsonl"
    old = path.read_bytes() if path.exists() else b""
    write_atomic(path, old + "".join(json.dumps(line) + "\n" for line in lines).encode())


def read_jobs(sweep: Path) -> dict[str, dict]:
    """{run_id: its last job line}; a damaged line is skipped (its run's lock still keeps a second writer out)."""
    from umv2cli.files import Damaged, read_text

    path = sweep / "jobs.jsonl"
    try:
        text = read_text(path)
    except (FileNotFoundError, Damaged):
        return {}
    jobs = {}
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("run_id"), str) and isinstance(line.get("job_id"), str):
            jobs[line["run_id"]] = line
    return jobs


# ----------------------------------------------------------------------------------------------
# the scheduler's view


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """{job id: Slurm state} of the jobs Slurm knows ({} where this machine has no Slurm): one
    squeue call for all of them, then one sacct call for those squeue has forgotten (after
    MinJobAge), if the cluster keeps accounting."""
    ids = sorted(set(job_ids))
    if not ids or shutil.which("squeue") is None:
        return {}
    arrays = sorted({i.split("_")[0] for i in ids})  # an array's id lists all its tasks
    # squeue fails if its one job id is unknown; sacct fails without accounting
    states = _states("squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T")
    forgotten = [i for i in ids if i not in states]
    if forgotten and shutil.which("sacct"):
        states |= _states("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(forgotten))
    return {i: states[i] for i in ids if i in states}


def _states(*command: str) -> dict[str, str]:
    """Lines "812_4|RUNNING" or "812_4|CANCELLED by 0" → {"812_4": "RUNNING", …}; {} if the command
    fails or gets no answer from Slurm within QUERY_TIMEOUT_S."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {}
    pairs = (line.split("|", 1) for line in result.stdout.splitlines() if "|" in line)
    return {job: state.split()[0] for job, state in pairs if state.strip()} if result.returncode == 0 else {}


def cancel(job_ids: list[str]) -> None:
    """One scancel for all `job_ids`; each running run gets SIGTERM, checkpoints and exits."""
    if job_ids:
        _slurm("scancel", *job_ids)


def _need(command: str) -> None:
    if shutil.which(command) is None:
        raise UserError(f"--executor slurm: no `{command}` on this machine; run on a Slurm login node, or start "
                        "the one-node test cluster with `sudo .ci/slurm-up`")


def _slurm(*command: str) -> str:
    _need(command[0])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(command[:2])}: no answer in {QUERY_TIMEOUT_S} s; is the Slurm controller "
                        "up (sinfo)?") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines() or ["no message"]
        raise UserError(f"{' '.join(command[:2])}: failed ({message[-1]}); is the Slurm controller up (sinfo)?")
    return result.stdout
