"""`umv2 data prepare` in-process, through `umv2cli.cli.app.main`'s error handling."""

import json

import pytest


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("naïve café — 東京\n" * 30)
    (tmp_path / "src" / "sub" / "b.py").write_text("def f(x):\n    return x + 1\n" * 30)
    (tmp_path / "src" / "blob.bin").write_bytes(b"\0\1\2\3")
    return tmp_path / "src"


def test_prepare_prints_one_summary_line_with_counts_and_meta_path(umv2, corpus, tmp_path):
    code, out, err = umv2("data", "prepare", corpus, "--out", tmp_path / "out", "--val-fraction", "0.3")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train, val = meta["tokens"]["train"], meta["tokens"]["val"]
    assert out == (f"{train:,} train + {val:,} val tokens from 2 documents, 1 file skipped "
                   f"(byte, vocab 257, uint16) → {tmp_path / 'out' / 'meta.json'}\n")
    assert sorted([train, val]) == [len(("naïve café — 東京\n" * 30).encode()), 30 * 27]  # a document each


def test_prepare_trains_bpe_with_the_tokenizer_option(umv2, corpus, tmp_path):
    code, out, _ = umv2("data", "prepare", corpus / "a.txt", corpus / "sub", "-o", tmp_path / "out",
                        "--tokenizer", "bpe:300", "--seed", "1")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert code == 0 and "(bpe, vocab" in out and (tmp_path / "out" / "tokenizer.json").is_file()
    assert meta["seed"] == 1 and meta["tokenizer"]["spec"] == "bpe:300"


@pytest.mark.parametrize("args,expected", [
    (["nope.txt"], "source 'nope.txt': no such file or folder"),
    (["SRC", "--val-fraction", "2"], "val_fraction=2.0: must lie strictly between 0 and 1"),
    (["SRC", "--tokenizer", "gpt2"], "tokenizer 'gpt2': unknown; use byte, bpe:VOCAB"),
    (["SRC", "--tokenizer", "bpe:100"], "tokenizer 'bpe:100': VOCAB must be between 257"),
    (["SRC/blob.bin"], "source '"),
    (["SRC", "--out", "SRC/a.txt"], "is a file; pass a new or empty folder"),
])
def test_bad_input_exits_2_with_one_error_line(umv2, corpus, tmp_path, args, expected):
    args = [a.replace("SRC", str(corpus)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    code, out, err = umv2("data", "prepare", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()} == before


def test_a_foreign_out_folder_exits_2_untouched(umv2, corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("keep me")
    code, _, err = umv2("data", "prepare", corpus, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "thesis.tex" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"]


def test_missing_out_is_a_usage_error(umv2, corpus):
    code, _, err = umv2("data", "prepare", corpus)
    assert code == 2 and "--out" in err


def test_prepare_reads_jsonl_records_from_the_text_column(umv2, tmp_path):
    lines = [json.dumps({"id": i, "content": f"record {i} " * 20}) for i in range(10)] + ['{"content": null}']
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = umv2("data", "prepare", tmp_path / "docs.jsonl", "--text-column", "content",
                          "--out", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert code == 0 and err == "" and meta["text_column"] == "content"
    assert out.startswith(f"{meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens from 10 "
                          "documents, 1 empty record skipped (byte")


@pytest.mark.parametrize("name,raw,expected", [
    ("docs.jsonl", b'{"body": "x"}\n', "docs.jsonl' line 1: no 'text' field (fields: body); name the text field "
                                       "with --text-column"),
    ("empty.txt", b"", "empty.txt': empty; remove it from the sources"),
    ("junk.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "junk.txt': binary (NUL byte), not UTF-8 text"),
    ("junk.jsonl", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "junk.jsonl' line 1: invalid UTF-8 at byte 0 of the line"),
    ("junk.jsonl.zst", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "junk.jsonl.zst': corrupt or truncated .zst data"),
    ("junk.parquet", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "junk.parquet': not a readable Parquet file"),
])
def test_a_bad_file_exits_2_with_one_line_naming_it(umv2, tmp_path, name, raw, expected):
    (tmp_path / name).write_bytes(raw)
    code, out, err = umv2("data", "prepare", tmp_path / name, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: source '") and expected in err, err
    assert not (tmp_path / "out").exists()
