"""Help and usage errors through the real entry point: plain text, bracketed words kept, one-line errors."""

import pytest


@pytest.mark.parametrize("command,words", [
    (["train"], ["[train] lr", "[train] batch_size", "`[train]`", "--compile / --no-compile"]),
    (["sweep", "run"], ["--retry-failed", "--partition"]),
    (["tune"], ["--n-trials"]),
])
def test_help_prints_bracketed_words_as_written_and_no_bool_type(umv2, command, words):
    code, out, err = umv2(*command, "--help")
    assert code == 0, err
    assert all(w in out for w in words), out
    assert "<bool>" not in out and "╭" not in out  # plain text: no Rich panels, no type on flags


@pytest.mark.parametrize("args,names", [
    (["train", "--steps", "abc", "--out", "x"], ["--steps", "umv2 train --help"]),
    (["train", "--lr", "fast", "--out", "x"], ["--lr"]),
    (["train", "--batch-size", "0", "--out", "x"], ["--batch-size"]),
    (["train", "--no-such-flag"], ["--no-such-flag"]),
    (["sweep", "plan"], ["recipe", "umv2 sweep plan --help"]),
    (["sweep", "plan", "recipes/smoke.toml", "--mfu", "2"], ["--mfu"]),
])
def test_a_usage_error_is_one_line_and_exit_code_2(umv2, tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)
    code, out, err = umv2(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in names), lines
    assert not (tmp_path / "x").exists()


def test_a_group_without_a_command_prints_its_help(umv2):
    code, out, err = umv2("sweep")
    assert code == 2 and "Commands:" in err and "plan" in err
