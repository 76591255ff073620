"""Token data (umv2cli/data.py): prepare, open_data, the builtin corpus, get_batch."""

import gzip
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from umv2cli import data
from umv2cli.data import get_batch, open_data, prepare, token_dtype
from umv2cli.errors import UserError

# One document per file; each holds a marker no other file holds, so a document's presence in a split
# can be checked by text. Repeated lines give BPE something to merge.
TEXTS = {
    "cafe.txt": "naïve café — 東京 ☕ doc-cafe\n" * 20,
    "code/fib.py": "def fib(n):\r\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # doc-fib\r\n" * 10,
    "code/lib/tabs.c": "int main(void) {\n\treturn 0;\t/* doc-tabs */\n}\n" * 12,
    "eot-literal.md": "# doc-eot\nGPT-2 separates documents with <|endoftext|> in its data.\n" * 8,
    "emoji.txt": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 🙂👍🏽 doc-emoji\n" * 15,
    "notes/a.rst": "Title doc-rst\n=====\n\n  indented   spaces   kept   \n" * 10,
    "notes/b.txt": "plain ascii prose about memory layers, doc-prose. " * 30,
    "zeta.txt": "no trailing newline doc-zeta",
}
SKIPPED = {"image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "latin1.txt": "café".encode("latin-1"),
           "empty.txt": b""}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    for name, raw in SKIPPED.items():
        (root / name).write_bytes(raw)
    (root / ".hidden.txt").write_text("hidden doc-hidden")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main doc-git")
    return root


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """One bpe:300 preparation shared by the tests that need a trained tokenizer.json."""
    root = tmp_path_factory.mktemp("bpe")
    for name, text in TEXTS.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_bytes(text.encode())
    prepare([root / "src"], root / "out", tokenizer="bpe:300")
    return root / "out"


def texts_by_split(d: data.TokenData) -> dict[str, list[str]]:
    """Decode each split document by document (splitting at eot_id)."""
    result = {}
    for split in ("train", "val"):
        ids = np.asarray(getattr(d, split))
        pieces = np.split(ids, np.flatnonzero(ids == d.meta["eot_id"]))
        result[split] = [d.decode(pieces[0])] + [d.decode(piece[1:]) for piece in pieces[1:]]
    return result


def expected_by_split(meta: dict, root: Path) -> dict[str, list[str]]:
    val = set(meta["val_documents"])
    order = sorted(TEXTS)  # sorted relative paths: the order prepare reads a folder in
    return {"train": [TEXTS[n] for n in order if str((root / n).resolve()) not in val],
            "val": [TEXTS[n] for n in order if str((root / n).resolve()) in val]}


# ----------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("kind", ["byte", "bpe:300", "tokenizer.json"])
def test_every_document_decodes_back_exactly_through_every_tokenizer(corpus, tmp_path, bpe_dir, kind):
    spec = str(bpe_dir / "tokenizer.json") if kind == "tokenizer.json" else kind
    meta = prepare([corpus], tmp_path / "out", tokenizer=spec)
    d = open_data(tmp_path / "out")
    assert texts_by_split(d) == expected_by_split(meta, corpus)
    assert len(meta["val_documents"]) >= 1 and meta["documents"] == {"train": 8 - len(meta["val_documents"]),
                                                                     "val": len(meta["val_documents"])}
    # the literal "<|endoftext|>" in eot-literal.md is text, not the separator id
    assert d.encode("a <|endoftext|> b").count(d.meta["eot_id"]) == 0
    assert d.decode(d.encode("naïve café — 東京\r\n")) == "naïve café — 東京\r\n"


def test_byte_ids_are_the_utf8_bytes_and_eot_is_256(corpus, tmp_path):
    meta = prepare([corpus / "zeta.txt", corpus / "cafe.txt", corpus / "emoji.txt"], tmp_path / "out",
                   val_fraction=0.01)
    d = open_data(tmp_path / "out")
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (257, 256, "uint16")
    val_doc = Path(meta["val_documents"][0]).name
    train_docs = [n for n in ("zeta.txt", "cafe.txt", "emoji.txt") if n != val_doc]  # in source order
    assert d.val.tolist() == list(TEXTS[val_doc].encode())
    assert d.train.tolist() == [*TEXTS[train_docs[0]].encode(), 256, *TEXTS[train_docs[1]].encode()]
    assert d.decode([104, 105, 256, 0xE6, 0x9D, 0xB1]) == "hi<|endoftext|>東"


def test_bpe_writes_its_tokenizer_and_records_the_actual_vocab(bpe_dir):
    from tokenizers import Tokenizer

    meta = json.loads((bpe_dir / "meta.json").read_text())
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert meta["tokenizer"] == {"kind": "bpe", "spec": "bpe:300", "path": "tokenizer.json"}
    assert meta["vocab_size"] == tok.get_vocab_size() and 257 < meta["vocab_size"] <= 300
    assert meta["eot_id"] == tok.token_to_id("<|endoftext|>") == 0
    d = open_data(bpe_dir)
    assert len(d.train) < 0.6 * sum(len(t.encode()) for t in TEXTS.values())  # merges happened


