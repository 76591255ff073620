"""Recipe: a TOML file → a validated `Recipe` (reads the file; writes nothing).

A recipe names a base model, the grid axes, seeds, the training shared by every run, the data and
the matching condition:

    name = "smoke"                       # the sweep's folder name
    model = "tiny-ultramemv2"            # base model: a preset name, or a table of model fields
    data = "builtin"
    seeds = [0]                          # every grid point runs with each of these seeds
    corner_seeds = [1, 2]                # extra seeds at the corners of the grid (σ_seed)
    match = "fixed-backbone"             # or "iso-activated" / "iso-flop": the planner resizes the FFN
    tokens = 2_000_000                   # token budget per run (sets train.steps); optional

    [train]                              # TrainConfig fields shared by every run
    batch_size = 8

    [grid]                               # axes; the runs are their Cartesian product
    sparse_params = [1e6, 4e6]           # shorthand: total sparse parameters (sets knum, or n_experts)
    topm = [4, 16]                       # shorthand: sparse.topm (MoE: sparse.topk)
    "sparse.dv" = [16, 32]               # any model field by its dotted path
    model = ["tiny-dense", "tiny-moe"]   # or an axis over base models

`load_recipe` reports every problem it finds at once, one line each.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umv2cli.config import SPARSE_KINDS, ModelConfig, TrainConfig, read_table
from umv2cli.errors import UserError

Match = Literal["fixed-backbone", "iso-activated", "iso-flop"]
SHORTHANDS = ("sparse_params", "topm")
TOP_KEYS = ("name", "model", "data", "seeds", "corner_seeds", "match", "tokens", "train", "grid")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str | dict
    grid: dict[str, list]
    """Axis name → values, in the file's order (axes vary slowest first)."""
    data: str = "builtin"
    seeds: tuple[int, ...] = (0,)
    corner_seeds: tuple[int, ...] = ()
    match: Match = "fixed-backbone"
    tokens: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    source: str = "recipe"

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as {axis: value}, the last axis varying fastest."""
        points: list[dict[str, Any]] = [{}]
        for axis, values in self.grid.items():
            points = [{**p, axis: v} for p in points for v in values]
        return points

    def is_corner(self, point: dict[str, Any]) -> bool:
        return all(point[a] in (vs[0], vs[-1]) for a, vs in self.grid.items() if len(vs) > 1)


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe; every problem is reported (one line each) before anything runs."""
    raw = read_table(path)
    where = str(path)
    problems = [f"{where}: {key}: unknown key; allowed: {', '.join(TOP_KEYS)}" for key in raw if key not in TOP_KEYS]
    problems += _typed(raw, where)
    grid = raw.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        problems.append(f"{where}: grid: empty; give at least one axis, e.g. topm = [4, 8]")
        grid = {}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: grid.{axis}: expected a non-empty list of values")
        elif axis not in SHORTHANDS and axis != "model" and not _is_model_field(axis):
            problems.append(f"{where}: grid.{axis}: not a model field; use sparse_params, topm, model, "
                            "or a dotted field such as sparse.dv or ffn_hidden")
    train = raw.get("train", {})
    if isinstance(train, dict):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        problems += [f"{where}: train.{k}: unknown field; allowed: {', '.join(sorted(names))}"
                     for k in train if k not in names]
    if problems:
        raise UserError(*problems)
    return Recipe(name=raw.get("name", path.stem), model=raw["model"], grid=grid, data=raw.get("data", "builtin"),
                  seeds=tuple(raw.get("seeds", [0])), corner_seeds=tuple(raw.get("corner_seeds", [])),
                  match=raw.get("match", "fixed-backbone"), tokens=_int(raw.get("tokens")), train=train,
                  source=where)


def _typed(raw: dict, where: str) -> list[str]:
    problems = []
    if "model" not in raw:
        problems.append(f"{where}: model: missing; give a preset name or a table of model fields")
    elif not isinstance(raw["model"], (str, dict)):
        problems.append(f"{where}: model: expected a preset name or a table of model fields")
    for key in ("name", "data"):
        if key in raw and not isinstance(raw[key], str):
            problems.append(f"{where}: {key}={raw[key]!r}: expected a string")
    for key in ("seeds", "corner_seeds"):
        value = raw.get(key, [])
        if not (isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)):
            problems.append(f"{where}: {key}={value!r}: expected a list of integers")
    if raw.get("seeds") == []:
        problems.append(f"{where}: seeds: empty; give at least one seed")
    if raw.get("match", "fixed-backbone") not in typing.get_args(Match):
        problems.append(f"{where}: match={raw['match']!r}: must be one of {', '.join(typing.get_args(Match))}")
    tokens = raw.get("tokens")
    if tokens is not None and not (isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and tokens > 0):
        problems.append(f"{where}: tokens={tokens!r}: expected a positive number of tokens per run")
    for key in ("train", "grid"):
        if key in raw and not isinstance(raw[key], dict):
            problems.append(f"{where}: {key}: expected a table")
    return problems


def _is_model_field(path: str) -> bool:
    """'ffn_hidden' or 'sparse.<field of any sparse kind>'."""
    head, _, rest = path.partition(".")
    if not rest:
        return head in {f.name for f in dataclasses.fields(ModelConfig)} - {"sparse"}
    return head == "sparse" and any(rest in {f.name for f in dataclasses.fields(c)} for c in SPARSE_KINDS.values())


def _int(value: Any) -> int | None:
    return None if value is None else int(math.floor(value))
