"""Recipe: a TOML file → a validated `Recipe` (reads the file; writes nothing).

A recipe names a base model, the grid axes, seeds, the training shared by every run, the data and
the matching condition:

    name = "smoke"                       # the sweep's folder name
    model = "tiny-ultramemv2"            # base model: a preset name, or a table of model fields
    data = "builtin"                     # or a `umv2 data prepare` folder (relative: from this file's folder)
    seeds = [0]                          # every grid point runs with each of these seeds
    corner_seeds = [1, 2]                # extra seeds at the corners of the grid (σ_seed)
    match = "fixed-backbone"             # or "iso-activated" / "iso-flop": the planner resizes the FFN
    tokens = 2_000_000                   # token budget per run (sets train.steps); optional
    tuned = "out/lr/best.toml"           # [train] values per group found by `umv2 tune` (relative: from this
                                         # file's folder); optional

    [train]                              # TrainConfig fields shared by every run
    batch_size = 8

    [grid]                               # axes; the runs are their Cartesian product
    sparse_params = [1e6, 4e6]           # shorthand: total sparse parameters (sets knum, or n_experts)
    topm = [4, 16]                       # shorthand: sparse.topm (MoE: sparse.topk)
    "sparse.dv" = [16, 32]               # any model field by its dotted path
    model = ["tiny-dense", "tiny-moe"]   # or an axis over base models

    [[references]]                       # runs beside the grid, for comparison, with `seeds`; optional
    model = "tiny-dense"                 # a point in the grid's terms: any axis keys, one value each

    [tune]                               # what `umv2 tune` searches (see `TuneSpec`); optional
    group_by = "model"                   # one study per value of this axis
    n_trials = 8
    lr = { low = 1e-4, high = 1e-2, log = true }

    [slurm]                              # job options of `--executor slurm` (sweeps/slurm.py); optional
    partition = "gpu"
    time = "4:00:00"                     # per job: minutes, or a Slurm time
    gpus = 1

`load_recipe` reports every problem it finds at once, one line each. The `tuned` file is read by
the planner (`read_tuned`), so a copy of the recipe elsewhere still loads.
"""

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umv2cli.config import MAX_SEED, SPARSE_KINDS, ModelConfig, TrainConfig, read_table
from umv2cli.errors import UserError
from umv2cli.sweeps.slurm import slurm_table_problems

Match = Literal["fixed-backbone", "iso-activated", "iso-flop"]
SHORTHANDS = ("sparse_params", "topm")
TOP_KEYS = ("name", "model", "data", "seeds", "corner_seeds", "match", "tokens", "tuned", "train", "grid", "references",
            "tune", "slurm")
MAX_PARAMS = 10**13
"""Total parameters a run may have: 10 T parameters take 160 TB to train (fp32 weights, gradients and two AdamW
moments), beyond any one run; a larger count is a slip such as sparse_params = 1e30."""
MAX_NAME_BYTES = 255
"""The longest file name most file systems take (NAME_MAX): the sweep's folder is named after the recipe."""


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: a float range [low, high] (log-uniform with `log`), or choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()


@dataclass(frozen=True)
class TuneSpec:
    """The `[tune]` table: an Optuna study per group over TrainConfig fields (`umv2 tune`)."""

    params: dict[str, Param]
    """TrainConfig field → its range, e.g. lr = {low = 1e-4, high = 1e-2, log = true}."""
    group_by: str | None = None
    """A grid axis: one study per value (e.g. lr per model size). A trial trains the grid point with
    that value and every other axis at its middle value. None: one study, at the grid's middle."""
    n_trials: int = 8
    """Finished trials per study (complete or pruned; a retry of a failed trial is extra)."""
    metric: Literal["eval_loss", "train_loss"] = "eval_loss"
    """Minimized; its value at the last step is the trial's value."""
    evals: int = 5
    """Evaluations per trial, evenly spaced, when train.eval_every is 0: the pruner's checkpoints."""
    prune: bool = True
    """Stop a trial whose intermediate metric is worse than the median of earlier trials at that
    step (optuna's MedianPruner, after 2 finished trials)."""
    retries: int = 1
    """A failed trial (NaN/Inf, or its worker killed) is tried again this many times; a NaN retry
    takes the next seed, a killed one resumes from its checkpoint."""
    seed: int = 0
    """Seed of the sampler (TPE)."""


