"""Relative paths in a recipe (`data`, `tuned`) are taken from the recipe's folder, whatever the
working directory, and a resumed sweep still finds them through its recipe copy."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np

from umv2cli.sweeps.recipe import Tuned, load_recipe, write_tuned

RECIPE = """name = "paths"
model = "tiny-dense"
data = "../corpus"
tuned = "../tune/best.toml"
[train]
steps = 2
batch_size = 2
seq_len = 32
eval_batches = 1
task_samples = 0
[grid]
ffn_hidden = [32, 48]
"""


def project(tmp_path):
    """tmp/recipes/paths.toml naming ../corpus (a nanoGPT folder of 256 ids) and ../tune/best.toml."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "val"):
        (np.arange(4096) % 256).astype(np.uint16).tofile(corpus / f"{split}.bin")
    (corpus / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 256}))
    (tmp_path / "tune").mkdir()
    write_tuned(tmp_path / "tune" / "best.toml", Tuned("ffn_hidden", {"32": {"lr": 0.01}, "48": {"lr": 0.002}}), {})
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "paths.toml").write_text(RECIPE)
    return tmp_path / "recipes" / "paths.toml"


def test_data_and_tuned_are_taken_from_the_recipes_folder_not_the_working_directory(tmp_path, monkeypatch):
    recipe_path = project(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")  # where ../corpus would be tmp/deep/corpus
    recipe = load_recipe(recipe_path)
    assert recipe.data == str(tmp_path / "corpus") and recipe.tuned.resolve() == tmp_path / "tune" / "best.toml"
    relative = load_recipe(Path("../../recipes/paths.toml"))  # a relative recipe path too
    assert relative.data == str(tmp_path / "corpus") and relative.tuned.resolve() == recipe.tuned.resolve()


def test_a_sweep_resumed_from_elsewhere_finds_the_data_and_the_tuned_file(tmp_path, monkeypatch, umv2):
    recipe_path = project(tmp_path)
    (tmp_path / "deep" / "a").mkdir(parents=True)  # working directories where ../corpus is not the corpus
    monkeypatch.chdir(tmp_path / "deep" / "a")
    code, out, err = umv2("sweep", "run", "../../recipes/paths.toml", "--out", tmp_path / "out", "--workers", "1")
    assert code == 0 and "launched 2 runs (0 not done)" in out, err
    sweep = tmp_path / "out" / "paths"
    runs = sorted((sweep / "runs").iterdir())
    shutil.rmtree(runs[0])  # lost: resume must run it again, from the sweep's own recipe copy
    (tmp_path / "deep" / "b").mkdir()
    monkeypatch.chdir(tmp_path / "deep" / "b")
    code, out, err = umv2("sweep", "resume", sweep)
    assert code == 0 and "launched 1 runs (0 not done)" in out, err
    specs = [json.loads((run / "spec.json").read_text()) for run in runs]
    assert {s["data"] for s in specs} == {str(tmp_path / "corpus")}
    assert sorted((s["model"]["ffn_hidden"], s["train"]["lr"]) for s in specs) == [(32, 0.01), (48, 0.002)]
    assert (runs[0] / "STATUS").read_text() == "done\n"
