"""`umv2 report`: the page of a finished sweep opens offline in real headless Chromium, draws its figures with
no console error and no network request, is not blank, and escapes every name it shows."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pl = pytest.importorskip("polars")

from umv2cli.bench import synthetic_sweep

HOSTILE_SWEEP = "tiny<img src=x onerror=console.error(1)>"  # a recipe name is a directory name: no "/"
HOSTILE_RUN = '</script><script>console.error("run")</script><b onmouseover=x>'
RECIPE = f"""
name = "{HOSTILE_SWEEP}"
model = "tiny-ultramemv2"
data = "builtin"
match = "iso-flop"
[train]
steps = 20
batch_size = 8
seq_len = 64
lr = 3e-3
schedule = "wsd"
eval_every = 10
eval_batches = 1
task_samples = 8
[grid]                                 # 6 configurations: the fewest a loglinear fit accepts is 5
sparse_params = [16_384, 32_768, 65_536]
topm = [4, 16]
"""


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory) -> Path:
    """A tiny real sweep (6 runs of 20 steps), run once for the whole session."""
    from umv2cli.sweeps.launch import launch

    root = tmp_path_factory.mktemp("report")
    (root / "tiny.toml").write_text(RECIPE)
    sweep, results = launch(root / "tiny.toml", root / "out", workers=2)
    assert set(results.values()) == {"done"}
    return sweep


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Debian's chromium, headless, offline-safe flags; skips the test where it is not installed."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (`make test` installs it: apt-get install chromium)")
    profile = cwd / "profile"
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd)


def open_page(page: Path, work: Path) -> dict:
    """Load ``page`` twice in headless Chromium: once for its DOM after scripts ran (with the console and the
    network log), once for a 1400×2400 screenshot. Returns the DOM, console lines, page requests, PNG path."""
    net, png = work / "net.json", work / "page.png"
    dom = chromium(f"--log-net-log={net}", "--dump-dom", page.as_uri(), cwd=work)
    shot = chromium(f"--screenshot={png}", "--window-size=1400,2400", page.as_uri(), cwd=work)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    log = json.loads(net.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [e["params"]["url"] for e in log["events"]  # the page's own requests, not the browser's
                if e["type"] == start and e["params"].get("network_isolation_key", "").startswith("file://")]
    console = [line for line in dom.stderr.splitlines() + shot.stderr.splitlines() if ":CONSOLE" in line]
    return {"dom": dom.stdout, "console": console, "requests": requests, "png": png}


def picture_stats(png: Path) -> tuple[float, int]:
    """(share of pixels that are not near-white, number of distinct colours)."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    ink = (rgb < 235).any(axis=1).mean()
    return float(ink), len(np.unique(rgb, axis=0))


def test_report_of_a_finished_sweep_opens_offline_draws_every_figure_and_is_not_blank(finished_sweep, umv2, tmp_path):
    code, out, err = umv2("report", finished_sweep, "--bootstrap", "200")
    page = finished_sweep / "report.html"
    assert (code, out) == (0, f"report: {page}\n"), err
    text = page.read_text()
    assert not any(tag in text for tag in ("<script src", "<link", "@import", 'src="http'))  # plotly.js inlined
    seen = open_page(page, tmp_path)
    assert seen["console"] == []
    assert seen["requests"] == []
    # curves, heatmap, slices, parity, bootstrap, iso-cost pairs ((16k, 16) against (64k, 4) at the grid's nominal
    # values: the planner rounds both P), tasks: each drawn by plotly.js
    assert text.count('class="plotly-graph-div"') == seen["dom"].count('class="plot-container plotly"') == 7
    ink, colours = picture_stats(seen["png"])
    assert ink > 0.10 and colours > 500, (ink, colours)
    runs = pl.read_parquet(finished_sweep / "results.parquet")
    assert all(run_id in text for run_id in runs["run_id"])
    assert "Inconclusive at this budget" in text or "outranks" in text.split("</header>")[1][:400]


def test_the_checks_catch_a_page_whose_plotly_comes_from_a_cdn(finished_sweep, umv2, tmp_path):
    """The negative control: the same page with plotly.js linked instead of inlined is caught."""
    from plotly.offline import get_plotlyjs

    umv2("report", finished_sweep, "--bootstrap", "50", "--out", tmp_path / "inline.html")
    inline = (tmp_path / "inline.html").read_text()
    cdn = inline.replace(f'<script type="text/javascript">{get_plotlyjs()}</script>',
                         '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>')
    assert cdn != inline
    (tmp_path / "cdn.html").write_text(cdn)
    seen = open_page(tmp_path / "cdn.html", tmp_path)
    assert "https://cdn.plot.ly/plotly-latest.min.js" in seen["requests"]
    assert any("Plotly is not defined" in line for line in seen["console"])
    assert seen["dom"].count('class="plot-container plotly"') == 0


def test_names_from_recipes_and_runs_are_escaped_everywhere(finished_sweep, umv2, tmp_path):
    table = pl.read_parquet(finished_sweep / "results.parquet").with_columns(
        run_id=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(HOSTILE_RUN)).otherwise(pl.col("run_id")),
        kind=pl.lit("<i>kind</i>"))
    table.write_csv(tmp_path / "hostile.csv")
    code, out, err = umv2("report", tmp_path / "hostile.csv", "--bootstrap", "50")
    assert code == 0, err
    page = tmp_path / "hostile-report.html"
    assert out == f"report: {page}\n"
    text = page.read_text()
    for raw in (HOSTILE_RUN, "<i>kind</i>", "<b onmouseover", '<script>console.error("run")'):
        assert raw not in text
    assert "&lt;/script&gt;&lt;script&gt;console.error(&quot;run&quot;)" in text  # shown in the run table
    umv2("report", finished_sweep, "--bootstrap", "50", "--out", tmp_path / "sweep.html")
    sweep_text = (tmp_path / "sweep.html").read_text()
    assert HOSTILE_SWEEP not in sweep_text and "tiny&lt;img src=x onerror=console.error(1)&gt;" in sweep_text
    seen = open_page(page, tmp_path)
    assert seen["console"] == [] and seen["requests"] == []


