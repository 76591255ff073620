"""One training run: exact resume after kill -9, signals, divergence, schedules, bad input."""

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umv2cli.config import TrainConfig, run_spec_from_dict
from umv2cli.train import lr_multiplier, read_metrics, train, value_lr_multiplier

FAST_TRAIN = {"batch_size": 4, "seq_len": 32, "eval_batches": 1, "task_samples": 0, "lr": 3e-3}


def run_config(tmp_path: Path, name: str = "run.toml", model: str = "tiny-ultramemv2", **train) -> Path:
    path = tmp_path / name
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**FAST_TRAIN, **train}.items())
    path.write_text(f'model = "{model}"\ndata = "builtin"\n[train]\n{table}\n')
    return path


def umv2(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "umv2cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def test_kill_9_then_resume_ends_bit_for_bit_where_an_uninterrupted_run_does(tmp_path):
    config = run_config(tmp_path, steps=40, ckpt_every=10)
    whole = umv2("train", str(config), "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = umv2("train", str(config), "--out", str(tmp_path / "killed"))
    kill_at = random.Random().randint(12, 38)  # after the first checkpoint, at a random step
    wait_for(lambda: len(read_metrics(tmp_path / "killed")) >= kill_at)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "STATUS").exists()
    resumed = umv2("train", "--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    expected, got = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in got] == list(range(1, 41))
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in expected]  # bit for bit
    assert got[-1]["eval_loss"] == expected[-1]["eval_loss"]
    assert (tmp_path / "killed" / "STATUS").read_text() == "done\n"


def test_sigterm_writes_a_checkpoint_before_exit_and_the_run_resumes(tmp_path):
    import torch

    run = umv2("train", str(run_config(tmp_path, steps=400)), "--out", str(tmp_path / "run"))
    wait_for(lambda: len(read_metrics(tmp_path / "run")) >= 3)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 3  # stopped, resumable
    assert "stopped by SIGTERM" in run.stdout.read()
    step = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=False)["step"]
    assert step == read_metrics(tmp_path / "run")[-1]["step"] >= 3
    assert not (tmp_path / "run" / "STATUS").exists()


@pytest.mark.parametrize("model,what", [
    ("tiny-dense", "gradient norm"),  # its loss stays finite at step 2; its gradient norm does not
    ("tiny-ultramemv2", "(loss|gradient norm)"),
])
def test_a_diverging_run_stops_and_is_marked_failed_with_its_step(tmp_path, model, what):
    run = umv2("train", str(run_config(tmp_path, model=model, steps=20, lr=1e30, grad_clip=0.0)),
               "--out", str(tmp_path / "run"))
    assert run.wait(timeout=120) == 1
    status = (tmp_path / "run" / "STATUS").read_text()
    assert re.fullmatch(rf"failed: non-finite {what} \((nan|inf)\) at step 2\n", status), status
    assert "non-finite" in run.stderr.read()


def test_a_run_writes_its_files_and_metrics(tmp_path):
    spec = run_spec_from_dict({"model": "tiny-ultramemv2", "data": "builtin",
                               "train": {**FAST_TRAIN, "steps": 6, "eval_every": 3, "task_samples": 8}})
    seen = []
    result = train(spec, tmp_path / "run", on_step=seen.append)
    assert result.status == "done" and result.step == 6 and len(seen) == 6
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"LOCK", "spec.json", "metrics.jsonl", "eval.json", "ckpt", "STATUS"}
    assert json.loads((tmp_path / "run" / "spec.json").read_text()) == spec.to_dict()
    metrics = read_metrics(tmp_path / "run")
    assert {"step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    assert metrics[1]["tokens"] == 2 * 4 * 32
    for m in (metrics[2], metrics[5]):  # eval steps
        assert {"eval_loss", "memory_mean_topm_score", "memory_values_touched", "memory_usage_kl",
                "task_associative_recall", "task_multi_round_recall", "task_in_context_mapping"} <= m.keys()
        assert 0 < m["memory_values_touched"] <= 1 and m["memory_usage_kl"] >= 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["eval_loss"] == metrics[-1]["eval_loss"]
    again = train(spec, tmp_path / "run", resume=True)  # a done run is not run again
    assert again.status == "done" and read_metrics(tmp_path / "run") == metrics


def test_the_memory_tables_get_the_value_lr_multiplier(tmp_path):
    from umv2cli.model.presets import get_preset
    from umv2cli.model.transformer import build_model
    from umv2cli.train import build_optimizer, set_lr

    model = build_model(get_preset("tiny-memoryplus"))
    cfg = TrainConfig(steps=100, lr=1e-3, value_lr_mult=4.0, value_lr_decay=True, warmup=0.0)
    opt = build_optimizer(model, cfg)
    tables = {id(p) for p in opt.param_groups[1]["params"]}
    assert tables == {id(model.sparse[0].values)}  # the shared Memory+ pool, once
    set_lr(opt, 0, cfg)
    assert opt.param_groups[1]["lr"] == pytest.approx(4 * opt.param_groups[0]["lr"])
    set_lr(opt, 50, cfg)
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5 * opt.param_groups[0]["lr"])


