"""Aggregate: a sweep directory → `<sweep>/results.parquet`, one row per run (reads the runs' files).

Every run of plan.parquet gets a row, whatever its state. A `done` run carries its loss; a `failed`,
`running` or `pending` run is listed with a null loss and the reason, never dropped. A done run whose
eval.json is damaged or missing is failed, "damaged eval.json (…)". The columns:

- the plan's accounting: run_id, seed, kind, grid.<axis>, sparse_params (P), topm (m),
  values_per_layer, density (m/N), activated_params, total_params, flops_per_token (forward),
  tokens, ffn_hidden, match_residual, gpu_hours, steps; plus `match`, the recipe's matching
  condition, and train_flops = 3·flops_per_token·tokens (a training step costs ≈ 3 forwards);
- status (`sweeps.ledger.STATES`: done, failed, running, queued, pending), reason, step (the last
  logged step);
- loss, the common point that `umv2 fit` fits: the final eval loss, measured after the cooldown;
- eval_loss (the same, final), train_loss (mean over the last `TRAIN_TAIL` logged steps: one
  batch is noisy), and from eval.json the memory-task accuracies task_* and the UltraMemV2 layer
  health memory_*;
- loss_pre_cooldown and tokens_pre_cooldown: the last eval at or before the step where a WSD run's
  cooldown starts (`cooldown_start`), which `umv2 fit` refits to check that its verdict does not
  hang on the anneal; null for a run without a cooldown (a cosine schedule, cooldown = 0), without
  an eval before it, or not done.

With `at_flops` (training-FLOP budgets F), each run gets one row per budget instead: `at_flops` = F,
`tokens` = the tokens seen at F (F / (3·flops_per_token); the run's own total moves to
`run_tokens`), and `loss` = the eval loss interpolated linearly in log FLOPs between the run's
eval steps (null where F lies outside them). A WSD run's evals before its cooldown are not
annealed: a law across budgets is cleaner from runs trained to each budget.

Reading cost. A 10,000-step run logs 10,000 metrics lines (1.4 MB). Parsing every line of 1,000
such runs takes 6.7 s here (polars scan_ndjson, 2 cores), so the default reads only each file's
last lines (a seek from its end) and `at_flops` finds the eval lines by a byte search and parses
only those. The table work (join with the plan, states, interpolation) is one lazy Polars query.
"""

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from umv2cli.errors import UserError
from umv2cli.files import Damaged, write_atomic
from umv2cli.rundir import damage_reason, eval_lines, metrics_line, read_eval, tail_metrics
from umv2cli.sweeps.ledger import STATES, RunState, read_plan, run_states
from umv2cli.sweeps.recipe import load_recipe

TRAIN_TAIL = 10
"""train_loss averages the last this many logged steps."""
TAIL_BYTES = 16_384
"""How much of the end of metrics.jsonl the default path reads (lines are ~150 bytes, eval lines ~600)."""


def _facts_schema() -> dict:
    import polars as pl

    return {"run_id": pl.String, "status": pl.String, "failure": pl.String, "step": pl.Int64,
            "train_loss": pl.Float64, "eval_loss": pl.Float64}


def aggregate(sweep: Path, at_flops: Sequence[float] = (), write: bool = True) -> "pl.DataFrame":
    """Build the table and (with ``write``) write it to `<sweep>/results.parquet` (atomically); returns it."""
    import polars as pl

    sweep = Path(sweep)
    bad = [f for f in at_flops if not (math.isfinite(f) and f > 0)]
    if bad:
        raise UserError(f"--at-flops {bad[0]:g}: a budget must be a positive number of training FLOPs, e.g. 1e15")
    plan = read_plan(sweep).lazy()
    run_ids = plan.select("run_id").collect()["run_id"].to_list()
    steps = dict(plan.select("run_id", "steps").collect().iter_rows())
    facts = pl.from_dicts([run_facts(sweep / "runs" / s.run_id, s) for s in run_states(sweep, steps)],
                          infer_schema_length=None, schema_overrides=_facts_schema())
    starts = cooldown_starts(sweep, facts.filter(pl.col("status") == "done")["run_id"].to_list())
    curves = eval_curves(sweep, run_ids if at_flops else list(starts)).lazy()
    table = (plan.join(facts.lazy(), on="run_id", how="left", maintain_order="left")
             .join(pre_cooldown(curves, starts), on="run_id", how="left", maintain_order="left")
             .with_columns(pl.lit(load_recipe(sweep / "recipe.toml").match).alias("match"),
                           train_flops(pl.col("tokens")).alias("train_flops"))
             .with_columns(reason=_reason()))
    if at_flops:
        table = at_budgets(table, curves, at_flops)
    else:
        table = table.with_columns(loss=pl.when(pl.col("status") == "done").then(pl.col("eval_loss")))
    results = table.select(_column_order(table.collect_schema().names())).collect()
    if write:
        buffer = io.BytesIO()
        results.write_parquet(buffer)
        write_atomic(sweep / "results.parquet", buffer.getvalue())
    return results