@pytest.mark.parametrize("kind", ["byte", "bpe:300"])
def test_same_inputs_give_identical_files_and_hash(corpus, tmp_path, kind):
    metas = [prepare([corpus], tmp_path / name, tokenizer=kind) for name in ("a", "b")]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == (["meta.json", "tokenizer.json", "train.bin", "val.bin"] if kind != "byte"
                     else ["meta.json", "train.bin", "val.bin"])
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tokens = (tmp_path / "a" / "train.bin").read_bytes() + (tmp_path / "a" / "val.bin").read_bytes()
    assert metas[0]["content_hash"] == metas[1]["content_hash"] == "sha256:" + hashlib.sha256(tokens).hexdigest()


def test_split_is_by_document_and_follows_the_seed(corpus, tmp_path):
    val_docs = set()
    for seed in range(4):
        meta = prepare([corpus], tmp_path / f"s{seed}", seed=seed, val_fraction=0.2)
        d = open_data(tmp_path / f"s{seed}")
        train_text, val_text = d.decode(d.train), d.decode(d.val)
        markers = [t.split("doc-")[1].split()[0][:4] for t in TEXTS.values()]
        in_val = {m for m in markers if f"doc-{m}" in val_text}
        assert in_val and not any(f"doc-{m}" in train_text for m in in_val)
        assert len(in_val) == len(meta["val_documents"])
        val_bytes = sum(len(Path(p).read_bytes()) for p in meta["val_documents"])
        assert val_bytes >= 0.2 * sum(len(t.encode()) for t in TEXTS.values())
        val_docs.add(tuple(meta["val_documents"]))
    assert len(val_docs) > 1  # the seed picks the val documents


def test_meta_records_tokenizer_counts_rule_sources_and_skips(corpus, tmp_path):
    meta = prepare([corpus], tmp_path / "out", val_fraction=0.1, seed=3)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert meta["format"] == "umv2-tokens/1"
    assert meta["tokenizer"] == {"kind": "byte", "spec": "byte", "path": None}
    n_bytes = sum(len(t.encode()) for t in TEXTS.values())
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == n_bytes + 8 - 2  # an EOT between documents
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * meta["tokens"]["train"]
    assert meta["val_fraction"] == 0.1 and meta["seed"] == 3 and "by document" in meta["split"]
    assert meta["sources"] == [str(corpus.resolve())]
    assert {Path(s["path"]).name: s["reason"] for s in meta["skipped"]} == {
        "image.png": "binary (NUL byte)", "latin1.txt": "invalid UTF-8 at byte 3", "empty.txt": "empty"}
    assert meta["content_hash_of"].startswith("sha256 of the train.bin bytes")