def test_schedules():
    cosine = TrainConfig(steps=100, warmup=0.1, min_lr_ratio=0.1)
    assert lr_multiplier(0, cosine) == pytest.approx(0.1) and lr_multiplier(9, cosine) == 1.0
    assert lr_multiplier(55, cosine) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_multiplier(100, cosine) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup=0.1, schedule="wsd", cooldown=0.2, min_lr_ratio=0.0)
    assert [lr_multiplier(s, wsd) for s in (10, 79)] == [1.0, 1.0]
    assert lr_multiplier(89, wsd) == pytest.approx(0.5) and lr_multiplier(99, wsd) == pytest.approx(0.0)
    constant = TrainConfig(steps=100, value_lr_mult=1.5)
    assert value_lr_multiplier(0, constant) == value_lr_multiplier(99, constant) == 1.5


@pytest.mark.parametrize("args,expected", [
    (["--preset", "tiny-dense", "--data", "no/such/dir", "--out", "{tmp}/r"], "no/such/dir"),
    (["--preset", "no-such-preset", "--out", "{tmp}/r"], "no-such-preset"),
    (["--preset", "tiny-dense", "--steps", "0", "--out", "{tmp}/r"], "train.steps=0"),
    (["--preset", "tiny-dense"], "--out"),
    (["--resume", "{tmp}"], "spec.json"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected):
    run = umv2("train", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert run.wait(timeout=60) == 2
    err = run.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_a_vocabulary_larger_than_the_models_exits_2(tmp_path):
    import pickle

    import numpy as np

    data = tmp_path / "data"  # a nanoGPT directory whose meta.pkl declares 1000 tokens
    data.mkdir()
    for split in ("train", "val"):
        (np.arange(5000) % 1000).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1000}))
    run = umv2("train", "--preset", "tiny-dense", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r"))
    assert run.wait(timeout=60) == 2
    assert "exceeds the model's vocab_size=512" in run.stderr.read()


def test_out_dir_that_holds_a_run_is_not_overwritten(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    run = umv2("train", "--preset", "tiny-dense", "--out", str(tmp_path / "r"))
    assert run.wait(timeout=60) == 2 and "--resume" in run.stderr.read()
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_the_demo_run_finishes_in_under_two_minutes_and_says_where_its_results_are(tmp_path):
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "umv2cli", "train", "--preset", "tiny-ultramemv2", "--data",
                          "builtin", "--steps", "60", "--ckpt-every", "10", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert time.time() - start < 120
    assert f"results in {tmp_path / 'demo'}" in run.stdout
    assert (tmp_path / "demo" / "STATUS").read_text() == "done\n"
    assert read_metrics(tmp_path / "demo")[-1]["train_loss"] < read_metrics(tmp_path / "demo")[0]["train_loss"] - 1


# ----------------------------------------------------------------------------------------------
# evaluation: the same held-out tokens for every run, and a bounded sample for layer health


def test_two_runs_with_different_seeds_are_scored_on_the_same_held_out_tokens(tmp_path, monkeypatch):
    """Every run of a sweep reads the same validation batches and memory-task samples whatever its training seed,
    so seed-to-seed spread is training noise. (Drawn with the training seed, they differed from run to run.)"""
    import torch

    import umv2cli.data
    import umv2cli.evals

    seen: dict[str, list] = {}
    get_batch, graded_hits = umv2cli.data.get_batch, umv2cli.evals.graded_hits

    def batch(tokens, batch_size, seq_len, *, seed, index):
        x, y = get_batch(tokens, batch_size, seq_len, seed=seed, index=index)
        caller = sys._getframe(1).f_code.co_name.removeprefix("_")  # `evaluate`: validation batches; `_train`: training
        seen.setdefault(caller, []).append(x)
        return x, y

    def hits(model, tokens_NT, answer_NT, batch_size=32):
        seen.setdefault("tasks", []).append(tokens_NT.clone())
        return graded_hits(model, tokens_NT, answer_NT, batch_size)

    monkeypatch.setattr(umv2cli.data, "get_batch", batch)
    monkeypatch.setattr(umv2cli.evals, "graded_hits", hits)
    runs = []
    for seed in (0, 1):
        seen.clear()
        spec = run_spec_from_dict({"model": "tiny-ultramemv2", "data": "builtin", "train": {
            **FAST_TRAIN, "steps": 2, "eval_batches": 2, "task_samples": 4, "seed": seed}})
        assert train(spec, tmp_path / f"seed{seed}").status == "done"
        runs.append({k: list(v) for k, v in seen.items()})
    first, second = runs
    assert len(first["evaluate"]) == len(second["evaluate"]) == 2 and len(first["tasks"]) == 3  # 3 tasks
    assert not all(torch.equal(a, b) for a, b in zip(first["train"], second["train"]))  # the seed orders training
    for what in ("evaluate", "tasks"):
        assert all(torch.equal(a, b) for a, b in zip(first[what], second[what], strict=True)), what


def health_sample_bytes(memory_layers: int, d_model: int, tokens: int, bytes_per_value: int = 4) -> int:
    """What layer health keeps to measure a model: `tokens` inputs of d_model values per UltraMemV2 layer (fp32 at
    most). The number of eval batches and their size do not enter."""
    return memory_layers * tokens * d_model * bytes_per_value


def health_run(monkeypatch, eval_batches: int) -> tuple[list[int], int]:
    """Evaluate a tiny UltraMemV2 model with HEALTH_TOKENS = 48 (eval batches of 4 × 32 = 128 tokens): the bytes of
    the sample each memory layer's health reads, and the bytes of eval-batch inputs still alive when it does."""
    import gc
    import weakref

    import torch

    import umv2cli.model.ultramemv2 as ultramemv2
    import umv2cli.train as training
    from umv2cli.data import open_data
    from umv2cli.model.transformer import build_model

    monkeypatch.setattr(training, "HEALTH_TOKENS", 48)
    spec = run_spec_from_dict({"model": "tiny-ultramemv2", "data": "builtin",
                               "train": {**FAST_TRAIN, "eval_batches": eval_batches, "task_samples": 0}})
    model = build_model(spec.model)
    inputs, samples, pinned = [], [], []
    for layer in model.sparse:  # sees every eval batch's input to each memory layer, without keeping it
        layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
    selection_health = ultramemv2.selection_health

    def health(layer, u_BH):
        gc.collect()
        alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                 for t in (r() for r in inputs) if t is not None}
        pinned.append(sum(alive.values()))
        samples.append(u_BH.numel() * u_BH.element_size())
        return selection_health(layer, u_BH)

    monkeypatch.setattr(ultramemv2, "selection_health", health)
    training.evaluate(model, open_data("builtin"), spec, torch.device("cpu"))
    return samples, max(pinned)


@pytest.mark.parametrize("eval_batches", [1, 3])
def test_layer_health_reads_a_sample_of_health_tokens_whatever_the_number_of_eval_batches(monkeypatch,
                                                                                         eval_batches):
    samples, _ = health_run(monkeypatch, eval_batches)
    cfg = run_spec_from_dict({"model": "tiny-ultramemv2", "data": "builtin", "train": FAST_TRAIN}).model
    assert len(samples) == len(cfg.sparse_pairs()) and \
        sum(samples) == health_sample_bytes(len(cfg.sparse_pairs()), cfg.d_model, 48)


def test_layer_health_keeps_no_eval_batch_alive(monkeypatch):
    _, pinned = health_run(monkeypatch, 3)
    assert pinned == 0


def test_layer_health_memory_at_the_paper_227m_recipe_is_bounded_by_accounting():
    """At the paper-227m-cluster recipe's eval size (50 batches of 32 × 4096 tokens, d_model 768, 20 memory layers),
    by accounting, not by allocating it: the kept sample is a few hundred MB and does not grow with eval_batches;
    keeping every eval batch's inputs (as before) needed 400 GB, more than an H100 has."""
    from umv2cli.config import UltraMemV2Config
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe
    from umv2cli.train import HEALTH_TOKENS

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "paper-227m-cluster.toml")
    spec = next(run.spec for run in build_plan(recipe) if isinstance(run.spec.model.sparse, UltraMemV2Config))
    layers, d_model = len(spec.model.sparse_pairs()), spec.model.d_model
    batch_tokens = spec.train.batch_size * (spec.train.seq_len or spec.model.seq_len)
    assert (layers, d_model, batch_tokens, spec.train.eval_batches) == (20, 768, 131_072, 50)
    kept = health_sample_bytes(layers, d_model, min(HEALTH_TOKENS, spec.train.eval_batches * batch_tokens))
    more_batches = 100 * spec.train.eval_batches * batch_tokens
    assert kept == health_sample_bytes(layers, d_model, min(HEALTH_TOKENS, more_batches))
    assert kept <= 256 * 2**20  # 240 MiB
    every_batch = health_sample_bytes(layers, d_model, spec.train.eval_batches * batch_tokens)
    assert every_batch > 160e9 and every_batch / kept == 1600