# ------------------------------------------------------------------------------------- one run's files

def run_facts(run: Path, state: RunState) -> dict:
    """The ledger's state of one run, its final train loss (from the tail of metrics.jsonl) and,
    when it is done, its final evaluation (eval.json)."""
    tail = tail_metrics(run, TRAIN_TAIL, TAIL_BYTES)
    losses = [m["train_loss"] for m in tail if "train_loss" in m]
    facts = {"run_id": state.run_id, "status": state.state, "failure": state.reason or None, "step": state.step,
             "train_loss": sum(losses) / len(losses) if losses else None, "eval_loss": None}
    if state.state != "done":
        return facts
    try:
        final = read_eval(run)
    except Damaged as e:
        return facts | {"status": "failed", "failure": damage_reason(run, e)}
    return facts | {k: float(v) for k, v in final.items() if k == "eval_loss" or k.startswith(("task_", "memory_"))}


def cooldown_start(train: dict) -> int | None:
    """The step after which a WSD run's learning rate decays (`umv2cli.train.lr_multiplier`'s rule: the
    last ⌈cooldown·steps⌉ steps), from its spec's train table; None for a schedule without a cooldown."""
    if train.get("schedule") != "wsd" or not train.get("cooldown"):
        return None
    return train["steps"] - math.ceil(train["cooldown"] * train["steps"])


