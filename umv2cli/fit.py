"""`umv2 fit`: does activation density outrank sparse parameter count? (docs/fitting.md tells the whole method.)

Reads a table of runs (CSV or Parquet, or a sweep directory, aggregated first) with the columns `COLUMNS`, fits
one law of `umv2cli.laws`, and answers with the elasticities at the design centre and their case-bootstrap
intervals, a decision on their signs and their difference, the paper's own trade, held-out error against seed
noise, refits that test the decision's robustness, and the model-free iso-cost pairs.

The estimand. P = ``sparse_params`` (total sparse parameters), m = ``topm`` (activated memory values per token),
N_a = ``activated_params``, D = ``tokens``. e_P = ∂log L/∂log P and e_m = ∂log L/∂log m at the design centre
(P₀, m₀) = geometric means of P and m over the configurations (fixed from the full table, so every resample
estimates the same quantity). Loss falls as a knob that helps grows, so a knob that helps has e < 0.

The decision, on the signs and on Δ = e_m − e_P (< 0: doubling m lowers log L more than doubling P), each with
its 95% case-bootstrap interval:
- "density outranks" iff the intervals of e_m and of Δ lie below 0;
- "count outranks" iff the interval of e_P lies below 0 and that of Δ above 0;
- else "inconclusive", with the reason: which interval includes 0, or which knob hurts.
R = e_m/e_P is reported only where both elasticities' intervals lie below 0: with e_P ≥ 0 (a bigger table does
nothing, or hurts) the ratio is negative or unbounded although density plainly wins, and with both positive a
ratio above 1 would call two knobs that hurt a win for density. For `leverage` the elasticities are those of the
compute multiplier EL, positive when a knob helps: the same rule with the signs flipped. The paper's trade
(halve P, triple m: its 120B/top-256 against 60B/top-768 pair) changes log L by e_m·ln 3 − e_P·ln 2 to first
order at the centre (for `leverage`: log EL, the log of the compute multiplier, by v·ln 3 − u·ln 2).

Runs, configurations, cells. A run is one ``run_id``; a configuration is one (P, m, N_a) model shape, and its
runs are its seeds. A run's budget is its ``at_flops`` (a table aggregated at FLOP budgets) or else its
``tokens``; a run's rows at one budget (the same checkpoint reported twice) are averaged in log loss into one
entry. The laws are fitted to cells, one per (configuration, budget): the mean log loss of its runs, weighted by
their number, so a table of 10⁶ rows fits as fast as its cells. Dense rows (``sparse_params`` == 0, or a
``kind`` column equal to "dense") form the dense ladder used only by `leverage`; the other sparse forms drop
them and `chinchilla` fits every row.

References. Rows with a true ``reference`` column (a recipe's `[[references]]`: e.g. a dense and an MoE model at
the grid's FLOPs per token) are not fitted: `reference_losses` sets each one's loss beside the grid's.
"""

import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from umv2cli import laws
from umv2cli.errors import UserError

COLUMNS = ("run_id", "sparse_params", "topm", "activated_params", "total_params", "tokens", "flops_per_token",
           "seed", "loss")
GRID = ("grid.sparse_params", "grid.topm")
"""The nominal values of P and m that a sweep's plan asked for (the planner rounds the table size)."""
FORMS = ("loglinear", "chinchilla", "modulated", "leverage")
SIGN_CONVENTION = ("e = ∂log L/∂log x < 0 when x lowers loss; Δ = e_m − e_P < 0 means density has the larger "
                   "effect (for leverage: e = ∂log EL/∂log x > 0 when x helps, and Δ > 0 favours density)")
NEGLIGIBLE = 1e-6
"""An interval lies below (above) 0 only if it ends below −1e-6 (starts above 1e-6): a knob whose doubling moves
log L by less than 1e-6 does nothing. It keeps an elasticity that a law's bound pins to ±1e-14 from counting."""
MAX_FAILED = 0.05
"""A decision needs all but this share of the bootstrap refits: intervals over only the resamples that could be
fitted would describe a different population."""
OUTLIER = 10.0
"""A loss more than this factor from the table's median is refused (a diverged run or a wrong unit)."""
PAIR_TOLERANCE = 0.03
"""Iso-cost pairs match values within 3% (P rounded by the planner, or a table without grid.* columns)."""
BACKBONE_TOLERANCE = 0.10
"""Without grid.* columns, the two sides of an iso-cost pair need activated_params within 10%: one backbone."""
PAIR_BOOTSTRAP_MAX = 1000
"""Above this many runs on a side, an iso-cost pair's interval is the normal one (mean ± 1.96 standard errors),
which the bootstrap of a mean of so many runs equals."""
LN2, LN3 = math.log(2), math.log(3)

one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")
"""Decorator: BLAS on one thread inside. Every fit calls BLAS on tiny arrays (L-BFGS-B's 5–9 parameters, batched
5×5 solves), where OpenBLAS's threads cost far more than they save: on a busy 2-core machine an L-BFGS-B step took
9 ms with 2 BLAS threads and 0.1 ms with one. The bootstrap's worker processes use the cores instead."""


@dataclass(frozen=True)
class Runs:
    """A validated table of runs as arrays: one entry per (run, budget), or per cell after `cells`."""

    P: np.ndarray
    m: np.ndarray
    N: np.ndarray
    D: np.ndarray
    flops: np.ndarray
    """flops_per_token."""
    loss: np.ndarray
    run: np.ndarray
    """Index of the entry's run (into ``run_ids``)."""
    config: np.ndarray
    """Index of the entry's configuration (P, m, N_a), in the order of (P, m, N_a)."""
    dense: np.ndarray
    run_ids: tuple
    source: str
    budget: np.ndarray
    """The budget that groups entries: at_flops where the table has it, else tokens."""
    weight: np.ndarray
    """How many runs the entry stands for: 1, or a cell's number of runs."""
    nominal_P: np.ndarray
    """grid.sparse_params where the table has it, else P; the same for m below."""
    nominal_m: np.ndarray
    axes: np.ndarray
    """Index of the entry's values of the other grid.* axes (−1 in a table without grid.* columns)."""

    @classmethod
    def at(cls, P, m, N, D, flops) -> "Runs":
        """Points to predict at (arrays of equal length); no runs behind them."""
        n = len(P)
        zeros = np.zeros(n, int)
        return cls(P, m, N, D, flops, np.ones(n), zeros, zeros, np.zeros(n, bool), ("point",), "points", D,
                   np.ones(n), P, m, zeros - 1)

    def subset(self, mask: np.ndarray) -> "Runs":
        """The entries under ``mask`` (run and configuration indices keep their meaning)."""
        return replace(self, **{f: getattr(self, f)[mask] for f in ARRAYS})

    @cached_property
    def cells(self) -> "Runs":
        """One entry per (configuration, budget): its runs' mean log loss (and log tokens), weighted by their
        number, which becomes its ``weight``. The fits use cells, the errors and seed noise use runs. Computed
        once per `Runs` (every form compared reads them)."""
        _, budget = np.unique(self.budget, return_inverse=True)
        _, first, cell = np.unique(self.config * (budget.max() + 1) + budget, return_index=True,
                                   return_inverse=True)
        total = np.bincount(cell, self.weight)
        mean = lambda x: np.bincount(cell, self.weight * x) / total  # noqa: E731
        labels = tuple(f"P {p:.4g}, m {m:g}, budget {b:.4g}" for p, m, b in
                       zip(self.P[first], self.m[first], self.budget[first]))
        return replace(self, P=self.P[first], m=self.m[first], N=self.N[first], D=np.exp(mean(np.log(self.D))),
                       flops=self.flops[first], loss=np.exp(mean(np.log(self.loss))), run=np.arange(len(first)),
                       config=self.config[first], dense=self.dense[first], run_ids=labels,
                       budget=self.budget[first], weight=total, nominal_P=self.nominal_P[first],
                       nominal_m=self.nominal_m[first], axes=self.axes[first])

    def budgets(self) -> int:
        """How many distinct budgets the entries hold."""
        return len(np.unique(self.budget))

    def count(self, what: str) -> int:
        """How many distinct runs ("run") or configurations ("config") the entries hold."""
        return int(np.count_nonzero(np.bincount(getattr(self, what))))


