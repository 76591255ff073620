"""`umv2 sweep plan|run` through the real entry point: a plan readable at 80 columns, a long plan in
brief, and a sweep that cannot run leaves nothing on disk."""

import re
from pathlib import Path

RECIPES = Path(__file__).parents[2] / "recipes"


def test_plan_fits_80_columns_with_short_ids_and_human_units(umv2, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = umv2("sweep", "plan", RECIPES / "micro-cpu.toml")
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header, rows = lines[1].split(), lines[2:22]
    assert header[:4] == ["run", "seed", "P", "m"] and "…" not in out
    assert all(re.fullmatch(r"[0-9a-f]{8}", row.split()[0]) for row in rows)  # short run ids
    assert {row.split()[2] for row in rows} == {"62k", "131k", "259k", "508k"}  # P in human units
    assert lines[0] == f"{RECIPES / 'micro-cpu.toml'}: 20 runs of ultramemv2" and lines[-1].startswith("total: 20")


def test_a_narrow_terminal_drops_columns_and_names_them_and_wide_shows_everything(umv2, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    code, out, _ = umv2("sweep", "plan", RECIPES / "smoke.toml")
    lines = out.splitlines()
    assert code == 0 and all(len(line) <= 50 for line in lines[1:8])
    assert "not shown at this width: tokens, GPU-h" in out and "GPU-h" not in lines[1]
    code, out, _ = umv2("sweep", "plan", RECIPES / "smoke.toml", "--wide")
    header = out.splitlines()[1].split()
    assert {"sparse_params", "topm", "kind", "N", "total", "FFN", "tokens", "GPU-h"} <= set(header)
    assert re.search(r"^[0-9a-f]{12} ", out.splitlines()[2])  # the whole run id


def test_a_long_plan_prints_its_first_and_last_runs_unless_all(umv2, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    recipe = tmp_path / "long.toml"
    recipe.write_text('model = "tiny-dense"\nseeds = ' + str(list(range(15))) + '\n[train]\nsteps = 2\n[grid]\n'
                      f"ffn_hidden = {list(range(32, 92))}\n")
    code, out, _ = umv2("sweep", "plan", recipe)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(": 900 runs of dense")
    assert "… 875 more runs (--all prints every one) …" in lines and len(lines) < 40
    assert any(line.startswith("all runs: ") for line in lines)
    code, out, _ = umv2("sweep", "plan", recipe, "--all")
    assert code == 0 and sum(bool(re.match(r"[0-9a-f]{8} ", line)) for line in out.splitlines()) == 900
    assert "more runs" not in out


def test_sweep_run_with_missing_data_writes_nothing(umv2, tmp_path):
    recipe = tmp_path / "recipes" / "nodata.toml"
    recipe.parent.mkdir()
    recipe.write_text('model = "tiny-dense"\ndata = "../no-such-data"\n[train]\nsteps = 2\n[grid]\n'
                      "ffn_hidden = [32, 48]\n")
    code, out, err = umv2("sweep", "run", recipe, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "no-such-data") in err  # taken from the recipe's folder
    assert not (tmp_path / "out").exists()
