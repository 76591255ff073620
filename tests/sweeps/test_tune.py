"""`umv2 tune`: real Optuna studies on a journal file, over 20-step runs of a tiny model."""

import json
import tomllib
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from umv2cli.sweeps.plan import build_plan, run_id
from umv2cli.sweeps.recipe import load_recipe
from umv2cli.sweeps.tune import JOURNAL, group_specs, open_storage, open_study, run_trial, trial_spec

from test_slurm import cluster  # noqa: F401  the fixture of test_slurm.py: the cluster's CPUs, or a skip

RECIPE = """name = "tiny"
model = "tiny-dense"
{top}
[train]
steps = {steps}
batch_size = 2
seq_len = 32
eval_batches = 1
task_samples = 0
{train}
[grid]
ffn_hidden = [32, 48]
"""


def write(tmp_path: Path, name: str = "r.toml", *, top: str = "", train: str = "", tune: str = "",
          steps: int = 20) -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(top=top, train=train, steps=steps) + (f"[tune]\n{tune}\n" if tune else ""))
    return path


def trials(folder: Path, group: str) -> list:
    study = optuna.load_study(study_name=f"tiny/{group}", storage=open_storage(str(folder / JOURNAL)))
    return study.get_trials()


def test_tune_writes_each_groups_best_trial_and_running_again_continues_the_studies(tmp_path, umv2):
    recipe = write(tmp_path, tune='group_by = "ffn_hidden"\nn_trials = 2\nprune = false\n'
                                  "lr = { low = 1e-3, high = 3e-2, log = true }")
    code, out, err = umv2("tune", recipe, "--out", tmp_path / "out", "--workers", "2")
    folder = tmp_path / "out" / "tiny"
    assert code == 0, err
    best_file = tomllib.loads((folder / "best.toml").read_text())
    assert best_file["group_by"] == "ffn_hidden" and set(best_file["groups"]) == {"32", "48"}
    first = {}
    for group in ("32", "48"):
        done = trials(folder, group)
        assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
        best = min(done, key=lambda t: t.value)
        written = best_file["groups"][group]
        assert written["train"] == {"lr": best.params["lr"]} and written["eval_loss"] == best.value
        eval_json = json.loads((folder / "trials" / "runs" / written["run_id"] / "eval.json").read_text())
        assert eval_json["eval_loss"] == best.value  # the value is the best trial's final eval loss
        first[group] = [(t.params, t.value) for t in done]

    code, out, _ = umv2("tune", recipe, "--out", tmp_path / "out", "--n-trials", "3")
    assert code == 0 and out.count(": trial 2 ") == 2 and ": trial 1 " not in out
    for group in ("32", "48"):
        again = trials(folder, group)
        assert [(t.params, t.value) for t in again[:2]] == first[group] and again[2].state.name == "COMPLETE"
        assert again[2].params != again[0].params  # the continued sampler does not redraw its first values
    code, out, _ = umv2("tune", recipe, "--out", tmp_path / "out", "--n-trials", "3")
    assert code == 0 and ": trial " not in out  # nothing left to run

    sweep = write(tmp_path, "sweep.toml", top=f'tuned = "{folder / "best.toml"}"')
    runs = build_plan(load_recipe(sweep))
    best_file = tomllib.loads((folder / "best.toml").read_text())
    assert {(r.spec.model.ffn_hidden, r.spec.train.lr) for r in runs} == {
        (int(g), best_file["groups"][g]["train"]["lr"]) for g in ("32", "48")}


def test_a_diverging_trial_is_recorded_failed_and_retried_with_the_next_seed(tmp_path, umv2):
    recipe = write(tmp_path, train="grad_clip = 0.0", tune="n_trials = 1\nretries = 1\n"
                                                          "lr = { low = 1e25, high = 1e30, log = true }")
    code, out, err = umv2("tune", recipe, "--out", tmp_path / "out", "--workers", "1")
    folder = tmp_path / "out" / "tiny"
    assert code == 1 and "no trial completed" in out, err
    failed = trials(folder, "all")
    assert [t.state.name for t in failed] == ["FAIL", "FAIL"]
    assert all("non-finite" in t.user_attrs["reason"] for t in failed)
    assert failed[1].user_attrs["retry_of"] == 0 and failed[1].user_attrs["seed_offset"] == 1
    assert failed[1].params == failed[0].params
    runs = [folder / "trials" / "runs" / t.user_attrs["run_id"] for t in failed]
    assert [json.loads((r / "spec.json").read_text())["train"]["seed"] for r in runs] == [0, 1]
    assert all((r / "STATUS").read_text().startswith("failed: non-finite") for r in runs)
    assert not (folder / "best.toml").exists()


class Killed(Exception):
    pass


def kill_at_step_12(line: dict) -> None:
    if line["step"] == 12:
        raise Killed