ARRAYS = ("P", "m", "N", "D", "flops", "loss", "run", "config", "dense", "budget", "weight", "nominal_P", "nominal_m",
          "axes")
"""The fields of `Runs` with one value per entry."""


# -------------------------------------------------------------------------------------------------- reading

def read_table(path: Path | str) -> tuple["pl.DataFrame", Path | None, str]:
    """(every row of the runs table at ``path``, the sweep directory or None, the file the rows are from): a sweep
    directory is aggregated first (writing its results.parquet); a folder holding results.parquet, or a
    .csv/.parquet file, is read."""
    import polars as pl

    path = Path(path)
    if (path / "plan.parquet").exists():
        from umv2cli.sweeps.aggregate import aggregate

        return aggregate(path), path, str(path / "results.parquet")
    if path.is_dir():
        if not (path / "results.parquet").exists():
            raise UserError(f"{path}: not a sweep directory (no plan.parquet) and no results.parquet in it; give a "
                            "sweep directory made by `umv2 sweep run`, or a .csv/.parquet runs table")
        path = path / "results.parquet"
    if not path.exists():
        raise UserError(f"{path}: no such file; give a .csv/.parquet runs table or a sweep directory")
    kind = "Parquet" if path.suffix.lower() == ".parquet" else "CSV"
    try:
        df = pl.read_parquet(path) if kind == "Parquet" else pl.read_csv(path, infer_schema_length=None)
    except Exception as e:  # polars raises many kinds for a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot read as {kind} ({first}); give a .csv or .parquet runs table") from None
    if not set(COLUMNS) & set(df.columns):
        head = df.columns[0] if df.columns else ""
        raise UserError(f"{path}: not a runs table (no column named {', '.join(COLUMNS[:3])}, …; its first column "
                        f"is {head[:60]!r}); give a CSV or Parquet table with the columns {', '.join(COLUMNS)}")
    return df, None, str(path)


def runs_from_frame(df, where: str = "table") -> Runs:
    """Check a polars DataFrame against `COLUMNS` and return its `Runs` (one UserError line per problem)."""
    import polars as pl

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(*[f"{where}: missing column `{c}`; the table needs {', '.join(COLUMNS)}" for c in missing])
    if "status" in df.columns:  # a sweep's results.parquet lists unfinished runs too, with no loss
        df = df.filter(pl.col("status") == "done")
    if df.height == 0:
        raise UserError(f"{where}: the table has no rows (of status done); give at least one run per configuration")
    values = _numbers(df, [*COLUMNS[1:], *[c for c in ("at_flops", *GRID) if c in df.columns]], where)
    dense = values["sparse_params"] == 0
    if "kind" in df.columns:
        dense |= (df["kind"].cast(pl.String) == "dense").fill_null(False).to_numpy()
    _check_values(values, dense, where)
    nominal = {c: np.where(np.isnan(values[g]), values[c], values[g]) if g in values else values[c]
               for c, g in (("sparse_params", GRID[0]), ("topm", GRID[1]))}
    rows = pl.DataFrame({"run_id": df["run_id"].cast(pl.String), "P": values["sparse_params"], "m": values["topm"],
                         "N": values["activated_params"], "budget": values.get("at_flops", values["tokens"]),
                         "lD": np.log(values["tokens"]), "flops": values["flops_per_token"],
                         "lL": np.log(values["loss"]), "dense": dense, "nominal_P": nominal["sparse_params"],
                         "nominal_m": nominal["topm"], "axes": _other_axes(df)})
    shapes = rows.select("P", "m", "N").unique().sort("P", "m", "N").with_row_index("config")
    rows = (rows.join(shapes, on=["P", "m", "N"]).with_columns(run=pl.col("run_id").rank("dense").cast(pl.Int64) - 1)
            .sort("run", "budget"))
    run, budget, config = (rows[c].to_numpy() for c in ("run", "budget", "config"))
    same_run = run[1:] == run[:-1]
    twice = np.unique(run[1:][same_run & (config[1:] != config[:-1])])
    if len(twice):
        raise UserError(*[f"{where}: run_id {rows['run_id'][int(np.searchsorted(run, r))]!r} has rows with different "
                          "sparse_params/topm/activated_params; give each run one model shape" for r in twice[:5]])
    # one entry per (run, budget): the same checkpoint reported twice counts once (in log loss)
    first = np.flatnonzero(np.r_[True, ~same_run | (budget[1:] != budget[:-1])])
    count = np.diff(np.r_[first, len(run)])
    col = lambda c: rows[c].to_numpy()[first]  # noqa: E731
    mean = lambda c: np.add.reduceat(rows[c].to_numpy(), first) / count  # noqa: E731
    run_ids = tuple(rows["run_id"].gather(np.flatnonzero(np.r_[True, ~same_run])))
    return Runs(col("P"), col("m"), col("N"), np.exp(mean("lD")), col("flops"), np.exp(mean("lL")), col("run"),
                col("config").astype(np.int64), col("dense"), run_ids, where, col("budget"), np.ones(len(first)),
                col("nominal_P"), col("nominal_m"), col("axes"))


def _numbers(df, columns: list[str], where: str) -> dict[str, np.ndarray]:
    """Each column as float64 (grid.* columns may be null: NaN); a non-numeric or (but grid.*) empty or
    non-finite value is a problem naming its row."""
    import polars as pl

    problems, values = [], {}
    for c in columns:
        col = df[c]
        if not col.dtype.is_numeric():
            bad = col.cast(pl.Float64, strict=False).is_null().arg_true()
            row = int(bad[0]) if len(bad) else 0
            problems.append(f"{where}: column `{c}` is not numeric (row {row}: {col[row]!r}); write numbers")
            continue
        v = col.cast(pl.Float64).to_numpy()
        bad = np.flatnonzero(np.isinf(v) if c in GRID else ~np.isfinite(v))
        if len(bad):
            problems.append(f"{where}: column `{c}` row {bad[0]} is empty or not finite; fill or drop the row")
            continue
        values[c] = v
    if problems:
        raise UserError(*problems)
    return values


def _check_values(values: dict, dense: np.ndarray, where: str) -> None:
    """Positive sizes and losses (P and m may be 0 in dense rows), whole seeds, no loss far from the others."""
    problems = []
    for c in ("sparse_params", "topm", "activated_params", "total_params", "tokens", "flops_per_token", "loss",
              *(("at_flops",) if "at_flops" in values else ())):
        ok = values[c] >= 0 if c in ("sparse_params", "topm") else values[c] > 0
        if c in ("sparse_params", "topm"):
            ok &= dense | (values[c] > 0)
        bad = np.flatnonzero(~ok)
        if len(bad):
            dense_note = " (0 only in dense rows, which have sparse_params = 0)" if c == "topm" else \
                " (0 marks a dense row)" if c == "sparse_params" else ""
            problems.append(f"{where}: column `{c}` row {bad[0]} is {values[c][bad[0]]:g}; it must be positive"
                            f"{dense_note}; fix or drop the row")
    bad = np.flatnonzero(values["seed"] != np.round(values["seed"]))
    if len(bad):
        problems.append(f"{where}: column `seed` row {bad[0]} is {values['seed'][bad[0]]:g}; a seed is a whole "
                        "number; fix or drop the row")
    if problems:
        raise UserError(*problems)
    loss = values["loss"]
    median = float(np.median(loss))
    far = np.flatnonzero((loss > OUTLIER * median) | (loss < median / OUTLIER))
    if len(far):
        raise UserError(f"{where}: column `loss` row {far[0]} is {loss[far[0]]:g}, more than {OUTLIER:g}× from the "
                        f"table's median {median:.4g} ({len(far)} such rows); a diverged run or another unit? fix or "
                        "drop the row")


