"""`umv2 fit` through a Typer root with the real error handling of `umv2cli.cli.app.main`."""

import json
import sys

import numpy as np
import polars as pl
import pytest
import typer

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from test_fit import planted_loglinear  # noqa: E402


@pytest.fixture
def fit_cli(capsys):
    """Run `umv2 fit ARGS…` on a root that registers the command as app.py will; (code, stdout, stderr)."""
    from umv2cli.cli import fit as fit_cmd
    from umv2cli.errors import UserError

    app = typer.Typer(pretty_exceptions_show_locals=False)
    app.command(name="fit")(fit_cmd.fit)

    @app.callback()
    def root() -> None:
        """umv2"""

    def run(*args) -> tuple[int, str, str]:
        try:
            app(["fit", *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except UserError as e:  # what umv2cli.cli.app.main does
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
            code = 2
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "runs.csv"
    planted_loglinear(-0.02, -0.05, 0.001).write_csv(path)
    return path


def test_fit_prints_the_verdict_and_writes_json(fit_cli, table, tmp_path):
    code, out, err = fit_cli(table, "--bootstrap", "300", "--seed", "3", "--json", tmp_path / "fit.json")
    assert code == 0, err
    assert "verdict: density outranks" in out and "case bootstrap, B = 300" in out
    report = json.loads((tmp_path / "fit.json").read_text())
    assert {"form", "params", "e_m", "e_P", "R", "R_ci", "verdict", "heldout_rmse", "seed_sigma", "n_runs"} <= report.keys()
    assert report["verdict"] == "density outranks" and report["R_ci"][0] > 1 and report["n_runs"] == 32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fit.json")] == []  # temp file renamed


def test_fit_reads_a_sweep_directory_and_is_deterministic_for_a_seed(fit_cli, table, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pl.read_csv(table).write_parquet(sweep / "results.parquet")
    fit_cli(sweep, "--bootstrap", "200", "--seed", "9", "--json", tmp_path / "a.json")
    fit_cli(table, "--bootstrap", "200", "--seed", "9", "--json", tmp_path / "b.json")
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["R_ci"] == b["R_ci"] and a["params"] == b["params"]


@pytest.mark.parametrize("edit, needle", [
    (lambda df: df.drop("tokens"), "missing column `tokens`"),
    (lambda df: df.with_columns(loss=pl.when(pl.int_range(pl.len()) == 5).then(-1.0).otherwise(pl.col("loss"))),
     "column `loss` row 5"),
    (lambda df: df.with_columns(topm=pl.col("topm").cast(pl.String) + "x"), "column `topm` is not numeric"),
    (lambda df: df.head(6), "needs ≥ 2 values of sparse_params and of topm"),
    (lambda df: df.filter(pl.col("topm") < 100).filter(pl.col("sparse_params") < 3e8), "sparse configurations"),
])
def test_bad_table_exits_2_with_one_line_naming_the_problem(fit_cli, tmp_path, edit, needle):
    path = tmp_path / "bad.csv"
    edit(planted_loglinear(-0.02, -0.05)).write_csv(path)
    code, out, err = fit_cli(path, "--bootstrap", "10")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_unreadable_or_missing_file_exits_2(fit_cli, tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    for path in (tmp_path / "junk.parquet", tmp_path / "absent.csv", tmp_path):
        code, _, err = fit_cli(path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_unknown_form_is_a_usage_error(fit_cli, table):
    code, _, err = fit_cli(table, "--form", "leverage")
    assert code == 2 and "leverage" in err