TUNABLE = ("lr", "value_lr_mult", "value_lr_decay", "warmup", "cooldown", "min_lr_ratio", "weight_decay",
           "beta1", "beta2", "grad_clip", "schedule")
"""TrainConfig fields a study may search; the others fix the budget or the bookkeeping."""


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str | dict
    grid: dict[str, list]
    """Axis name → values, in the file's order (axes vary slowest first)."""
    references: tuple[dict[str, Any], ...] = ()
    """Points trained beside the grid (e.g. a dense and an MoE model at the same FLOPs), each {axis: value}, with
    `seeds` (no corner seeds). They are compared with the grid, not fitted with it."""
    data: str = "builtin"
    seeds: tuple[int, ...] = (0,)
    corner_seeds: tuple[int, ...] = ()
    match: Match = "fixed-backbone"
    tokens: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    tuned: Path | None = None
    """A best.toml written by `umv2 tune` (absolute: a relative path was taken from the recipe's folder)."""
    tune: TuneSpec | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    """Job options for `--executor slurm` (`sweeps.slurm.SLURM_KEYS`); the command line overrides them."""
    source: str = "recipe"

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as {axis: value}, the last axis varying fastest."""
        points: list[dict[str, Any]] = [{}]
        for axis, values in self.grid.items():
            points = [{**p, axis: v} for p in points for v in values]
        return points

    def size(self) -> int:
        """How many runs the plan has, counted without listing them: every point with each seed, and the
        corners (each axis at its first or last value) with each corner seed."""
        points = math.prod(len(values) for values in self.grid.values())
        corners = math.prod(min(len(values), 2) for values in self.grid.values())
        return points * len(self.seeds) + corners * len(self.corner_seeds)

    def is_corner(self, point: dict[str, Any]) -> bool:
        return all(point[a] in (vs[0], vs[-1]) for a, vs in self.grid.items() if len(vs) > 1)

    def middle(self) -> dict[str, Any]:
        """The grid's middle point: each axis at its middle value (the lower one of an even count)."""
        return {axis: values[(len(values) - 1) // 2] for axis, values in self.grid.items()}


def group_key(value: Any) -> str:
    """The name of a group in a tuned file: a string value itself, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def load_recipe(path: Path, base: Path | None = None) -> Recipe:
    """Read and check a recipe; every problem is reported (one line each) before anything runs.

    Relative paths in it (`data`, `tuned`) start at ``base``: the recipe's own folder unless given (a
    sweep's copy of its recipe passes the folder the original came from)."""
    raw = read_table(path)
    base = Path(path).parent if base is None else Path(base)
    where = str(path)
    problems = [f"{where}: {key}: unknown key; allowed: {', '.join(TOP_KEYS)}" for key in raw if key not in TOP_KEYS]
    problems += _typed(raw, where)
    grid = raw.get("grid", {}) if isinstance(raw.get("grid", {}), dict) else {}
    if not grid and isinstance(raw.get("grid", {}), dict):
        problems.append(f"{where}: grid: empty; give at least one axis, e.g. topm = [4, 8]")
    for axis, values in grid.items():
        problems += [f"{where}: {p}" for p in _axis_problems(axis, values)]
    references = raw.get("references", [])
    problems += [f"{where}: {p}" for p in _reference_problems(references)]
    train = raw.get("train", {}) if isinstance(raw.get("train", {}), dict) else {}
    train_problems = _train_problems(train, raw)
    problems += [f"{where}: {p}" for p in train_problems]
    tune = None
    if isinstance(raw.get("tune"), dict):
        try:  # the bounds are checked with [train] when it is valid itself
            tune = _tune_spec(raw["tune"], grid, {} if train_problems else train)
        except UserError as e:
            problems += [f"{where}: {p}" for p in e.problems]
    problems += slurm_table_problems(raw.get("slurm", {}), where)
    if problems:
        raise UserError(*problems)
    tuned = Path(raw["tuned"]) if "tuned" in raw else None
    return Recipe(name=raw.get("name", path.stem), model=raw["model"], grid=grid,
                  references=tuple(references), data=_data_path(raw, base),
                  seeds=tuple(raw.get("seeds", [0])), corner_seeds=tuple(raw.get("corner_seeds", [])),
                  match=raw.get("match", "fixed-backbone"), tokens=_int(raw.get("tokens")), train=train,
                  tuned=tuned if tuned is None or tuned.is_absolute() else base / tuned, tune=tune,
                  slurm=raw.get("slurm", {}), source=where)


def _data_path(raw: dict, base: Path) -> str:
    """The recipe's `data`: "builtin", or a folder, a relative one taken from ``base`` (made absolute)."""
    data = raw.get("data", "builtin")
    return data if data == "builtin" or Path(data).is_absolute() else str((base / data).resolve())


def _typed(raw: dict, where: str) -> list[str]:
    problems = []
    if "model" not in raw:
        problems.append(f"{where}: model: missing; give a preset name or a table of model fields")
    elif not isinstance(raw["model"], (str, dict)):
        problems.append(f"{where}: model: expected a preset name or a table of model fields")
    for key in ("name", "data", "tuned"):
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            problems.append(f"{where}: {key}={raw[key]!r}: expected a non-empty string")
    name = raw.get("name", "")
    if isinstance(name, str) and (set(name) & set("/\\\0") or name in (".", "..")):
        problems.append(f"{where}: name={name!r}: names the sweep's folder; use letters, digits, - and _")
    elif isinstance(name, str) and len(name.encode()) > MAX_NAME_BYTES:
        problems.append(f"{where}: name={name[:20]!r}…: {len(name.encode())} bytes long; the sweep's folder takes "
                        f"at most {MAX_NAME_BYTES}, shorten it")
    for key in ("seeds", "corner_seeds"):
        value = raw.get(key, [])
        if not (isinstance(value, list) and all(_is_int(s) and 0 <= s < MAX_SEED for s in value)):
            problems.append(f"{where}: {key}={value!r}: expected a list of integers in [0, 2^63)")
    seeds = [s for key in ("seeds", "corner_seeds") if isinstance(raw.get(key), list) for s in raw[key]]
    if len(seeds) != len({repr(s) for s in seeds}):
        problems.append(f"{where}: seeds, corner_seeds: a seed appears twice; every run needs its own seed")
    if raw.get("seeds") == []:
        problems.append(f"{where}: seeds: empty; give at least one seed")
    match = raw.get("match", "fixed-backbone")
    if not (isinstance(match, str) and match in typing.get_args(Match)):
        problems.append(f"{where}: match={raw['match']!r}: must be one of {', '.join(typing.get_args(Match))}")
    tokens = raw.get("tokens")
    if tokens is not None and not (_is_number(tokens) and 1 <= tokens < math.inf):
        problems.append(f"{where}: tokens={tokens!r}: expected a positive number of tokens per run")
    for key in ("train", "grid", "tune"):
        if key in raw and not isinstance(raw[key], dict):
            problems.append(f"{where}: {key}: expected a table")
    return problems


def _reference_problems(references: Any) -> list[str]:
    """`references` is a list of tables, each a point: grid-style keys with one value each."""
    if not (isinstance(references, list) and all(isinstance(r, dict) and r for r in references)):
        return ["references: expected a list of non-empty tables ([[references]] in TOML), each a point such as "
                'model = "tiny-dense"']
    return [p.replace("[0]", "", 1).replace("grid.", f"references[{i}].", 1)
            for i, ref in enumerate(references) for axis, value in ref.items() for p in _axis_problems(axis, [value])]


def _axis_problems(axis: str, values: Any) -> list[str]:
    """An axis must be a non-empty list of distinct values of a known field; the shorthands'
    values are checked here, every other field's type by the planner (it depends on the model)."""
    if axis == "sparse.kind":
        return ['grid.sparse.kind: use a model axis to compare sparse kinds, e.g. model = ["tiny-moe", "tiny-peer"]']
    if not (axis in SHORTHANDS or axis == "model" or _is_model_field(axis)):
        return [f"grid.{axis}: not a model field; use sparse_params, topm, model, "
                "or a dotted field such as sparse.dv or ffn_hidden"]
    if not isinstance(values, list) or not values:
        return [f"grid.{axis}: expected a non-empty list of values"]
    problems = []
    for i, value in enumerate(values):
        if axis == "sparse_params" and not (_is_number(value) and 0 < value <= MAX_PARAMS):
            problems.append(f"grid.sparse_params[{i}]={value!r}: expected a positive number of parameters, at most "
                            f"{MAX_PARAMS:.0e}")
        elif axis == "topm" and not (_is_int(value) and value > 0):
            problems.append(f"grid.topm[{i}]={value!r}: expected a positive integer")
        elif axis == "model" and not isinstance(value, (str, dict)):
            problems.append(f"grid.model[{i}]={value!r}: expected a preset name or a table of model fields")
    keys = [json.dumps(v, sort_keys=True, default=str) for v in values]
    problems += [f"grid.{axis}[{i}]={values[i]!r}: appears twice; every grid point must differ"
                 for i, key in enumerate(keys) if key in keys[:i]]
    return problems


def _train_problems(train: dict, raw: dict) -> list[str]:
    """Names, types and values of the [train] table, checked by building the TrainConfig."""
    from umv2cli.config import _typed_kwargs

    problems: list[str] = []
    kwargs = _typed_kwargs(TrainConfig, train, "train.", problems)
    if "seed" in train:
        problems.append("train.seed: set by seeds and corner_seeds; remove it")
    if "steps" in train and "tokens" in raw:
        problems.append("train.steps and tokens: both set the run's length; give one")
    try:  # the values of the well-typed fields
        TrainConfig(**kwargs)
    except UserError as e:
        problems += e.problems
    return problems


def _tune_spec(table: dict, grid: dict, train: dict) -> TuneSpec:
    """The [tune] table → `TuneSpec`: settings, then one inline table per searched field."""
    settings = {f.name for f in dataclasses.fields(TuneSpec)} - {"params"}
    problems: list[str] = []
    params = {}
    for name, value in table.items():
        if name in settings:
            continue
        if name not in TUNABLE:
            problems.append(f"tune.{name}: not a setting ({', '.join(sorted(settings))}) nor a searchable "
                            f"train field ({', '.join(TUNABLE)})")
        elif not isinstance(value, dict):
            problems.append(f"tune.{name}: expected a range like {{low = 1e-4, high = 1e-2, log = true}} "
                            "or {choices = [...]}")
        else:
            try:
                params[name] = _param(name, value, train)
            except UserError as e:
                problems += e.problems
    if not params and not problems:
        problems.append("tune: searches nothing; add a field, e.g. lr = {low = 1e-4, high = 1e-2, log = true}")
    kwargs = {k: v for k, v in table.items() if k in settings}
    for key in ("n_trials", "evals"):
        if key in kwargs and not (_is_int(kwargs[key]) and kwargs[key] > 0):
            problems.append(f"tune.{key}={kwargs[key]!r}: expected a positive integer")
    for key in ("retries", "seed"):
        if key in kwargs and not (_is_int(kwargs[key]) and kwargs[key] >= 0):
            problems.append(f"tune.{key}={kwargs[key]!r}: expected an integer ≥ 0")
    if "prune" in kwargs and not isinstance(kwargs["prune"], bool):
        problems.append(f"tune.prune={kwargs['prune']!r}: expected true or false")
    if kwargs.get("metric", "eval_loss") not in ("eval_loss", "train_loss"):
        problems.append(f"tune.metric={kwargs['metric']!r}: must be eval_loss or train_loss")
    if "group_by" in kwargs and (not isinstance(kwargs["group_by"], str) or kwargs["group_by"] not in grid):
        problems.append(f"tune.group_by={kwargs['group_by']!r}: not an axis of [grid]; "
                        f"one of {', '.join(map(str, grid)) or '(none)'}")
    if problems:
        raise UserError(*problems)
    return TuneSpec(params=params, **kwargs)


def _param(name: str, table: dict, train: dict) -> Param:
    """One searched field; each bound (each choice) must make a valid TrainConfig with [train]."""
    keys = {"choices"} if "choices" in table else {"low", "high", "log"}
    problems = [f"tune.{name}.{k}: unknown key; allowed: {', '.join(sorted(keys))}" for k in table if k not in keys]
    if "choices" in table:
        choices = table["choices"]
        if not (isinstance(choices, list) and choices):
            raise UserError(*problems, f"tune.{name}.choices: expected a non-empty list")
        bounds = {f"choices[{i}]": c for i, c in enumerate(choices)}
        param = Param(choices=tuple(choices))
    else:
        low, high, log = table.get("low"), table.get("high"), table.get("log", False)
        if not (_is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high) and low < high):
            raise UserError(*problems, f"tune.{name}: expected numbers low < high, got low={low!r}, high={high!r}")
        if not isinstance(log, bool):
            problems.append(f"tune.{name}.log={log!r}: expected true or false")
        elif log and low <= 0:
            problems.append(f"tune.{name}.low={low!r}: a log range needs low > 0")
        bounds = {"low": low, "high": high}
        param = Param(low=float(low), high=float(high), log=log)
    for label, value in bounds.items():
        problems += [f"tune.{name}.{label}: {p}" for p in _train_problems({**train, name: value}, {})]
    if problems:
        raise UserError(*problems)
    return param


def _is_model_field(path: str) -> bool:
    """'ffn_hidden' or 'sparse.<field of any sparse kind>'."""
    head, _, rest = path.partition(".")
    if not rest:
        return head in {f.name for f in dataclasses.fields(ModelConfig)} - {"sparse"}
    return head == "sparse" and any(rest in {f.name for f in dataclasses.fields(c)} for c in SPARSE_KINDS.values())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any) -> int | None:
    return None if value is None else int(math.floor(value))


