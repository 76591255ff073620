"""Recipes → plans: grid expansion, shorthands, matching, run ids, and recipe errors."""

import json
from pathlib import Path

import pytest

from umv2cli.model.accounting import account
from umv2cli.model.presets import get_preset
from umv2cli.sweeps.plan import build_plan
from umv2cli.sweeps.recipe import load_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_smoke_recipe_plans_six_distinct_stable_runs():
    runs = build_plan(load_recipe(RECIPES / "smoke.toml"))
    assert len(runs) == 6 and len({r.run_id for r in runs}) == 6
    assert [r.run_id for r in build_plan(load_recipe(RECIPES / "smoke.toml"))] == [r.run_id for r in runs]
    assert {(r.row["grid.sparse_params"], r.row["grid.topm"]) for r in runs} == {
        (16384, 4), (16384, 16), (32768, 4), (32768, 16), (65536, 4), (65536, 16)}
    assert all(abs(r.row["match_residual"]) < 0.01 for r in runs)  # iso-flop within 1%


def test_sparse_params_shorthand_picks_the_nearest_table(tmp_path):
    (run,) = build_plan(load_recipe(recipe(tmp_path, 'model = "tiny-ultramemv2"\n[grid]\nsparse_params = [1e6]\n')))
    sparse = run.spec.model.sparse  # 4 layers · knum² · (dv + dp) = 4 · knum² · 32
    assert sparse.knum == round((1e6 / 128) ** 0.5) and run.row["sparse_params"] == 4 * sparse.knum**2 * 32
    (moe,) = build_plan(load_recipe(recipe(tmp_path, 'model = "tiny-moe"\n[grid]\nsparse_params = [4e5]\ntopm = [3]\n')))
    assert moe.spec.model.sparse.n_experts == round(4e5 / (4 * 3 * 64 * 64)) and moe.spec.model.sparse.topk == 3


def test_iso_activated_resizes_the_ffn_to_the_base_models_budget(tmp_path):
    runs = build_plan(load_recipe(recipe(tmp_path, (
        'model = "tiny-ultramemv2"\nmatch = "iso-activated"\n[grid]\ntopm = [4, 32]\n"sparse.dk" = [8, 32]\n'))))
    target = account(get_preset("tiny-ultramemv2")).activated_params
    for run in runs:
        assert abs(account(run.spec.model).activated_params / target - 1) < 0.005
        assert run.row["match_residual"] == pytest.approx(account(run.spec.model).activated_params / target - 1)
    assert len({r.spec.model.ffn_hidden for r in runs}) > 1


def test_corner_seeds_and_token_budget(tmp_path):
    runs = build_plan(load_recipe(recipe(tmp_path, (
        'model = "tiny-ultramemv2"\nseeds = [0]\ncorner_seeds = [1, 2]\ntokens = 100000\n'
        '[train]\nbatch_size = 4\nseq_len = 32\n[grid]\ntopm = [4, 8, 16]\n"sparse.dv" = [16, 24, 32]\n'))))
    assert len(runs) == 9 + 4 * 2
    assert {r.spec.train.steps for r in runs} == {782}  # ceil(100000 / (4 · 32))
    corner_seeds = sorted(r.spec.train.seed for r in runs if r.row["grid.topm"] == 4 and r.row["grid.sparse.dv"] == 16)
    assert corner_seeds == [0, 1, 2]


def test_a_model_axis_compares_kinds_at_equal_activated_params(tmp_path):
    runs = build_plan(load_recipe(recipe(tmp_path, (
        'model = "tiny-dense"\nmatch = "iso-activated"\n'
        '[grid]\nmodel = ["tiny-dense", "tiny-ultramemv2", "tiny-peer", "tiny-memoryplus"]\n'))))
    assert [r.row["kind"] for r in runs] == ["dense", "ultramemv2", "peer", "pkm"]
    assert all(abs(r.row["match_residual"]) < 0.01 for r in runs)