def _other_axes(df) -> np.ndarray:
    """Per row, the index of its values of the grid.* axes other than `GRID` (0 where there are none); −1 in a
    table without grid.* columns."""
    import polars as pl

    grid = [c for c in df.columns if c.startswith("grid.")]
    others = [c for c in grid if c not in GRID]
    if not grid:
        return np.full(df.height, -1)
    if not others:
        return np.zeros(df.height, int)
    key = pl.concat_str([pl.col(c).cast(pl.String).fill_null("∅") for c in others], separator="\x1f")
    return df.select((key.rank("dense") - 1).cast(pl.Int64)).to_series().to_numpy()


# ----------------------------------------------------------------------------------- what a fit is run on

@dataclass(frozen=True)
class View:
    """One table to fit: the main one or a robustness refit's (``frame``), or why there is none."""

    label: str
    frame: "pl.DataFrame | None" = None
    why_not: str = ""
    below: str = "drop"
    """`leverage`'s entries below the dense ladder's floor: "drop", or "bound" (the main table, refitted)."""


def views(table, sweep: Path | None, at_flops: Sequence[float], where: str) -> tuple[View, list[View]]:
    """The main table and the robustness refits' tables, from every row of a runs table.

    - Main: the done rows; in a table with an ``at_flops`` column (rows per run and FLOP budget), those at the
      largest budget.
    - Pre-cooldown: the main rows with loss := ``loss_pre_cooldown`` (and tokens := ``tokens_pre_cooldown``),
      runs without one left out: the eval just before a WSD cooldown, not annealed.
    - Second budgets: each of ``at_flops`` (a sweep directory is aggregated at it; a table must have rows at
      it); without ``at_flops``, a table's next-largest budget, if it has one.
    """
    import polars as pl

    done = table.filter(pl.col("status") == "done") if "status" in table.columns else table
    if done.height == 0 and sweep:
        raise UserError(f"{where}: no finished run yet ({table.height} runs); see `umv2 sweep status {sweep}`")
    if done.height == 0:
        raise UserError(f"{where}: the table has no rows (of status done); give at least one run per configuration")
    budgets = sorted(done["at_flops"].unique().to_list()) if "at_flops" in done.columns else []
    main = _budget_view(done, budgets[-1]) if budgets else \
        View("the final eval loss" if sweep else "the table's loss", done)
    if main.frame is None:
        raise UserError(f"{where}: {main.why_not} ({budgets[-1]:g} training FLOPs, the table's largest budget)")
    if budgets:
        main = replace(main, label=f"{main.label}, the table's largest budget")
    refits = [_on(_pre_cooldown_view(main.frame))]
    if at_flops and budgets:
        absent = [f for f in at_flops if not any(math.isclose(f, b, rel_tol=1e-9) for b in budgets)]
        if absent:
            raise UserError(f"--at-flops {absent[0]:g}: the table has rows at {', '.join(f'{b:g}' for b in budgets)} "
                            "training FLOPs only; choose one of them, or give the sweep directory")
        refits += [_on(_budget_view(done, f)) for f in at_flops]
    elif at_flops and sweep:
        from umv2cli.sweeps.aggregate import aggregate

        at, _ = split_references(aggregate(sweep, at_flops, write=False).filter(pl.col("status") == "done"))
        refits += [_on(_budget_view(at, f)) for f in at_flops]
    elif at_flops:
        raise UserError(f"--at-flops: {where} is a table without an at_flops column; give the sweep directory "
                        "(its runs' eval curves give the loss at any budget) or a table from "
                        "`umv2 sweep aggregate --at-flops`")
    elif len(budgets) > 1:
        refits.append(_on(_budget_view(done, budgets[-2])))
    else:
        refits.append(View("at a second token budget", why_not="no second budget given; `umv2 fit SWEEP --at-flops F` "
                                                            "refits the sweep's runs at F training FLOPs"))
    return main, refits


def _on(view: View) -> View:
    """A table as a refit: "on <what it fits>"."""
    return replace(view, label=f"on {view.label}")


def _pre_cooldown_view(main) -> View:
    import polars as pl

    label = "the eval loss before the cooldown"
    if "loss_pre_cooldown" not in main.columns:
        return View(label, why_not="the table has no loss_pre_cooldown column; a sweep's results.parquet has one")
    pre = main.filter(pl.col("loss_pre_cooldown").is_not_null())
    if pre.height == 0:
        return View(label, why_not="no run has an eval at or before the start of a cooldown: that needs a WSD "
                                   "schedule with cooldown > 0 and an eval before it")
    tokens = pl.col("tokens_pre_cooldown") if "tokens_pre_cooldown" in pre.columns else pl.col("tokens")
    left_out = main["run_id"].n_unique() - pre["run_id"].n_unique()
    return View(label + (f" ({left_out} runs without one left out)" if left_out else ""),
                pre.drop("at_flops", strict=False).with_columns(loss=pl.col("loss_pre_cooldown"), tokens=tokens))


def _budget_view(rows, flops: float) -> View:
    import polars as pl

    at = rows.filter((pl.col("at_flops") - flops).abs() <= 1e-9 * flops)
    have = at.filter(pl.col("loss").is_not_null())
    label = f"the eval loss at {flops:.3g} training FLOPs"
    if have.height == 0:
        return View(label, why_not="no done run has evals on both sides of that budget")
    left_out = at["run_id"].n_unique() - have["run_id"].n_unique()
    return View(label + (f" ({left_out} runs whose evals do not reach it left out)" if left_out else ""), have)


# ------------------------------------------------------------------------------------------ forms, uniformly

def design_centre(runs: Runs) -> tuple[float, float, float, float]:
    """log of the geometric means of P, m over the sparse configurations and of N_a, D over the runs (the same
    from a table's entries as from its cells)."""
    sp = ~runs.dense
    first = np.unique(runs.config[sp], return_index=True)[1] if sp.any() else np.array([], int)
    lP = np.log(runs.P[sp][first]).mean() if sp.any() else 0.0
    lm = np.log(runs.m[sp][first]).mean() if sp.any() else 0.0
    return (float(lP), float(lm), float(np.average(np.log(runs.N), weights=runs.weight)),
            float(np.average(np.log(runs.D), weights=runs.weight)))


def check_form(runs: Runs, form: str) -> None:
    """Raise a UserError when the table cannot support ``form`` (too few runs, levels or dense ladder)."""
    sp = runs.subset(~runs.dense) if form != "chinchilla" else runs
    n_cfg = len(np.unique(sp.config)) if len(sp.loss) else 0
    levels = {k: len(np.unique(getattr(sp, k))) for k in ("P", "m", "N")} if len(sp.loss) else \
        dict.fromkeys(("P", "m", "N"), 0)
    levels["D"] = sp.budgets() if len(sp.loss) else 0
    where = f"{runs.source}: --form {form}"
    if form in ("loglinear", "leverage", "modulated"):
        need_cfg = {"loglinear": 5 + (levels["D"] > 1), "leverage": 4, "modulated": 10}[form]
        if levels["P"] < 2 or levels["m"] < 2:
            raise UserError(f"{where} needs ≥ 2 values of sparse_params and of topm among sparse runs; got "
                            f"{levels['P']} and {levels['m']}; add runs along both axes")
        if n_cfg < need_cfg:
            raise UserError(f"{where} needs ≥ {need_cfg} sparse configurations (sparse_params, topm, "
                            f"activated_params); got {n_cfg}; add runs (a 4×4 grid is recommended)")
    if form == "modulated" and (levels["N"] < 2 or levels["D"] < 2):
        raise UserError(f"{where} needs ≥ 2 values of activated_params and of tokens; got {levels['N']} and "
                        f"{levels['D']}; use --form loglinear, or add runs at a second size and token budget")
    if form == "chinchilla":
        need, cells = 6 if levels["D"] > 1 else 4, len(sp.cells.loss) if len(sp.loss) else 0
        if levels["N"] < 3 or cells < need:
            raise UserError(f"{where} needs ≥ 3 values of activated_params and ≥ {need} (configuration, budget) "
                            f"cells; got {levels['N']} and {cells}; add model sizes")
    if form == "leverage":
        ladder = runs.subset(runs.dense) if runs.dense.any() else None
        if ladder is None or len(np.unique(ladder.N)) < 3:
            raise UserError(f"{where} needs a dense ladder: ≥ 3 sizes of rows with sparse_params = 0 (or kind = "
                            f"\"dense\"); got {0 if ladder is None else len(np.unique(ladder.N))}")


