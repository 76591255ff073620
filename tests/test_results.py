"""The shipped answers under results/: each `fit.json` is what `umv2 fit results/<name>/results.parquet`
gives (the same seed gives the same numbers), each `results-at-<F>.parquet` refits to the robustness entry
`fit.json` records at that budget, and each `report.html` opens in headless Chromium with no console error
and no request."""

import json
import math
from pathlib import Path

import pytest
from test_report import open_page, picture_stats

pytest.importorskip("polars")

RESULTS = Path(__file__).parents[1] / "results"
FITS = sorted(RESULTS.glob("*/fit*.json"))
"""Each `fit.json` is the fit of `results.parquet`; each `fit-at-<F>.json`, of `results-at-<F>.parquet` (the same
runs' loss at F training FLOPs: the refit at a second budget)."""
SKIPPED_PATHS = ("source", "forms_heldout")
"""Keys that name the table's path (it differs between the sweep and the checkout), compared apart."""


def table_of(fit: Path) -> Path:
    return fit.with_name(fit.stem.replace("fit", "results", 1) + ".parquet")


@pytest.mark.parametrize("name", ["micro-cpu", "micro-1gpu"])
def test_the_answers_are_shipped_with_their_report_and_readme(name):
    assert all((RESULTS / name / f).exists() for f in ("results.parquet", "fit.json", "report.html", "README.md"))


def same(a, b) -> bool:
    """Equal, floats to 1e-9 relative (a JSON round trip of the same fit, on another BLAS)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("fit", FITS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_umv2_fit_reproduces_the_committed_fit(fit, umv2, tmp_path):
    committed = json.loads(fit.read_text())
    code, out, err = umv2("fit", table_of(fit), "--form", committed["form"], "--bootstrap",
                          str(committed["bootstrap"]["B"]), "--seed", str(committed["bootstrap"]["seed"]),
                          "--json", tmp_path / "fit.json")
    assert code == 0, err
    fresh = json.loads((tmp_path / "fit.json").read_text())
    assert fresh.keys() == committed.keys()
    differing = [k for k in committed if k not in SKIPPED_PATHS and not same(committed[k], fresh[k])]
    assert not differing, differing
    assert same(committed["forms_heldout"]["loglinear"], fresh["forms_heldout"]["loglinear"])
    assert f"verdict: {committed['verdict']}" in out


@pytest.mark.parametrize("name", sorted(p.parent.name for p in RESULTS.glob("*/report.html")))
def test_the_committed_report_opens_with_no_console_error_and_no_request(name, tmp_path):
    page = open_page(RESULTS / name / "report.html", tmp_path)
    assert page["console"] == [] and page["requests"] == [], (page["console"], page["requests"])
    assert page["dom"].count('class="plot-container plotly"') >= 5  # the figures drew
    ink, colours = picture_stats(page["png"])
    assert ink > 0.05 and colours > 50