def test_every_recipe_problem_is_reported_at_once_one_line_each(tmp_path, umv2):
    bad = recipe(tmp_path, (
        'model = "tiny-ultramemv2"\nflavour = 1\nseeds = "0"\nmatch = "iso-vibes"\n'
        '[train]\nstepz = 3\n[grid]\ntopm = [4, 4096]\n"sparse.k_rc" = [64]\nnot_a_field = [1]\n'))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = umv2("sweep", "plan", bad)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    for expected in ("flavour: unknown key", "seeds='0'", "match='iso-vibes'", "train.stepz: unknown field",
                     "grid.not_a_field: not a model field"):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_grid_point_problems_name_the_point(tmp_path, umv2):
    bad = recipe(tmp_path, 'model = "tiny-ultramemv2"\n[grid]\ntopm = [4, 4096]\n"sparse.k_rc" = [8, 64]\n')
    code, _, err = umv2("sweep", "plan", bad)
    lines = err.strip().splitlines()
    assert code == 2 and all(line.startswith("error: ") for line in lines)
    assert any("topm=4096" in line and "sparse.topm=4096" in line for line in lines)
    assert any("sparse.k_rc=64" in line and "keys per side" in line for line in lines)
    code, _, err = umv2("sweep", "plan", recipe(tmp_path, 'model = "no-such"\n[grid]\ntopm = [4]\n'))
    assert code == 2 and "preset 'no-such'" in err and err.count("\n") == 1


def test_plan_json_has_the_columns_the_fit_needs(umv2):
    code, out, _ = umv2("sweep", "plan", RECIPES / "smoke.toml", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 6
    assert {"run_id", "sparse_params", "topm", "density", "activated_params", "total_params", "tokens",
            "flops_per_token", "seed", "gpu_hours"} <= rows[0].keys()


def test_a_run_id_is_the_hash_of_the_specs_json_without_its_layout():
    import hashlib

    from umv2cli.config import TrainConfig

    for run in build_plan(load_recipe(RECIPES / "moe-parity-1gpu.toml")):
        spec = run.spec.to_dict()
        for field in TrainConfig.LAYOUT:  # how a run spreads over processes is not what it trains
            del spec["train"][field]
        canonical = json.dumps(spec, sort_keys=True).encode()
        assert run.run_id == hashlib.sha256(canonical).hexdigest()[:12]


def test_a_tuned_file_gives_each_group_its_train_fields_and_must_cover_every_group(tmp_path, umv2):
    from umv2cli.sweeps.recipe import Tuned, write_tuned

    write_tuned(tmp_path / "best.toml", Tuned("topm", {"4": {"lr": 0.01}, "16": {"lr": 0.002}}), {})
    text = 'model = "tiny-ultramemv2"\ntuned = "best.toml"\n[train]\nlr = 0.5\nwarmup = 0.1\n[grid]\ntopm = {}\n'
    runs = build_plan(load_recipe(recipe(tmp_path, text.format("[4, 16]"))))
    assert [(r.spec.train.lr, r.spec.train.warmup) for r in runs] == [(0.01, 0.1), (0.002, 0.1)]
    code, _, err = umv2("sweep", "plan", recipe(tmp_path, text.format("[4, 8, 16]")))
    assert code == 2 and err.count("\n") == 1 and "groups.8: missing" in err


def test_references_train_beside_the_grid_with_the_recipes_seeds_and_its_matching(tmp_path):
    text = ('model = "tiny-ultramemv2"\nseeds = [0, 1]\ncorner_seeds = [2]\nmatch = "iso-flop"\n[grid]\n'
            'sparse_params = [16_384, 65_536]\ntopm = [4, 16]\n[[references]]\nmodel = "tiny-dense"\n'
            '[[references]]\nmodel = "tiny-ultramemv2"\ntopm = 8\n')
    runs = build_plan(load_recipe(recipe(tmp_path, text)))
    grid, refs = [r for r in runs if not r.row["reference"]], [r for r in runs if r.row["reference"]]
    assert len(grid) == 4 * 2 + 4 and len(refs) == 2 * 2  # corners get seed 2; references only `seeds`
    assert [r.row["kind"] for r in refs] == ["dense", "dense", "ultramemv2", "ultramemv2"]
    assert {r.spec.train.seed for r in refs} == {0, 1} and refs[2].spec.model.sparse.topm == 8
    flops = grid[0].row["flops_per_token"]  # the dense reference is resized to the same FLOPs per token
    assert abs(refs[0].row["flops_per_token"] / flops - 1) < 0.01 and refs[0].spec.model.ffn_hidden > 128


def test_a_bad_reference_is_one_line_naming_it(tmp_path, umv2):
    path = recipe(tmp_path, 'model = "tiny-ultramemv2"\n[grid]\ntopm = [4]\n[[references]]\ntopm = 0\nsize = 3\n')
    code, out, err = umv2("sweep", "plan", path)
    assert code == 2 and "references[0].topm=0: expected a positive integer" in err
    assert "references[0].size: not a model field" in err and "Traceback" not in err
