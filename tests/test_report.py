"""`umv2 report`: the page of a finished sweep opens offline in real headless Chromium, draws its figures with
no console error and no network request, is not blank, keeps its legends off the data, clips its histograms to a
readable range, shows accuracies of 0, and escapes every name it shows; `--format png|svg` writes each figure as
an image through kaleido."""

import json
import re
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


FIGURES = ["curves", "grid", "slices", "fit", "bootstrap", "pairs", "tasks"]
"""The figures of a finished sweep's page, in page order, by the names their images get."""


def drawn_figures(dom: str) -> list[str]:
    """Each plotly figure's markup, in page order, from a DOM dumped after the page's scripts ran."""
    return dom.split('class="plot-container plotly"')[1:]


def attributes(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def plot_areas(figure: str) -> dict[str, tuple[float, float, float, float]]:
    """subplot ("xy", "x2y2", …) → (left, top, right, bottom) of its plot area in the figure's pixels: the
    rectangle plotly lays over each plot area to catch the mouse."""
    areas = {}
    for tag in re.findall(r'<rect class="nsewdrag[^>]*>', figure):
        a = attributes(tag)
        x, y = float(a["x"]), float(a["y"])
        areas[a["data-subplot"]] = (x, y, x + float(a["width"]), y + float(a["height"]))
    return areas


def legend_boxes(figure: str) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) of each legend: a <g class="legend"> (legend2, … for more) moved by a translate,
    sized by its background rectangle."""
    boxes = []
    for x, y, rect in re.findall(r'<g class="legend\d*"[^>]*transform="translate\(([-\d.]+),\s*([-\d.]+)\)"[^>]*>'
                                 r'(<rect class="bg"[^>]*>)', figure):
        a = attributes(rect)
        boxes.append((float(x), float(y), float(x) + float(a["width"]), float(y) + float(a["height"])))
    return boxes


def overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def legends_off_the_data(dom: str) -> list[int]:
    """Asserts that no legend of any figure covers a plot area or another legend; returns the number of legends
    of each figure."""
    counts = []
    for i, figure in enumerate(drawn_figures(dom)):
        areas, legends = plot_areas(figure), legend_boxes(figure)
        assert areas, f"figure {i}: no plot area found"
        for legend in legends:
            assert not any(overlap(legend, area) for area in areas.values()), (i, legend, areas)
        assert not any(overlap(a, b) for j, a in enumerate(legends) for b in legends[j + 1:]), (i, legends)
        counts.append(len(legends))
    return counts


def number(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def axis_range(figure: str, axis: str, subplot: str) -> tuple[float, float]:
    """The x range drawn on ``subplot``'s plot area, from the positions of ``axis``'s tick labels."""
    ticks = [(float(x), number(v)) for v, x in re.findall(
        rf'<g class="{axis}tick"><text [^>]*data-unformatted="([^"]+)"[^>]*transform="translate\(([-\d.]+),', figure)]
    (x0, v0), (x1, v1) = ticks[0], ticks[-1]
    left, _, right, _ = plot_areas(figure)[subplot]
    per_pixel = (v1 - v0) / (x1 - x0)
    return v0 + (left - x0) * per_pixel, v0 + (right - x0) * per_pixel


def test_report_of_a_finished_sweep_opens_offline_draws_every_figure_and_is_not_blank(finished_sweep, umv2, tmp_path):
    import html

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
    box = html.unescape(text[text.index('class="verdict"'):text.index("<section>")])
    assert "loglinear law on the final eval loss, 6 runs, 6 configurations" in box
    # one seed on six configurations: a resample drawing fewer than four of them cannot determine the 4-term law
    assert re.search(r"Bootstrap: 200 resamples of configurations with all their runs; [1-9]\d* of them could not "
                     r"be refitted \(a resample that draws too few distinct configurations", box)
    assert "Seed noise: not measured (no configuration has two seeds; give the recipe more seeds" in box
    # the legends of the curves, the slices and the tasks lie beside the data
    assert legends_off_the_data(seen["dom"]) == [1, 0, 1, 0, 0, 0, 1]
    # every memory-task accuracy of this tiny sweep is 0: each is drawn, a marker on the axis, and said
    assert runs.select(pl.col("^task_.*$")).to_numpy().max() == 0
    tasks = drawn_figures(seen["dom"])[FIGURES.index("tasks")]
    left, top, right, bottom = plot_areas(tasks)["xy"]
    points = [(float(x), float(y)) for x, y in
              re.findall(r'<path class="point"[^>]*transform="translate\(([-\d.]+),([-\d.]+)\)', tasks)]
    assert len(points) == 6 * 3 and all(abs(y - (bottom - top)) < 0.5 and 0 < x < right - left for x, y in points)
    assert "Every accuracy is 0 at this scale: no run predicted a graded token" in tasks


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
    """Tables are read by `umv2 fit`'s reader: the same lines for the same mistakes."""
    code, out, err = umv2("report", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "missing: no such file" in err
    (tmp_path / "notes.txt").write_text("P and m\nmore notes\n")
    code, out, err = umv2("report", tmp_path / "notes.txt")
    assert code == 2 and err.count("\n") == 1 and "notes.txt: not a runs table" in err
    (tmp_path / "t.csv").write_text("run_id,loss\nx,1\n")
    code, out, err = umv2("report", tmp_path / "t.csv")
    assert code == 2 and "missing column `sparse_params`" in err
    code, out, err = umv2("report", two_runs(tmp_path / "two.parquet"), "--out", tmp_path / "no" / "dir.html")
    assert code == 2 and "no directory" in err and not (tmp_path / "no").exists()
    code, out, err = umv2("report", tmp_path / "two.parquet", "--images", tmp_path / "no" / "figures")
    assert code == 2 and err.count("\n") == 1 and "--images" in err and "its parent must be a directory" in err
    assert not (tmp_path / "no").exists() and not (tmp_path / "two-report.html").exists()


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
    assert "Seed noise: not measured (no configuration has two seeds; give the recipe more seeds or corner_seeds)." \
        in box
    assert "law on the table's loss, 16 runs" in box
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


def test_histograms_show_the_bulk_of_their_resamples_and_say_how_many_lie_outside(tmp_path, umv2):
    from fit_planted import planted_loglinear

    from umv2cli.fit import run_fit

    # e_P's interval lies just below 0: R = e_m / e_P is reported, and the resamples with e_P near 0 send it far out
    table = planted_loglinear(-0.006, -0.05, noise=0.02, rng=1)
    table.write_csv(tmp_path / "tails.csv")
    assert umv2("report", tmp_path / "tails.csv", "--bootstrap", "400")[0] == 0
    seen = open_page(tmp_path / "tails-report.html", tmp_path)
    assert seen["console"] == []
    assert legends_off_the_data(seen["dom"]) == [0, 1, 0, 0, 0]  # grid, slices (one legend for both), fit, …
    r = run_fit(table, "loglinear", 400, 0, resamples=True, compare=False)  # the page's resamples again
    boot = drawn_figures(seen["dom"])[3]
    stated = re.findall(r">(\d+) of 400 outside \[([-\d.e+]+), ([-\d.e+]+)\]", boot)
    panels = [("x", "xy", "delta"), ("x2", "x2y2", "e_m"), ("x3", "x3y3", "e_P"), ("x4", "x4y4", "R")]
    assert len(stated) == len(panels)
    for (axis, subplot, key), (k, lo, hi) in zip(panels, stated):
        x, (lo, hi), ci = np.asarray(r["resamples"][key]), (float(lo), float(hi)), r[f"{key}_ci"]
        a, b = axis_range(boot, axis, subplot)
        assert lo - 0.05 * (hi - lo) < a < lo and hi < b < hi + 0.05 * (hi - lo), (key, a, b, lo, hi)
        assert a < ci[0] and ci[1] < b and ci[1] - ci[0] > 0.5 * (b - a), (key, ci, a, b)  # the interval is readable
        slack = 0.005 * max(abs(lo), abs(hi))  # the title rounds lo and hi to 3 digits
        assert ((x < lo - slack) | (x > hi + slack)).sum() <= int(k) <= ((x < lo + slack) | (x > hi - slack)).sum()
    R = np.asarray(r["resamples"]["R"])
    assert np.ptp(R[np.isfinite(R)]) > 4 * (b - a) and int(stated[3][0]) > 0  # R's tails are cut off, and counted


def test_each_figure_is_written_as_a_png_with_a_stable_name(finished_sweep, umv2, tmp_path):
    from PIL import Image

    page, folder = tmp_path / "r.html", tmp_path / "r-figures"
    code, out, err = umv2("report", finished_sweep, "--bootstrap", "50", "--out", page, "--format", "png")
    assert code == 0, err
    assert out == f"report: {page}\n" + "".join(f"image: {folder / name}.png\n" for name in FIGURES)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.png" for name in FIGURES)
    assert page.read_text().count('class="plotly-graph-div"') == len(FIGURES)  # one image per figure of the page
    for name in FIGURES:
        with Image.open(folder / f"{name}.png") as image:
            assert image.format == "PNG" and image.width == 2400, (name, image.format, image.size)
            image.verify()
        ink, colours = picture_stats(folder / f"{name}.png")
        assert ink > 0.005, (name, ink, colours)  # an empty plotly_white figure of this size: 0.0008


def test_svg_images_go_to_the_folder_given_and_hold_every_point(tmp_path, umv2):
    import xml.etree.ElementTree as ET

    from fit_planted import planted_loglinear

    planted_loglinear(-0.02, -0.05).write_csv(tmp_path / "t.csv")  # 16 configurations, 2 seeds: 32 runs
    code, out, err = umv2("report", tmp_path / "t.csv", "--bootstrap", "50", "--format", "svg", "--images",
                          tmp_path / "svg")
    assert code == 0, err
    names = ["grid", "slices", "fit", "bootstrap", "pairs"]  # a table has no curves, this one no memory tasks
    assert out.splitlines()[1:] == [f"image: {tmp_path / 'svg' / name}.svg" for name in names]
    for name in names:
        assert ET.parse(tmp_path / "svg" / f"{name}.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    slices = (tmp_path / "svg" / "slices.svg").read_text()
    assert slices.count('class="point"') == 2 * 32  # every run, in both panels


def test_without_a_browser_the_images_fail_in_one_line_and_the_page_is_still_written(tmp_path, umv2, monkeypatch):
    from fit_planted import planted_loglinear

    planted_loglinear(-0.02, -0.05).write_csv(tmp_path / "t.csv")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))  # kaleido looks there and nowhere else
    code, out, err = umv2("report", tmp_path / "t.csv", "--bootstrap", "20", "--format", "png")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --format png: kaleido could not draw the figures (No browser found at BROWSER_PATH")
    assert "install Chromium (apt-get install chromium) or set BROWSER_PATH" in err
    assert f"the HTML report is written: {tmp_path / 't-report.html'}" in err
    assert "Does activation density outrank" in (tmp_path / "t-report.html").read_text()
    assert not (tmp_path / "t-report-figures").exists()
