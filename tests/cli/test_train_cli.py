"""`umv2 train` through the real entry point: [train] flags, and a refused run leaves nothing behind."""

import json

TINY = ["--preset", "tiny-dense", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--device", "cpu"]


def test_bad_data_writes_nothing_and_the_corrected_retry_runs(umv2, tmp_path):
    out = tmp_path / "D"
    code, _, err = umv2("train", *TINY, "--data", tmp_path / "bad", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad" in err
    assert not out.exists()
    code, stdout, err = umv2("train", *TINY, "--data", "builtin", "--out", out)
    assert code == 0, err
    assert (out / "STATUS").read_text() == "done\n" and f"results in {out}" in stdout


def test_a_device_that_is_not_here_writes_nothing(umv2, tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the check is for machines without CUDA
    code, _, err = umv2("train", *TINY[:-2], "--device", "cuda", "--out", tmp_path / "D")
    assert code == 2 and "train.device" in err and not (tmp_path / "D").exists()


def test_flags_override_the_configs_train_table(umv2, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "tiny-dense"\ndata = "builtin"\n[train]\nsteps = 2\nlr = 1e-3\nbatch_size = 4\n'
                      'seq_len = 32\neval_batches = 1\ntask_samples = 0\ncompile = true\n')
    code, _, err = umv2("train", config, "--lr", "0.02", "--batch-size", "2", "--seq-len", "16", "--no-compile",
                        "--device", "cpu", "--out", tmp_path / "r")
    assert code == 0, err
    train = json.loads((tmp_path / "r" / "spec.json").read_text())["train"]
    assert (train["lr"], train["batch_size"], train["seq_len"], train["compile"], train["device"]) == \
        (0.02, 2, 16, False, "cpu")
    assert train["steps"] == 2 and train["eval_batches"] == 1  # the rest from the config
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["tokens"] == 2 * 16


def test_a_bad_flag_value_is_one_line_naming_the_field(umv2, tmp_path):
    for args, field in ((["--lr", "-1"], "train.lr"), (["--seq-len", "4096"], "train.seq_len=4096"),
                        (["--seq-len", "16"], "task_samples")):  # the memory tasks need 18 tokens
        code, _, err = umv2("train", "--preset", "tiny-dense", *args, "--out", tmp_path / "D")
        assert code == 2 and len(err.strip().splitlines()) == 1 and field in err, err
        assert not (tmp_path / "D").exists()


def test_resume_refuses_train_flags(umv2, tmp_path):
    code, _, err = umv2("train", "--resume", tmp_path, "--lr", "0.1")
    assert code == 2 and "--resume" in err
