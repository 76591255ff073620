"""Plan: a `Recipe` → one `PlannedRun` per (grid point, seed) (reads the recipe's `tuned` file, if
any; writes nothing).

Each run is a fully resolved `RunSpec`, its accounting row, and a run id: the first 12 hex digits of
the SHA-256 of the spec's canonical JSON, so the same recipe always names the same runs and a
finished run is never launched twice. `umv2 sweep plan` prints `build_plan`'s rows; `sweep run`
launches exactly these runs.

Shorthands: `sparse_params` sets the size of the table (knum; for MoE n_experts) so that the
model's total sparse parameters come nearest the value; `topm` sets sparse.topm (MoE: topk).
Matching: `iso-activated` / `iso-flop` resize the backbone FFN (ffn_hidden) so each run's
activated parameters / forward FLOPs per token equal the base model's; the residual mismatch is
reported per run (it is not zero where every FFN is replaced, e.g. an MoE, which has none to resize).
A `tuned` file (`umv2 tune`) sets the [train] fields of each run's group; the recipe's [train]
gives the rest.

Checks before any compute: the grid's size, counted before a run is listed (more than MAX_RUNS needs
`max_runs=None`, the command line's --force); for every run, what it would fail on only after
training (`umv2cli.train.spec_problems`: a sequence too short for the memory tasks, …) and a size no
run can hold (MAX_PARAMS).

Speed (BENCHMARKS.md, "Sweeps"): each base model is resolved once, each axis value's type checked
once per base, and a grid point's config is its base with the point's values replaced (the config
dataclasses check the values), never parsed again; accounting is computed once per distinct config.
"""

import dataclasses
import functools
import gc
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from umv2cli.config import (ModelConfig, MoEConfig, RunSpec, TrainConfig, UltraMemV2Config, config_from_dict,
                            layout_problems)
from umv2cli.errors import UserError
from umv2cli.model.accounting import Accounting, account
from umv2cli.sweeps.recipe import MAX_PARAMS, Recipe, Tuned, group_key, read_tuned

H100_BF16_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM (datasheet), for the GPU-hour estimate."""

MAX_PROBLEMS = 20
"""Problems printed before the rest are counted, so a bad 100 × 100 grid stays readable."""
MAX_RUNS = 100_000
"""Runs a plan may have unless forced: ten times the largest grid planned here (10,000 runs in 2 s)."""


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    spec: RunSpec
    row: dict[str, Any]
    """The plan table's columns: id, seed, grid point, P, m, N, density, params, FLOPs, cost."""


def run_id(spec: RunSpec) -> str:
    """The hash of `spec.to_dict()`'s JSON without the layout fields of [train] (`TrainConfig.LAYOUT`: how
    the run is spread over processes, not what it trains). `_fields` gives each (flat, frozen) config
    dataclass's fields as `asdict` does, without its deep copies: a 10,000-run plan spends 1 s less here."""
    return hashlib.sha256(json.dumps(spec, default=_fields, sort_keys=True).encode()).hexdigest()[:12]


def _fields(config: Any) -> dict[str, Any]:
    if isinstance(config, TrainConfig):
        return {k: v for k, v in vars(config).items() if k not in TrainConfig.LAYOUT}
    return vars(config)


def build_plan(recipe: Recipe, *, mfu: float = 0.3, max_runs: int | None = MAX_RUNS,
               processes: int | None = None) -> list[PlannedRun]:
    """Every run of the recipe, in grid order, each on `processes` GPUs (or CPU processes; default:
    the recipe's [slurm] nodes × tasks); all problems of all grid points at once. A grid of more
    than `max_runs` runs is refused before any is listed (None: no limit)."""
    from umv2cli.sweeps.slurm import slurm_options

    if max_runs is not None and recipe.size() > max_runs:
        raise UserError(f"{recipe.source}: the grid has {recipe.size():,} runs, more than {max_runs:,}; shrink it, "
                        "or pass --force to plan them all")
    gc.disable()  # a plan allocates objects and frees none: the cycle collector would only re-scan them
    try:
        return _build_plan(recipe, mfu, processes or slurm_options(recipe.slurm, where=str(recipe.source)).processes)
    finally:
        gc.enable()