def test_a_trial_left_running_by_a_killed_tune_is_retried_and_its_run_resumes(tmp_path, umv2):
    from umv2cli.train import read_metrics, train

    recipe_path = write(tmp_path, train="ckpt_every = 10", tune="n_trials = 1\nlr = { low = 1e-3, high = 3e-2 }")
    recipe = load_recipe(recipe_path)
    folder = tmp_path / "out" / "tiny"
    folder.mkdir(parents=True)
    storage = open_storage(str(folder / JOURNAL))
    study = open_study(storage, "tiny/all", recipe.tune)
    study.enqueue_trial({"lr": 0.01})
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2)})  # RUNNING, as when killed
    spec = trial_spec(group_specs(recipe)["all"], trial.params, 0, recipe.tune.evals)
    run_dir = folder / "trials" / "runs" / run_id(spec)
    trial.set_user_attr("run_id", run_dir.name)
    with pytest.raises(Killed):
        train(spec, run_dir, on_step=kill_at_step_12)
    before = read_metrics(run_dir)[:10]  # the kill came after the step-10 checkpoint

    code, out, err = umv2("tune", recipe_path, "--out", tmp_path / "out", "--workers", "1")
    assert code == 0, err
    stale, retried = trials(folder, "all")
    assert stale.state.name == "FAIL" and "stopped before it finished" in stale.user_attrs["reason"]
    assert retried.state.name == "COMPLETE" and retried.user_attrs["retry_of"] == 0
    assert retried.user_attrs["run_id"] == run_dir.name  # same values, same seed: the same run …
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 21)) and metrics[:10] == before  # … resumed at step 10


def test_the_pruner_stops_a_trial_worse_than_the_median_at_its_first_evaluation(tmp_path):
    recipe = load_recipe(write(tmp_path, tune="lr = { low = 1e-3, high = 3e-2 }"))
    storage_spec = str(tmp_path / JOURNAL)
    study = open_study(open_storage(storage_spec), "tiny/all", recipe.tune)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2)}
    for lr in (0.002, 0.004):  # two finished trials that were far better at every evaluation
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dists, value=0.5,
                                                  intermediate_values={s: 0.5 for s in range(4, 21, 4)}))
    trial = study.ask(dists)
    spec = trial_spec(group_specs(recipe)["all"], trial.params, 0, recipe.tune.evals)
    run_dir = tmp_path / "run"
    outcome = run_trial(storage_spec, "tiny/all", trial._trial_id, spec, run_dir, "eval_loss", True)
    assert outcome["state"] == "pruned" and outcome["step"] == 4 and outcome["value"] > 0.5
    from umv2cli.train import read_metrics

    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4] and not (run_dir / "STATUS").exists()
    assert study.trials[-1].intermediate_values == {4: outcome["value"]}


def test_bad_storage_and_a_recipe_without_tune_exit_2_and_write_nothing(tmp_path, umv2):
    recipe = write(tmp_path, tune="lr = { low = 1e-3, high = 3e-2 }")
    code, _, err = umv2("tune", recipe, "--out", tmp_path / "out", "--storage", f"sqlite:///{tmp_path}/x.db")
    assert code == 2 and err.count("\n") == 1 and "SQLite" in err
    plain = write(tmp_path, "plain.toml")
    code, _, err = umv2("tune", plain, "--out", tmp_path / "out")
    assert code == 2 and "no [tune] table" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.toml", "r.toml"]


# ----------------------------------------------------------------------------------------------
# on Slurm (skipped without a reachable cluster; `sudo .ci/slurm-up` starts one, .ci/run does in CI)

SLURM = '[slurm]\ncpus = 1\ntime = 60\n'


def test_tune_on_slurm_trains_each_trial_as_a_job(cluster, tmp_path, umv2):
    recipe = write(tmp_path, train='device = "cpu"', tune="n_trials = 2\nprune = false\n"
                                                          "lr = { low = 1e-3, high = 3e-2, log = true }\n" + SLURM)
    code, out, err = umv2("tune", recipe, "--out", tmp_path / "out", "--executor", "slurm")
    folder = tmp_path / "out" / "tiny"
    assert code == 0, err
    done = trials(folder, "all")
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    jobs = [json.loads(line) for line in (folder / "trials" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j["run_id"] for j in jobs) == sorted(t.user_attrs["run_id"] for t in done)  # one job each
    best = min(done, key=lambda t: t.value)
    assert tomllib.loads((folder / "best.toml").read_text())["groups"]["all"]["eval_loss"] == best.value
    final = json.loads((folder / "trials" / "runs" / best.user_attrs["run_id"] / "eval.json").read_text())
    assert final["eval_loss"] == best.value


def test_tune_on_slurm_cancels_the_job_of_a_pruned_trial(cluster, tmp_path, umv2):
    from umv2cli.train import read_metrics

    recipe_path = write(tmp_path, train='device = "cpu"', steps=3000,
                        tune="n_trials = 3\nlr = { low = 1e-3, high = 3e-2 }\n" + SLURM)
    recipe = load_recipe(recipe_path)
    folder = tmp_path / "out" / "tiny"
    study = open_study(open_storage(str(folder / JOURNAL)), "tiny/all", recipe.tune)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2)}
    for lr in (0.002, 0.004):  # two finished trials far better at every evaluation: the third is pruned
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dists, value=0.5,
                                                  intermediate_values={s: 0.5 for s in range(600, 3001, 600)}))
    code, out, err = umv2("tune", recipe_path, "--out", tmp_path / "out", "--executor", "slurm")
    assert code == 0, err
    pruned = trials(folder, "all")[-1]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [600]
    run_dir = folder / "trials" / "runs" / pruned.user_attrs["run_id"]
    assert not (run_dir / "STATUS").exists() and read_metrics(run_dir)[-1]["step"] < 3000  # stopped early
