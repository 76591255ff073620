"""A run directory under a hostile user: two writers, kill -9, a damaged file, a full disk. Real processes,
real signals, a real full file system; nothing mocked."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umv2cli.config import run_spec_from_dict
from umv2cli.rundir import holder, read_metrics
from umv2cli.train import train

FAST_TRAIN = {"batch_size": 4, "seq_len": 32, "eval_batches": 1, "task_samples": 0}


def spec_dict(**train) -> dict:
    return {"model": "tiny-dense", "data": "builtin", "train": {**FAST_TRAIN, **train}}


def run_config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(spec_dict(**train)))
    return path


def umv2(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "umv2cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def steps(run: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run)]


def test_a_second_writer_is_refused_naming_the_holder_and_a_kill_9_frees_the_run(tmp_path):
    run = tmp_path / "run"
    first = umv2("train", run_config(tmp_path, steps=300, ckpt_every=10), "--out", run)
    wait_for(lambda: len(steps(run)) >= 12)  # past the step-10 checkpoint
    first.send_signal(signal.SIGKILL)
    first.wait()

    resumed = umv2("train", "--resume", run)
    wait_for(lambda: f"pid {resumed.pid} " in holder(run))  # it holds the run …
    resumed.send_signal(signal.SIGSTOP)  # (paused, so that it cannot end before the second one starts)
    second = umv2("train", "--resume", run)  # … while a second resume starts
    assert second.wait(timeout=300) == 2
    err = second.stderr.read().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"in use by pid {resumed.pid} on " in err[0], err
    assert resumed.poll() is None  # the holder trains on
    resumed.send_signal(signal.SIGCONT)

    wait_for(lambda: len(steps(run)) >= 22)
    resumed.send_signal(signal.SIGKILL)  # the holder dies mid-run: its lock dies with it
    resumed.wait()
    assert holder(run) == ""
    last = umv2("train", "--resume", run)
    assert last.wait(timeout=300) == 0, last.stderr.read()
    assert steps(run) == list(range(1, 301))  # every step logged, each once
    assert (run / "STATUS").read_text() == "done\n"


def test_a_garbage_line_mid_metrics_is_skipped_and_every_valid_line_kept_on_resume(tmp_path):
    run = tmp_path / "run"
    first = umv2("train", run_config(tmp_path, steps=30, ckpt_every=100), "--out", run)
    wait_for(lambda: len(steps(run)) >= 20)
    first.send_signal(signal.SIGTERM)  # checkpoints the step it is at, and stops
    assert first.wait(timeout=120) == 3
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    stopped = len(lines)
    damaged = lines[:13] + [b'{"step": 14, "tokens": \xff garbage\n', b"\n"] + lines[13:]
    (run / "metrics.jsonl").write_bytes(b"".join(damaged))
    (run / "ckpt" / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # a kill during a write leaves these
    (run / ".STATUS.a1b2c3.tmp").write_text("do")

    resumed = subprocess.run([sys.executable, "-m", "umv2cli", "train", "--resume", str(run)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "metrics.jsonl" in warning[0], warning
    assert "2 damaged lines (lines 14, 15)" in warning[0] and f"kept the {stopped} valid lines" in warning[0]
    after = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert after[:stopped] == lines  # every valid line, byte for byte
    assert steps(run) == list(range(1, 31))
    assert sorted(p.name for p in run.rglob(".*")) == []  # the temporaries of the killed writes are gone


def test_a_full_disk_fails_the_run_in_one_line_and_its_last_checkpoint_resumes_bit_exact(tmp_path):
    reference = train(run_spec_from_dict(spec_dict(steps=20, ckpt_every=5)), tmp_path / "reference")
    checkpoint = (tmp_path / "reference" / "ckpt" / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kb = int(1.6 * checkpoint) // 1024  # one checkpoint fits; the next one's temporary file beside it does not
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        config = run_config(tmp_path, steps=20, ckpt_every=5)
        full = subprocess.run([sys.executable, "-m", "umv2cli", "train", str(config), "--out", str(disk / "run")],
                              capture_output=True, text=True, timeout=300)
        assert full.returncode == 1
        err = full.stderr.strip().splitlines()
        assert len(err) == 1 and "ckpt/last.pt: cannot write (No space left on device) at step 10" in err[0], err
        assert "Traceback" not in full.stdout + full.stderr
        assert (disk / "run" / "STATUS").read_text() == "failed: disk full at step 10\n"
        shutil.copytree(disk / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    resumed = subprocess.run([sys.executable, "-m", "umv2cli", "train", "--resume", str(tmp_path / "moved")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got, expected = read_metrics(tmp_path / "moved"), read_metrics(tmp_path / "reference")
    assert [m["step"] for m in got] == list(range(1, 21))
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in expected]  # bit for bit
    assert got[-1]["eval_loss"] == expected[-1]["eval_loss"] == reference.final["eval_loss"]
    assert (tmp_path / "moved" / "STATUS").read_text() == "done\n"


# ----------------------------------------------------------------------------------------------
# damaged files: one line, exit 2, and the run marked failed


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped after its step-2 checkpoint, as a kill leaves one."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(run_spec_from_dict(spec_dict(steps=2)), run)
    (run / "spec.json").write_text(json.dumps(spec_dict(steps=6)))
    (run / "STATUS").unlink()
    (run / "eval.json").unlink()
    return run


def _damage_truncated(run: Path) -> None:
    ckpt = run / "ckpt" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def _damage_foreign(run: Path) -> None:
    (run / "ckpt" / "last.pt").write_text("# notes, not a checkpoint\n")


def _damage_other_model(run: Path) -> None:
    import torch

    from umv2cli.model.presets import get_preset
    from umv2cli.model.transformer import build_model

    state = torch.load(run / "ckpt" / "last.pt", weights_only=False)
    state["model"] = build_model(get_preset("tiny-ultramemv2")).state_dict()
    torch.save(state, run / "ckpt" / "last.pt")


@pytest.mark.parametrize("damage,file,cause", [
    (_damage_truncated, "ckpt/last.pt", "zip archive"),
    (_damage_foreign, "ckpt/last.pt", ""),
    (_damage_other_model, "ckpt/last.pt", "state_dict"),
])
def test_a_damaged_file_stops_the_resume_in_one_line_and_marks_the_run_failed(stopped_run, tmp_path, umv2, damage,
                                                                               file, cause):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    damage(run)
    code, out, err = umv2("train", "--resume", run)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {run / file}: damaged (") and cause in err, err
    assert (run / "STATUS").read_text().startswith(f"failed: damaged {file} (")
    assert "Traceback" not in out + err


def test_a_spec_json_that_is_not_utf8_is_one_line(stopped_run, tmp_path, umv2):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    (run / "spec.json").write_bytes(b'{"model": "tiny-dense\xff"}')
    code, _, err = umv2("train", "--resume", run)
    assert code == 2 and err == f"error: {run / 'spec.json'}: damaged (not UTF-8 text: byte 21); the run cannot " \
                                "resume; train it again in a new folder\n"


def test_a_folder_left_with_only_a_temporary_spec_starts_with_out(tmp_path, umv2):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".spec.json.k2j3h4.tmp").write_text('{"model": ')  # killed while writing spec.json
    code, _, err = umv2("train", "--resume", run)
    assert code == 2 and f"start a run with --out {run}" in err
    code, out, err = umv2("train", run_config(tmp_path, steps=2), "--out", run)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["LOCK", "STATUS", "ckpt", "eval.json", "metrics.jsonl",
                                                     "spec.json"]


@pytest.mark.parametrize("args,expected", [
    (["--seed", "-1", "--out", "{tmp}/r"], "train.seed=-1: must be in [0, 2^63)"),
    (["--seed", str(2**63), "--out", "{tmp}/r"], "train.seed=9223372036854775808"),
    (["--out", "{tmp}/run.json"], "is a file, not a run folder"),
    (["--out", "{tmp}/run.json/r"], "cannot write (Not a directory)"),
    (["--out", "/proc/umv2-no-such/r"], "/proc/umv2-no-such/r: cannot write"),
    (["--out", "{tmp}/" + "x" * 300], "File name too long"),
])
def test_bad_paths_and_seeds_are_one_line_exit_2(tmp_path, umv2, args, expected):
    config = run_config(tmp_path, steps=1)
    code, out, err = umv2("train", config, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # nothing written


def test_metrics_lines_out_of_order_or_damaged_are_skipped_and_the_rest_kept_byte_for_byte(tmp_path, capsys):
    from umv2cli.rundir import keep_metrics

    run = tmp_path / "run"
    run.mkdir()
    good = [json.dumps({"step": s, "train_loss": 1 / s}) for s in (1, 2, 3)] + ['{"step":4,  "train_loss": 0.25}']
    text = [*good[:3], '{"step": 2, "train_loss": 9.0}', "[1, 2]", good[3], '{"step": 5, "train_lo']  # last: cut short
    (run / "metrics.jsonl").write_text("\n".join(text))
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert [m["step"] for m in keep_metrics(run, 4)] == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text() == "".join(line + "\n" for line in good)
    assert capsys.readouterr().err == f"warning: {run / 'metrics.jsonl'}: skipped 2 damaged lines (lines 4, 5); " \
                                      "kept the 4 valid lines up to step 4\n"
    keep_metrics(run, 6)  # a checkpoint past the last line: steps were lost
    assert capsys.readouterr().err == f"warning: {run / 'metrics.jsonl'}: 2 of steps 1-6 lost; kept the 4 valid " \
                                      "lines up to step 6\n"
    keep_metrics(run, 2)  # a resume from step 2: the lines past it go, silently
    assert read_metrics(run) == [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.5}]
    assert capsys.readouterr().err == ""