def _build_plan(recipe: Recipe, mfu: float, processes: int) -> list[PlannedRun]:
    from umv2cli.train import spec_problems

    bases = resolve_bases(recipe)
    tuned = read_tuned(recipe.tuned, recipe.grid) if recipe.tuned else None
    _raise(value_type_problems(recipe, bases))
    reference = accounting(bases[_key(recipe.model)])

    @functools.cache  # a plan has few distinct trainings: groups × sequence lengths × seeds
    def train_for(group: str | None, seq_len: int, seed: int) -> TrainConfig:
        return train_config(recipe, tuned.train[group] if tuned else {}, seq_len, seed)

    runs, problems, seen = [], [], {}
    grid = [(p, recipe.seeds + (recipe.corner_seeds if recipe.is_corner(p) else ()), False) for p in recipe.points()]
    for point, seeds, is_reference in grid + [(ref, recipe.seeds, True) for ref in recipe.references]:
        try:
            cfg, residual = hold_match(point_config(recipe, point, bases), reference, recipe.match)
            trains = [train_for(tuned_group(tuned, point), cfg.seq_len, seed) for seed in seeds]
        except UserError as e:
            what = "reference" if is_reference else "grid point"
            problems += [f"{recipe.source}: {what} {_show(point)}: {p}" for p in e.problems]
            continue
        acc = accounting(cfg)
        for train in trains:
            spec = RunSpec(model=cfg, train=train, data=recipe.data)
            problems += [f"{recipe.source}: {p}" for p in layout_problems(spec, processes)]  # the recipe's: once
            found = spec_problems(spec) + size_problems(spec, acc)
            if found:
                problems += [f"{recipe.source}: grid point {_show(point)}: {p}" for p in found]
                continue
            rid = run_id(spec)
            if rid in seen:
                problems.append(f"{recipe.source}: grid points {_show(seen[rid])} and {_show(point)} give the same "
                                "run (e.g. two sparse_params that round to one table size); drop one")
            seen[rid] = point
            row = plan_row(rid, spec, point, acc, residual, mfu, processes)
            runs.append(PlannedRun(rid, spec, row | {"reference": is_reference}))
    _raise(problems)
    return runs


def _raise(problems: list[str]) -> None:
    problems = list(dict.fromkeys(problems))  # one line per distinct problem, in order
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"… and {len(problems) - MAX_PROBLEMS} more problems like these"]
    if problems:
        raise UserError(*problems)


# ----------------------------------------------------------------------------------------------
# a grid point's model


def _key(model: str | dict) -> str:
    return model if isinstance(model, str) else json.dumps(model, sort_keys=True)


def resolve_bases(recipe: Recipe) -> dict[str, ModelConfig]:
    """Every distinct base model of the recipe (its `model`, and each value of a model axis)."""
    models = [recipe.model, *recipe.grid.get("model", []), *[r["model"] for r in recipe.references if "model" in r]]
    bases, problems = {}, []
    for model in models:
        if _key(model) not in bases:
            try:
                bases[_key(model)] = config_from_dict({"preset": model} if isinstance(model, str) else model,
                                                      where=f"{recipe.source}: model")
            except UserError as e:
                problems += e.problems
    _raise(problems)
    return bases


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def value_type_problems(recipe: Recipe, bases: dict[str, ModelConfig]) -> list[str]:
    """Each dotted axis value against the field's type in every base model it applies to."""
    from umv2cli.config import _type_ok

    models = recipe.grid.get("model", [recipe.model])
    problems = []
    for axis, values in recipe.grid.items():
        if axis in ("model", "sparse_params", "topm"):
            continue
        for model in models:
            cls, name = _field_class(bases[_key(model)], axis, recipe.source)
            if cls is None:
                problems.append(f"{recipe.source}: grid.{axis}: {model if isinstance(model, str) else 'the model'} "
                                f"has {name}; drop the axis or the model")
                continue
            for i, value in enumerate(values):
                ok, expected = _type_ok(value, _hints(cls)[name])
                if not ok:
                    problems.append(f"{recipe.source}: grid.{axis}[{i}]={value!r}: expected {expected}")
    return problems


def _field_class(base: ModelConfig, axis: str, where: str) -> tuple[type | None, str]:
    """The dataclass that holds `axis` in this base, and the field's name (or why there is none)."""
    if not axis.startswith("sparse."):
        return ModelConfig, axis
    name = axis.removeprefix("sparse.")
    if base.sparse is None:
        return None, "no sparse layer"
    if name not in {f.name for f in dataclasses.fields(base.sparse)}:
        return None, f"no field {axis} (its sparse kind is {base.sparse.kind})"
    return type(base.sparse), name


