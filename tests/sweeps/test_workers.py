"""Local workers: their placement on GPUs and CPUs (a pure function, so every machine shape is
checked here without a GPU), and real pools of real processes: what each worker sees, and that
workers never outlive or outrun their parent."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umv2cli.errors import UserError
from umv2cli.sweeps.workers import WorkerPool, WorkerSlot, gpu_names, gpus_for, plan_workers

from waiting import wait_until


def as_before(cpus: list[int], workers: int | None, runs: int) -> list[WorkerSlot]:
    """The placement before GPUs were placed: min(workers or #CPUs, #CPUs, runs) workers, worker w on
    cpus[w::n]."""
    n = max(1, min(workers or len(cpus), len(cpus), runs))
    return [WorkerSlot((), frozenset(cpus[w::n])) for w in range(n)]


@pytest.mark.parametrize("cpus", [[0], [0, 1], list(range(3)), list(range(16)), [0, 2, 5, 7, 11], list(range(64))])
@pytest.mark.parametrize("workers", [None, 1, 3, 100])
@pytest.mark.parametrize("runs", [1, 5, 1000])
def test_without_gpus_the_placement_is_unchanged(cpus, workers, runs):
    assert plan_workers([], cpus, runs_per_gpu=4, workers=workers, runs=runs) == as_before(cpus, workers, runs)


def assert_fair(slots: list[WorkerSlot], cpus: list[int]) -> None:
    """Every CPU is used, and the workers' shares differ by at most one CPU (one CPU each, each CPU
    shared by at most one worker more than another, when there are more workers than CPUs)."""
    sizes = [len(s.cpus) for s in slots]
    uses = [sum(c in s.cpus for s in slots) for c in cpus]
    assert set().union(*(s.cpus for s in slots)) == set(cpus)
    assert max(sizes) - min(sizes) <= 1 and max(uses) - min(uses) <= 1


@pytest.mark.parametrize("n_gpus", [1, 2, 8])
@pytest.mark.parametrize("n_cpus", [1, 2, 4, 16, 128])
@pytest.mark.parametrize("runs_per_gpu", [1, 2, 4, 8])
def test_on_gpus_k_workers_share_each_gpu_and_the_cpus_are_split_fairly(n_gpus, n_cpus, runs_per_gpu):
    gpus, cpus = [str(g) for g in range(n_gpus)], list(range(n_cpus))
    slots = plan_workers(gpus, cpus, runs_per_gpu)
    assert len(slots) == n_gpus * runs_per_gpu
    assert all(len(s.gpus) == 1 for s in slots)
    assert [sum(s.gpus == (g,) for s in slots) for g in gpus] == [runs_per_gpu] * n_gpus
    assert [s.gpus[0] for s in slots[:n_gpus]] == gpus  # the first workers take one GPU each
    assert_fair(slots, cpus)
    if len(slots) <= n_cpus:
        assert sum(len(s.cpus) for s in slots) == n_cpus  # nothing shared


def test_one_gpu_and_sixteen_cpus_give_one_worker_all_of_them():
    assert plan_workers(["0"], range(16)) == [WorkerSlot(("0",), frozenset(range(16)))]


def test_gpu_names_and_counts_of_workers_and_runs_are_kept():
    slots = plan_workers(["2", "GPU-5f"], range(8), runs_per_gpu=2)
    assert [s.gpus for s in slots] == [("2",), ("GPU-5f",), ("2",), ("GPU-5f",)]
    assert [s.gpus for s in plan_workers(["0", "1"], range(8), workers=3)] == [("0",), ("1",), ("0",)]
    few = plan_workers([str(g) for g in range(8)], range(16), runs_per_gpu=4, runs=3)
    assert [s.gpus for s in few] == [("0",), ("1",), ("2",)] and all(len(s.cpus) in (5, 6) for s in few)


def test_gpu_names_follow_cuda_visible_devices():
    assert gpu_names(None, 0) == [] and gpu_names(None, 3) == ["0", "1", "2"]
    assert gpu_names("", 0) == [] and gpu_names("-1", 0) == []
    assert gpu_names("3, 1", 2) == ["3", "1"]
    assert gpu_names("GPU-aa,GPU-bb,7", 2) == ["GPU-aa", "GPU-bb"]  # what CUDA shows: the first `count`


def test_cpu_runs_are_placed_without_gpus_and_a_named_gpu_is_refused():
    assert gpus_for(["cpu", "cpu"], ["0", "1"]) == []
    assert gpus_for(["cpu", "auto"], ["0", "1"]) == ["0", "1"]  # mixed: every worker holds a GPU
    assert gpus_for(["auto", "cuda", "cuda:0"], ["0"]) == ["0"]
    assert gpus_for(["cuda:1"], []) == []  # no GPU here: the run itself says so when it starts
    with pytest.raises(UserError, match=r"train.device='cuda:1': each local worker sees one GPU, as cuda:0"):
        gpus_for(["auto", "cuda:1"], ["0", "1"])


# ----------------------------------------------------------------------------------------------
# real pools


def probe(meeting: Path, others: int) -> dict:
    """In a worker: what it sees, once `others` other workers have arrived too (so that each worker
    answers once)."""
    import torch

    from umv2cli.sweeps.workers import pool_stopping
    from umv2cli.train import configure_cpu

    (meeting / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(meeting.iterdir())) <= others and time.monotonic() < deadline:
        time.sleep(0.05)
    configure_cpu()  # as train() does
    return {"gpus": os.environ["CUDA_VISIBLE_DEVICES"], "cpus": os.sched_getaffinity(0),
            "threads": torch.get_num_threads(), "sigint": signal.getsignal(signal.SIGINT),
            "stopping": pool_stopping(), "cuda_started": torch.cuda.is_initialized()}


def test_each_worker_sees_its_own_gpu_and_cpus_and_ignores_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")  # a sweep run inside a Slurm allocation: not each worker's
    cpus = sorted(os.sched_getaffinity(0))
    slots = plan_workers(["3", "7"], cpus)  # no such GPUs here: only what the workers are told is checked
    with WorkerPool(slots) as pool:
        seen = [f.result(timeout=300) for f in [pool.submit(probe, tmp_path, len(slots) - 1) for _ in slots]]
    assert sorted((s["gpus"], frozenset(s["cpus"])) for s in seen) == sorted((",".join(s.gpus), s.cpus) for s in slots)
    assert all(s["threads"] == len(s["cpus"]) and s["sigint"] == signal.SIG_IGN for s in seen)
    assert not any(s["stopping"] or s["cuda_started"] for s in seen)


LONG = """name = "long"
model = "tiny-dense"
[train]
steps = 1_000_000
batch_size = 2
seq_len = 16
eval_batches = 1
task_samples = 0
ckpt_every = 1_000_000
{train}
[grid]
{grid}
"""


def start_sweep(tmp_path: Path, grid: str, workers: int, train: str = "",
                env: dict[str, str] | None = None, launch: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """`umv2 sweep run` of a recipe of long runs, as its own process writing to tmp_path/std{out,err}
    (files, not pipes, which a worker that outlived it would hold open); (the process, its sweep).
    `launch`: other options of `sweep run` (e.g. --gpus-per-run 2 instead of the workers)."""
    pytest.importorskip("polars", reason="`umv2 sweep run` writes plan.parquet with polars, not installed here")
    recipe = tmp_path / "long.toml"
    recipe.write_text(LONG.format(grid=grid, train=train))
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        parent = subprocess.Popen([sys.executable, "-m", "umv2cli", "sweep", "run", recipe, "--out", tmp_path / "out",
                                   *(launch or ("--workers", str(workers)))], stdout=out, stderr=err, env={**os.environ, **(env or {})},
                                  preexec_fn=ctrl_c_as_in_a_terminal)
    return parent, tmp_path / "out" / "long"


def ctrl_c_as_in_a_terminal() -> None:
    """SIGINT's default action, as a shell gives a foreground command (a test run in the background
    inherits SIGINT ignored, and Python keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def steps_logged(sweep: Path) -> dict[str, int]:
    """Run id → metrics lines, of the runs that have started."""
    return {m.parent.name: len(m.read_text().splitlines()) for m in (sweep / "runs").glob("*/metrics.jsonl")}


