"""A sweep under a hostile user: two `sweep run` at once, a run another process holds, damaged files in some
runs and in the sweep's own files, and plans that would fail only after compute. Real processes, real locks;
nothing mocked."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umv2cli.bench import synthetic_sweep
from umv2cli.rundir import hold, read_metrics

MICRO = """name = "micro"
model = "tiny-dense"
[train]
steps = {steps}
batch_size = 2
seq_len = 16
eval_batches = 1
task_samples = 0
[grid]
ffn_hidden = {sizes}
"""


def micro(tmp_path: Path, steps: int, sizes: list[int]) -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(MICRO.format(steps=steps, sizes=sizes))
    return path


def run_lines(out: str) -> dict[str, str]:
    """{run_id: status} from `sweep run`'s per-run lines."""
    return dict(line.split(": ", 1) for line in out.splitlines() if line[:12].isalnum() and line[12:14] == ": ")


def test_two_sweep_runs_at_once_train_every_run_exactly_once(tmp_path):
    recipe, sweep = micro(tmp_path, steps=20, sizes=[32, 48, 64]), tmp_path / "out" / "micro"
    command = [sys.executable, "-m", "umv2cli", "sweep", "run", str(recipe), "--out", str(tmp_path / "out"),
               "--workers", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 300
    while not any(read_metrics(r) for r in (sweep / "runs").glob("*")):  # the first sweep trains a run …
        assert time.time() < end and first.poll() is None, "the first sweep never trained"
        time.sleep(0.05)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # … when this starts
    seen: dict[str, set[bytes]] = {}  # every state of each run's metrics.jsonl the two sweeps went through
    while first.poll() is None or second.poll() is None:
        for run in (sweep / "runs").iterdir():
            if (run / "metrics.jsonl").exists():
                seen.setdefault(run.name, set()).add((run / "metrics.jsonl").read_bytes())
        time.sleep(0.05)
    outputs = [p.communicate() for p in (first, second)]

    runs = sorted((sweep / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        final = (run / "metrics.jsonl").read_bytes()
        assert all(final.startswith(state) for state in seen.get(run.name, ()))  # only ever appended to: one writer
        assert [m["step"] for m in read_metrics(run)] == list(range(1, 21))
        assert (run / "STATUS").read_text() == "done\n"
    for (out, err), process in zip(outputs, (first, second)):
        assert "Traceback" not in err and process.returncode in (0, 1), err
        statuses = run_lines(out).values()
        assert all(s == "done" or s.startswith("running elsewhere: pid ") for s in statuses), out
        assert process.returncode == int(any(s != "done" for s in statuses))
    assert {r for out, _ in outputs for r, s in run_lines(out).items() if s == "done"} == {r.name for r in runs}


def test_a_sweep_leaves_a_held_run_alone_and_marks_damaged_runs_failed_while_the_rest_train(tmp_path, umv2):
    from umv2cli.sweeps.launch import prepare_sweep

    recipe = micro(tmp_path, steps=4, sizes=[32, 48, 64, 80])
    sweep, _, runs = prepare_sweep(recipe, tmp_path / "out")
    held, truncated, unreadable, fresh = (sweep / "runs" / r.run_id for r in runs)
    (truncated / "ckpt").mkdir(parents=True)  # a stopped run whose checkpoint is cut short
    (truncated / "spec.json").write_text(json.dumps(runs[1].spec.to_dict()))
    (truncated / "ckpt" / "last.pt").write_bytes(b"PK\x03\x04" + os.urandom(2000))
    unreadable.mkdir()  # a stopped run whose spec.json is not text
    (unreadable / "spec.json").write_bytes(b"\xff\xfe\x00{")
    (unreadable / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.2}\n')
    with hold(held):  # this test process trains it, as far as anyone can tell
        code, out, _ = umv2("sweep", "status", sweep, "--json")
        assert json.loads(out)["runs"][0]["state"] == "running"
        code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--workers", "2")
    assert code == 1 and "Traceback" not in err, err
    lines = run_lines(out)
    assert lines[held.name].startswith(f"running elsewhere: pid {os.getpid()} on ")
    assert lines[truncated.name].startswith("failed: damaged ckpt/last.pt (")
    assert lines[unreadable.name] == "failed: damaged spec.json (not UTF-8 text: byte 0)"
    assert lines[fresh.name] == "done"
    assert "launched 3 runs (2 not done); 1 running elsewhere, left to them" in out
    assert not (held / "metrics.jsonl").exists()  # never touched
    assert (truncated / "STATUS").read_text().startswith("failed: damaged ckpt/last.pt (")
    code, out, _ = umv2("sweep", "status", sweep, "--json")
    state = json.loads(out)
    assert (state["done"], state["failed"], state["pending"]) == (1, 2, 1)
    assert {f["reason"].split(" (")[0] for f in state["failures"]} == {"damaged ckpt/last.pt", "damaged spec.json"}


def test_damaged_files_of_finished_runs_fail_those_runs_in_status_and_aggregate(tmp_path, umv2):
    sweep = tmp_path / "synthetic"
    synthetic_sweep(sweep, runs=100, rows=20, eval_every=10)  # 97 done, one failed, one running, one pending
    run = [sweep / "runs" / f"{i:012x}" for i in range(6)]
    (run[0] / "eval.json").write_text('{"eval_loss": 3.1, ')
    (run[1] / "STATUS").write_bytes(b"d\xffne\n")
    metrics = (run[2] / "metrics.jsonl").read_bytes()
    (run[2] / "metrics.jsonl").write_bytes(metrics[: len(metrics) // 2])  # done, but truncated
    (run[3] / "eval.json").unlink()
    (run[4] / "STATUS").write_text("dnoe\n")
    lines = (run[5] / "metrics.jsonl").read_bytes().splitlines(keepends=True)  # garbage mid-file, an eval key in it
    (run[5] / "metrics.jsonl").write_bytes(b"".join(lines[:12] + [b'{"eval_loss": oops\n'] + lines[12:]))

    code, out, err = umv2("sweep", "status", sweep, "--json")
    assert code == 0, err
    reasons = {f["run_id"]: f["reason"] for f in json.loads(out)["failures"]}
    assert reasons[run[1].name] == "damaged STATUS (not UTF-8 text: byte 1)"
    assert reasons[run[2].name].startswith("damaged metrics.jsonl (done, but its last valid line is step ")
    assert reasons[run[4].name] == "damaged STATUS (reads 'dnoe', neither done nor failed)"
    assert len(reasons) == 4  # and the run that failed by itself

    code, out, err = umv2("sweep", "aggregate", sweep, "--at-flops", "1e9")
    assert code == 0 and "Traceback" not in err, err
    import polars as pl

    results = pl.read_parquet(sweep / "results.parquet").unique("run_id").sort("run_id")
    reason = dict(zip(results["run_id"], results["reason"]))
    assert reason[run[0].name].startswith("damaged eval.json (not valid JSON")
    assert reason[run[3].name] == "damaged eval.json (missing)"
    assert reason[run[5].name] is None
    assert results["status"].value_counts().sort("status").rows() == [
        ("done", 92), ("failed", 6), ("pending", 1), ("running", 1)]


@pytest.mark.parametrize("file,content,commands", [
    ("plan.parquet", b"PAR1 not really", [["sweep", "status"], ["sweep", "aggregate"], ["sweep", "cancel"],
                                          ["fit"], ["report"]]),
    ("plan.parquet", None, [["sweep", "status"], ["sweep", "aggregate"]]),  # a table without a steps column
    ("launch.json", b'{"executor": "local", "workers": ', [["sweep", "resume"]]),
    ("launch.json", b'{"executor": "ssh", "workers": null, "slurm": {}}', [["sweep", "resume"]]),
])
def test_a_damaged_sweep_file_is_one_line_and_exit_2(tmp_path, umv2, file, content, commands):
    import polars as pl

    sweep = tmp_path / "synthetic"
    synthetic_sweep(sweep, runs=100, rows=20, eval_every=10)
    if content is None:
        pl.DataFrame({"run_id": ["a", "b"]}).write_parquet(sweep / file)
    else:
        (sweep / file).write_bytes(content)
    for command in commands:
        code, out, err = umv2(*command, sweep)
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert err.startswith(f"error: {sweep / file}: damaged ("), (command, err)


# ----------------------------------------------------------------------------------------------
# what `sweep plan` refuses before any compute


VALID = """model = "tiny-ultramemv2"
{top}
[train]
batch_size = 2
{train}
[grid]
{grid}
"""


@pytest.mark.parametrize("top,train,grid,expected", [
    ("", "seq_len = 16\ntask_samples = 8", "topm = [2]", "memory task multi_round_recall: seq_len=16: must be ≥ 18; raise it, or set train.task_samples = 0"),
    ("", "lr = nan", "topm = [2]", "train.lr=nan: must be a finite number"),
    ("", "grad_clip = inf", "topm = [2]", "train.grad_clip=inf: must be a finite number"),
    ("", "beta1 = 1.0", "topm = [2]", "train.beta1=1.0: must be in [0, 1)"),
    ("", "beta2 = -0.5", "topm = [2]", "train.beta2=-0.5: must be in [0, 1)"),
    ("seeds = [9223372036854775808]", "", "topm = [2]", "seeds=[9223372036854775808]: expected a list of integers"),
    ("", "", "sparse_params = [1e300]", "grid.sparse_params[0]=1e+300: expected a positive number of parameters"),
    ("", "", '"sparse.knum" = [10_000_000]', "more than 1e+13, which no run can hold"),
    ("tokens = 1e30", "", "topm = [2]", "tokens, beyond 2^63"),
    (f'name = "{"n" * 300}"', "", "topm = [2]", "300 bytes long; the sweep's folder takes at most 255"),
])
def test_plan_refuses_what_a_run_would_fail_on_only_after_compute(tmp_path, umv2, top, train, grid, expected):
    recipe = tmp_path / "plan.toml"
    length = "" if "tokens" in top else "steps = 2"  # a token budget sets the steps
    recipe.write_text(VALID.format(top=top, train=f"{length}\n{train}", grid=grid))
    for command in (["sweep", "plan", recipe], ["sweep", "run", recipe, "--out", tmp_path / "out"]):
        code, out, err = umv2(*command)
        assert code == 2 and expected in err, err
        assert all(line.startswith("error: ") for line in err.splitlines()), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]  # nothing written


def test_a_grid_of_ten_million_runs_is_counted_and_refused_at_once_unless_forced(tmp_path, umv2):
    from umv2cli.errors import UserError
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe

    axes = ["topm", '"sparse.dv"', '"sparse.dk"', '"sparse.dp"', "ffn_hidden", '"sparse.rank"', '"sparse.cores"']
    huge = tmp_path / "huge.toml"
    grid = "\n".join(f"{axis} = {list(range(1, 11))}" for axis in axes)
    huge.write_text(VALID.format(top="", train="steps = 2", grid=grid))
    start = time.perf_counter()
    code, _, err = umv2("sweep", "plan", huge)
    assert code == 2 and err == f"error: {huge}: the grid has 10,000,000 runs, more than 100,000; shrink it, or " \
                                "pass --force to plan them all\n"
    assert time.perf_counter() - start < 5  # counted, not listed

    small = tmp_path / "small.toml"
    small.write_text(VALID.format(top="seeds = [0, 1]\ncorner_seeds = [7]", train="steps = 2",
                                  grid="topm = [2, 4, 8]\nffn_hidden = [32, 48]"))
    recipe = load_recipe(small)
    assert recipe.size() == len(build_plan(recipe)) == 3 * 2 * 2 + 2 * 2 * 1  # points × seeds + corners × corner seeds
    with pytest.raises(UserError, match="the grid has 16 runs, more than 10"):
        build_plan(recipe, max_runs=10)
    code, out, err = umv2("sweep", "plan", small, "--force", "--json")
    assert code == 0 and len(json.loads(out)) == 16, err


@pytest.mark.parametrize("args,expected", [
    (["sweep", "run", "{recipe}", "--out", "{tmp}/micro.toml"], "cannot write (Not a directory)"),
    (["sweep", "run", "{recipe}", "--out", "/proc/umv2-no-such"], "/proc/umv2-no-such/micro/runs: cannot write"),
    (["report", "{tmp}", "--out", "{tmp}"], "is a directory; give a file name such as"),
])
def test_bad_output_paths_are_one_line_exit_2(tmp_path, umv2, args, expected):
    recipe = micro(tmp_path, steps=2, sizes=[32])
    code, _, err = umv2(*[str(a).replace("{recipe}", str(recipe)).replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.toml"]