def point_config(recipe: Recipe, point: dict[str, Any], bases: dict[str, ModelConfig]) -> ModelConfig:
    """The base model with this grid point's values applied (a new k_rc is derived from a new
    top-m unless the point or a model table sets it)."""
    base_model = point.get("model", recipe.model)
    base = bases[_key(base_model)]
    model_fields, sparse_fields = {}, {}
    for axis, value in point.items():
        if axis in ("model", "sparse_params"):
            continue
        if axis == "topm":
            if base.sparse is None:
                raise UserError("grid.topm: the model has no sparse layer")
            sparse_fields["topk" if isinstance(base.sparse, MoEConfig) else "topm"] = value
        elif axis.startswith("sparse."):
            name = axis.removeprefix("sparse.")
            sparse_fields[name] = _typed(type(base.sparse), name, value)
        else:
            model_fields[axis] = _typed(ModelConfig, axis, value)
    keep_k_rc = "k_rc" in sparse_fields or (isinstance(base_model, dict) and "k_rc" in base_model.get("sparse", {}))
    if isinstance(base.sparse, UltraMemV2Config) and sparse_fields and not keep_k_rc:
        sparse_fields["k_rc"] = None
    cfg = _replaced(base, tuple(model_fields.items()), tuple(sparse_fields.items()))
    if "sparse_params" in point:
        cfg = with_sparse_params(cfg, point["sparse_params"], keep_k_rc=keep_k_rc)
    return cfg


@functools.lru_cache(maxsize=4096)
def _replaced(base: ModelConfig, model_fields: tuple, sparse_fields: tuple) -> ModelConfig:
    """`base` with these (field, value) pairs; cached, as points that differ only in sparse_params
    share it."""
    sparse = dataclasses.replace(base.sparse, **dict(sparse_fields)) if sparse_fields else base.sparse
    return dataclasses.replace(base, **dict(model_fields), sparse=sparse) if model_fields or sparse_fields else base


def _typed(cls: type, name: str, value: Any) -> Any:
    """A number given for a float field becomes a float, as `config_from_dict` does (the run id
    hashes the spec's JSON, where 1 and 1.0 differ)."""
    return float(value) if _hints(cls)[name] is float else value


def with_sparse_params(cfg: ModelConfig, target: float, keep_k_rc: bool) -> ModelConfig:
    """Resize the table (knum; MoE: n_experts) so the total sparse parameters come nearest `target`.
    Sparse parameters grow as knum² for the memory layers and linearly in n_experts for MoE."""
    if cfg.sparse is None:
        raise UserError("grid.sparse_params: the model has no sparse layer")
    size_field, power = ("n_experts", 1) if isinstance(cfg.sparse, MoEConfig) else ("knum", 2)
    size = getattr(cfg.sparse, size_field)
    per_unit = accounting(cfg).sparse_params / size**power
    new_size = max(1, round((target / per_unit) ** (1 / power)))
    reset = {"k_rc": None} if isinstance(cfg.sparse, UltraMemV2Config) and not keep_k_rc else {}
    return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, **{size_field: new_size}, **reset))


@functools.lru_cache(maxsize=4096)
def accounting(cfg: ModelConfig) -> Accounting:
    """`account`, once per distinct config (a plan asks again for the same ones: every seed, the
    sizing of a table, the matching)."""
    return account(cfg)


def hold_match(cfg: ModelConfig, reference: Accounting, match: str) -> tuple[ModelConfig, float]:
    """Resize ffn_hidden to hold the matching condition; returns the config and the relative
    residual of the matched quantity (0.0 for fixed-backbone)."""
    if match == "fixed-backbone":
        return cfg, 0.0
    metric = "activated_params" if match == "iso-activated" else "flops_per_token"
    target = getattr(reference, metric)
    if cfg.ffn_blocks():  # linear in ffn_hidden: one Newton step is exact up to rounding
        now = getattr(accounting(cfg), metric)
        slope = _ffn_slope(cfg.d_model, cfg.n_heads, len(cfg.ffn_blocks()), metric)
        ffn_hidden = round(cfg.ffn_hidden + (target - now) / slope)
        if ffn_hidden < 1:
            raise UserError(f"match={match}: needs ffn_hidden={ffn_hidden}: the sparse layers alone exceed the "
                            "base model's budget; shrink them or use match = \"fixed-backbone\"")
        cfg = dataclasses.replace(cfg, ffn_hidden=ffn_hidden)
    return cfg, getattr(accounting(cfg), metric) / target - 1


