"""`umv2 fit` through the real app (`umv2` fixture): the printed verdict, the JSON, a planned recipe's pairs, and bad
tables."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

pl = pytest.importorskip("polars")
from fit_planted import planted_leverage, planted_loglinear

RECIPES = Path(__file__).parents[2] / "recipes"

REPORT_FIELDS = {"form", "params", "e_m", "e_P", "R", "R_ci", "verdict", "heldout_rmse", "seed_sigma", "n_runs",
                 "converged", "start_objectives", "start_objective_spread", "heldout_mae", "extrapolation_rmse",
                 "forms_heldout", "iso_cost_pairs", "sign_test", "params_ci", "e_m_ci", "e_P_ci", "bootstrap",
                 "sentence", "delta", "delta_ci", "verdict_reason", "paper_trade", "paper_trade_ci", "resamples_failed",
                 "R_note", "R_infinite", "paper_trade_effect", "robustness", "below_floor", "fitted_on"}


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "runs.csv"
    planted_loglinear(-0.02, -0.05, 0.001).write_csv(path)
    return path


def test_fit_prints_the_verdict_sentence_and_writes_every_json_field(umv2, table, tmp_path):
    code, out, err = umv2("fit", table, "--bootstrap", "300", "--seed", "3", "--json", tmp_path / "out" / "fit.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-2] == ("verdict: density outranks: e_m's interval " + lines[-2].split("e_m's interval ")[1]) and \
        lines[-2].endswith("lie below 0: density helps, and more than table size does")
    assert lines[-4].startswith("The paper's trade (halve P, triple m) changes log L by −0.0") and \
        lines[-4].endswith(": it helps here.")
    assert lines[-3].startswith("Refit on the eval loss before the cooldown: not possible")
    # the report sentence, filled in
    assert lines[-1].startswith("Within P ∈ [1e+08, 8e+08], m ∈ [32, 256], D = 4e+09 tokens, backbone N_a = 2e+08, "
                                "at matched FLOPs/token (±0%), e_m = −0.")
    assert "(case bootstrap, B = 300, resampling configurations with their runs; 0 refits failed): density outranks: " \
           "e_m's interval" in lines[-1] and "The loglinear model predicts 16 held-out configs with MAE" in lines[-1]
    assert lines[-1].endswith("Not tested beyond this range.")
    assert "density has the lower loss in 14 of 14 (descriptive: pairs share configurations); in 6 of the 6 that " \
           "share none (sign test p = 0.031)" in out and "loglinear on the table's loss: 32 runs, 16 configs" in out
    r = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert REPORT_FIELDS <= r.keys()
    assert r["form"] == "loglinear" and set(r["params"]) == {"c0", "a", "b", "c"} and r["n_runs"] == 32
    assert r["e_m"] < r["e_P"] < 0 and r["R"] == pytest.approx(r["e_m"] / r["e_P"])
    assert r["delta"] == pytest.approx(r["e_m"] - r["e_P"]) and r["delta_ci"][1] < 0 and r["R_note"] is None
    assert r["paper_trade"] == pytest.approx(r["e_m"] * math.log(3) - r["e_P"] * math.log(2))
    assert r["paper_trade_ci"][1] < 0 and r["paper_trade_effect"] == "helps" and r["resamples_failed"] == 0
    assert len(r["R_ci"]) == 2 and 1 < r["R_ci"][0] < r["R"] < r["R_ci"][1] and r["verdict"] == "density outranks"
    assert r["converged"] is True and len(r["start_objectives"]) == 5 and r["start_objective_spread"] < 1e-12
    assert 0 < r["heldout_rmse"] < 0.05 and 0 < r["extrapolation_rmse"] < 0.05 and 0 < r["seed_sigma"] < 0.05
    assert r["forms_heldout"]["loglinear"]["loco_configs"] == 16 and "skipped" in r["forms_heldout"]["modulated"]
    assert len(r["iso_cost_pairs"]) == 14 and r["sign_test"]["density_wins"] == 14
    assert r["bootstrap"] == {"B": 300, "seed": 3, "unit": "configurations, each with all its runs (seeds)",
                              "failed": 0}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fit.json"]  # the temp file was renamed


def test_fit_leverage_on_a_dense_ladder_and_a_sparse_grid(umv2, tmp_path):
    path = tmp_path / "runs.parquet"
    planted_leverage(0.3, 0.1, -5.5).write_parquet(path)
    code, out, err = umv2("fit", path, "--form", "leverage", "--bootstrap", "100", "--json", tmp_path / "f.json")
    assert code == 0, err
    assert "verdict: count outranks: e_P's interval" in out
    assert "leverage on the table's loss: 38 runs, 22 configs" in out
    assert "changes log EL, the log of the dense compute a run is worth, by −0." in out and "it hurts here" in out
    r = json.loads((tmp_path / "f.json").read_text())
    assert r["params"]["u"] == pytest.approx(0.3, abs=0.02) and r["R_ci"][1] < 1
    assert "loco_rmse" in r["forms_heldout"]["loglinear"]  # the other forms are compared on held-out error


def test_fit_reads_a_directory_with_results_parquet_and_is_deterministic_for_a_seed(umv2, table, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pl.read_csv(table).write_parquet(sweep / "results.parquet")
    assert umv2("fit", sweep, "--bootstrap", "200", "--seed", "9", "--json", tmp_path / "a.json")[0] == 0
    assert umv2("fit", table, "--bootstrap", "200", "--seed", "9", "--json", tmp_path / "b.json")[0] == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["R_ci"] == b["R_ci"] and a["params"] == b["params"]


def set_row(col, value, row=5):
    return lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == row).then(value).otherwise(pl.col(col))
                                      .alias(col))


@pytest.mark.parametrize("edit, needle", [
    (lambda df: df.drop("tokens"), "missing column `tokens`; the table needs run_id, sparse_params"),
    (set_row("loss", -1.0), "column `loss` row 5 is -1; it must be positive"),
    (set_row("flops_per_token", 0.0), "column `flops_per_token` row 5 is 0; it must be positive"),
    (set_row("tokens", None), "column `tokens` row 5 is empty or not finite; fill or drop the row"),
    (set_row("loss", float("inf")), "column `loss` row 5 is empty or not finite; fill or drop the row"),
    (set_row("loss", 1e300), "column `loss` row 5 is 1e+300, more than 10× from the table's median"),
    (set_row("seed", 0.5), "column `seed` row 5 is 0.5; a seed is a whole number; fix or drop the row"),
    (lambda df: df.with_columns(topm=pl.col("topm").cast(pl.String) + "x"),
     "column `topm` is not numeric (row 0: '32.0x'); write numbers"),
    (lambda df: df.head(0), "the table has no rows"),
    (lambda df: df.head(6), "needs ≥ 2 values of sparse_params and of topm"),
    (lambda df: df.filter(pl.col("topm") < 100).filter(pl.col("sparse_params") < 3e8), "sparse configurations"),
])
def test_bad_table_exits_2_with_one_line_naming_the_column_and_the_fix(umv2, tmp_path, edit, needle):
    path = tmp_path / "bad.csv"
    edit(planted_loglinear(-0.02, -0.05)).write_csv(path)
    code, out, err = umv2("fit", path, "--bootstrap", "10")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_leverage_without_a_dense_ladder_names_what_is_missing(umv2, table):
    code, _, err = umv2("fit", table, "--form", "leverage")
    assert code == 2 and "needs a dense ladder: ≥ 3 sizes of rows with sparse_params = 0" in err, err


def test_unreadable_empty_or_missing_file_exits_2(umv2, tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("These are my notes on the sweep.\nIt went well.\n")
    for path, needle in [(tmp_path / "junk.parquet", "cannot read as Parquet"),
                         (tmp_path / "empty.csv", "empty.csv"), (tmp_path / "absent.csv", "no such file"),
                         (tmp_path / "empty", "not a sweep directory (no plan.parquet) and no results.parquet"),
                         (tmp_path / "notes.txt", "notes.txt: not a runs table (no column named run_id")]:
        code, _, err = umv2("fit", path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
        assert "aggregate" not in err and "missing column" not in err


def test_json_path_that_is_a_directory_exits_2_before_fitting(umv2, table, tmp_path):
    code, _, err = umv2("fit", table, "--json", tmp_path)
    assert code == 2 and "--json" in err and "is a directory" in err, err


def test_unknown_form_is_a_usage_error(umv2, table):
    code, _, err = umv2("fit", table, "--form", "joint")
    assert code == 2 and "joint" in err


def test_bench_fit_times_the_bootstrap_of_64_runs(umv2):
    code, out, err = umv2("bench", "fit", "--resamples", "50", "--repeats", "1", "--json")
    r = json.loads(out)
    assert code == 0 and r["runs"] == 64 and r["resamples"] == 50 and r["failed"] == 0, err
    assert 0 < r["bootstrap_s"] <= r["run_fit_s"] and r["R_ci"][0] < r["R"] < r["R_ci"][1]


def test_fit_reports_every_iso_cost_pair_of_the_density_x_size_recipe(umv2, tmp_path):
    """The recipe's plan (no training), with a planted loss: its 4 × 4 grid has 14 pairs (P, k·m) vs (k·P, m), 9 at
    k = 2, 4 at k = 4 and 1 at k = 8, although the planner rounds every P (by up to 0.4%)."""
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe

    plan = pl.DataFrame([run.row for run in build_plan(load_recipe(RECIPES / "density-x-size-1gpu.toml"))])
    assert plan.height == 24 and (plan["sparse_params"] != plan["grid.sparse_params"]).all()
    noise = np.random.default_rng(0).normal(0, 0.003, plan.height)
    plan = plan.with_columns(loss=(1.6 - 0.01 * pl.col("sparse_params").log() - 0.03 * pl.col("topm").log()).exp()
                             * np.exp(noise))
    plan.write_parquet(tmp_path / "plan.parquet")
    plan.drop("grid.sparse_params", "grid.topm").write_csv(tmp_path / "no-grid.csv")
    for table in ("plan.parquet", "no-grid.csv"):
        code, out, err = umv2("fit", tmp_path / table, "--bootstrap", "200", "--json", tmp_path / "fit.json")
        assert code == 0, err
        r = json.loads((tmp_path / "fit.json").read_text())
        ks = sorted(round(p["k"]) for p in r["iso_cost_pairs"])
        assert ks == [2] * 9 + [4] * 4 + [8] and r["sign_test"]["density_wins"] == 14, table
        assert "density has the lower loss in 14 of 14" in out and r["verdict"] == "density outranks"
        corners = [p for p in r["iso_cost_pairs"] if p["k"] == pytest.approx(8, rel=0.02)]
        assert [(p["n_density"], p["n_count"]) for p in corners] == [(3, 3)]  # the corners' seeds 0, 1, 2
