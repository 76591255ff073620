"""`umv2 report`: one self-contained HTML page of a sweep's runs, its fit and the verdict (docs/fitting.md).

Reads a sweep directory (aggregated first, so the table is current; loss curves from each run's
metrics.jsonl) or a runs table (CSV or Parquet with `umv2cli.fit.COLUMNS`; no curves), both through
`umv2cli.fit.read_table`. Fits one law with the case bootstrap (`umv2cli.fit.run_fit`) on the runs that are
done, and lays the page out top to bottom:

1. the verdict and its reason (decided on the signs of e_m, e_P and Δ = e_m − e_P with their 95% intervals),
   the paper's trade, the refits on other losses and budgets, the bootstrap's failures, the seed noise and
   the report sentence (docs/fitting.md);
2. the estimand: P, m, the matching condition, the grid, D, seeds, runs by state;
3. training curves per run (train loss, smoothed; eval points), coloured by P, dashed by m;
4. the final loss over the (P, m) grid, as a heatmap;
5. loss against P at fixed m and against m at fixed P, observed points with the fitted curves;
6. fitted against observed, and the residuals against log P and log m;
7. the bootstrap distributions of Δ, e_m and e_P (and of R where it is reported) with their intervals, each
   cut to the bulk of its resamples; the fit's parameters and held-out error of every form against the seed
   noise;
8. the model-free iso-cost pairs (P, k·m) against (k·P, m);
9. memory-task accuracies per configuration, as markers (an accuracy of 0 shows);
10. the accounting table of every run, failed and unfinished ones included, with their reasons.

The page works offline: plotly.js is inlined once, there is no MathJax, no web font and no link, so opening
it makes no request. Every name that comes from a recipe, a run or a table is HTML-escaped, in the page and
in the figures' labels (plotly renders a subset of HTML in text; its JSON escapes <, > and / by itself).
Figures over the grid use the loss at one token budget D, the most common one in the table. Legends sit
beside the plots (plotly's default, right of the plot area), never on the data. With an image format, each
figure is also written as a PNG or SVG through kaleido (`write_images`).
"""

import datetime
import html
import io
import itertools
import math
from pathlib import Path

import numpy as np

from umv2cli import fit as fitting
from umv2cli.errors import UserError
from umv2cli.files import write_atomic

CURVE_POINTS, CURVE_TOTAL = 400, 100_000
"""Points per training curve on the page (evals always kept), and fewer (down to 50) when the runs together
would pass CURVE_TOTAL: a 10,000-step run is thinned to 400 points, a 1,000-run sweep to 100 each."""
FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
"""Fonts already on the reader's machine: the page loads no web font."""
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
VERDICT_COLOURS = {"density outranks": "#0f766e", "count outranks": "#4338ca", "inconclusive": "#b45309"}
IMAGE_WIDTH, IMAGE_SCALE = 1200, 2
"""Static figures are drawn 1200 px wide at each figure's page height; a PNG at twice that resolution."""


def build_report(path: Path | str, out: Path | str | None = None, form: str = "loglinear", n_boot: int = 2000,
                 seed: int = 0, image_format: str | None = None, images: Path | str | None = None
                 ) -> tuple[Path, list[Path]]:
    """Write the report of a sweep directory or runs table to ``out`` (default: <sweep>/report.html, or
    <table stem>-report.html beside a table), atomically, and with ``image_format`` (png or svg) each figure as
    <images>/<figure>.<format> (default folder: <page stem>-figures beside the page). Returns (the page, the
    images). The page is written first: a figure that cannot be drawn as an image leaves it in place."""
    path = Path(path)
    table, sweep = load_table(path)
    out = Path(out) if out else (sweep / "report.html" if sweep else path.with_name(f"{path.stem}-report.html"))
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no directory {out.parent}; create it or choose another path")
    if image_format:
        images = Path(images) if images else out.with_name(f"{out.stem}-figures")
        if not images.parent.is_dir() or (images.exists() and not images.is_dir()):
            raise UserError(f"--images {images}: not a folder that can be made (its parent must be a directory); "
                            "choose another path")
    result = fit_done_runs(table, form, n_boot, seed, sweep)
    curves = read_curves(sweep, table["run_id"].unique(maintain_order=True).to_list()) if sweep else None
    name = sweep.name if sweep else path.name
    figs = figures(table, result, curves)
    write_atomic(out, page(name, str(path), table, result, figs))
    return out, write_images(figs, images, image_format, out) if image_format else []


def write_images(figs: dict, folder: Path, fmt: str, page: Path) -> list[Path]:
    """Each figure as <folder>/<name>.<fmt>, drawn by kaleido in a headless Chrome or Chromium (Debian's
    /usr/bin/chromium is found by itself; BROWSER_PATH names another) with no network: plotly.js comes from the
    plotly package and MathJax is off. All images are drawn before the folder is made or a file written."""
    import asyncio

    fix = ("install Chromium (apt-get install chromium) or set BROWSER_PATH to a Chrome or Chromium; the HTML "
           f"report is written: {page}")
    try:
        import kaleido
    except ImportError:
        raise UserError(f"--format {fmt}: kaleido is not installed; pip install kaleido, and {fix}") from None

    async def draw() -> list[bytes]:
        async with kaleido.Kaleido(n=1, mathjax=False) as k:
            return [await k.calc_fig(fig, opts=dict(format=fmt, width=IMAGE_WIDTH, height=fig.layout.height,
                                                    scale=IMAGE_SCALE)) for fig in figs.values()]

    try:
        drawn = asyncio.run(draw())
    except Exception as e:  # choreographer and kaleido raise RuntimeErrors of several kinds (no browser, crash)
        first = str(e.args[0] if e.args else type(e).__name__).strip().splitlines()[0].split(". ")[0]
        raise UserError(f"--format {fmt}: kaleido could not draw the figures ({first}); {fix}") from None
    folder.mkdir(exist_ok=True)
    paths = [folder / f"{name}.{fmt}" for name in figs]
    for file, data in zip(paths, drawn):
        write_atomic(file, data)
    return paths