@functools.lru_cache(maxsize=256)
def _ffn_slope(d_model: int, n_heads: int, n_ffn_blocks: int, metric: str) -> int:
    """d metric / d ffn_hidden. The FFNs' share depends only on the width h and on how many blocks
    have an FFN, so it is measured once on a dense model of that many blocks."""
    dense = ModelConfig(d_model=d_model, n_layers=n_ffn_blocks, n_heads=n_heads, ffn_hidden=1)
    return getattr(account(dataclasses.replace(dense, ffn_hidden=2)), metric) - getattr(account(dense), metric)


# ----------------------------------------------------------------------------------------------
# a run's training and its row


def size_problems(spec: RunSpec, acc: Accounting) -> list[str]:
    """A run too large for any machine, or for the plan table's 64-bit integers."""
    train, problems = spec.train, []
    if acc.total_params > MAX_PARAMS:
        problems.append(f"total_params={float(acc.total_params):.3g}: more than {MAX_PARAMS:.0e}, which no run can "
                        "hold; lower sparse_params or the model's sizes")
    tokens = train.steps * train.batch_size * (train.seq_len or spec.model.seq_len) * train.grad_accum
    if tokens >= 2**63:
        problems.append(f"train.steps={train.steps}: {float(tokens):.3g} tokens, beyond 2^63; lower it")
    return problems


def train_config(recipe: Recipe, tuned_fields: dict[str, Any], model_seq_len: int, seed: int) -> TrainConfig:
    """The recipe's [train], then the tuned fields of the run's group, the seed, and the steps of the
    token budget."""
    train = TrainConfig(**{**recipe.train, **tuned_fields, "seed": seed})
    if recipe.tokens is not None:
        per_step = train.batch_size * (train.seq_len or model_seq_len) * train.grad_accum
        train = dataclasses.replace(train, steps=math.ceil(recipe.tokens / per_step))
    return train


def tuned_group(tuned: Tuned | None, point: dict[str, Any]) -> str | None:
    """The group of a tuned file that a grid point belongs to."""
    if tuned is None:
        return None
    if tuned.group_by is not None and tuned.group_by not in point:
        raise UserError(f"tuned: groups by {tuned.group_by}, which this point does not set; give it that key")
    return "all" if tuned.group_by is None else group_key(point[tuned.group_by])


def plan_row(rid: str, spec: RunSpec, point: dict, acc: Accounting, residual: float, mfu: float,
             gpus: int = 1) -> dict[str, Any]:
    """A run's row; its wall-clock hours assume the `gpus` of a run are each as fast as one alone."""
    cfg, train = spec.model, spec.train
    tokens = train.steps * train.batch_size * (train.seq_len or cfg.seq_len) * train.grad_accum
    gpu_hours = 3 * acc.flops_per_token * tokens / (mfu * H100_BF16_FLOPS) / 3600
    m, n = activated_and_table_values(cfg)
    return {
        "run_id": rid, "seed": train.seed, "kind": acc.kind,
        **{f"grid.{axis}": model_label(v) if axis == "model" else v for axis, v in point.items()},
        "sparse_params": acc.sparse_params, "topm": m, "values_per_layer": n,
        "density": m / n if n else 0.0, "activated_params": acc.activated_params,
        "total_params": acc.total_params, "flops_per_token": acc.flops_per_token, "tokens": tokens,
        "ffn_hidden": cfg.ffn_hidden, "match_residual": residual,
        "gpus": gpus, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus,
    }


def model_label(model: str | dict) -> str:
    """A model axis value in the plan table: a preset's name, or a table's sparse kind and size fields."""
    if isinstance(model, str):
        return model
    sparse = model.get("sparse", {})
    fields = [model.get("preset", "table"), str(sparse.get("kind", "dense"))]
    return " ".join(fields + [f"{k}={v}" for k, v in sparse.items() if k in ("knum", "n_experts", "topm", "topk")])


def activated_and_table_values(cfg: ModelConfig) -> tuple[int, int]:
    """m (values or experts one token activates per layer, all heads) and N (those it chooses
    among): the two numbers of the activation density m/N."""
    s = cfg.sparse
    if s is None:
        return 0, 0
    if isinstance(s, MoEConfig):
        return s.topk, s.n_experts
    if isinstance(s, UltraMemV2Config):
        return s.topm, s.window_knum**2
    return s.topm * s.heads, s.knum**2


def _show(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())
