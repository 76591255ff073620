"""Aggregate: every run of a sweep becomes one row of results.parquet, finished or not."""

import json
import math

import pytest

pl = pytest.importorskip("polars")

from umv2cli.bench import synthetic_sweep
from umv2cli.fit import COLUMNS
from umv2cli.sweeps.aggregate import aggregate

ROWS, EVAL_EVERY = 100, 20


@pytest.fixture
def sweep(tmp_path):
    """100 runs: 97 done, run 97 failed at mid-run, 98 running (last line cut short), 99 pending."""
    path = tmp_path / "synthetic"
    synthetic_sweep(path, runs=100, rows=ROWS, eval_every=EVAL_EVERY)
    return path


def metrics(sweep, run_id: str) -> list[dict]:
    lines = (sweep / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_every_run_is_a_row_in_plan_order_with_its_state_and_null_loss_unless_done(sweep):
    results = aggregate(sweep)
    assert results.equals(pl.read_parquet(sweep / "results.parquet"))
    assert [p.name for p in sweep.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert results["run_id"].to_list() == pl.read_parquet(sweep / "plan.parquet")["run_id"].to_list()
    assert set(COLUMNS) <= set(results.columns)
    assert results["status"].value_counts().sort("status").rows() == [
        ("done", 97), ("failed", 1), ("pending", 1), ("running", 1)]
    by_id = {r["run_id"]: r for r in results.iter_rows(named=True)}
    failed, running, pending = by_id[f"{97:012x}"], by_id[f"{98:012x}"], by_id[f"{99:012x}"]
    assert failed["reason"] == f"non-finite loss (nan) at step {ROWS // 2 + 1}" and failed["step"] == ROWS // 2
    assert running["reason"] == f"stopped or running at step {ROWS // 2} of {ROWS}"
    assert pending["reason"] == "not started" and pending["step"] == 0 and pending["train_loss"] is None
    assert failed["loss"] is None and running["loss"] is None and pending["loss"] is None
    last10 = metrics(sweep, running["run_id"])[-10:]
    assert running["train_loss"] == pytest.approx(sum(m["train_loss"] for m in last10) / 10)
    for run_id in (f"{i:012x}" for i in range(3)):
        row, final = by_id[run_id], json.loads((sweep / "runs" / run_id / "eval.json").read_text())
        assert row["status"] == "done" and row["reason"] is None
        assert row["loss"] == row["eval_loss"] == final["eval_loss"]
        assert row["task_associative_recall"] == final["task_associative_recall"]
        assert row["train_loss"] == pytest.approx(sum(m["train_loss"] for m in metrics(sweep, run_id)[-10:]) / 10)
        assert row["train_flops"] == 3 * row["flops_per_token"] * row["tokens"]
        assert row["match"] == "iso-flop"


def test_loss_at_flop_budgets_interpolates_in_log_flops_between_evals(sweep):
    run_id = f"{5:012x}"
    evals = [m for m in metrics(sweep, run_id) if "eval_loss" in m]
    fpt = pl.read_parquet(sweep / "plan.parquet").filter(pl.col("run_id") == run_id)["flops_per_token"][0]
    c = [3 * fpt * m["tokens"] for m in evals]
    mid = math.sqrt(c[1] * c[2])  # halfway between the 2nd and 3rd eval in log FLOPs
    budgets = [c[0], mid, c[-1], c[-1] * 2, c[0] / 2]
    results = aggregate(sweep, budgets)
    assert results.height == 100 * len(budgets)
    rows = results.filter(pl.col("run_id") == run_id).sort("at_flops")
    assert rows["at_flops"].to_list() == sorted(budgets)
    assert rows["loss"].to_list()[1:4] == pytest.approx(
        [evals[0]["eval_loss"], (evals[1]["eval_loss"] + evals[2]["eval_loss"]) / 2, evals[-1]["eval_loss"]])
    assert rows["loss"][0] is None and rows["loss"][4] is None  # before the first and after the last eval
    assert rows["tokens"].to_list() == [round(b / (3 * fpt)) for b in sorted(budgets)]
    assert rows["run_tokens"].unique().to_list() == [ROWS * 8 * 64]
    not_done = results.filter(pl.col("status") != "done")
    assert not_done.height == 3 * len(budgets) and not_done["loss"].null_count() == not_done.height


def write_schedules(sweep, schedules: dict) -> None:
    """spec.json of runs (only the train fields aggregate reads): {run_id: (schedule, cooldown)}."""
    for run_id, (schedule, cooldown) in schedules.items():
        train = {"schedule": schedule, "cooldown": cooldown, "steps": ROWS}
        (sweep / "runs" / run_id / "spec.json").write_text(json.dumps({"train": train}))


def test_the_loss_before_the_cooldown_is_the_last_eval_at_or_before_its_start(sweep):
    ids = [f"{i:012x}" for i in (0, 1, 2, 3, 97)]
    write_schedules(sweep, {ids[0]: ("wsd", 0.2), ids[1]: ("wsd", 0.25), ids[2]: ("cosine", 0.2),
                            ids[3]: ("wsd", 0.0), ids[4]: ("wsd", 0.2)})  # 97 failed
    results = aggregate(sweep)
    by_id = {r["run_id"]: r for r in results.iter_rows(named=True)}
    for run_id, step in ((ids[0], 80), (ids[1], 60)):  # cooldowns from step 80 and 75 of 100; evals every 20
        before = next(m for m in metrics(sweep, run_id) if m["step"] == step)
        assert by_id[run_id]["loss_pre_cooldown"] == before["eval_loss"] != by_id[run_id]["loss"]
        assert by_id[run_id]["tokens_pre_cooldown"] == before["tokens"]
    # a cosine schedule, no cooldown, a failed run, a run without spec.json: none
    for run_id in (*ids[2:], f"{4:012x}"):
        assert by_id[run_id]["loss_pre_cooldown"] is None and by_id[run_id]["tokens_pre_cooldown"] is None


def test_umv2_fit_on_a_sweep_refits_before_the_cooldown_and_at_a_second_budget(sweep, umv2, tmp_path):
    write_schedules(sweep, {f"{i:012x}": ("wsd", 0.2) for i in range(100) if i % 100 < 97})
    budget = 3 * 590_000 * 40 * 8 * 64  # the eval at step 40
    code, out, err = umv2("fit", sweep, "--bootstrap", "50", "--at-flops", budget, "--json", tmp_path / "fit.json")
    assert code == 0, err
    pre, half = json.loads((tmp_path / "fit.json").read_text())["robustness"]
    assert pre["refit"] == "on the eval loss before the cooldown" and pre["n_runs"] == 97 and "verdict" in pre
    assert half["refit"] == f"on the eval loss at {budget:.3g} training FLOPs" and half["n_runs"] == 97
    assert f"on the eval loss at {budget:.3g} training FLOPs: " in out
    assert "at_flops" not in pl.read_parquet(sweep / "results.parquet").columns  # the sweep's table stays final


def test_umv2_fit_on_a_sweep_directory_aggregates_it_and_fits_only_done_runs(sweep, umv2, tmp_path):
    code, out, err = umv2("fit", sweep, "--bootstrap", "50", "--json", tmp_path / "fit.json")
    assert code == 0, err
    assert json.loads((tmp_path / "fit.json").read_text())["n_runs"] == 97
    assert (sweep / "results.parquet").exists()


def test_cli_prints_counts_failures_and_the_table_path(sweep, umv2):
    code, out, err = umv2("sweep", "aggregate", sweep)
    assert code == 0, err
    assert out.splitlines() == [
        f"100 runs: 97 done, 1 failed, 1 running, 1 pending; wrote {sweep / 'results.parquet'} (100 rows)",
        f"  failed {97:012x}: non-finite loss (nan) at step {ROWS // 2 + 1}"]


def test_bad_input_is_one_line_exit_2_and_leaves_results_alone(sweep, umv2, tmp_path):
    aggregate(sweep)
    before = (sweep / "results.parquet").read_bytes()
    code, out, err = umv2("sweep", "aggregate", sweep, "--at-flops", "-1")
    assert (code, err) == (2, "error: --at-flops -1: a budget must be a positive number of training FLOPs, e.g. 1e15\n")
    assert (sweep / "results.parquet").read_bytes() == before
    code, out, err = umv2("sweep", "aggregate", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "no plan.parquet" in err


def test_bench_aggregate_times_a_synthetic_sweep(umv2):
    code, out, err = umv2("bench", "aggregate", "--runs", "100", "--rows", "200", "--repeats", "1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["runs"], r["rows_per_run"], r["budgets"]) == (100, 200, 3)
    assert 0 < r["default_s"] < 10 and 0 < r["at_flops_s"] < 10 and r["metrics_bytes"] > 100 * 200 * 100


def test_the_refits_of_a_sweep_leave_its_reference_runs_out_as_the_main_fit_does(sweep, umv2, tmp_path):
    write_schedules(sweep, {f"{i:012x}": ("wsd", 0.2) for i in range(100) if i % 100 < 97})
    plan = pl.read_parquet(sweep / "plan.parquet")
    plan.with_columns(reference=pl.col("run_id").is_in([f"{0:012x}", f"{1:012x}"])).write_parquet(
        sweep / "plan.parquet")
    budget = 3 * 590_000 * 40 * 8 * 64
    code, _, err = umv2("fit", sweep, "--bootstrap", "50", "--at-flops", budget, "--json", tmp_path / "fit.json")
    assert code == 0, err
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["n_runs"] == 95 and [r["n_runs"] for r in report["robustness"]] == [95, 95]
    assert sum(r["runs"] for r in report["references"]) == 2