def cooldown_starts(sweep: Path, run_ids: list[str]) -> dict[str, int]:
    """{run_id: `cooldown_start`} of the runs whose spec.json gives one (a run without a readable spec
    has no pre-cooldown loss)."""
    starts = {}
    for run_id in run_ids:
        try:
            start = cooldown_start(json.loads((sweep / "runs" / run_id / "spec.json").read_text())["train"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if start is not None:
            starts[run_id] = start
    return starts


def eval_curves(sweep: Path, run_ids: list[str]) -> "pl.DataFrame":
    """Every eval line of every run (`rundir.eval_lines`: only those lines are read): run_id, step, tokens,
    eval_loss. They are parsed at once by Polars; if one of them is damaged, each is parsed alone and only the
    valid ones, with whole tokens and a numeric eval loss, are kept."""
    import polars as pl

    ids, lines = [], []
    for run_id in run_ids:
        found = eval_lines(sweep / "runs" / run_id)
        ids += [run_id] * len(found)
        lines += found
    schema = {"run_id": pl.String, "step": pl.Int64, "tokens": pl.Int64, "eval_loss": pl.Float64}
    try:
        curves = pl.read_ndjson(io.BytesIO(b"\n".join(lines)), schema={k: schema[k] for k in list(schema)[1:]})
        return curves.with_columns(run_id=pl.Series(ids, dtype=pl.String)).select(*schema)
    except pl.exceptions.PolarsError:
        rows = [(run_id, line["step"], line["tokens"], line["eval_loss"])
                for run_id, line in zip(ids, map(metrics_line, lines))
                if line and type(line.get("tokens")) is int and type(line.get("eval_loss")) in (int, float)]
        return pl.DataFrame(rows, schema=schema, orient="row")


# ------------------------------------------------------------------------------------------- table work

def pre_cooldown(curves: "pl.LazyFrame", starts: dict[str, int]) -> "pl.LazyFrame":
    """run_id, loss_pre_cooldown, tokens_pre_cooldown: each run's last eval at or before its cooldown start."""
    import polars as pl

    start = pl.LazyFrame({"run_id": list(starts), "start": list(starts.values())},
                         schema={"run_id": pl.String, "start": pl.Int64})
    return (curves.join(start, on="run_id").filter(pl.col("step") <= pl.col("start")).sort("step")
            .group_by("run_id").agg(pl.col("eval_loss").last().alias("loss_pre_cooldown"),
                                    pl.col("tokens").last().alias("tokens_pre_cooldown")))


def at_budgets(table: "pl.LazyFrame", curves: "pl.LazyFrame", at_flops: Sequence[float]) -> "pl.LazyFrame":
    """One row per (run, budget F): the eval loss at F, linear in log training FLOPs between the
    eval steps on either side (an eval exactly at F gives its own loss)."""
    import polars as pl

    log_c = train_flops(pl.col("tokens")).log()
    points = (curves.join(table.select("run_id", "flops_per_token"), on="run_id")
              .select("run_id", log_c.alias("x"), pl.col("eval_loss").alias("y")).sort("x"))
    rows = (table.rename({"tokens": "run_tokens"}).with_row_index("order")
            .join(pl.LazyFrame({"at_flops": [float(f) for f in at_flops]}), how="cross")
            .with_columns(x=pl.col("at_flops").log(),
                          tokens=(pl.col("at_flops") / (3 * pl.col("flops_per_token"))).round().cast(pl.Int64))
            .sort("x"))
    for side, strategy in (("lo", "backward"), ("hi", "forward")):
        side_points = points.select("run_id", "x", pl.col("x").alias(f"x_{side}"), pl.col("y").alias(f"y_{side}"))
        rows = rows.join_asof(side_points, on="x", by="run_id", strategy=strategy,
                              check_sortedness=False)  # both sides are sorted on x, so within each run too
    slope = (pl.col("y_hi") - pl.col("y_lo")) / (pl.col("x_hi") - pl.col("x_lo"))
    loss = pl.when(pl.col("x_hi") == pl.col("x_lo")).then(pl.col("y_lo")) \
        .otherwise(pl.col("y_lo") + slope * (pl.col("x") - pl.col("x_lo")))
    return (rows.with_columns(loss=pl.when(pl.col("status") == "done").then(loss))
            .sort("order", "at_flops").drop("order", "x", "x_lo", "y_lo", "x_hi", "y_hi"))


def train_flops(tokens: "pl.Expr") -> "pl.Expr":
    """Training FLOPs after ``tokens`` tokens: 3 forwards' worth per token (in floats: no overflow)."""
    import polars as pl

    return 3.0 * pl.col("flops_per_token").cast(pl.Float64) * tokens.cast(pl.Float64)


def _reason() -> "pl.Expr":
    """Why a run has no loss: the failure from STATUS, how far a started run got, or not started."""
    import polars as pl

    return (pl.when(pl.col("status") == "failed").then(pl.col("failure"))
            .when(pl.col("status") == "running")
            .then(pl.format("stopped or running at step {} of {}", pl.col("step"), pl.col("steps")))
            .when(pl.col("status") == "queued").then(pl.lit("queued on Slurm"))
            .when(pl.col("status") == "pending").then(pl.lit("not started")))


def _column_order(names: list[str]) -> list[str]:
    """Identity and accounting first, then state and losses, then evals; `failure` is folded into reason."""
    first = ["run_id", "status", "reason", "seed", "kind", "match", *[n for n in names if n.startswith("grid.")],
             "sparse_params", "topm", "values_per_layer", "density", "activated_params", "total_params",
             "flops_per_token", "tokens", "run_tokens", "train_flops", "at_flops", "steps", "step",
             "loss", "eval_loss", "train_loss", "loss_pre_cooldown", "tokens_pre_cooldown"]
    first = [n for n in first if n in names]
    rest = [n for n in names if n not in first and n != "failure" and not n.startswith(("task_", "memory_"))]
    return first + rest + sorted(n for n in names if n.startswith(("task_", "memory_")))


def summary(results: "pl.DataFrame") -> dict:
    """Counts of runs by state (a run counts once, whatever the number of budgets)."""
    runs = results.unique("run_id", maintain_order=True)
    return {"total": runs.height, **{s: int((runs["status"] == s).sum()) for s in STATES},
            "failures": runs.filter(runs["status"] == "failed").select("run_id", "reason").to_dicts()}
