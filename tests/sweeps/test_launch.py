"""Local launching and the ledger: idempotent sweeps, failures with reasons, retries."""

import dataclasses
import json
from pathlib import Path

RECIPES = Path(__file__).parents[2] / "recipes"

MICRO = """name = "micro"
model = "tiny-dense"
[train]
steps = 4
batch_size = 2
seq_len = 16
eval_batches = 1
task_samples = 0
{extra}
[grid]
ffn_hidden = [32, 48]
"""


def test_smoke_sweep_finishes_then_launches_nothing_and_reports_all_done(tmp_path, umv2):
    code, out, err = umv2("sweep", "run", RECIPES / "smoke.toml", "--out", tmp_path, "--executor", "local")
    assert code == 0, err
    assert "launched 6 runs (0 not done)" in out
    sweep = tmp_path / "smoke"
    assert {p.name for p in sweep.iterdir()} == {"recipe.toml", "plan.parquet", "launch.json", "runs"}
    stamps = {p: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/STATUS")}
    code, out, _ = umv2("sweep", "run", RECIPES / "smoke.toml", "--out", tmp_path)
    assert code == 0 and "6 of 6 runs already done; nothing to launch" in out
    assert {p: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/STATUS")} == stamps  # nothing re-run
    code, out, _ = umv2("sweep", "status", sweep, "--json")
    status = json.loads(out)
    assert code == 0 and status["total"] == status["done"] == 6
    assert status["failed"] == status["running"] == status["pending"] == 0 and status["progress"] == 1.0


def test_a_failed_run_is_listed_with_its_reason_and_retried_on_request(tmp_path, umv2):
    recipe = tmp_path / "micro.toml"
    recipe.write_text(MICRO.format(extra="lr = 1e30\ngrad_clip = 0.0"))  # diverges at step 2
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--workers", "1", "--runs-per-gpu", "2")
    assert code == 1 and "launched 2 runs (2 not done)" in out
    launched = json.loads((tmp_path / "out" / "micro" / "launch.json").read_text())
    assert (launched["workers"], launched["runs_per_gpu"]) == (1, 2)  # for `sweep resume`
    code, out, _ = umv2("sweep", "status", tmp_path / "out" / "micro", "--json")
    status = json.loads(out)
    assert status["failed"] == 2 and all("non-finite" in f["reason"] for f in status["failures"])
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out")
    assert "0 of 2 runs already done, 2 failed (--retry-failed runs them again); nothing to launch" in out
    # failed runs stay failed …
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out", "--retry-failed")
    assert "launched 2 runs" in out  # … until asked


def test_a_started_run_resumes_instead_of_starting_over(tmp_path, umv2):
    from umv2cli.sweeps.launch import prepare_sweep
    from umv2cli.train import read_metrics, train

    recipe = tmp_path / "micro.toml"
    recipe.write_text(MICRO.format(extra="ckpt_every = 2"))
    sweep, _, runs = prepare_sweep(recipe, tmp_path / "out")
    first = runs[0]
    partial = dataclasses.replace(first.spec, train=dataclasses.replace(first.spec.train, steps=2))
    train(partial, sweep / "runs" / first.run_id)  # a run stopped after its step-2 checkpoint …
    (sweep / "runs" / first.run_id / "STATUS").unlink()
    (sweep / "runs" / first.run_id / "spec.json").write_text(json.dumps(first.spec.to_dict()))
    code, out, _ = umv2("sweep", "status", sweep, "--json")
    assert json.loads(out)["running"] == 1 and json.loads(out)["pending"] == 1
    code, out, _ = umv2("sweep", "run", recipe, "--out", tmp_path / "out")
    assert code == 0 and "launched 2 runs" in out
    assert [m["step"] for m in read_metrics(sweep / "runs" / first.run_id)] == [1, 2, 3, 4]  # … continues


def test_status_of_a_directory_that_is_no_sweep_exits_2(tmp_path, umv2):
    code, _, err = umv2("sweep", "status", tmp_path)
    assert code == 2 and "no plan.parquet" in err and err.count("\n") == 1


def synthetic_sweep(sweep: Path, n: int, steps: int = 200) -> None:
    """A sweep directory of `n` runs of `steps` logged steps each, as `sweep run` leaves one: 60%
    done, 10% failed, 20% started and 10% not started."""
    import polars as pl

    ids = [f"{i:012x}" for i in range(n)]
    (sweep / "runs").mkdir(parents=True)
    pl.DataFrame({"run_id": ids, "steps": [steps] * n}).write_parquet(sweep / "plan.parquet")
    line = {"step": 0, "tokens": 0, "lr": 0.003, "train_loss": 3.1415926, "grad_norm": 0.5, "tokens_per_s": 12345.6}
    metrics = "".join(json.dumps(line | {"step": s, "tokens": 2048 * s}) + "\n" for s in range(1, steps + 1))
    for i, run_id in enumerate(ids):
        run = sweep / "runs" / run_id
        run.mkdir()
        if i % 10 < 9:
            (run / "metrics.jsonl").write_text(metrics)
        if i % 10 < 6:
            (run / "STATUS").write_text("done\n")
        elif i % 10 == 6:
            (run / "STATUS").write_text("failed: non-finite loss (nan) at step 200\n")


def test_status_of_1000_runs_takes_under_a_second(tmp_path, umv2):
    import time

    from umv2cli.sweeps.ledger import sweep_status

    synthetic_sweep(tmp_path / "big", 1000)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state = sweep_status(tmp_path / "big")
        times.append(time.perf_counter() - start)
    assert (state["done"], state["failed"], state["running"], state["pending"]) == (600, 100, 200, 100)
    print(f"umv2 sweep status of 1,000 runs: {min(times):.3f} s (best of 3)")
    assert min(times) < 1.0