@pytest.mark.parametrize("vocab,dtype", [(257, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                         (2**32, np.uint32)])
def test_token_dtype_is_uint16_up_to_65536_ids_else_uint32(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_a_single_document_is_split_at_its_end(corpus, tmp_path):
    meta = prepare([corpus / "notes" / "b.txt"], tmp_path / "out", val_fraction=0.25)
    d = open_data(tmp_path / "out")
    raw = list(TEXTS["notes/b.txt"].encode())
    assert len(d.val) == math.ceil(0.25 * len(raw)) and d.train.tolist() + d.val.tolist() == raw
    assert meta["documents"] == {"train": 1, "val": 0} and meta["val_documents"] == []


def test_rerunning_into_a_previous_output_replaces_it(bpe_dir, corpus, tmp_path):
    out = tmp_path / "out"
    prepare([corpus], out, tokenizer=str(bpe_dir / "tokenizer.json"))
    assert (out / "tokenizer.json").exists()
    prepare([corpus], out, tokenizer=str(out / "tokenizer.json"))  # its own tokenizer, read before replaced
    meta = prepare([corpus], out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert open_data(out).meta == meta


def test_the_output_folder_inside_a_source_folder_is_not_read(corpus):
    meta = prepare([corpus], corpus / "tokens")
    again = prepare([corpus], corpus / "tokens")
    assert again["content_hash"] == meta["content_hash"]


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the argument; nothing on disk touched


def no_eot_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(path))
    return str(path)


def lowercasing_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=260, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


def binary_folder(corpus: Path) -> Path:
    (corpus / "bin").mkdir()
    (corpus / "bin" / "blob.dat").write_bytes(b"\0\1\2")
    return corpus / "bin"


def one_byte_file(path: Path) -> Path:
    path.write_text("x")
    return path


def unreadable_tokenizer(path: Path) -> str:
    path.write_text('{"version": "1.0"}')
    return str(path)


BAD_PREPARE = {
    "missing source": (lambda c, t: {"sources": [c / "nope.txt"]}, "source '"),
    "no text": (lambda c, t: {"sources": [binary_folder(c)]}, "no text found"),
    "empty source file": (lambda c, t: {"sources": [c / "empty.txt"]}, "empty.txt': empty; remove it from the"),
    "binary source file": (lambda c, t: {"sources": [c / "latin1.txt"]}, "not UTF-8 text"),
    "no sources": (lambda c, t: {"sources": []}, "sources: none given"),
    "one token": (lambda c, t: {"sources": [one_byte_file(c / "x.txt")]},
                  "1 tokens are too few to split into train and val"),
    "val_fraction 0": (lambda c, t: {"val_fraction": 0.0}, "val_fraction=0.0"),
    "val_fraction 1": (lambda c, t: {"val_fraction": 1.0}, "val_fraction=1.0"),
    "val_fraction 1.5": (lambda c, t: {"val_fraction": 1.5}, "val_fraction=1.5"),
    "negative seed": (lambda c, t: {"seed": -1}, "seed=-1"),
    "unknown tokenizer": (lambda c, t: {"tokenizer": "sentencepiece"}, "tokenizer 'sentencepiece': unknown"),
    "bpe vocab 256": (lambda c, t: {"tokenizer": "bpe:256"}, "tokenizer 'bpe:256': VOCAB must be between 257"),
    "bpe vocab 2^32+1": (lambda c, t: {"tokenizer": f"bpe:{2**32 + 1}"}, "VOCAB must be between 257"),
    "bpe vocab words": (lambda c, t: {"tokenizer": "bpe:lots"}, "VOCAB must be a whole number"),
    "missing tokenizer.json": (lambda c, t: {"tokenizer": str(t / "x" / "tokenizer.json")}, "no such file"),
    "unreadable tokenizer.json": (lambda c, t: {"tokenizer": unreadable_tokenizer(t / "bad.json")},
                                  "cannot be read by HF tokenizers"),
    "tokenizer without eot": (lambda c, t: {"tokenizer": no_eot_tokenizer(t / "noeot.json")},
                              "none of the end-of-text tokens"),
    "lossy tokenizer": (lambda c, t: {"tokenizer": lowercasing_tokenizer(t / "lower.json")},
                        "does not give back"),
    "jsonl without the text field": (lambda c, t: {"sources": [write_jsonl(t / "a.jsonl", {"id": 1, "body": "x"})]},
                                     "a.jsonl' line 1: no 'text' field (fields: id, body); name the text field"),
    "jsonl text not a string": (lambda c, t: {"sources": [write_jsonl(t / "a.jsonl", {"text": "ok"}, {"text": 3})]},
                                "a.jsonl' line 2: 'text' is a JSON int, not a string"),
    "jsonl line not JSON": (lambda c, t: {"sources": [write_jsonl(t / "a.jsonl.gz", {"text": "ok"}, "", "{oops")]},
                            "a.jsonl.gz' line 3: not JSON"),
    "jsonl line not an object": (lambda c, t: {"sources": [write_jsonl(t / "a.jsonl", '["text"]')]},
                                 "line 1: a JSON list, not an object"),
    "jsonl of binary junk": (lambda c, t: {"sources": [write_file(t / "a.jsonl", b"\x89PNG\r\n\x1a\n\0\0")]},
                             "a.jsonl' line 1: invalid UTF-8 at byte 0 of the line"),
    "empty jsonl": (lambda c, t: {"sources": [write_file(t / "a.jsonl.zst", b"\n")]}, "empty, no records"),
    "no text in records": (lambda c, t: {"sources": [write_jsonl(t / "a.jsonl", {"text": ""})]}, "no text found"),
    "text column empty": (lambda c, t: {"text_column": ""}, "text_column: empty"),
    "gz of junk": (lambda c, t: {"sources": [write_file(t / "a.txt", b"junk").rename(t / "a.txt.gz") or t / "a.txt.gz"]},
                   "a.txt.gz': corrupt or truncated .gz data"),
    "truncated gz": (lambda c, t: {"sources": [truncated(write_file(t / "a.jsonl.gz", b'{"text": "x"}\n' * 99))]},
                     "a.jsonl.gz': corrupt or truncated .gz data"),
    "zst of junk": (lambda c, t: {"sources": [write_file(t / "a.txt", b"junk").rename(t / "a.zst") or t / "a.zst"]},
                    "a.zst': corrupt or truncated .zst data"),
    "truncated zst": (lambda c, t: {"sources": [truncated(write_file(t / "a.txt.zst", os.urandom(999)))]},
                      "a.txt.zst': corrupt or truncated .zst data (the file ends inside a zstd frame)"),
    "corrupt gz in a folder": (lambda c, t: {"sources": [c, truncated(write_file(c / "d" / "x.gz", b"text" * 99))]},
                               "x.gz': corrupt or truncated .gz data"),
    "parquet without the column": (lambda c, t: {"sources": [write_parquet(t / "a.parquet", id=[1], body=["x"])]},
                                   "a.parquet': no column 'text' (columns: id, body); name the text column"),
    "parquet column not text": (lambda c, t: {"sources": [write_parquet(t / "a.parquet", text=[1, 2])]},
                                "a.parquet': column 'text' holds Int64, not text; name a string column"),
    "parquet of junk": (lambda c, t: {"sources": [write_file(t / "a.parquet", b"PAR1 junk \0\1\2")]},
                        "a.parquet': not a readable Parquet file"),
    "empty parquet": (lambda c, t: {"sources": [write_parquet(t / "a.parquet", text=[])]}, "empty, no records"),
    "compressed parquet": (lambda c, t: {"sources": [write_file(t / "a.parquet.gz", b"x")]},
                           "a.parquet.gz': a Parquet file compresses its columns itself"),
}


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-7])
    return path