def form_rows(runs: Runs, form: str) -> np.ndarray:
    """Which entries a form fits: sparse ones for loglinear/modulated, all for chinchilla and leverage."""
    return ~runs.dense if form in ("loglinear", "modulated") else np.ones(len(runs.loss), bool)


def fit_form(runs: Runs, form: str, centre: tuple, w: np.ndarray | None = None, start=None,
             below_floor: str = "drop"):
    """Fit ``form`` to ``runs`` (cells, as a rule), each entry weighted by its number of runs times ``w`` (the
    bootstrap's count of its configuration; zero drops it). Returns a `laws.LawFit`. ``below_floor``: see
    `_fit_leverage`."""
    return _fit(runs, form, centre, runs.weight * (1.0 if w is None else w), start, below_floor)


def _fit(runs: Runs, form: str, centre: tuple, w: np.ndarray, start, below_floor: str):
    y = np.log(runs.loss)
    lD = np.log(runs.D) if runs.budgets() > 1 else None
    if form == "loglinear":
        return laws.fit_loglinear(np.log(runs.P), np.log(runs.m), lD, y, centre, w, start is None)
    if form == "chinchilla":
        return laws.fit_chinchilla(np.log(runs.N), lD, y, w, start)
    if form == "modulated":
        return laws.fit_modulated(np.log(runs.P), np.log(runs.m), np.log(runs.N), np.log(runs.D), y, w, start)
    return _fit_leverage(runs, centre, w, start, below_floor)


def predict(runs: Runs, form: str, fit, centre: tuple) -> np.ndarray:
    """Predicted log L for every entry of ``runs``."""
    lD = np.log(runs.D) if "d" in fit.params or "beta" in fit.params else None
    if form == "loglinear":
        X = laws.loglinear_design(np.log(runs.P), np.log(runs.m), lD, centre)
        return X @ fit.theta
    if form == "chinchilla":
        return laws.chinchilla_predict(fit.theta, np.log(runs.N), lD)
    if form == "modulated":
        return laws.modulated_predict(fit.theta, np.log(runs.P), np.log(runs.m), np.log(runs.N), np.log(runs.D))
    return _predict_leverage(runs, fit, centre)


def elasticities(form: str, fit, centre: tuple) -> tuple[float | None, float | None]:
    """(e_P, e_m) at the design centre, or (None, None) for a form without P and m (chinchilla)."""
    if form == "loglinear":
        return float(fit.theta[1]), float(fit.theta[2])
    if form == "modulated":
        return laws.modulated_elasticities(fit.theta, *centre)
    if form == "leverage":
        return fit.params["u"], fit.params["v"]
    return None, None


def helps(form: str) -> int:
    """The sign of an elasticity whose knob helps: −1 (loss falls), +1 for leverage (the compute multiplier grows)."""
    return 1 if form == "leverage" else -1


# ------------------------------------------------------------------------------------ F4 leverage (Clark EPC)

def _fit_leverage(runs: Runs, centre: tuple, w: np.ndarray, start=None, below_floor: str = "drop"):
    """F4 `leverage` (Clark et al. 2022's effective parameter count; Ling's efficiency leverage):

        EL(run) = C_dense(L_run)/C_run,   log EL = c0 + u·log P + v·log m

    The dense ladder (dense entries) is fitted by F0 `chinchilla`; C_dense(L) is the dense compute per token that
    reaches L at the run's D: N̄ solves E + A/N̄^α (+ B/D^β) = L, and dense FLOPs/token at N̄ come from a
    log-linear fit of flops_per_token on activated_params over the ladder. C_run = the run's flops_per_token.

    A sparse entry whose loss the ladder cannot reach (L ≤ E + B/D^β, its floor) has no finite EL. With
    ``below_floor`` = "drop" it is left out; with "bound" it enters at a lower bound of its EL: the dense compute
    of the ladder's lowest loss, which it beats (E never exceeds the ladder's lowest loss).
    """
    d = runs.dense
    ladder = _fit(runs.subset(d), "chinchilla", centre, w[d], None if start is None else start[0], "drop")
    kf = np.polyfit(np.log(runs.N[d]), np.log(runs.flops[d]), 1, w=np.sqrt(np.maximum(w[d], 0)) + 1e-12)
    lel = _log_el(runs, ladder.params, kf)
    below = ~d & ~np.isfinite(lel)
    if below_floor == "bound" and below.any():
        best = np.flatnonzero(d & (w > 0))[np.argmin(runs.loss[d & (w > 0)])]
        lel = np.where(below, kf[1] + kf[0] * np.log(runs.N[best]) - np.log(runs.flops), lel)
    use = ~d & np.isfinite(lel) & (w > 0)
    X = _leverage_design(runs, use, centre)
    theta, ok, conv = laws.huber_linear(X, lel[use], w[use][None])
    params = {"c0": float(theta[0, 0] - theta[0, 1] * centre[0] - theta[0, 2] * centre[1]),
              "u": float(theta[0, 1]), "v": float(theta[0, 2]),
              **{f"dense_{k}": v for k, v in ladder.params.items()}, "flops_slope": float(kf[0]),
              "flops_intercept": float(kf[1])}
    n_below = int(below.sum())
    message = f"dense ladder: {ladder.message}" + (
        "" if not n_below else f"; {n_below} sparse entries below the ladder's floor "
                               + ("entered at a lower bound" if below_floor == "bound" else "left out"))
    return laws.LawFit("leverage", params, (ladder.theta, theta[0], kf), ladder.objective,
                       bool(ladder.converged and ok[0] and conv[0]), message, ladder.start_objectives)


def below_floor(runs: Runs, fit) -> np.ndarray:
    """The sparse entries of ``runs`` whose loss a fitted `leverage` law's dense ladder cannot reach."""
    ladder = {k.removeprefix("dense_"): v for k, v in fit.params.items() if k.startswith("dense_")}
    return ~runs.dense & ~np.isfinite(_log_el(runs, ladder, fit.theta[2]))


def _leverage_design(runs: Runs, rows: np.ndarray, centre: tuple) -> np.ndarray:
    """Columns [1, x, y] of log EL = c0' + u·x + v·y (x, y: log P, log m centred) for the sparse ``rows``."""
    return laws.loglinear_design(np.log(runs.P[rows]), np.log(runs.m[rows]), None, centre)[:, :3]


def _log_el(runs: Runs, p: dict, kf) -> np.ndarray:
    """log EL of every entry, given the dense ladder's `chinchilla` parameters ``p`` and the FLOPs line ``kf``;
    NaN where the ladder never reaches the entry's loss."""
    floor = p["E"] + (p["B"] * runs.D ** -p["beta"] if "B" in p else 0.0)
    gap = runs.loss - floor
    with np.errstate(invalid="ignore", divide="ignore"):
        lNbar = (np.log(p["A"]) - np.log(gap)) / p["alpha"]
        return np.where(gap > 0, kf[1] + kf[0] * lNbar - np.log(runs.flops), np.nan)


def _predict_leverage(runs: Runs, fit, centre: tuple) -> np.ndarray:
    """log L̂ of sparse entries through the fitted EL and the dense ladder (dense entries: the ladder itself)."""
    ladder_theta, theta, kf = fit.theta
    lD = np.log(runs.D) if len(ladder_theta) == 5 else None
    lN = np.log(runs.N)  # dense entries: the ladder at their own size; sparse ones: at the dense size N̄ ≡ EL·C_run
    sp = ~runs.dense
    lN[sp] = (_leverage_design(runs, sp, centre) @ theta + np.log(runs.flops[sp]) - kf[1]) / kf[0]
    return laws.chinchilla_predict(ladder_theta, lN, lD)