def children(pid: int) -> set[int]:
    return {int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}


def alive(pid: int) -> bool:
    """Running, or stopped; not gone and not a zombie waiting to be reaped by init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_the_sweep_parent_alone_kills_its_workers(tmp_path):
    parent, sweep = start_sweep(tmp_path, "ffn_hidden = [32, 48]", workers=2)
    workers: set[int] = set()
    try:
        wait_until(lambda: len(steps_logged(sweep)) == 2 and min(steps_logged(sweep).values()) > 0,
                   "both runs to train")
        workers = children(parent.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, not its process group
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "workers outlived their parent"
    finally:
        for pid in [parent.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


def descendants(pid: int) -> set[int]:
    """Every process below pid now (one that ends while it is read is left out)."""
    found, pending = set(), [pid]
    while pending:
        try:
            below = children(pending.pop())
        except FileNotFoundError:
            continue
        found |= below
        pending += below
    return found


def test_killing_the_sweep_parent_alone_stops_torchrun_and_its_processes(tmp_path):
    """--gpus-per-run 2 without GPUs: one run as two gloo processes under torchrun, which the
    sweep's process starts from a thread; torchrun gets SIGTERM when that process dies and stops
    its ranks."""
    parent, sweep = start_sweep(tmp_path, "ffn_hidden = [32]", workers=1, launch=("--gpus-per-run", "2"))
    tree: set[int] = set()
    try:
        wait_until(lambda: sum(steps_logged(sweep).values()) > 0, "the run to train")
        tree = descendants(parent.pid)
        assert len(tree) >= 3  # torchrun and its two ranks
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not any(map(alive, tree)), "torchrun and its ranks to stop", timeout=60)
    finally:
        for pid in [parent.pid, *tree]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_a_run_that_raises_stops_the_pool_and_no_queued_run_starts(tmp_path):
    """train.device = "cuda" where no GPU is visible passes the plan's checks (they read the data,
    not the machine) and raises in its worker (UserError); the pool stops, and the sweep ends with
    that one line instead of starting the queued runs, each of which would raise the same."""
    parent, sweep = start_sweep(tmp_path, "ffn_hidden = [32, 48, 64, 80]", workers=2,
                                train='device = "cuda"', env={"CUDA_VISIBLE_DEVICES": ""})
    try:
        parent.wait(timeout=300)
    finally:
        parent.kill()
    err = (tmp_path / "stderr").read_text()
    assert parent.returncode == 2 and err.count("\n") == 1, err
    assert "train.device='cuda': no CUDA device here" in err
    # none failed or ended, and none trained (a refused run leaves no directory): stopped, to resume
    assert (sweep / "plan.parquet").exists() and not list(sweep.glob("runs/*/*"))


def test_ctrl_c_stops_running_runs_at_a_checkpoint_and_starts_no_queued_one(tmp_path):
    parent, sweep = start_sweep(tmp_path, "ffn_hidden = [32, 48, 64]", workers=2)
    try:
        wait_until(lambda: len(steps_logged(sweep)) == 2 and min(steps_logged(sweep).values()) > 0,
                   "two runs to train")
        parent.send_signal(signal.SIGINT)  # the parent alone; a terminal sends it to the workers too
        parent.wait(timeout=120)
    finally:
        parent.kill()
    assert parent.returncode == 130  # as a shell reports a command that Ctrl-C ended
    started = steps_logged(sweep)
    assert len(started) == 2, "a queued run started after Ctrl-C"
    for run_id, steps in started.items():
        assert (sweep / "runs" / run_id / "ckpt" / "last.pt").exists() and steps < 1_000_000


# ----------------------------------------------------------------------------------------------
# `umv2 bench pack`: K runs at once on one GPU


def test_packed_throughput_counts_the_tokens_of_the_window_where_all_runs_train():
    from umv2cli.bench import overlap_throughput

    a = [(float(t), 100 * t) for t in range(0, 11)]  # a step a second, 100 tokens each, from t=0 to 10
    b = [(float(t), 50 * (t - 2)) for t in range(2, 13)]  # from t=2 to 12, 50 tokens a step
    # the window: from b's first step + 1 s of warm-up to a's last step, (3, 10]: 7 steps of each
    assert overlap_throughput([a, b], warmup=1) == {"window_s": 7.0, "tokens": 7 * 150, "tokens_per_s": 150.0}
    with pytest.raises(UserError, match="trained together for 8.0 s only, not past a 9 s warm-up; raise --seconds"):
        overlap_throughput([a, b], warmup=9)


def test_pack_trains_a_recipes_middle_grid_point():
    from umv2cli.bench import pack_spec
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe

    smoke = Path(__file__).parents[2] / "recipes" / "smoke.toml"  # sparse_params 16k, 32k, 64k × topm 4, 16
    (middle,) = [r for r in build_plan(load_recipe(smoke)) if (r.row["grid.sparse_params"], r.row["grid.topm"])
                 == (32_768, 4)]
    assert pack_spec(smoke, "tiny-dense") == middle.spec


def test_pack_trains_k_runs_at_once_in_the_sweep_pool(tmp_path):
    """The whole path of the GPU benchmark, with real runs that train together for 2 s; without a GPU
    the workers are told GPU "0" and train on their CPUs."""
    import torch

    from umv2cli.bench import pack_spec, pack_throughput

    spec = pack_spec(None, "tiny-dense")
    rows = pack_throughput(dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=2)),
                           [1, 2], gpu="0", seconds=2, warmup=0.2)
    assert [r["runs_per_gpu"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["tokens"] > 0 and r["window_s"] > 1 and (r["gpu_reserved_gb"] > 0) == torch.cuda.is_available()
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["window_s"])
        assert r["tokens_per_s_per_run"] == pytest.approx(r["tokens_per_s"] / r["runs_per_gpu"])
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])


def test_pack_refuses_bad_values_of_k_and_a_machine_without_gpu(umv2):
    code, _, err = umv2("bench", "pack", "--runs-per-gpu", "1,two")
    assert code == 2 and "--runs-per-gpu 1,two: expected positive integers separated by commas" in err
    code, _, err = umv2("bench", "pack", "--runs-per-gpu", "0")
    assert code == 2 and err.count("\n") == 1
    code, _, err = umv2("bench", "pack")
    assert code == 2 and err == "error: umv2 bench pack: needs a GPU; run it on a GPU machine\n"