@pytest.mark.parametrize("case", BAD_PREPARE)
def test_bad_prepare_input_raises_one_line_and_writes_nothing(corpus, tmp_path, case):
    make, expected = BAD_PREPARE[case]
    kwargs = {"sources": [corpus], **make(corpus, tmp_path)}
    with pytest.raises(UserError) as e:
        prepare(kwargs.pop("sources"), tmp_path / "out", **kwargs)
    assert len(e.value.problems) == 1 and "\n" not in str(e.value) and expected in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("contents", [{"notes.txt": b"mine"}, {"train.bin": b"\0\0", "meta.pkl": b"x"},
                                      {"train.bin": b"\0\0", "val.bin": b"\0\0"},
                                      {"meta.json": b'{"format": "other"}'}])
def test_an_out_folder_holding_other_files_is_refused_untouched(corpus, tmp_path, contents):
    out = tmp_path / "out"
    out.mkdir()
    for name, raw in contents.items():
        (out / name).write_bytes(raw)
    with pytest.raises(UserError, match=r"out '.*': holds files that are not a `umv2 data prepare` output"):
        prepare([corpus], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == contents


def test_an_out_path_that_is_a_file_is_refused(corpus):
    with pytest.raises(UserError, match="is a file; pass a new or empty folder"):
        prepare([corpus], corpus / "cafe.txt")
    assert (corpus / "cafe.txt").read_text() == TEXTS["cafe.txt"]


# ----------------------------------------------------------------------------------------------
# .jsonl, Parquet, .gz and .zst inputs; streaming


def compress(raw: bytes, suffix: str) -> bytes:
    import zstandard

    return {"": raw, ".gz": gzip.compress(raw, mtime=0), ".zst": zstandard.ZstdCompressor().compress(raw)}[suffix]


def write_file(path: Path, raw: bytes) -> Path:
    """`raw` at `path`, compressed as the name ends (.gz, .zst)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(raw, next((s for s in (".gz", ".zst") if path.name.endswith(s)), "")))
    return path


def write_jsonl(path: Path, *records) -> Path:
    """One line per record: a dict is written as JSON, a str as it is."""
    return write_file(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode())


def write_parquet(path: Path, **columns) -> Path:
    """The columns as a Parquet file of 3-row groups; an empty column is a string column."""
    import polars as pl

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = {name: pl.String for name, values in columns.items() if not len(values)}
    pl.DataFrame(columns, schema_overrides=empty).write_parquet(path, row_group_size=3)
    return path


ORDER = sorted(TEXTS)  # the order prepare reads the corpus folder in

SAME_DOCUMENTS = {  # TEXTS, in ORDER, as other kinds of input
    "jsonl": lambda t: write_jsonl(t / "docs.jsonl", *({"id": i, "text": TEXTS[n]} for i, n in enumerate(ORDER))),
    "jsonl.gz": lambda t: write_jsonl(t / "docs.jsonl.gz", *({"text": TEXTS[n]} for n in ORDER)),
    "jsonl.zst": lambda t: write_jsonl(t / "docs.jsonl.zst", *({"text": TEXTS[n]} for n in ORDER)),
    "json.zst (OLMo-mix)": lambda t: write_jsonl(t / "docs.json.zst", *({"text": TEXTS[n]} for n in ORDER)),
    "parquet": lambda t: write_parquet(t / "docs.parquet", id=list(range(8)), text=[TEXTS[n] for n in ORDER]),
    "folder of .txt.gz and .txt.zst": lambda t: [write_file(t / "src" / f"{i}.txt{'.gz' if i % 2 else '.zst'}",
                                                            TEXTS[n].encode()) for i, n in enumerate(ORDER)][0].parent,
    "folder of two .jsonl shards": lambda t: [write_jsonl(t / "src" / "a.jsonl", *({"text": TEXTS[n]} for n in ORDER[:3])),
                                              write_jsonl(t / "src" / "b.jsonl", *({"text": TEXTS[n]} for n in ORDER[3:]))
                                              ][0].parent,
}


@pytest.mark.parametrize("form,kind", [(form, "byte") for form in SAME_DOCUMENTS]
                         + [("jsonl.zst", "bpe:300"), ("parquet", "bpe:300")])
def test_every_input_format_gives_the_tokens_of_the_same_text_files(corpus, tmp_path, form, kind):
    folder = prepare([corpus], tmp_path / "folder", tokenizer=kind, val_fraction=0.2)
    meta = prepare([SAME_DOCUMENTS[form](tmp_path)], tmp_path / "out", tokenizer=kind, val_fraction=0.2)
    assert meta["content_hash"] == folder["content_hash"] and meta["tokens"] == folder["tokens"]
    assert meta["documents"] == folder["documents"] and meta["skipped"] == []
    d = open_data(tmp_path / "out")
    assert sorted(texts_by_split(d)["val"]) == sorted(TEXTS[Path(n).relative_to(corpus).as_posix()]
                                                      for n in folder["val_documents"])


def test_records_are_documents_named_by_line_or_row_and_a_text_column_can_be_chosen(tmp_path):
    lines = write_jsonl(tmp_path / "a.jsonl", {"body": "first record"}, "", {"body": "third line"})
    rows = write_parquet(tmp_path / "b.parquet", body=["row one", "row two"])
    meta = prepare([lines, rows], tmp_path / "out", text_column="body", val_fraction=0.5)
    names = [f"{lines}:1", f"{lines}:3", f"{rows}:1", f"{rows}:2"]
    texts = dict(zip(names, ["first record", "third line", "row one", "row two"]))
    assert meta["text_column"] == "body" and meta["documents"] == {"train": 2, "val": 2}
    assert set(meta["val_documents"]) < set(names)
    split = texts_by_split(open_data(tmp_path / "out"))
    assert split["val"] == [texts[n] for n in names if n in meta["val_documents"]]
    assert split["train"] == [texts[n] for n in names if n not in meta["val_documents"]]


def test_only_a_compressed_json_file_is_read_as_json_lines(tmp_path):
    write_file(tmp_path / "src" / "config.json", b'{\n  "text": "one document"\n}\n')
    write_jsonl(tmp_path / "src" / "shard.json.gz", {"text": "a record"}, {"text": "another"})
    meta = prepare([tmp_path / "src"], tmp_path / "out")
    split = texts_by_split(open_data(tmp_path / "out"))
    assert meta["documents"] == {"train": 2, "val": 1}
    assert sorted(split["train"] + split["val"]) == sorted(['{\n  "text": "one document"\n}\n', "a record", "another"])


def test_a_zst_file_of_several_frames_is_read_to_its_end(tmp_path):
    import zstandard

    frames = b"".join(zstandard.ZstdCompressor().compress(part) for part in (b"one frame, ", b"two frames"))
    (tmp_path / "doc.txt.zst").write_bytes(frames)
    prepare([tmp_path / "doc.txt.zst"], tmp_path / "out")
    d = open_data(tmp_path / "out")
    assert d.decode(np.concatenate([d.train, d.val])) == "one frame, two frames"


def test_a_folder_skips_empty_records_and_files_that_are_not_text_and_says_so(tmp_path):
    src = tmp_path / "src"
    write_jsonl(src / "a.jsonl", {"text": "a doc"}, "  ", {"text": ""}, {"text": None}, '{"text": "bad \\ud800"}',
                {"text": "another doc"})
    write_file(src / "b.jsonl", b"")
    write_file(src / "c.txt.gz", b"\x89PNG\0\1")
    write_file(src / "d.txt.zst", "café".encode("latin-1"))
    write_parquet(src / "e.parquet", text=["row", None, ""])
    meta = prepare([src], tmp_path / "out", val_fraction=0.3)
    assert meta["skipped"] == [
        {"path": str(src / "a.jsonl"), "reason": "empty or null 'text'", "records": 2},
        {"path": str(src / "a.jsonl"), "reason": "'text' holds a lone surrogate, not UTF-8", "records": 1},
        {"path": str(src / "b.jsonl"), "reason": "empty"},
        {"path": str(src / "c.txt.gz"), "reason": "binary (NUL byte)"},
        {"path": str(src / "d.txt.zst"), "reason": "invalid UTF-8 at byte 3"},
        {"path": str(src / "e.parquet"), "reason": "empty or null 'text'", "records": 2}]
    split = texts_by_split(open_data(tmp_path / "out"))
    assert sorted(split["train"] + split["val"]) == ["a doc", "another doc", "row"]


def test_the_split_of_records_is_by_document_and_follows_the_seed(tmp_path):
    texts = [f"record {i} " * (1 + i % 7) for i in range(40)]
    src = write_jsonl(tmp_path / "docs.jsonl.zst", *({"text": t} for t in texts))
    val_sets = set()
    for seed in (0, 0, 1):
        meta = prepare([src], tmp_path / f"s{seed}", seed=seed, val_fraction=0.25)
        split = texts_by_split(open_data(tmp_path / f"s{seed}"))
        val_lines = [int(n.rsplit(":", 1)[1]) for n in meta["val_documents"]]
        assert split["val"] == [texts[i - 1] for i in val_lines]  # each val document whole, in source order
        assert split["train"] == [t for i, t in enumerate(texts, 1) if i not in val_lines]
        assert sum(len(t) for t in split["val"]) >= 0.25 * sum(map(len, texts))
        val_sets.add(tuple(val_lines))
    assert len(val_sets) == 2  # seed 0 twice gives one split; seed 1 another


@pytest.mark.parametrize("kind", ["byte", "bpe:300"])
def test_streaming_in_small_batches_writes_what_one_batch_writes(tmp_path, monkeypatch, kind):
    texts = [f"document {i}: " + "memory layers at scale " * (i % 9 + 1) for i in range(60)]
    src = write_jsonl(tmp_path / "docs.jsonl.gz", *({"text": t} for t in texts))
    batches = []
    real = data._batches
    monkeypatch.setattr(data, "_batches", lambda *a: (batches.append(b) or b for b in real(*a)))
    prepare([src], tmp_path / "one", tokenizer=kind, batch_bytes=1 << 30)
    assert len(batches) == 1
    batches.clear()
    prepare([src], tmp_path / "many", tokenizer=kind, batch_bytes=300)
    assert len(batches) > 10 and sum(map(len, batches)) == 60
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def test_progress_reports_each_pass_up_to_the_bytes_on_disk(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl.zst", *({"text": f"doc {i} " * 50} for i in range(20)))
    heard = []
    prepare([src], tmp_path / "out", tokenizer="bpe:300", progress=lambda *a: heard.append(a))
    stages = list(dict.fromkeys(s for s, _, _ in heard))
    assert stages == ["reading", "training BPE", "tokenizing"]
    for stage in stages:
        done = [n for s, n, total in heard if s == stage]
        assert done == sorted(done) and done[-1] == src.stat().st_size
        assert {total for s, _, total in heard} == {src.stat().st_size}


# The content hashes that the code before record formats and streaming (main at f15e63b) wrote for
# `pinned_corpus` with val_fraction=0.1, seed=7: printed by running `prepare` there on this corpus
# (twice, in separate processes, with the same result). A folder of text files keeps giving the same
# tokens, so a corpus prepared then (data/debian-en) can be rebuilt bit for bit.
PINNED_HASHES = {
    ("folder", "byte"): "sha256:cae5fd6932bdc220001ba2255525d7ce2e9e33c33e9a22f36558f345192e4325",
    ("folder", "bpe:300"): "sha256:3ae404e18edba1e3ee7942a6555e010875f94566ccd27bd14193afe18ef5b48f",
    ("one file", "byte"): "sha256:7f7f5aa80520f89ca1431f84b9dbb15a27fa9708dd46eadf81d62c1dc012a16a",
    ("one file", "bpe:300"): "sha256:12527685a17021b79af57f507b6a1913b74fa030d379672d19f52d8f2b5615da",
}
PINNED_BPE_TOKENIZER_SHA256 = "a7bdbb97fc1584b6c9800fa5295722f626d3d3e7df05b4404aa13afddc8e32b5"
PINNED_WORDS = ("memory", "layer", "value", "key", "sparse", "naïve", "café", "東京", "🙂", "top-m", "router",
                "scaling", "law", "<|endoftext|>", "token", "the", "of", "and", "a", "in")


def pinned_corpus(root: Path) -> Path:
    """24 text documents in three folders, and files that a folder read skips."""
    for i in range(24):
        words = [PINNED_WORDS[(i * 7 + j * j) % len(PINNED_WORDS)] for j in range(40 + 13 * i)]
        lines = [" ".join(words[k:k + 9]) for k in range(0, len(words), 9)]
        text = ("\r\n" if i % 5 == 0 else "\n").join(lines) + ("\n" if i % 3 else "")
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
    (root / "blob.bin").write_bytes(b"\x89PNG\0\1")
    (root / "part1" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "part2" / "empty.txt").write_bytes(b"")
    (root / ".hidden.txt").write_text("hidden")
    return root


@pytest.mark.parametrize("batch_bytes", [data.BATCH_BYTES, 100])
@pytest.mark.parametrize("source,kind", PINNED_HASHES)
def test_text_files_give_the_tokens_the_previous_code_gave(tmp_path, source, kind, batch_bytes):
    root = pinned_corpus(tmp_path / "src")
    sources = [root] if source == "folder" else [root / "part2" / "doc23.txt"]
    meta = prepare(sources, tmp_path / "out", tokenizer=kind, val_fraction=0.1, seed=7, batch_bytes=batch_bytes)
    assert meta["content_hash"] == PINNED_HASHES[source, kind]
    if (source, kind) == ("folder", "bpe:300"):
        tokenizer_json = (tmp_path / "out" / "tokenizer.json").read_bytes()
        assert hashlib.sha256(tokenizer_json).hexdigest() == PINNED_BPE_TOKENIZER_SHA256


def test_a_failed_prepare_leaves_a_previous_output_as_it_was(corpus, tmp_path):
    out = tmp_path / "out"
    prepare([corpus], out, tokenizer="bpe:300")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_file(corpus / "broken.jsonl.gz", b'{"text": "x"}\n' * 100)
    (corpus / "broken.jsonl.gz").write_bytes((corpus / "broken.jsonl.gz").read_bytes()[:-9])
    with pytest.raises(UserError, match="broken.jsonl.gz': corrupt or truncated .gz data"):
        prepare([corpus], out)  # fails while reading
    (corpus / "broken.jsonl.gz").unlink()
    with pytest.raises(UserError, match="does not give back"):
        prepare([corpus], out, tokenizer=lowercasing_tokenizer(tmp_path / "lower.json"))  # fails while writing
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# open_data


def test_open_data_reads_a_nanogpt_char_folder_with_meta_pkl(tmp_path):
    text = "to be or not to be"
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    ids = [stoi[c] for c in text]
    np.array(ids[:12], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array(ids[12:], dtype=np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    d = open_data(tmp_path)
    assert d.vocab_size == len(chars) and d.meta["format"] == "nanogpt"
    assert d.train.tolist() == ids[:12] and d.decode(d.val) == text[12:]
    assert d.encode("not") == [stoi[c] for c in "not"]


def test_open_data_assumes_gpt2_without_meta(tmp_path):
    np.array([50256, 15496, 11, 995], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([50256, 0], dtype=np.uint16).tofile(tmp_path / "val.bin")
    d = open_data(str(tmp_path))
    assert (d.vocab_size, d.train.dtype, d.meta["eot_id"]) == (50257, np.uint16, 50256)
    assert d.train.tolist() == [50256, 15496, 11, 995] and not d.train.flags.writeable
    with pytest.raises(UserError, match="no tokenizer recorded"):
        d.decode(d.val)


def test_a_meta_pkl_that_would_run_code_is_refused(tmp_path):
    np.array([1, 2], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([1, 2], dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": Path("x")}))
    with pytest.raises(UserError, match=r"meta.pkl: cannot read vocab_size \(refusing to load pathlib"):
        open_data(tmp_path)


def write_shards(folder: Path, train: bytes, val: bytes = b"\1\0\2\0", vocab: int = 10) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "train.bin").write_bytes(train)
    (folder / "val.bin").write_bytes(val)
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab}))
    return folder


@pytest.mark.parametrize("make,expected", [
    (lambda t: t / "nowhere", "data '.*nowhere': no such folder"),
    (lambda t: write_shards(t / "d", b"\1\0") / "train.bin", "is a file"),
    (lambda t: (write_shards(t / "d", b"\1\0") / "train.bin").unlink() or t / "d", r"train\.bin: missing"),
    (lambda t: write_shards(t / "d", b"\1\0\2"), r"train\.bin: corrupt shard: 3 bytes"),
    (lambda t: write_shards(t / "d", b""), r"train\.bin: corrupt shard: 0 bytes"),
    (lambda t: write_shards(t / "d", np.array([1, 2, 12, 3], np.uint16).tobytes()),
     r"train\.bin: corrupt shard: token id 12 at position 2 is ≥ vocab_size 10"),
    (lambda t: write_shards(t / "d", b"\1\0", val=np.array([9, 10], np.uint16).tobytes()),
     r"val\.bin: corrupt shard: token id 10 at position 1"),
])
def test_open_data_reports_missing_and_corrupt_shards_naming_the_file(tmp_path, make, expected):
    spec = make(tmp_path)
    with pytest.raises(UserError, match=expected) as e:
        open_data(spec)
    assert len(e.value.problems) == 1 and "\n" not in str(e.value)


def test_an_out_of_range_id_deep_in_the_last_million_is_found(tmp_path):
    ids = np.zeros(3 * data.CHECK_TOKENS, np.uint16)
    ids[-5] = 300
    write_shards(tmp_path, ids.tobytes(), vocab=257)
    with pytest.raises(UserError, match=f"token id 300 at position {len(ids) - 5} "):
        open_data(tmp_path)


def test_a_shard_that_disagrees_with_meta_json_is_corrupt(corpus, tmp_path):
    prepare([corpus], tmp_path / "out")
    val = tmp_path / "out" / "val.bin"
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"val\.bin: corrupt shard: \d+ tokens but meta\.json says \d+; re-run"):
        open_data(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# builtin


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UMV2_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builtin_is_python_source_prepared_once_into_the_cache(cache, monkeypatch):
    d = open_data("builtin")
    assert d.root.parent == cache and d.root.name.startswith("builtin-")
    assert d.vocab_size == 257 and 0.05 <= len(d.val) / (len(d.train) + len(d.val)) < 0.1
    assert 1e6 < len(d.train) + len(d.val) < 3e6
    assert d.meta["documents"] == {"train": 73 - len(d.meta["val_documents"]), "val": len(d.meta["val_documents"])}
    text = d.decode(d.train[:20000])
    assert "import " in text and "def " in text and "\n    " in text
    x, _ = get_batch(d.train, 2, 64, seed=0, index=0)
    assert d.decode(x[0]) in d.decode(d.train)  # a tensor decodes too
    stamp = (d.root / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("builtin was prepared again"))
    again = open_data("builtin")
    assert again.root == d.root and (d.root / "meta.json").stat().st_mtime_ns == stamp
    assert again.meta["content_hash"] == d.meta["content_hash"]
    assert sorted(p.name for p in cache.iterdir()) == [d.root.name]


def test_builtin_prepared_by_two_callers_at_once_ends_as_one_folder(cache, monkeypatch):
    real_prepare, calls = data.prepare, []

    def racing_prepare(*args, **kwargs):  # another caller finishes while this one prepares
        calls.append(args[1])
        if len(calls) == 1:
            data.builtin_dir()
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(data, "prepare", racing_prepare)
    root = data.builtin_dir()
    assert len(calls) == 2 and calls[0] != calls[1] != root
    assert sorted(p.name for p in cache.iterdir()) == [root.name]  # the loser's temporary folder is gone
    assert open_data("builtin").root == root


def test_builtin_in_two_processes_at_once(cache):
    code = "from umv2cli.data import open_data; print(open_data('builtin').meta['content_hash'])"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ)
             for _ in range(2)]
    hashes = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(hashes) == 1
    assert len(list(cache.iterdir())) == 1


def test_builtin_names_a_missing_pinned_file(cache, monkeypatch):
    monkeypatch.setattr(data, "BUILTIN_FILES", (*data.BUILTIN_FILES, "json/no_such_module.py"))
    with pytest.raises(UserError, match=r"builtin corpus: json/no_such_module.py is missing from this Python"):
        open_data("builtin")
    assert not cache.exists()


def test_importing_the_data_library_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, umv2cli.data; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------------------------
# get_batch


def test_get_batch_is_a_pure_function_of_seed_and_index():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 16, seed=1, index=5)
    x2, y2 = get_batch(tokens, 8, 16, seed=1, index=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, get_batch(tokens, 8, 16, seed=1, index=6)[0])
    assert not torch.equal(x, get_batch(tokens, 8, 16, seed=2, index=5)[0])


def test_get_batch_rows_are_windows_and_targets_are_shifted_by_one():
    tokens = (np.arange(5000) * 7 % 65521).astype(np.uint16)  # id ↔ position, not monotone
    x, y = get_batch(tokens, 16, 32, seed=0, index=0)
    assert x.dtype == y.dtype == torch.int64
    position = {int(t): i for i, t in enumerate(tokens)}
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = position[row_x[0]]
        assert row_x == tokens[start:start + 32].tolist() and row_y == tokens[start + 1:start + 33].tolist()


def test_get_batch_offsets_cover_exactly_the_valid_range():
    tokens = np.arange(20, dtype=np.uint16)
    starts = {s for i in range(50) for s in get_batch(tokens, 8, 16, seed=0, index=i)[0][:, 0].tolist()}
    assert starts == {0, 1, 2, 3}  # 20 tokens, seq_len 16: the last target is tokens[19]
    x, y = get_batch(tokens[:17], 2, 16, seed=0, index=0)
    assert x.tolist() == [list(range(16))] * 2 and y.tolist() == [list(range(1, 17))] * 2


def test_get_batch_on_a_split_too_short_names_the_split(corpus, tmp_path):
    prepare([corpus], tmp_path / "out")
    d = open_data(tmp_path / "out")
    with pytest.raises(UserError, match=rf"val\.bin: {len(d.val)} tokens, but a batch needs more than "
                                        rf"seq_len={len(d.val)}; lower seq_len or prepare more text"):
        get_batch(d.val, 4, len(d.val), seed=0, index=0)
    with pytest.raises(UserError, match="the token split: 3 tokens"):
        get_batch(np.arange(3), 1, 3, seed=0, index=0)
