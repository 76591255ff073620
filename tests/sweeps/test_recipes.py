"""Every shipped recipe plans, and each holds what its header promises (grid, matching, budget)."""

from pathlib import Path

import pytest

from umv2cli.sweeps.plan import build_plan
from umv2cli.sweeps.recipe import load_recipe

RECIPES = Path(__file__).parents[2] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.toml"))


def test_the_shipped_recipes():
    assert SHIPPED == ["density-x-size-1gpu.toml", "micro-1gpu.toml", "micro-cpu.toml", "moe-parity-1gpu.toml",
                       "paper-227m-cluster.toml", "smoke.toml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_plans_through_the_cli(name, umv2):
    code, out, err = umv2("sweep", "plan", RECIPES / name)
    assert code == 0 and err == "" and "GPU-hours" in out


def plan(name: str) -> list[dict]:
    return [run.row for run in build_plan(load_recipe(RECIPES / name))]


def test_density_x_size_is_a_4x4_iso_flop_grid_with_corner_seeds_for_one_gpu_day():
    rows = plan("density-x-size-1gpu.toml")
    assert len({(r["grid.sparse_params"], r["grid.topm"]) for r in rows}) == 16
    assert len(rows) == 16 + 4 * 2  # seeds 1 and 2 at the four corners
    assert all(abs(r["match_residual"]) < 0.001 for r in rows)
    assert all(abs(r["sparse_params"] / r["grid.sparse_params"] - 1) < 0.01 for r in rows)
    assert 10 < sum(r["gpu_hours"] for r in rows) < 30
    assert load_recipe(RECIPES / "density-x-size-1gpu.toml").tune.params["lr"].log


def test_micro_cpu_is_a_4x4_iso_flop_grid_on_real_text_with_a_million_tokens_a_run():
    recipe = load_recipe(RECIPES / "micro-cpu.toml")
    rows = plan("micro-cpu.toml")
    assert len({(r["grid.sparse_params"], r["grid.topm"]) for r in rows}) == 16
    assert len(rows) == 16 + 4  # seed 1 at the four corners
    assert all(abs(r["match_residual"]) < 0.001 and r["tokens"] >= 1_000_000 for r in rows)
    assert recipe.data == str((RECIPES.parent / "data" / "debian-en").resolve())  # from the recipe's folder
    assert recipe.train["schedule"] == "wsd" and recipe.train["device"] == "cpu"


def test_micro_1gpu_is_micro_cpu_ten_times_larger_with_dense_and_moe_references_at_equal_flops():
    rows = plan("micro-1gpu.toml")
    grid, refs = [r for r in rows if not r["reference"]], [r for r in rows if r["reference"]]
    assert len({(r["grid.sparse_params"], r["grid.topm"]) for r in grid}) == 16 and len(grid) == 20
    assert [r["kind"] for r in refs] == ["dense", "moe"]
    assert all(abs(r["match_residual"]) < 0.001 and r["tokens"] >= 5_000_000 for r in rows)
    cpu = plan("micro-cpu.toml")
    assert 8 < grid[0]["activated_params"] / cpu[0]["activated_params"] < 12
    assert max(r["sparse_params"] for r in grid) / max(r["sparse_params"] for r in cpu) == pytest.approx(10, rel=0.05)


def test_moe_parity_compares_six_kinds_at_equal_flops_and_sparse_size():
    rows = plan("moe-parity-1gpu.toml")
    assert {r["kind"] for r in rows} == {"dense", "moe", "ultramemv2", "ultramem", "pkm", "peer"}
    assert len(rows) == 6 * 3
    assert all(abs(r["match_residual"]) < 0.01 for r in rows)  # the MoE's +0.5% included
    sparse = [r["sparse_params"] for r in rows if r["kind"] != "dense"]
    assert max(sparse) / min(sparse) < 1.01
    assert 5 < sum(r["gpu_hours"] for r in rows) < 30
    assert load_recipe(RECIPES / "moe-parity-1gpu.toml").tune.group_by == "model"


def test_the_paper_recipe_trains_the_table_10_presets_on_500b_tokens_at_768_x_4096():
    runs = build_plan(load_recipe(RECIPES / "paper-227m-cluster.toml"))
    assert [r.row["grid.model"] for r in runs] == ["olmoe-227m", "ultramemv2-227m", "ultramem-227m", "memoryplus-227m"]
    for run in runs:
        train = run.spec.train
        assert train.batch_size * train.grad_accum * run.spec.model.seq_len == 768 * 4096
        assert abs(run.row["tokens"] / 500e9 - 1) < 1e-4 and train.lr == 4e-4 and train.schedule == "cosine"
        assert run.row["gpus"] == 32 and run.row["wall_hours"] == run.row["gpu_hours"] / 32  # 4 nodes × 8 GPUs
    assert sum(r.row["gpu_hours"] for r in runs) > 1000