# ----------------------------------------------------------------------------------------------- bootstrap

def bootstrap_weights(runs: Runs, n: int, seed: int) -> np.ndarray:
    """How many times each entry's configuration is drawn in each of ``n`` case-bootstrap resamples, shape
    (n, entries). The unit is the configuration with all its runs, never a row.

    Two stages (a cluster bootstrap): draw configurations with replacement; a drawn configuration brings its
    runs (seeds) without replacement, i.e. all of them once per draw. Drawing the seeds again with replacement
    would count seed noise twice (Davison & Hinkley 1997, §3.8): on planted 4×4 grids with 2 seeds it made the
    95% intervals cover the truth 99.75% of the time (400 draws), against 96% this way. Every entry of a drawn
    configuration (its runs, their budgets and checkpoints) gets its count, so duplicated checkpoints cannot pass
    for independent evidence. Dense and sparse configurations are resampled as separate strata. Drawn here, in
    one process, from one seeded generator: the result does not depend on how many workers refit the resamples.
    """
    rng = np.random.default_rng(seed)
    W = np.zeros((n, len(runs.loss)))
    for stratum in (False, True):
        rows = runs.dense == stratum
        configs, column = np.unique(runs.config[rows], return_inverse=True)
        if len(configs):
            k = rng.multinomial(len(configs), np.full(len(configs), 1 / len(configs)), size=n)  # (n, configs)
            W[:, rows] = k[:, column]
    return W


@one_blas_thread
def _fit_each(runs: Runs, form: str, centre: tuple, W: np.ndarray, start, below: str) -> list:
    """The law fitted with each weight row of W, from ``start``; None where a fit raised."""
    fits = []
    for w in W:
        try:
            fits.append(fit_form(runs, form, centre, w, start, below))
        except (np.linalg.LinAlgError, ValueError):
            fits.append(None)
    return fits


def fit_each(runs: Runs, form: str, centre: tuple, W: np.ndarray, start, below: str = "drop",
             workers: int = 2) -> list:
    """`_fit_each` split over ``workers`` processes (in this one for fewer than 8 rows). The fits do not depend
    on the number of workers."""
    if workers <= 1 or len(W) < 8:
        return _fit_each(runs, form, centre, W, start, below)
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_fit_each, [runs] * workers, [form] * workers, [centre] * workers,
                         np.array_split(W, workers), [start] * workers, [below] * workers)
        return [f for part in parts for f in part]


@one_blas_thread
def bootstrap(runs: Runs, form: str, fit, centre: tuple, n: int, seed: int, workers: int = 2,
              below: str = "drop") -> np.ndarray:
    """Refits of ``n`` case-bootstrap resamples (`bootstrap_weights`) of ``runs`` (cells, as a rule); rows
    [e_P, e_m, *params], all NaN where a refit failed (raised, did not converge, or gave a non-finite value)."""
    W = bootstrap_weights(runs, n, seed)
    if form == "loglinear":  # convex and linear: all resamples at once
        lD = np.log(runs.D) if "d" in fit.params else None
        X = laws.loglinear_design(np.log(runs.P), np.log(runs.m), lD, centre)
        theta, ok, converged = laws.huber_linear(X, np.log(runs.loss), W * runs.weight)
        params = np.array([list(laws.loglinear_params(t, centre, lD is not None).values()) for t in theta])
        res = np.column_stack([theta[:, 1], theta[:, 2], params])
        res[~(ok & converged)] = np.nan
        return res
    res = np.full((n, 2 + len(fit.params)), np.nan)
    for i, f in enumerate(fit_each(runs, form, centre, W, fit.theta, below, workers)):
        if f is not None and f.converged and np.all(np.isfinite(list(f.params.values()))):
            eP, em = elasticities(form, f, centre)
            res[i] = [np.nan if eP is None else eP, np.nan if em is None else em, *f.params.values()]
    return res


def percentile_ci(x: np.ndarray) -> list | None:
    """95% percentile interval of the finite values, or None when there are none."""
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else None


# -------------------------------------------------------------------------------------------- the decision

def side(form: str, ci: list) -> str:
    """Where an interval of an elasticity (or of Δ, or of the paper's trade) lies: "helps" on the side where the
    knob helps (below 0; above for leverage), "hurts" on the other, else "includes 0" (`NEGLIGIBLE`)."""
    lo, hi = sorted((-helps(form) * ci[0], -helps(form) * ci[1]))  # loss-like: below 0 helps
    return "helps" if hi < -NEGLIGIBLE else "hurts" if lo > NEGLIGIBLE else "includes 0"


def decide(form: str, eP: float, em: float, boot: np.ndarray) -> dict:
    """The decision (module docstring) from the estimates and the resamples' rows [e_P, e_m] (NaN: failed)."""
    ok = np.all(np.isfinite(boot[:, :2]), axis=1)
    bP, bm = boot[ok, 0], boot[ok, 1]
    d = {"e_P": eP, "e_P_ci": percentile_ci(bP), "e_m": em, "e_m_ci": percentile_ci(bm),
         "delta": em - eP, "delta_ci": percentile_ci(bm - bP), "resamples_failed": int((~ok).sum()),
         "paper_trade": em * LN3 - eP * LN2, "paper_trade_ci": percentile_ci(bm * LN3 - bP * LN2)}
    d["verdict"], d["verdict_reason"] = rule(form, d, len(boot))
    d |= ratio(form, d, bP, bm)
    if d["R_note"]:
        d["verdict_reason"] += f". {d['R_note']}"
    d["paper_trade_effect"] = side(form, d["paper_trade_ci"]) if d["paper_trade_ci"] else "includes 0"
    return d


def rule(form: str, d: dict, B: int) -> tuple[str, str]:
    """(verdict, reason): density or count outranks only where the signs and Δ say so (module docstring)."""
    failed = d["resamples_failed"]
    if d["e_m_ci"] is None:
        return "inconclusive", f"all {B} bootstrap refits failed, so there is no interval"
    if failed > MAX_FAILED * B:
        return "inconclusive", (f"{failed} of {B} bootstrap refits failed (more than {MAX_FAILED:.0%}); intervals "
                                "over the rest would describe only the resamples that could be fitted")
    m, p, dl = side(form, d["e_m_ci"]), side(form, d["e_P_ci"]), side(form, d["delta_ci"])
    below, above = ("below", "above") if helps(form) < 0 else ("above", "below")
    e_m, e_P, delta = (f"{name}'s interval {show_ci(d[key])}" for name, key in
                       (("e_m", "e_m_ci"), ("e_P", "e_P_ci"), ("Δ", "delta_ci")))
    hurt_m, hurt_P = f"more density hurts ({e_m} lies {above} 0)", f"a bigger table hurts ({e_P} lies {above} 0)"
    if m == "helps" and dl == "helps":
        return "density outranks", (f"{e_m} and {delta} lie {below} 0: density helps, and more than table size "
                                    "does" + (f"; {hurt_P}" if p == "hurts" else ""))
    if p == "helps" and dl == "hurts":
        return "count outranks", (f"{e_P} lies {below} 0 and {delta} {above} 0: table size helps, and more than "
                                  "density does" + (f"; {hurt_m}" if m == "hurts" else ""))
    if m == "hurts" and p == "hurts":
        return "inconclusive", f"both knobs hurt: {e_m} and {e_P} lie {above} 0"
    if dl == "includes 0":
        clauses = [f"{delta} includes 0: neither knob is shown to matter more"]
    elif dl == "helps":  # Δ favours density, but density itself is not shown to help
        clauses = [f"{e_m} includes 0: density is not shown to help" if m == "includes 0" else hurt_m]
    else:
        clauses = [f"{e_P} includes 0: table size is not shown to help" if p == "includes 0" else hurt_P]
    clauses += [c for c, s in ((hurt_m, m), (hurt_P, p)) if s == "hurts" and c not in clauses]
    return "inconclusive", "; ".join(clauses)