# ---------------------------------------------------------------------------------------------------- inputs

def load_table(path: Path) -> tuple["pl.DataFrame", Path | None]:
    """(every run's row, the sweep directory or None), read by `umv2cli.fit.read_table` (a sweep directory is
    aggregated first). A table without ``status`` is taken as done runs."""
    import polars as pl

    df, sweep, source = fitting.read_table(path)
    missing = [c for c in fitting.COLUMNS if c not in df.columns]
    if missing:
        raise UserError(*[f"{source}: missing column `{c}`; the table needs {', '.join(fitting.COLUMNS)}"
                          for c in missing])
    if "status" not in df.columns:
        df = df.with_columns(status=pl.lit("done"))
    return df.with_columns(pl.col("run_id").cast(pl.String)), sweep


def done_rows(table: "pl.DataFrame") -> "pl.DataFrame":
    import polars as pl

    return table.filter((pl.col("status") == "done") & pl.col("loss").is_not_null())


class FitResult:
    """run_fit's report (with bootstrap resamples), the fitted law and its runs for curves, or why there is no fit."""

    def __init__(self, report: dict | None = None, est=None, problem: str = ""):
        self.report, self.est, self.problem = report, est, problem

    def predict(self, P, m, N, D, flops) -> np.ndarray:
        """Fitted loss at arrays of (P, m, N_a, D, FLOPs/token)."""
        P, m, N, D, flops = np.broadcast_arrays(*(np.asarray(x, float) for x in (P, m, N, D, flops)))
        points = fitting.Runs.at(P, m, N, D, flops)
        return np.exp(fitting.predict(points, self.report["form"], self.est.fit, self.est.centre))


def fit_done_runs(table: "pl.DataFrame", form: str, n_boot: int, seed: int,
                  sweep: Path | None = None) -> FitResult:
    """Fit ``form`` to the done runs (with `umv2cli.fit.run_fit`'s refits) of a table, aggregated from ``sweep`` or
    not; a table that cannot support it gives the reason instead."""
    done = done_rows(table)
    if done.height == 0:
        return FitResult(problem="no finished run yet")
    where = "the done runs"
    try:
        report = fitting.run_fit(done, form, n_boot, seed, resamples=True, sweep=sweep)
        main, _ = fitting.views(fitting.split_references(done)[0], None, (), where)
        est = fitting.estimate(fitting.runs_from_frame(main.frame, where), form, 0, seed)
    except UserError as e:
        return FitResult(problem=e.problems[0].removeprefix(f"{where}: ").removeprefix("table: "))
    return FitResult(report, est)


