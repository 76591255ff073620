"""Plan: a `Recipe` → one `PlannedRun` per (grid point, seed) (reads nothing else; writes nothing).

Each run is a fully resolved `RunSpec`, its accounting row, and a run id: the first 12 hex digits of
the SHA-256 of the spec's canonical JSON, so the same recipe always names the same runs and a
finished run is never launched twice. `umv2 sweep plan` prints `build_plan`'s rows; `sweep run`
launches exactly these runs.

Shorthands: `sparse_params` sets the size of the table (knum; for MoE n_experts) so that the
model's total sparse parameters come nearest the value; `topm` sets sparse.topm (MoE: topk).
Matching: `iso-activated` / `iso-flop` resize the backbone FFN (ffn_hidden) so each run's
activated parameters / forward FLOPs per token equal the base model's; the residual mismatch is
reported per run (it is not zero where every FFN is replaced, e.g. an MoE, which has none to resize).
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from umv2cli.config import ModelConfig, MoEConfig, RunSpec, TrainConfig, UltraMemV2Config, config_from_dict
from umv2cli.errors import UserError
from umv2cli.model.accounting import Accounting, account
from umv2cli.sweeps.recipe import Recipe

H100_BF16_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM (datasheet), for the GPU-hour estimate."""


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    spec: RunSpec
    row: dict[str, Any]
    """The plan table's columns: id, seed, grid point, P, m, N, density, params, FLOPs, cost."""


def run_id(spec: RunSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def build_plan(recipe: Recipe, *, mfu: float = 0.3) -> list[PlannedRun]:
    """Every run of the recipe, in grid order; all problems of all grid points at once."""
    problems: list[str] = []
    reference = account(base_config(recipe.model, recipe.source))
    runs = []
    for point in recipe.points():
        try:
            cfg, residual = hold_match(point_config(recipe, point), reference, recipe.match)
        except UserError as e:
            problems += [f"{recipe.source}: grid point {_show(point)}: {p.split(': ', 1)[-1]}" for p in e.problems]
            continue
        acc = account(cfg)
        for seed in recipe.seeds + (recipe.corner_seeds if recipe.is_corner(point) else ()):
            spec = RunSpec(model=cfg, train=train_config(recipe, cfg, seed), data=recipe.data)
            runs.append(PlannedRun(run_id(spec), spec, plan_row(spec, point, acc, residual, mfu)))
    if problems:
        raise UserError(*dict.fromkeys(problems))  # one line per distinct problem, in order
    return runs


def base_config(model: str | dict, where: str) -> ModelConfig:
    return config_from_dict({"preset": model} if isinstance(model, str) else model, where=f"{where}: model")


def point_config(recipe: Recipe, point: dict[str, Any]) -> ModelConfig:
    """The base model with this grid point's values applied."""
    base = point.get("model", recipe.model)
    model = {"preset": base} if isinstance(base, str) else dict(base)
    kind_cfg = base_config(base, recipe.source).sparse
    sparse = dict(model.get("sparse", {}))
    for axis, value in point.items():
        if axis in ("model", "sparse_params"):
            continue
        if axis == "topm":
            if kind_cfg is None:
                raise UserError("grid.topm: the model has no sparse layer")
            sparse["topk" if isinstance(kind_cfg, MoEConfig) else "topm"] = value
        elif axis.startswith("sparse."):
            sparse[axis.removeprefix("sparse.")] = value
        else:
            model[axis] = value
    if sparse:
        model["sparse"] = sparse
    cfg = config_from_dict(model, where="model")
    if "sparse_params" in point:
        cfg = with_sparse_params(cfg, point["sparse_params"], keep_k_rc="sparse.k_rc" in point)
    return cfg


def with_sparse_params(cfg: ModelConfig, target: float, keep_k_rc: bool) -> ModelConfig:
    """Resize the table (knum; MoE: n_experts) so the total sparse parameters come nearest `target`.
    Sparse parameters grow as knum² for the memory layers and linearly in n_experts for MoE."""
    if cfg.sparse is None:
        raise UserError("grid.sparse_params: the model has no sparse layer")
    size_field, power = ("n_experts", 1) if isinstance(cfg.sparse, MoEConfig) else ("knum", 2)
    size = getattr(cfg.sparse, size_field)
    per_unit = account(cfg).sparse_params / size**power
    new_size = max(1, round((target / per_unit) ** (1 / power)))
    reset = {"k_rc": None} if isinstance(cfg.sparse, UltraMemV2Config) and not keep_k_rc else {}
    return dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, **{size_field: new_size}, **reset))


def hold_match(cfg: ModelConfig, reference: Accounting, match: str) -> tuple[ModelConfig, float]:
    """Resize ffn_hidden to hold the matching condition; returns the config and the relative
    residual of the matched quantity (0.0 for fixed-backbone)."""
    if match == "fixed-backbone":
        return cfg, 0.0
    metric = "activated_params" if match == "iso-activated" else "flops_per_token"
    target = getattr(reference, metric)

    def value(ffn_hidden: int) -> int:
        return getattr(account(dataclasses.replace(cfg, ffn_hidden=ffn_hidden)), metric)

    if cfg.ffn_blocks():  # linear in ffn_hidden: one Newton step is exact up to rounding
        slope = value(cfg.ffn_hidden + 1) - value(cfg.ffn_hidden)
        ffn_hidden = round(cfg.ffn_hidden + (target - value(cfg.ffn_hidden)) / slope)
        if ffn_hidden < 1:
            raise UserError(f"match={match}: needs ffn_hidden={ffn_hidden}: the sparse layers alone exceed the "
                            "base model's budget; shrink them or use match = \"fixed-backbone\"")
        cfg = dataclasses.replace(cfg, ffn_hidden=ffn_hidden)
    return cfg, getattr(account(cfg), metric) / target - 1


def train_config(recipe: Recipe, cfg: ModelConfig, seed: int) -> TrainConfig:
    train = TrainConfig(**{**recipe.train, "seed": seed})
    if recipe.tokens is not None:
        per_step = train.batch_size * (train.seq_len or cfg.seq_len) * train.grad_accum
        train = dataclasses.replace(train, steps=math.ceil(recipe.tokens / per_step))
    return train


def plan_row(spec: RunSpec, point: dict, acc: Accounting, residual: float, mfu: float) -> dict[str, Any]:
    cfg, train = spec.model, spec.train
    tokens = train.steps * train.batch_size * (train.seq_len or cfg.seq_len) * train.grad_accum
    m, n = activated_and_table_values(cfg)
    return {
        "run_id": run_id(spec), "seed": train.seed, "kind": acc.kind,
        **{f"grid.{axis}": str(v) if axis == "model" else v for axis, v in point.items()},
        "sparse_params": acc.sparse_params, "topm": m, "values_per_layer": n,
        "density": m / n if n else 0.0, "activated_params": acc.activated_params,
        "total_params": acc.total_params, "flops_per_token": acc.flops_per_token, "tokens": tokens,
        "ffn_hidden": cfg.ffn_hidden, "match_residual": residual,
        "gpu_hours": 3 * acc.flops_per_token * tokens / (mfu * H100_BF16_FLOPS) / 3600,
    }


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