def ratio(form: str, d: dict, bP: np.ndarray, bm: np.ndarray) -> dict:
    """R = e_m/e_P with its interval where both elasticities' intervals lie on the helping side of 0, with the
    number of resamples whose ratio is infinite (e_P = 0 exactly); else R is null and R_note says why."""
    if d["e_m_ci"] is None:
        return {"R": None, "R_ci": None, "R_infinite": 0, "R_note": "R is not reported: no interval"}
    sides = {"e_m": side(form, d["e_m_ci"]), "e_P": side(form, d["e_P_ci"])}
    if set(sides.values()) == {"helps"}:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = bm / bP
        return {"R": d["e_m"] / d["e_P"], "R_ci": percentile_ci(r), "R_infinite": int((~np.isfinite(r)).sum()),
                "R_note": None}
    below, above = ("below", "above") if helps(form) < 0 else ("above", "below")
    why = [f"{k}'s interval " + ("includes 0" if s == "includes 0" else f"lies {above} 0")
           for k, s in sides.items() if s != "helps"]
    return {"R": None, "R_ci": None, "R_infinite": 0,
            "R_note": f"R is not reported: {' and '.join(why)} (the ratio ranks the knobs only where both "
                      f"elasticities lie {below} 0)"}


@dataclass(frozen=True)
class Estimate:
    """One fit with its bootstrap and decision: the design centre, the entries of the form's rows (``data``),
    their cells, the law, the resamples' rows [e_P, e_m, *params] and `decide`'s dict."""

    centre: tuple
    data: Runs
    cells: Runs
    fit: laws.LawFit
    boot: np.ndarray
    decision: dict


@one_blas_thread
def estimate(runs: Runs, form: str, n_boot: int, seed: int, workers: int = 2, below: str = "drop") -> Estimate:
    """Fit ``form`` to the cells of ``runs``, bootstrap it (``n_boot`` = 0: no resample, no interval) and decide."""
    every = runs.cells
    check_form(every, form)
    centre = design_centre(every)
    data, cells = runs.subset(form_rows(runs, form)), every.subset(form_rows(every, form))
    fit = fit_form(cells, form, centre, below_floor=below)
    eP, em = elasticities(form, fit, centre)
    boot = bootstrap(cells, form, fit, centre, n_boot, seed, workers, below) if n_boot else \
        np.empty((0, 2 + len(fit.params)))
    if eP is None:
        failed = int((~np.all(np.isfinite(boot[:, 2:]), axis=1)).sum())
        decision = {"e_P": None, "e_P_ci": None, "e_m": None, "e_m_ci": None, "delta": None, "delta_ci": None,
                    "R": None, "R_ci": None, "R_infinite": 0, "R_note": "R is not reported: the form has no P or m",
                    "paper_trade": None, "paper_trade_ci": None, "paper_trade_effect": None,
                    "resamples_failed": failed, "verdict": "inconclusive",
                    "verdict_reason": f"{form} has no P or m term (it fits the dense ladder); no verdict"}
    else:
        decision = decide(form, eP, em, boot)
    return Estimate(centre, data, cells, fit, boot, decision)


# ---------------------------------------------------------------------------------------------- validation

def seed_sigma(runs: Runs) -> float | None:
    """Pooled std of loss across the runs of one configuration at one budget (nats); None without replicates."""
    _, budget = np.unique(runs.budget, return_inverse=True)
    _, group = np.unique(runs.config * (budget.max() + 1) + budget, return_inverse=True)
    sizes = np.bincount(group)
    if not (sizes > 1).any():
        return None
    means = np.bincount(group, runs.loss) / sizes
    return float(math.sqrt(np.sum((runs.loss - means[group]) ** 2) / np.sum(sizes - 1)))


def heldout(est: Estimate, form: str, workers: int = 2) -> dict:
    """Leave-one-configuration-out and extrapolation-corner errors of ``form``, in nats of loss: a refit on the
    other configurations' cells predicts each run of the held-out ones.

    The corner: sparse configurations with P and m both above their medians are predicted from the rest (for
    chinchilla: the upper half of N_a from the lower half). Refits start from the full fit's parameters; a
    configuration whose rest cannot support the form, or whose refit fails, is not counted.
    """
    cells, data, centre = est.cells, est.data, est.centre
    target = ~cells.dense if form == "leverage" else np.ones(len(cells.loss), bool)
    if form == "chinchilla":
        corner = cells.N > np.median(np.unique(cells.N))
    else:
        sp = ~cells.dense
        corner = sp & (cells.P > np.median(np.unique(cells.P[sp]))) & (cells.m > np.median(np.unique(cells.m[sp])))
    held = [cells.config == c for c in np.unique(cells.config[target])] + ([corner] if corner.any() else [])
    held = [out for out in held if supports(cells.subset(~out), form)]
    fits = fit_each(cells, form, centre, np.array([~out for out in held], float), est.fit.theta,
                    workers=1 if form == "loglinear" else workers)
    errors = []
    for out, f in zip(held, fits):
        rows = data.subset(np.isin(data.config, np.unique(cells.config[out])))
        errors.append(None if f is None else np.exp(predict(rows, form, f, centre)) - rows.loss)
    loco = [e for out, e in zip(held, errors) if e is not None and out is not corner]
    errs = np.concatenate(loco) if loco else np.array([])
    extrap = next((e for out, e in zip(held, errors) if out is corner and e is not None), None)
    return {"loco_rmse": float(np.sqrt(np.mean(errs ** 2))) if len(errs) else None,
            "loco_mae": float(np.mean(np.abs(errs))) if len(errs) else None, "loco_configs": len(loco),
            "extrap_rmse": None if extrap is None else float(np.sqrt(np.mean(extrap ** 2))),
            "extrap_configs": 0 if extrap is None else len(np.unique(cells.config[corner]))}


def supports(runs: Runs, form: str) -> bool:
    """Whether ``runs`` can support ``form`` (`check_form` without its message)."""
    try:
        check_form(runs, form)
    except UserError:
        return False
    return True


def iso_cost_pairs(runs: Runs, n_boot: int, seed: int) -> tuple[list, dict | None]:
    """Model-free check: pairs (P, k·m) against (k·P, m), k > 1, at one budget and the same other grid axes.

    Sides match on the grid's nominal values (`GRID`; the planner's rounding of P does not matter) and, in a
    table without grid.* columns, on P and m within `PAIR_TOLERANCE` with activated_params within
    `BACKBONE_TOLERANCE`. Δ = mean loss of the density side (P, k·m) − that of the count side (k·P, m); Δ < 0
    favours density. Its interval resamples each side's runs (seeds) with replacement (normal beyond
    `PAIR_BOOTSTRAP_MAX` runs); None when a side has one run.

    Pairs share configurations (on a 4×4 grid, 14 pairs among 16 configurations), so the count of pairs that
    favour density is descriptive. The sign test uses only pairs that share no configuration, picked from the grid
    alone (smallest k first, then smallest P), never from the losses.
    """
    sp = runs.subset(~runs.dense)
    if not len(sp.loss):
        return [], None
    rng = np.random.default_rng(seed + 1)
    _, budget = np.unique(sp.budget, return_inverse=True)
    _, axes = np.unique(sp.axes, return_inverse=True)
    _, first, cell = np.unique((sp.config * (axes.max() + 1) + axes) * (budget.max() + 1) + budget,
                               return_index=True, return_inverse=True)
    losses = np.split(sp.loss[np.argsort(cell, kind="stable")], np.cumsum(np.bincount(cell))[:-1])
    P, m, N, B, A = (x[first] for x in (sp.nominal_P, sp.nominal_m, sp.N, sp.budget, sp.axes))
    tol = math.log1p(PAIR_TOLERANCE)
    found = []
    for i in range(len(first)):  # i: the density side (P, k·m)
        partner = ((B == B[i]) & (A == A[i]) & (np.abs(np.log(P * m / (P[i] * m[i]))) <= tol)
                   & (np.log(P / P[i]) > tol))
        if A[i] < 0:  # no grid.* columns: the same backbone
            partner &= np.abs(np.log(N / N[i])) <= math.log1p(BACKBONE_TOLERANCE)
        found += [(B[i], P[j] / P[i], P[i], m[i], i, j) for j in np.flatnonzero(partner)]
    pairs, used = [], set()
    for budget_i, k, _, _, i, j in sorted(found):
        a, b = losses[i], losses[j]
        pairs.append({"density": {"P": float(P[i]), "m": float(m[i])}, "count": {"P": float(P[j]), "m": float(m[j])},
                      "tokens": float(sp.D[first[i]]), "budget": float(budget_i), "k": float(k),
                      "delta_loss": float(a.mean() - b.mean()), "delta_ci": _difference_ci(a, b, n_boot, rng),
                      "n_density": len(a), "n_count": len(b), "in_sign_test": not {i, j} & used})
        used |= {i, j} if pairs[-1]["in_sign_test"] else set()
    if not pairs:
        return pairs, None
    independent = [p["delta_loss"] < 0 for p in pairs if p["in_sign_test"]]
    wins = sum(independent)
    return pairs, {"density_wins": sum(p["delta_loss"] < 0 for p in pairs), "pairs": len(pairs),
                   "independent_pairs": len(independent), "independent_density_wins": wins,
                   "p_value": sign_test(wins, len(independent))}