# ----------------------------------------------------------------------------------------------
# the tuned file: what `umv2 tune` found, in the form a recipe's `tuned` key reads


@dataclass(frozen=True)
class Tuned:
    group_by: str | None
    """The grid axis the studies were grouped by; None: one group, "all"."""
    train: dict[str, dict[str, Any]]
    """group_key(value) → the TrainConfig fields found best for that group."""


def write_tuned(path: Path, tuned: Tuned, notes: dict[str, dict[str, Any]]) -> None:
    """best.toml: ``group_by`` and per group a table with its `train` fields and `notes`
    (study, trial, metric value) for the reader."""
    from umv2cli.files import write_atomic

    lines = ["# Written by `umv2 tune`: the best trial of each study. A recipe uses it with tuned = \"<this file>\"."]
    if tuned.group_by is not None:
        lines.append(f"group_by = {_toml(tuned.group_by)}")
    for group, train in tuned.train.items():
        lines += ["", f"[groups.{_toml(group)}]"]
        lines += [f"{_toml(k)} = {_toml(v)}" for k, v in notes.get(group, {}).items()]
        lines += [f"train = {{ {', '.join(f'{_toml(k)} = {_toml(v)}' for k, v in train.items())} }}"]
    write_atomic(path, "\n".join(lines) + "\n")