def test_failed_running_and_pending_runs_are_listed_with_their_reasons(tmp_path, umv2):
    sweep = tmp_path / "synthetic"
    synthetic_sweep(sweep, runs=100, rows=60, eval_every=20)
    code, out, err = umv2("report", sweep, "--bootstrap", "50")
    assert code == 0, err
    text = (sweep / "report.html").read_text()
    assert text.count('<tr class="done">') == 97
    assert [text.count(f'<tr class="{s}">') for s in ("failed", "running", "pending")] == [1, 1, 1]
    assert "non-finite loss (nan) at step 31" in text and "stopped or running at step 30 of 60" in text
    assert "97 done" in text and "1 failed" in text


def two_runs(path: Path) -> Path:
    pl.DataFrame({"run_id": ["a", "b"], "sparse_params": [1e4, 4e4], "topm": [4, 4], "activated_params": [1e5, 1e5],
                  "total_params": [2e5, 3e5], "tokens": [1e6, 1e6], "flops_per_token": [1e6, 1e6], "seed": [0, 0],
                  "loss": [3.0, 2.9]}).write_parquet(path)
    return path


def test_a_table_that_cannot_be_fitted_still_gets_a_page_saying_why(tmp_path, umv2):
    two_runs(tmp_path / "two.parquet")
    code, out, err = umv2("report", tmp_path / "two.parquet", "--out", tmp_path / "two.html")
    assert code == 0, err
    text = (tmp_path / "two.html").read_text()
    assert "No verdict yet" in text and "needs ≥ 2 values of sparse_params and of topm" in text


def test_bad_paths_are_one_line_and_exit_2(tmp_path, umv2):
    code, out, err = umv2("report", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "no such table or sweep directory" in err
    (tmp_path / "t.csv").write_text("run_id,loss\nx,1\n")
    code, out, err = umv2("report", tmp_path / "t.csv")
    assert code == 2 and "missing column `sparse_params`" in err
    code, out, err = umv2("report", two_runs(tmp_path / "two.parquet"), "--out", tmp_path / "no" / "dir.html")
    assert code == 2 and "no directory" in err and not (tmp_path / "no").exists()


def test_the_verdict_box_gives_the_decision_its_reason_the_trade_and_what_was_not_measured(tmp_path, umv2):
    import html

    from fit_planted import planted_loglinear

    # one run per configuration (no seed noise), and a bigger table hurts: R is not reported
    planted_loglinear(0.009, -0.05, seeds=1).write_csv(tmp_path / "hurts.csv")
    code, out, err = umv2("report", tmp_path / "hurts.csv", "--bootstrap", "200")
    assert code == 0, err
    text = html.unescape((tmp_path / "hurts-report.html").read_text())
    box = text[text.index('class="verdict"'):text.index("<section>")]
    assert "Density outranks sparse parameter count" in box and "a bigger table hurts (e_P's interval" in box
    assert "R not reported" in box and "R is not reported: e_P's interval lies above 0" in box
    assert "The paper's trade (halve P, triple m) changes log L by −0.0" in box and ": it helps here." in box
    assert "Seed noise: not measured (no configuration has two seeds)." in box
    assert "Bootstrap: 200 resamples of configurations with all their runs; every refit succeeded." in box
    assert "Refit on the eval loss before the cooldown: not possible" in box
    # Δ, e_m and e_P, each saying how many resamples lie outside the range it shows; no R panel
    assert "Uncertainty of Δ, e_m and e_P</h2>" in text and text.count(" of 200 outside [") == 3

    planted_loglinear(-0.02, -0.05).write_csv(tmp_path / "both.csv")  # both help: R is reported, and drawn
    assert umv2("report", tmp_path / "both.csv", "--bootstrap", "200")[0] == 0
    text = html.unescape((tmp_path / "both-report.html").read_text())
    assert "Uncertainty of Δ, e_m and e_P and R</h2>" in text and text.count(" of 200 outside [") == 4
    assert "Seed noise: σ = " in text


def test_reference_models_are_set_beside_the_grid_in_the_verdict_box_and_kept_out_of_its_figures(tmp_path, umv2):
    import html

    from fit_planted import planted_loglinear, row

    grid = planted_loglinear(-0.02, -0.05).with_columns(reference=pl.lit(False), kind=pl.lit("ultramemv2"))
    refs = pl.DataFrame([row("dense-0", 0, 0, 2e8, 4e9, 4e8, 0, 3.25), row("moe-0", 7e8, 2, 2e8, 4e9, 4e8, 0, 3.5)])
    refs = refs.with_columns(reference=pl.lit(True), kind=pl.Series(["dense", "moe"]))
    pl.concat([grid, refs], how="diagonal_relaxed").write_csv(tmp_path / "refs.csv")
    code, out, err = umv2("report", tmp_path / "refs.csv", "--bootstrap", "200")
    assert code == 0, err
    text = html.unescape((tmp_path / "refs-report.html").read_text())
    box = text[text.index('class="verdict"'):text.index("<section>")]
    assert "Reference dense (dense, 1 run, 400M FLOPs/token, not fitted): loss <b>3.25</b>, against" in box
    assert "Reference moe (moe, 1 run" in box and "32 runs, 16 configurations" in box
    assert "7e+08" not in text and "700M" not in text.split("Every run")[0]  # the MoE is in no grid figure