def read_curves(sweep: Path, run_ids: list[str]) -> dict[str, "pl.DataFrame"]:
    """run_id → (tokens, train_loss smoothed over 2% of the run, eval_loss), thinned to CURVE_POINTS rows (see
    there) plus every eval row. A last line cut short by a kill is left out."""
    import polars as pl

    schema = {"step": pl.Int64, "tokens": pl.Int64, "train_loss": pl.Float64, "eval_loss": pl.Float64}
    points = max(50, min(CURVE_POINTS, CURVE_TOTAL // max(1, len(run_ids))))
    curves = {}
    for run_id in run_ids:
        path = sweep / "runs" / run_id / "metrics.jsonl"
        text = path.read_bytes() if path.exists() else b""
        text = text[: text.rfind(b"\n") + 1]
        if not text:
            continue
        df = pl.read_ndjson(io.BytesIO(text), schema=schema)
        window, stride = max(1, df.height // 50), max(1, math.ceil(df.height / points))
        df = df.with_columns(train_smooth=pl.col("train_loss").rolling_mean(window, min_samples=1))
        keep = (pl.int_range(pl.len()) % stride == 0) | (pl.int_range(pl.len()) == pl.len() - 1) \
            | pl.col("eval_loss").is_not_null()
        curves[run_id] = df.filter(keep)
    return curves


# ---------------------------------------------------------------------------------------------- formatting

def esc(x) -> str:
    return html.escape(str(x), quote=True)


def si(x) -> str:
    """1234567 → 1.23M (counts of params, FLOPs, tokens)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def num(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def interval(ci) -> str:
    return "[–]" if ci is None else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def config_label(P, m) -> str:
    return f"P={si(P)}, m={m:g}"


def palette(n: int, scale: str = "Viridis") -> list[str]:
    """``n`` colours along a sequential scale (dark to light, the light end clipped to stay readable)."""
    from plotly.colors import sample_colorscale

    return sample_colorscale(scale, [0.85 * i / max(1, n - 1) for i in range(n)])


def grid_rows(done: "pl.DataFrame") -> "pl.DataFrame":
    """The done rows at the table's most common token budget D (ties: the larger D)."""
    import polars as pl

    if done.height == 0:
        return done
    counts = done.group_by("tokens").len().sort(["len", "tokens"], descending=True)
    return done.filter(pl.col("tokens") == counts["tokens"][0])


# -------------------------------------------------------------------------------------------------- figures

def styled(fig, height: int = 420):
    fig.update_layout(template="plotly_white", height=height,
                      font=dict(family=FONT, size=13), margin=dict(l=60, r=20, t=64, b=50),
                      legend=dict(font=dict(size=11)), hoverlabel=dict(font=dict(family=FONT)))
    return fig


def fig_curves(curves: dict, table: "pl.DataFrame"):
    """Train loss (smoothed) against tokens, eval losses as markers: one legend entry per configuration (its
    seeds are one trace, runs separated by gaps, so a 1,000-run sweep stays light); colour = P, dash = m."""
    import plotly.graph_objects as go

    Ps, ms = sorted(table["sparse_params"].unique().to_list()), sorted(table["topm"].unique().to_list())
    colour, dash = dict(zip(Ps, palette(len(Ps)))), {m: DASHES[i % len(DASHES)] for i, m in enumerate(ms)}
    configs: dict[tuple, dict[str, list]] = {}
    for row in table.unique("run_id", maintain_order=True).iter_rows(named=True):
        df = curves.get(row["run_id"])
        if df is None:
            continue
        who = esc(f"{row['run_id']}, seed {row['seed']}" + ("" if row["status"] == "done" else f", {row['status']}"))
        ev = df.filter(df["eval_loss"].is_not_null())
        c = configs.setdefault((row["sparse_params"], row["topm"]),
                               {k: [] for k in ("x", "y", "who", "ex", "ey", "ewho")})
        c["x"] += [*df["tokens"], None]
        c["y"] += [*df["train_smooth"], None]
        c["who"] += [who] * df.height + [None]
        c["ex"] += ev["tokens"].to_list()
        c["ey"] += ev["eval_loss"].to_list()
        c["ewho"] += [who] * ev.height
    traces = []
    for (P, m), c in configs.items():
        label, group = esc(config_label(P, m)), f"{P}-{m}"
        traces += [go.Scatter(x=c["x"], y=c["y"], customdata=c["who"], mode="lines", name=label, legendgroup=group,
                              line=dict(color=colour[P], dash=dash[m], width=1.8),
                              hovertemplate=f"{label}<br>%{{customdata}}<br>%{{x:.3s}} tokens<br>train %{{y:.4f}}"
                                            "<extra></extra>"),
                   go.Scatter(x=c["ex"], y=c["ey"], customdata=c["ewho"], mode="markers", legendgroup=group,
                              showlegend=False, marker=dict(color=colour[P], size=8, symbol="diamond",
                                                            line=dict(color="white", width=1)),
                              hovertemplate=f"{label}<br>%{{customdata}}<br>%{{x:.3s}} tokens<br>eval %{{y:.4f}}"
                                            "<extra></extra>")]
    fig = go.Figure(traces)
    fig.update_xaxes(type="log", title="tokens seen")
    fig.update_yaxes(title="loss (nats/token)")
    return styled(fig, 460)


def fig_heatmap(grid: "pl.DataFrame"):
    """Mean final loss per (P, m), with the value and seed count in each cell."""
    import plotly.graph_objects as go
    import polars as pl

    cells = grid.group_by("sparse_params", "topm").agg(pl.col("loss").mean(), pl.len().alias("n"))
    Ps, ms = sorted(cells["sparse_params"].unique().to_list()), sorted(cells["topm"].unique().to_list())
    z = np.full((len(ms), len(Ps)), np.nan)
    text = [[""] * len(Ps) for _ in ms]
    for P, m, loss, n in cells.iter_rows():
        i, j = ms.index(m), Ps.index(P)
        z[i, j], text[i][j] = loss, f"{loss:.4f}" + (f"<br>n={n}" if n > 1 else "")
    fig = go.Figure(go.Heatmap(x=[si(P) for P in Ps], y=[f"{m:g}" for m in ms], z=z, text=text,
                               texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title="loss"),
                               hovertemplate="P=%{x}, m=%{y}<br>loss %{z:.4f}<extra></extra>"))
    fig.update_xaxes(title="P: total sparse parameters", type="category")
    fig.update_yaxes(title="m: activated values per token", type="category")
    return styled(fig, 420)


def fig_slices(grid: "pl.DataFrame", result: FitResult):
    """Loss against P at each m, and against m at each P: runs as points, the fitted law as lines. One legend,
    right of both panels (the m levels, then the P levels), so no entry covers a point."""
    import plotly.graph_objects as go
    import polars as pl
    from plotly.subplots import make_subplots

    fig = make_subplots(1, 2, horizontal_spacing=0.08,
                        subplot_titles=("against P at fixed m", "against m at fixed P"))
    for col, (x, fixed, name) in enumerate((("sparse_params", "topm", "m"), ("topm", "sparse_params", "P")), 1):
        levels = sorted(grid[fixed].unique().to_list())
        colours = palette(len(levels), "Plasma" if fixed == "topm" else "Viridis")
        xs = np.array(sorted(grid[x].unique().to_list()), float)
        for level, c in zip(levels, colours):
            rows = grid.filter(pl.col(fixed) == level)
            label = esc(f"{name}={si(level)}")
            fig.add_trace(go.Scatter(x=rows[x], y=rows["loss"], mode="markers", name=label, legendgroup=f"{col}{label}",
                                     marker=dict(color=c, size=9, line=dict(color="white", width=1)),
                                     hovertemplate=f"{label}<br>{x}=%{{x:.3s}}<br>loss %{{y:.4f}}<extra></extra>"),
                          1, col)
            if result.report and len(xs) > 1:
                span = np.geomspace(xs.min(), xs.max(), 60)
                P, m = (span, level) if x == "sparse_params" else (level, span)
                mean = rows.select(pl.col("activated_params", "tokens", "flops_per_token").mean()).row(0)
                fig.add_trace(go.Scatter(x=span, y=result.predict(P, m, *mean), mode="lines",
                                         legendgroup=f"{col}{label}",
                                         showlegend=False, line=dict(color=c, width=2, dash="dash"),
                                         hoverinfo="skip"), 1, col)
    fig.update_xaxes(type="log")
    fig.update_xaxes(title="P: total sparse parameters", row=1, col=1)
    fig.update_xaxes(title="m: activated values per token", row=1, col=2)
    fig.update_yaxes(title="final loss", row=1, col=1)
    fig = styled(fig, 440)
    fig.update_layout(legend=dict(tracegroupgap=2))
    return fig


def fig_parity(result: FitResult):
    """Observed against fitted loss, and the residuals (observed − fitted) against log P and log m."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    runs = result.est.data
    fitted = np.exp(fitting.predict(runs, result.report["form"], result.est.fit, result.est.centre))
    resid = runs.loss - fitted
    ids = [esc(runs.run_ids[i]) for i in runs.run]
    fig = make_subplots(1, 3, horizontal_spacing=0.07, column_widths=[0.38, 0.31, 0.31],
                        subplot_titles=("observed against fitted", "residual against P", "residual against m"))
    lo, hi = float(min(fitted.min(), runs.loss.min())), float(max(fitted.max(), runs.loss.max()))
    pad = 0.05 * (hi - lo or 1)
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", hoverinfo="skip",
                             line=dict(color="#9ca3af", dash="dot"), showlegend=False), 1, 1)
    marker = dict(color="#2563eb", size=8, line=dict(color="white", width=1))
    for col, x in ((1, fitted), (2, runs.P), (3, runs.m)):
        y = runs.loss if col == 1 else resid
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=marker, showlegend=False, customdata=ids,
                                 hovertemplate="%{customdata}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>"), 1, col)
        if col > 1:
            fig.add_hline(0, line=dict(color="#9ca3af", dash="dot"), row=1, col=col)
            fig.update_xaxes(type="log", row=1, col=col)
    fig.update_xaxes(title="fitted loss", row=1, col=1)
    fig.update_yaxes(title="observed loss", row=1, col=1)
    fig.update_xaxes(title="P", row=1, col=2)
    fig.update_xaxes(title="m", row=1, col=3)
    fig.update_yaxes(title="observed − fitted (nats)", row=1, col=2)
    return styled(fig, 400)


def shown_range(x: np.ndarray, keep: list[float]) -> tuple[float, float]:
    """The part of a bootstrap distribution a histogram shows: its 1st–99th percentiles, cut at three
    interquartile ranges beyond the quartiles (a ratio's tails can run to ±100 and squash the rest), widened to
    the values in ``keep`` (the estimate and its 95% interval)."""
    lo, hi = np.inf, -np.inf
    if len(x):
        q1, q25, q75, q99 = np.percentile(x, [1, 25, 75, 99])
        lo, hi = max(q1, q25 - 3 * (q75 - q25)), min(q99, q75 + 3 * (q75 - q25))
    return float(min(lo, *keep)), float(max(hi, *keep))


def fig_bootstrap(result: FitResult):
    """Histograms of the bootstrap refits of Δ = e_m − e_P (the decision's quantity), e_m and e_P, and of R where
    it is reported: the estimate (solid), the 95% interval (dashed), 0 (red, the decision's threshold; 1 for R).
    Each shows the bulk of its resamples (`shown_range`) and says how many lie outside it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    r, res = result.report, result.report["resamples"]
    panels = [("delta", "Δ = e_m − e_P", "#0f766e"), ("e_m", "e_m", "#7c3aed"), ("e_P", "e_P", "#2563eb")]
    if res["R"] is not None:
        panels.append(("R", "R = e_m / e_P", "#b45309"))
    shown, titles = [], []
    for key, title, _ in panels:
        x = np.asarray(res[key], float)
        x = x[np.isfinite(x)]
        lo, hi = shown_range(x, [r[key], *(r[f"{key}_ci"] or [])])
        inside = x[(x >= lo) & (x <= hi)]
        shown.append((inside, lo, hi))
        titles.append(f"{title}<br><sup>{len(x) - len(inside)} of {len(res[key])} outside "
                      f"[{lo:.3g}, {hi:.3g}]</sup>")
    fig = make_subplots(1, len(panels), horizontal_spacing=0.06, subplot_titles=titles)
    for col, ((key, _, colour), (x, lo, hi)) in enumerate(zip(panels, shown), 1):
        fig.add_trace(go.Histogram(x=x, nbinsx=60, marker_color=colour, opacity=0.75, showlegend=False,
                                   hovertemplate="%{x}<br>%{y} resamples<extra></extra>"), 1, col)
        ci = r[f"{key}_ci"]
        for v, style in [(r[key], "solid")] + ([(ci[0], "dash"), (ci[1], "dash")] if ci else []):
            fig.add_vline(v, line=dict(color="#111827", dash=style, width=1.5), row=1, col=col)
        threshold = 1.0 if key == "R" else 0.0
        if lo <= threshold <= hi:
            fig.add_vline(threshold, line=dict(color="#dc2626", width=2), row=1, col=col)
        fig.update_xaxes(range=[lo - 0.02 * (hi - lo or 1), hi + 0.02 * (hi - lo or 1)], row=1, col=col)
    fig.update_yaxes(title="resamples", row=1, col=1)
    return styled(fig, 400)


def fig_pairs(pairs: list[dict]):
    """Δ loss of each iso-cost pair, density side − count side, with its interval over seeds."""
    import plotly.graph_objects as go

    labels = [f"({si(p['density']['P'])}, {p['density']['m']:g}) vs ({si(p['count']['P'])}, {p['count']['m']:g})"
              for p in pairs]
    delta = [p["delta_loss"] for p in pairs]
    lo = [p["delta_loss"] - p["delta_ci"][0] if p["delta_ci"] else 0 for p in pairs]
    hi = [p["delta_ci"][1] - p["delta_loss"] if p["delta_ci"] else 0 for p in pairs]
    colours = ["#0f766e" if d < 0 else "#4338ca" for d in delta]
    fig = go.Figure(go.Scatter(x=delta, y=labels, mode="markers", marker=dict(size=11, color=colours),
                               error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#6b7280"),
                               hovertemplate="%{y}<br>Δ %{x:.4f} nats<extra></extra>"))
    fig.add_vline(0, line=dict(color="#9ca3af", dash="dot"))
    fig.update_xaxes(title="Δ loss = loss(P, k·m) − loss(k·P, m)   (< 0: density wins)")
    fig.update_yaxes(type="category", autorange="reversed")
    return styled(fig, max(240, 90 + 34 * len(pairs)))


TASK_MARKERS = (("#2563eb", "circle"), ("#0f766e", "diamond"), ("#d97706", "square"), ("#7c3aed", "triangle-up"),
                ("#dc2626", "x"))
ALL_ZERO = "Every accuracy is 0 at this scale: no run predicted a graded token<br>(too small or too short a run " \
           "to recall from context)"


def fig_tasks(done: "pl.DataFrame"):
    """Mean memory-task accuracy per configuration, one marker per task: a marker shows an accuracy of 0, where a
    bar would have no height. Every accuracy 0 (tiny models, short runs) is said on the figure."""
    import plotly.graph_objects as go
    import polars as pl

    tasks = [c for c in done.columns if c.startswith("task_")]
    cells = (done.group_by("sparse_params", "topm").agg(pl.col(tasks).mean()).sort("sparse_params", "topm"))
    x = [config_label(P, m) for P, m in cells.select("sparse_params", "topm").iter_rows()]
    fig = go.Figure([go.Scatter(x=x, y=cells[t], mode="markers", name=esc(t.removeprefix("task_").replace("_", " ")),
                                marker=dict(color=colour, symbol=symbol, size=11, line=dict(color="white", width=1)),
                                cliponaxis=False, hovertemplate="%{x}<br>%{y:.3f}<extra></extra>")
                     for t, (colour, symbol) in zip(tasks, itertools.cycle(TASK_MARKERS))])
    if all_zero_tasks(cells.select(tasks)):
        fig.add_annotation(text=ALL_ZERO, x=0.5, y=0.55, xref="paper", yref="paper", showarrow=False,
                           font=dict(size=14, color="#6b7280"))
    fig.update_layout(scattermode="group")
    fig.update_yaxes(title="accuracy (greedy, graded tokens)", range=[0, 1])
    return styled(fig, 380)


def all_zero_tasks(accuracies: "pl.DataFrame") -> bool:
    """Whether every measured task accuracy is 0."""
    values = accuracies.to_numpy().ravel()
    values = values[np.isfinite(values)]
    return len(values) > 0 and not values.any()


# ----------------------------------------------------------------------------------------------- HTML parts

def figure_html(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})


def verdict_box(result: FitResult) -> str:
    """The decision, its reason, the numbers it rests on, the paper's trade, the refits, what the bootstrap could
    not fit and the seed noise, each in plain words, then the report sentence and the rule."""
    if not result.report:
        return (f'<div class="verdict" style="--c:#6b7280"><div class="v-head">No verdict yet</div>'
                f'<p>{esc(result.problem)}</p></div>')
    r = result.report
    head = {"density outranks": "Density outranks sparse parameter count",
            "count outranks": "Sparse parameter count outranks density",
            "inconclusive": "Inconclusive at this budget"}[r["verdict"]]
    R = (f'R = <b>{num(r["R"], 3)}</b> {interval(r["R_ci"])}' if r["R"] is not None else "R not reported")
    B, failed = r["bootstrap"]["B"], r["resamples_failed"]
    boot = (f"Bootstrap: {B} resamples of configurations with all their runs; "
            + (f"{failed} of them could not be refitted (a resample that draws too few distinct configurations "
               "cannot determine the law, or its fit did not converge) and are left out of every interval; more "
               "configurations make fewer fail" if failed else "every refit succeeded")
            + (f"; {r['R_infinite']} resamples gave an infinite R (e_P = 0), left out of R's interval"
               if r["R_infinite"] else "") + ".")
    noise = f"Seed noise: {seed_noise(r)}."
    below, above = ("below", "above") if fitting.helps(r["form"]) < 0 else ("above", "below")
    rule = (f"Rule: “density outranks” only if the 95% intervals of e_m and of Δ = e_m − e_P lie {below} 0; “count "
            f"outranks” only if e_P’s lies {below} 0 and Δ’s {above} 0; otherwise inconclusive. R = e_m/e_P is "
            f"reported only where both elasticities lie {below} 0. {r['sign_convention']}.")
    return (f'<div class="verdict" style="--c:{VERDICT_COLOURS[r["verdict"]]}"><div class="v-head">{esc(head)}</div>'
            f'<p class="reason">{esc(r["verdict_reason"])}.</p>'
            f'<div class="v-nums"><span>Δ = e<sub>m</sub> − e<sub>P</sub> = <b>{num(r["delta"], 3)}</b> '
            f'{interval(r["delta_ci"])}</span>'
            f'<span>e<sub>m</sub> = <b>{num(r["e_m"], 3)}</b> {interval(r["e_m_ci"])}</span>'
            f'<span>e<sub>P</sub> = <b>{num(r["e_P"], 3)}</b> {interval(r["e_P_ci"])}</span><span>{R}</span>'
            f'<span>{esc(r["form"])} law on {esc(r["fitted_on"])}, {r["n_runs"]} runs, {r["n_configs"]} '
            f'configurations</span></div>'
            f'<p class="trade">{esc(fitting.trade_text(r))}</p>'
            f'<p class="robust">{esc(fitting.robustness_text(r))}</p>{references_text(r)}'
            f'<p class="rule">{esc(boot)} {esc(noise)}</p>'
            f'<p class="sentence">{esc(r["sentence"])}</p>'
            f'<p class="rule">{esc(rule)}</p></div>')


def seed_noise(r: dict) -> str:
    """The spread between seeds of one configuration, or why it is not known."""
    if r["seed_sigma"] is None:
        return "not measured (no configuration has two seeds; give the recipe more seeds or corner_seeds)"
    return f"σ = {num(r['seed_sigma'], 3)} nats between runs of one configuration"


def references_text(r: dict) -> str:
    """One line per reference model (not fitted): its loss beside the grid configurations' best and median."""
    return "".join(
        f'<p class="robust">Reference {esc(ref["label"])} ({esc(ref["kind"])}, {ref["runs"]} run'
        f'{"s" * (ref["runs"] != 1)}, {si(ref["flops_per_token"])} FLOPs/token, not fitted): loss '
        f'<b>{num(ref["loss"])}</b>, against the grid\'s best configuration {num(ref["grid_best"])} and its median '
        f'{num(ref["grid_median"])}.</p>' for ref in r.get("references", []))


def estimand(table: "pl.DataFrame", done: "pl.DataFrame") -> str:
    """The grid (P, m, matching, D, seeds, the layer's kind), the references beside it, and how far the runs got."""
    runs = table.unique("run_id", maintain_order=True)
    states = " · ".join(f"{n} {s}" for s, n in runs.group_by("status").len().sort("status").iter_rows())
    match = runs["match"][0] if "match" in runs.columns else "not recorded"
    grid, refs = fitting.split_references(runs)
    Ps = ", ".join(si(p) for p in sorted(grid["sparse_params"].unique().to_list()))
    ms = ", ".join(f"{m:g}" for m in sorted(grid["topm"].unique().to_list()))
    D = ", ".join(si(d) for d in sorted(table["tokens"].unique().to_list()))
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique().to_list()))
    spread = "–"
    if done.height:
        f = done["flops_per_token"]
        spread = f"{100 * (f.max() / f.min() - 1):.2g}%"
    kinds = ", ".join(sorted(grid["kind"].drop_nulls().unique().to_list())) if "kind" in grid.columns else "–"
    items = [("P", f"total sparse parameters: {Ps}"), ("m", f"activated memory values per token: {ms}"),
             ("matching", f"{match} (FLOPs/token spread among done runs {spread})"), ("D", f"tokens per run: {D}"),
             ("seeds", seeds), ("layer", kinds), ("runs", f"{runs.height}: {states}")]
    if refs is not None and refs.height:
        label = "grid.model" if "grid.model" in refs.columns else "kind"
        items.insert(6, ("references", ", ".join(str(x) for x in refs[label].unique(maintain_order=True)) +
                         " (same matching; not fitted)"))
    return '<dl class="estimand">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def fit_details(r: dict) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{num(v, 6)}</td><td>{interval(r['params_ci'].get(k))}</td></tr>"
                   for k, v in r["params"].items())
    forms = ""
    for name, v in r["forms_heldout"].items():
        skipped = v.get("skipped", "").removeprefix(f"{r['source']}: ")
        cells = (f'<td colspan="3" class="wrap">{esc(skipped)}</td>' if "skipped" in v else
                 f"<td>{num(v['loco_rmse'])}</td><td>{num(v['extrap_rmse'])}</td><td>{v['loco_configs']}</td>")
        forms += f"<tr><td>{esc(name)}{' (fitted)' if name == r['form'] else ''}</td>{cells}</tr>"
    return (f'<div class="two"><div><h3>{esc(r["form"])} parameters (95% bootstrap interval)</h3>'
            f'<table class="small"><tr><th>parameter</th><th>estimate</th><th>interval</th></tr>{rows}</table>'
            f'<p class="note">converged: {r["converged"]}; spread of the best objectives over starts: '
            f'{r["start_objective_spread"]:.2g}; design centre P = {si(r["centre"]["P"])}, m = {r["centre"]["m"]:.3g}'
            f'</p></div><div><h3>Held-out error (nats), against the seed noise</h3>'
            f'<table class="small"><tr><th>form</th><th>leave-one-config-out RMSE</th><th>extrapolation corner '
            f'RMSE</th><th>configs</th></tr>{forms}</table>'
            f'<p class="note">Seed noise: {esc(seed_noise(r))}.</p></div></div>')


def pairs_table(r: dict) -> str:
    rows = "".join(
        f"<tr><td>({si(p['density']['P'])}, {p['density']['m']:g})</td><td>({si(p['count']['P'])}, "
        f"{p['count']['m']:g})</td><td>{p['k']:.3g}</td><td>{si(p['tokens'])}</td><td>{p['delta_loss']:+.4f}</td>"
        f"<td>{interval(p['delta_ci'])}</td><td>{p['n_density']} / {p['n_count']}</td>"
        f"<td>{'yes' if p['in_sign_test'] else '–'}</td></tr>"
        for p in r["iso_cost_pairs"])
    s = r["sign_test"]
    sign = (f"density wins {s['density_wins']} of {s['pairs']} pairs (descriptive: pairs share configurations); "
            f"{s['independent_density_wins']} of the {s['independent_pairs']} that share none, sign test p = "
            f"{s['p_value']:.3g}.") if s else ""
    return (f'<table class="small"><tr><th>density side (P, k·m)</th><th>count side (k·P, m)</th><th>k</th>'
            f'<th>D</th><th>Δ loss</th><th>interval (seeds)</th><th>runs</th><th>in the sign test</th></tr>'
            f'{rows}</table>'
            f'<p class="note">{esc(sign)}</p>')


def accounting_table(table: "pl.DataFrame") -> str:
    """Every row of the table, failed and unfinished runs included, with their reasons."""
    grid = [c for c in table.columns if c.startswith("grid.")]
    evals = [c for c in table.columns if c.startswith(("task_", "memory_"))]
    cols = [("run", "run_id", str), ("status", "status", str), ("reason", "reason", str), ("seed", "seed", str),
            ("kind", "kind", str), *[(c.removeprefix("grid."), c, str) for c in grid],
            ("P", "sparse_params", si), ("m", "topm", str), ("m/N", "density", lambda v: f"{v:.2e}"),
            ("activated", "activated_params", si), ("total", "total_params", si),
            ("FLOPs/token", "flops_per_token", si), ("tokens", "tokens", si), ("budget", "at_flops", si),
            ("Δ match", "match_residual", lambda v: f"{100 * v:+.2f}%"), ("step", "step", str),
            ("loss", "loss", num), ("train loss", "train_loss", num),
            *[(c.removeprefix("task_").removeprefix("memory_").replace("_", " "), c, lambda v: num(v, 3))
              for c in evals]]
    cols = [c for c in cols if c[1] in table.columns]
    head = "".join(f"<th>{esc(name)}</th>" for name, _, _ in cols)
    body = []
    for row in table.iter_rows(named=True):
        cells = "".join(f"<td>{'–' if row[key] is None else esc(fmt(row[key]))}</td>" for _, key, fmt in cols)
        body.append(f'<tr class="{esc(row["status"])}">{cells}</tr>')
    return f'<div class="scroll"><table class="runs"><tr>{head}</tr>{"".join(body)}</table></div>'


CSS = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --bg: #f8fafc; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 15px/1.5 FONT; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 32px 60px; }
header h1 { margin: 0; font-size: 26px; letter-spacing: -0.01em; }
header .sub { color: var(--muted); margin: 2px 0 18px; font-size: 13px; word-break: break-all; }
.verdict { border-left: 6px solid var(--c); background: white; border-radius: 10px; padding: 18px 22px;
  box-shadow: 0 1px 3px rgba(0,0,0,.08); margin-bottom: 18px; }
.v-head { font-size: 24px; font-weight: 700; color: var(--c); }
.v-nums { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 8px 0; font-size: 16px; }
.v-nums span:last-child { color: var(--muted); font-size: 14px; align-self: center; }
.reason { margin: 4px 0 6px; font-size: 16px; } .trade, .robust { margin: 4px 0; }
.sentence { margin: 8px 0 4px; color: var(--muted); font-size: 13px; }
.rule { color: var(--muted); font-size: 13px; margin: 2px 0; }
section { background: white; border-radius: 10px; padding: 14px 18px; margin: 16px 0;
  box-shadow: 0 1px 3px rgba(0,0,0,.06); }
h2 { font-size: 18px; margin: 4px 0 6px; } h3 { font-size: 15px; margin: 6px 0; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0; }
dl.estimand { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 4px 0; }
dl.estimand dt { font-weight: 600; } dl.estimand dd { margin: 0; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #f1f5f9; position: sticky; top: 0; font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
.scroll { max-height: 560px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
td.wrap { white-space: normal; text-align: left; color: var(--muted); }
tr.failed td { background: #fef2f2; } tr.running td, tr.pending td { background: #fffbeb; color: var(--muted); }
""".replace("FONT", FONT)


def figures(table: "pl.DataFrame", result: FitResult, curves: dict | None) -> dict:
    """The page's figures in page order, by the name an image of it gets; those the data cannot draw are absent.
    Figures over the grid leave the reference models out (the verdict box sets them beside the grid)."""
    done = done_rows(table)
    grid = grid_rows(fitting.split_references(done)[0])
    figs = {}
    if curves:
        figs["curves"] = fig_curves(curves, table)
    if grid.height:
        figs["grid"], figs["slices"] = fig_heatmap(grid), fig_slices(grid, result)
    if result.report:
        figs["fit"] = fig_parity(result)
        if "resamples" in result.report:
            figs["bootstrap"] = fig_bootstrap(result)
        if result.report["iso_cost_pairs"]:
            figs["pairs"] = fig_pairs(result.report["iso_cost_pairs"])
    if done.height and any(c.startswith("task_") for c in done.columns):
        figs["tasks"] = fig_tasks(done)
    return figs


def page(name: str, source: str, table: "pl.DataFrame", result: FitResult, figs: dict) -> str:
    from plotly.offline import get_plotlyjs

    import umv2cli

    done = done_rows(table)
    sections = [("The question", "What is compared, over which grid, and how far the sweep got.",
                 estimand(table, done))]
    if "curves" in figs:
        sections.append(("Training curves", "Train loss (rolling mean over 2% of a run's steps) against tokens; "
                         "◆ eval loss. Colour: P; dash: m; a configuration's seeds share a line style. Click a "
                         "legend entry to hide a configuration.", figure_html(figs["curves"])))
    if "grid" in figs:
        D = grid_rows(fitting.split_references(done)[0])["tokens"][0]
        sections.append(("Final loss over the grid", f"Mean final loss over seeds at D = {si(D)} tokens; darker is "
                         "lower.", figure_html(figs["grid"])))
        sections.append(("Loss against each knob", "Each point a run; dashed lines: the fitted "
                         f"{result.report['form'] if result.report else ''} law at that level of the other knob."
                         if result.report else "Each point a run (no fitted law).", figure_html(figs["slices"])))
    if result.report:
        r = result.report
        sections.append(("Fit", "Observed against fitted loss, and residuals against each knob: structure in the "
                         "residuals (a trend, a saddle, one-sided tails) means the form is wrong.",
                         figure_html(figs["fit"]) + fit_details(r)))
        if "bootstrap" in figs:
            sections.append(("Uncertainty of Δ, e_m and e_P" + (" and R" if r["R"] is not None else ""),
                             f"Case bootstrap: {r['bootstrap']['B']} resamples of configurations, each with all its "
                             f"runs (seeds); {r['resamples_failed']} refits failed. Solid line the estimate, dashed "
                             "the 95% interval, red the decision's threshold (0; 1 for R). The verdict reads Δ, e_m "
                             "and e_P; R is shown only where both elasticities help. Each panel shows the bulk of "
                             "its resamples and says how many lie outside.", figure_html(figs["bootstrap"])))
        sections.append(("Iso-cost pairs", "Model-free check: (P, k·m) against (k·P, m) at the grid's nominal "
                         "values, equal P·m, same budget; Δ < 0 means the denser side has the lower loss. Intervals "
                         "resample each side's seeds.",
                         (figure_html(figs["pairs"]) + pairs_table(r)) if "pairs" in figs else
                         '<p class="note">No such pair at the same D in this grid.</p>'))
    else:
        sections.append(("Fit", "", f'<p class="note">No fit: {esc(result.problem)}</p>'))
    if "tasks" in figs:
        sections.append(("Memory tasks", "Mean accuracy over seeds on the synthetic memory tasks "
                         "(umv2cli/evals.py): greedy next-token accuracy at graded positions; chance ≈ 1/#values.",
                         figure_html(figs["tasks"])))
    sections.append(("Every run", "The accounting of every run, failed (red) and unfinished (amber) ones included.",
                     accounting_table(table)))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f'<section><h2>{esc(title)}</h2><p class="note">{esc(note)}</p>{content}</section>'
                   for title, note, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>umv2 report: {esc(name)}</title><style>{CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body><main>'
            f"<header><h1>Does activation density outrank sparse parameter count? · {esc(name)}</h1>"
            f'<div class="sub">{esc(source)} · {now} · umv2 {esc(umv2cli.__version__)}</div></header>'
            f"{verdict_box(result)}{body}</main></body></html>")