def read_tuned(path: Path, grid: dict[str, list]) -> Tuned:
    """A best.toml, checked against the grid that will use it: the axis exists and every value of
    it has a group; the train fields are valid."""
    if not path.exists():
        raise UserError(f"tuned={str(path)!r}: no such file; run `umv2 tune` first, or fix the path (relative "
                        "paths start at the recipe's folder)")
    raw = read_table(path)
    group_by, groups = raw.get("group_by"), raw.get("groups")
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise UserError(f"{path}: groups: expected a table of groups, as `umv2 tune` writes")
    if group_by is not None and (not isinstance(group_by, str) or group_by not in grid):
        raise UserError(f"{path}: group_by={group_by!r}: tuned per {group_by}, which is not an axis of this grid; "
                        f"add the axis or tune with a group_by this grid has")
    wanted = ["all"] if group_by is None else [group_key(v) for v in grid[group_by]]
    problems = [f"{path}: groups.{g}: missing; tune this {group_by} too (umv2 tune) or drop it from the grid"
                for g in wanted if g not in groups]
    train = {g: groups[g].get("train", {}) for g in wanted if g in groups}
    for g, fields in train.items():
        problems += [f"{path}: groups.{g}.{p}" for p in _train_problems(fields, {})] if isinstance(fields, dict) else [
            f"{path}: groups.{g}.train: expected a table of train fields"]
    if problems:
        raise UserError(*problems)
    return Tuned(group_by, train)


def _toml(value: Any) -> str:
    """A TOML literal of a string, bool, int or float (JSON strings are TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