def sign_test(wins: int, n: int) -> float:
    """Two-sided exact sign test: if each of ``n`` independent pairs favoured either side with chance ½, the
    chance of a split at least as uneven as ``wins`` of ``n``."""
    tail = sum(math.comb(n, i) for i in range(min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _difference_ci(a: np.ndarray, b: np.ndarray, n_boot: int, rng) -> list | None:
    """95% interval of mean(a) − mean(b), resampling each side's runs; None when a side has one run."""
    if len(a) < 2 or len(b) < 2:
        return None
    if max(len(a), len(b)) > PAIR_BOOTSTRAP_MAX:
        d, se = a.mean() - b.mean(), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        return [float(d - 1.96 * se), float(d + 1.96 * se)]
    return percentile_ci(rng.choice(a, (n_boot, len(a))).mean(axis=1) - rng.choice(b, (n_boot, len(b))).mean(axis=1))


# ------------------------------------------------------------------------------------------------- the fit

@one_blas_thread
def run_fit(source, form: str = "loglinear", n_boot: int = 2000, seed: int = 0, workers: int = 2,
            compare: bool = True, resamples: bool = False, at_flops: Sequence[float] = (),
            sweep: Path | None = None) -> dict:
    """Fit ``form`` to a runs table (a path, a polars DataFrame, or `Runs`) and return the report (the `--json`
    dict; see the module docstring and docs/fitting.md). ``at_flops``: budgets of the second-budget refits. With
    ``resamples``, ``report["resamples"]`` holds the converged bootstrap refits' e_P, e_m, Δ, trade and R.
    ``sweep``: the sweep directory a DataFrame was aggregated from (its loss is the final eval loss)."""
    if form not in FORMS:
        raise UserError(f"--form {form}: unknown; choose one of {', '.join(FORMS)}")
    if n_boot < 1:
        raise UserError(f"--bootstrap {n_boot}: must be ≥ 1 (2000 recommended)")
    bad = [f for f in at_flops if not (math.isfinite(f) and f > 0)]
    if bad:
        raise UserError(f"--at-flops {bad[0]:g}: a budget must be a positive number of training FLOPs, e.g. 1e15")
    references = []
    if isinstance(source, Runs):
        runs, fitted_on = source, "the table's loss"
        refits = [View("on other losses or budgets", why_not="the fit was given arrays, not a table")]
    else:
        table, sweep, where = read_table(source) if isinstance(source, (str, Path)) else (source, sweep, "table")
        table, reference_rows = split_references(table)
        main, refits = views(table, sweep, at_flops, where)
        runs, fitted_on = runs_from_frame(main.frame, where), main.label
        references = reference_losses(reference_rows, main.frame)
    est = estimate(runs, form, n_boot, seed, workers)
    fit, boot, d = est.fit, est.boot, est.decision
    ok = np.all(np.isfinite(boot[:, 2:]), axis=1)
    names = list(fit.params)
    params_ci = {k: percentile_ci(boot[ok, 2 + i]) for i, k in enumerate(names)} if boot.shape[1] > 2 else {}
    valid = {form: heldout(est, form, workers)}
    if compare:
        for other in FORMS:
            if other != form:
                try:
                    valid[other] = heldout(estimate(runs, other, 0, seed), other, workers)
                except UserError as e:
                    valid[other] = {"skipped": e.problems[0]}
    pairs, sign = iso_cost_pairs(runs, n_boot, seed)
    floor = below_floor(est.cells, fit) if form == "leverage" else np.zeros(len(est.cells.loss), bool)
    if floor.any():
        n = int(floor.sum())
        refits.append(View(f"with the {n} cell{'s' * (n != 1)} below the dense ladder's loss floor, at a lower "
                           "bound of their leverage", below="bound"))
    report = {
        "form": form, "source": runs.source, "fitted_on": fitted_on, "n_runs": est.data.count("run"),
        "n_configs": est.data.count("config"), "n_rows": int(len(est.data.loss)),
        "n_cells": int(len(est.cells.loss)), "params": fit.params, "params_ci": params_ci,
        "objective": fit.objective, "converged": fit.converged, "optimizer_message": fit.message,
        "start_objectives": list(fit.start_objectives),
        "start_objective_spread": float(max(fit.start_objectives) - min(fit.start_objectives)),
        "centre": {"P": math.exp(est.centre[0]), "m": math.exp(est.centre[1])}, **d,
        "sign_convention": SIGN_CONVENTION,
        "bootstrap": {"B": n_boot, "seed": seed, "unit": "configurations, each with all its runs (seeds)",
                      "failed": d["resamples_failed"]},
        "heldout_rmse": valid[form]["loco_rmse"], "heldout_mae": valid[form]["loco_mae"],
        "extrapolation_rmse": valid[form]["extrap_rmse"], "seed_sigma": seed_sigma(est.data), "forms_heldout": valid,
        "iso_cost_pairs": pairs, "sign_test": sign, "range": _ranges(est.data),
        "below_floor": _floor_cells(est.cells, floor), "references": references,
    }
    report["robustness"] = [refit(v, runs, form, n_boot, seed, workers, report) for v in refits]
    report["sentence"] = sentence(report)
    if resamples and d["e_P"] is not None:
        bP, bm = boot[ok, 0], boot[ok, 1]
        report["resamples"] = {"e_P": bP.tolist(), "e_m": bm.tolist(), "delta": (bm - bP).tolist(),
                               "paper_trade": (bm * LN3 - bP * LN2).tolist(),
                               "R": (bm / bP).tolist() if d["R"] is not None else None}
    return report


def split_references(table) -> tuple["pl.DataFrame", "pl.DataFrame | None"]:
    """(the rows to fit, the reference rows or None): a true ``reference`` column marks a reference."""
    import polars as pl

    if "reference" not in table.columns:
        return table, None
    is_ref = pl.col("reference").cast(pl.Boolean).fill_null(False)
    return table.filter(~is_ref), table.filter(is_ref)


def reference_losses(refs, grid) -> list[dict]:
    """Each reference model's loss beside the grid's: its label (``grid.model`` or ``kind``), kind, runs, mean loss,
    FLOPs/token, and the grid configurations' best, median and worst mean loss. Done rows only; in a table of
    budgets, each at the grid rows' (largest) budget."""
    import polars as pl

    if refs is None:
        return []
    if "status" in refs.columns:
        refs = refs.filter(pl.col("status") == "done")
    if "at_flops" in refs.columns and "at_flops" in grid.columns and grid.height:
        refs = refs.filter(pl.col("at_flops") == grid["at_flops"].max())
    refs = refs.filter(pl.col("loss").is_not_null())
    if refs.height == 0:
        return []
    label = pl.col("grid.model") if "grid.model" in refs.columns else pl.col("kind")
    keys = ["sparse_params", "topm", "activated_params"]
    configs = grid.filter(pl.col("loss").is_not_null()).group_by(keys).agg(pl.col("loss").mean())["loss"]
    beside = {"grid_best": float(configs.min()), "grid_median": float(configs.median()),
              "grid_worst": float(configs.max())} if len(configs) else {}
    out = refs.group_by(label.alias("label"), "kind", maintain_order=True).agg(
        runs=pl.len(), loss=pl.col("loss").mean(), loss_std=pl.col("loss").std(),
        flops_per_token=pl.col("flops_per_token").mean())
    return [{**row, **beside} for row in out.to_dicts()]


def _floor_cells(cells: Runs, floor: np.ndarray) -> list[dict]:
    """The cells below a leverage law's dense ladder floor: their P, m and number of runs."""
    return [{"P": float(cells.P[i]), "m": float(cells.m[i]), "budget": float(cells.budget[i]),
             "runs": int(cells.weight[i])} for i in np.flatnonzero(floor)]


def refit(view: View, runs: Runs, form: str, n_boot: int, seed: int, workers: int, main: dict) -> dict:
    """A robustness refit's decision, and whether it keeps the main verdict and the sign of Δ."""
    if view.frame is None and view.below == "drop":
        return {"refit": view.label, "skipped": view.why_not}
    try:
        other = runs if view.frame is None else runs_from_frame(view.frame, runs.source)
        est = estimate(other, form, n_boot, seed, workers, view.below)
    except UserError as e:
        return {"refit": view.label, "skipped": e.problems[0].removeprefix(f"{runs.source}: ")}
    d = est.decision
    same_sign = None if d["delta"] is None else bool(np.sign(d["delta"]) == np.sign(main["delta"]))
    return {"refit": view.label, "n_runs": est.data.count("run"), "verdict": d["verdict"],
            "verdict_reason": d["verdict_reason"], "holds": d["verdict"] == main["verdict"],
            "delta_sign_holds": same_sign, **{k: d[k] for k in ("e_m", "e_m_ci", "e_P", "e_P_ci", "delta",
                                                                   "delta_ci", "paper_trade", "paper_trade_ci")}}


def _ranges(data: Runs) -> dict:
    """[min, max] of P, m, N_a (of the sparse entries when there are any), D; the largest FLOPs/token deviation."""
    sp = ~data.dense
    span = lambda x: [float(x.min()), float(x.max())] if len(x) else None  # noqa: E731
    return {"P": span(data.P[sp]), "m": span(data.m[sp]), "N_a": span(data.N[sp] if sp.any() else data.N),
            "D": span(data.D), "flops_per_token_deviation":
            float(np.max(np.abs(data.flops[sp] / np.median(data.flops[sp]) - 1))) if sp.any() else None}


# ---------------------------------------------------------------------------------------------- the sentence

MATCHED = 0.05
"""FLOPs/token within ±5% of their median count as matched in the sentence."""


def show(x) -> str:
    """A number to 3 significant digits with a true minus sign; "n/a" for None."""
    return "n/a" if x is None else f"{x:.3g}".replace("-", "−")


def show_ci(c) -> str:
    """An interval as [lo, hi]; "[n/a]" for None."""
    return "[n/a]" if c is None else f"[{show(c[0])}, {show(c[1])}]"


def trade_text(r: dict) -> str:
    """What the paper's trade (halve P, triple m) does here, in words."""
    if r["paper_trade"] is None:
        return "The paper's trade (halve P, triple m) needs elasticities of P and m."
    what = "log EL, the log of the dense compute a run is worth," if r["form"] == "leverage" else "log L"
    effect = {"helps": "it helps here", "hurts": "it hurts here",
              "includes 0": "neither a gain nor a loss is shown here"}[r["paper_trade_effect"]]
    return (f"The paper's trade (halve P, triple m) changes {what} by {show(r['paper_trade'])} "
            f"{show_ci(r['paper_trade_ci'])}: {effect}.")


def robustness_text(r: dict) -> str:
    """The refits of the decision, and whether each keeps the verdict."""
    parts = []
    for e in r["robustness"]:
        what = e["refit"]
        if "skipped" in e:
            parts.append(f"{what}: not possible ({e['skipped']})")
        elif e["holds"]:
            parts.append(f"{what}: {e['verdict']}, the same verdict")
        else:
            sign = "n/a" if e["delta_sign_holds"] is None else "holds" if e["delta_sign_holds"] else "reverses"
            parts.append(f"{what}: {e['verdict']}, not the same verdict (Δ = {show(e['delta'])} "
                         f"{show_ci(e['delta_ci'])}, its sign {sign})")
    return "Refit " + "; ".join(parts) + "."


def sentence(r: dict) -> str:
    """The report sentence, filled from a `run_fit` report:

    Within P ∈ [..], m ∈ [..], D = .. tokens, backbone N_a .., at matched FLOPs/token (±x%), e_m = .. [CI],
    e_P = .. [CI], Δ = e_m − e_P = .. [CI], R = .. [CI] (case bootstrap, B = 2000, resampling configurations with
    their runs; k refits failed): VERDICT: REASON. The paper's trade (halve P, triple m) changes log L by ..
    [CI]: it helps here. The <form> model predicts n held-out configs with MAE .. nats vs seed σ ≈ ... Refit on
    the eval loss before the cooldown: ..., the same verdict; .... Not tested beyond this range.
    """
    def span(key, unit=""):
        lo_hi = r["range"][key]
        if lo_hi is None:
            return "n/a"
        return f"= {show(lo_hi[0])}{unit}" if lo_hi[0] == lo_hi[1] else f"∈ [{show(lo_hi[0])}, {show(lo_hi[1])}]{unit}"

    dev = r["range"]["flops_per_token_deviation"]
    flops = "FLOPs/token n/a" if dev is None else \
        f"at matched FLOPs/token (±{100 * dev:.2g}%)" if dev <= MATCHED else \
        f"at FLOPs/token that differ by up to ±{100 * dev:.2g}% (not matched)"
    R = "R not reported" if r["R"] is None else f"R = {show(r['R'])} {show_ci(r['R_ci'])}"
    failed = r["resamples_failed"]
    verdict = r["verdict"] + (" at this budget" if r["verdict"] == "inconclusive" else "")
    held = r["forms_heldout"][r["form"]]
    sigma = f"vs seed σ ≈ {show(r['seed_sigma'])}" if r["seed_sigma"] is not None else \
        "(seed noise not measured: no configuration has two seeds)"
    return (f"Within P {span('P')}, m {span('m')}, D {span('D', ' tokens')}, backbone N_a {span('N_a')}, {flops}, "
            f"e_m = {show(r['e_m'])} {show_ci(r['e_m_ci'])}, e_P = {show(r['e_P'])} {show_ci(r['e_P_ci'])}, "
            f"Δ = e_m − e_P = {show(r['delta'])} {show_ci(r['delta_ci'])}, {R} (case bootstrap, "
            f"B = {r['bootstrap']['B']}, resampling configurations with their runs; {failed} "
            f"refit{'s' * (failed != 1)} failed): {verdict}: "
            f"{r['verdict_reason']}. {trade_text(r)} The {r['form']} model predicts {held['loco_configs']} "
            f"held-out configs with MAE {show(r['heldout_mae'])} nats (leave-one-config-out; RMSE "
            f"{show(r['heldout_rmse'])}, extrapolation corner RMSE {show(r['extrapolation_rmse'])}) {sigma}. "
            f"{robustness_text(r)} Not tested beyond this range.")
