"""Token data: text → token shards (`prepare`), shards → batches (`open_data`, `get_batch`).

`prepare(sources, out)` reads text files, .jsonl and Parquet files (compressed or not) and folders of
them, and writes, into the folder `out`:

    train.bin, val.bin   flat token ids, nanoGPT's layout: np.uint16 when the vocab fits in 65,536
                         ids, else np.uint32 (`token_dtype`); <|endoftext|> between documents
    tokenizer.json       the HF `tokenizers` file, for bpe:VOCAB and PATH/tokenizer.json
    meta.json            written last: tokenizer, vocab_size, dtype, eot_id, token and document
                         counts per split, the split rule, the sources, skipped files, content_hash

Every file goes to a temporary name in `out` and is renamed into place, so a reader never sees half a
file. Runs are deterministic: the same inputs give byte-identical files (meta.json holds no time).

What counts as a document. A source is a file or a folder; a folder is read recursively, in sorted
path order, leaving out hidden entries (name starts with ".", e.g. .git/) and the output folder. A
file's name says how it is read:

    NAME.jsonl           one JSON object a line (blank lines are passed over); each record's text
                         field (`text_column`, default "text") is a document, named PATH:LINE
    NAME.parquet         each row's `text_column`, a string column, is a document, named PATH:ROW
                         (counted from 1); read PARQUET_ROWS rows at a time
    NAME.gz, NAME.zst    decompressed while read (gzip; Zstandard), then read as the rest of the name
                         says: x.jsonl.gz, x.txt.zst, x.gz (Parquet compresses inside: no x.parquet.gz);
                         x.json.gz and x.json.zst are JSON lines, as Dolma and OLMo-mix name their
                         shards (a plain x.json is a text file)
    any other name       a text file: the whole file is one document, named by its path

Text is kept byte for byte (no newline or Unicode normalization), so decoding gives back the exact
file or field.

What is skipped and what is an error. A text file found in a folder is skipped if it is binary (a
NUL byte in its first 8 KiB, git's rule), not valid UTF-8, or empty; named as a source, such a file
is an error. A record file (.jsonl, .parquet) or a compressed file must be what its name says
wherever it is: a corrupt or truncated .gz/.zst, a line that is not a JSON object or not UTF-8, a
record without the text field or with one that is not a string, a Parquet file that cannot be read
or whose column is missing or not text are errors; so is an empty record file named as a source (in
a folder it is skipped). Records whose text is empty, null or not UTF-8 (a JSON-escaped lone
surrogate) are skipped, counted per file. meta.json "skipped" lists what was skipped and why. An
error names the file (and the line or row) and the fix, and leaves `out` as it was.

Streaming. `prepare` reads the sources one document at a time, twice (three times for bpe:VOCAB):
first to check every file and measure each document (its UTF-8 bytes, for the split), then (bpe
only) to train the tokenizer on the train documents as they stream by (the trainer keeps a count per
distinct word), then to tokenize batches of about `batch_bytes` of text and append them to the
shards. Memory holds one document, one batch and its encodings (under 100 MB at the default 1 MiB),
some 30 bytes per document for the split, and the names of the val documents that meta.json lists;
never the corpus's text or token ids, so a corpus larger than memory works.

Tokenizers: ``byte`` (UTF-8 bytes 0–255, <|endoftext|> = 256, vocab 257, no files);
``bpe:VOCAB`` (a byte-level BPE trained here with HF `tokenizers` on the train documents, VOCAB ids
including <|endoftext|>; a small corpus may give fewer); ``PATH/tokenizer.json`` (an existing HF
tokenizer, copied as is, which must hold an end-of-text token and round-trip every document).
The split is by document, seeded, and the same for every tokenizer (see `split_documents`).

`open_data(spec)` reads a prepared folder, a nanoGPT folder or the ``"builtin"`` corpus (a pinned
list of CPython standard-library sources, prepared once into a cache folder) as `TokenData`:
read-only memmaps of both splits plus the tokenizer. `get_batch` draws (x, y) as a pure function of
(seed, index), so a trainer's data position is just its step.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import platform
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np

from umv2cli.errors import UserError
from umv2cli.files import write_atomic

if TYPE_CHECKING:
    import torch

FORMAT = "umv2-tokens/1"  # meta.json "format": marks a folder as a `prepare` output
EOT = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values + <|endoftext|>
OUTPUT_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
SNIFF_BYTES = 8192  # git's rule: a NUL byte in the first 8 KiB means binary
RECORD_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}  # any other name is a text file
COMPRESSIONS = {".gz": "gzip -t", ".zst": "zstd -t"}  # suffix → the command that checks such a file
PARQUET_ROWS = 1024  # rows read from a Parquet file at once
BATCH_BYTES = 1 << 20  # text tokenized at once by `prepare`; HF keeps ~50× as much per batch in its encodings
CHECK_TOKENS = 1 << 20  # open_data range-checks this many ids at each end of a shard
GPT2_VOCAB, GPT2_EOT = 50257, 50256  # a nanoGPT folder without meta.pkl holds GPT-2 ids
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")  # looked for in a given tokenizer.json


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits (vocab ≤ 65,536, as nanoGPT assumes), else np.uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise UserError(f"vocab_size={vocab_size}: token ids must fit in uint32; use a vocab of 1 to 2^32")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------------------------
# sources → input files


class Input(NamedTuple):
    """One file to read, as its name says (see the module docstring)."""

    path: Path
    format: str  # "text" | "jsonl" | "parquet"
    compression: str | None  # ".gz" | ".zst" | None
    named: bool  # named as a source (must be valid) or found in a folder (a bad text file is skipped)
    size: int  # bytes on disk, for the progress bar


def find_inputs(sources: list[Path], *, exclude: Path | None = None) -> list[Input]:
    """The files under `sources`, each once, in order: a named file as given, a folder's files in
    sorted relative path order (hidden entries and `exclude` left out)."""
    if not sources:
        raise UserError("sources: none given; pass at least one file or folder")
    inputs, seen = [], set()
    for source in map(Path, sources):
        if not source.exists():
            raise UserError(f"source '{source}': no such file or folder; check the path")
        named = source.is_file()
        for path in [source.resolve()] if named else _files_under(source, exclude):
            if path not in seen:
                seen.add(path)
                inputs.append(_input(path, named))
    return inputs


def _input(path: Path, named: bool) -> Input:
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    inner = Path(name[: -len(compression)] if compression else name).suffix
    fmt = RECORD_FORMATS.get(inner, "text")
    if inner == ".json" and compression:  # Dolma and OLMo-mix shards: JSON lines named x.json.gz, x.json.zst
        fmt = "jsonl"
    if fmt == "parquet" and compression:
        undo = "zstd -d" if compression == ".zst" else "gunzip"
        raise UserError(f"source '{path}': a Parquet file compresses its columns itself and is not read "
                        f"through {compression}; decompress it first ({undo} FILE)")
    return Input(path, fmt, compression, named, path.stat().st_size)


def _files_under(folder: Path, exclude: Path | None) -> list[Path]:
    """Every non-hidden file below `folder` (not under `exclude`), sorted by relative path."""
    folder = folder.resolve()
    exclude = exclude.resolve() if exclude else None
    found = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and root_path / d != exclude]
        found += [root_path / f for f in files if not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


# ----------------------------------------------------------------------------------------------
# input files → documents


class Document(NamedTuple):
    name: str  # the file's path; PATH:LINE for a .jsonl record, PATH:ROW for a Parquet row
    text: str


def read_documents(inputs: list[Input], text_column: str = "text", *, skipped: list[dict] | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[Document]:
    """The documents of `inputs`, one at a time, in order. What is skipped is appended to `skipped` as
    {path, reason}, with "records": how many, for the records skipped in a .jsonl or Parquet file.
    `on_bytes(n)` hears how many bytes of the inputs (as on disk) have been read, at least every MiB
    and at the end of each file."""
    done, told = 0, -1
    for inp in inputs:
        for doc, at in _documents_in(inp, text_column, skipped):
            if on_bytes and done + at - told >= 1 << 20:
                on_bytes(told := done + at)
            yield doc
        done += inp.size
        if on_bytes:
            on_bytes(told := done)


def _documents_in(inp: Input, text_column: str, skipped: list[dict] | None) -> Iterator[tuple[Document, int]]:
    """(document, bytes of the file read so far) for each document of one input."""
    if inp.format == "text":
        text, reason = _read_text(inp)
        if reason == "empty" and inp.named:
            raise UserError(f"source '{inp.path}': empty; remove it from the sources")
        if reason and inp.named:
            raise UserError(f"source '{inp.path}': {reason}, not UTF-8 text; pass text files "
                            "(convert other encodings first, e.g. iconv -f cp1252 -t utf-8)")
        if reason and skipped is not None:
            skipped.append({"path": str(inp.path), "reason": reason})
        if not reason:
            yield Document(str(inp.path), text), inp.size
        return
    records = _jsonl_records if inp.format == "jsonl" else _parquet_records
    found, skips = 0, {}
    for n, text, at in records(inp, text_column):
        if problem := _record_problem(text, text_column):
            skips[problem] = skips.get(problem, 0) + 1
        else:
            found += 1
            yield Document(f"{inp.path}:{n}", text), at
    if not found and not skips and inp.named:
        raise UserError(f"source '{inp.path}': empty, no records; remove it from the sources")
    if skipped is not None:
        skipped += [{"path": str(inp.path), "reason": why, "records": count} for why, count in skips.items()]
        skipped += [{"path": str(inp.path), "reason": "empty"}] if not found and not skips else []


def _record_problem(text: str | None, text_column: str) -> str | None:
    """Why a record's text is no document, or None. JSON can escape a lone surrogate (\\ud800), which
    is no UTF-8."""
    if not text:
        return f"empty or null '{text_column}'"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return f"'{text_column}' holds a lone surrogate, not UTF-8"
    return None


def _read_text(inp: Input) -> tuple[str, str | None]:
    """(text, None) for a UTF-8 text file, else ("", why it is not one)."""
    with _open(inp) as (f, _):
        head = f.read(SNIFF_BYTES)
        if b"\0" in head:
            return "", "binary (NUL byte)"
        data = head + f.read()
    if not data:
        return "", "empty"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return "", f"invalid UTF-8 at byte {e.start}"


def _jsonl_records(inp: Input, text_column: str) -> Iterator[tuple[int, str | None, int]]:
    """(line number, the record's text or None, bytes read) for each non-blank line."""
    with _open(inp) as (f, raw):
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"source '{inp.path}' line {n}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: invalid UTF-8 at byte {e.start} of the line; "
                                "a .jsonl file must be UTF-8 JSON, one object a line") from None
            except ValueError as e:
                raise UserError(f"{where}: not JSON ({e}); a .jsonl file holds one JSON object a line") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: a JSON {type(record).__name__}, not an object; "
                                "a .jsonl file holds one JSON object a line")
            yield n, _text_field(record, text_column, where), raw.tell()


def _text_field(record: dict, text_column: str, where: str) -> str | None:
    if text_column not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise UserError(f"{where}: no '{text_column}' field (fields: {fields}); "
                        "name the text field with --text-column")
    text = record[text_column]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: '{text_column}' is a JSON {type(text).__name__}, not a string; "
                        "name the text field with --text-column")
    return text


def _parquet_records(inp: Input, text_column: str) -> Iterator[tuple[int, str | None, int]]:
    """(row number from 1, the row's text or None, bytes read, pro rata) for each row."""
    import polars as pl

    where = f"source '{inp.path}'"
    try:
        schema = pl.read_parquet_schema(inp.path)
        if text_column not in schema:
            raise UserError(f"{where}: no column '{text_column}' (columns: {', '.join(list(schema)[:8])}); "
                            "name the text column with --text-column")
        if schema[text_column] != pl.String:
            raise UserError(f"{where}: column '{text_column}' holds {schema[text_column]}, not text; "
                            "name a string column with --text-column")
        rows = pl.scan_parquet(inp.path).select(pl.len()).collect().item()
        for start in range(0, rows, PARQUET_ROWS):
            batch = pl.scan_parquet(inp.path).select(text_column).slice(start, PARQUET_ROWS).collect()
            for n, text in enumerate(batch.to_series().to_list(), start + 1):
                yield n, text, inp.size * n // rows
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{where}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                        "re-download or re-write it") from None


@contextlib.contextmanager
def _open(inp: Input) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(the decompressed bytes, the file on disk) of one input. A corrupt or truncated .gz/.zst is a
    `UserError` naming the file and the command that checks it."""
    with open(inp.path, "rb") as raw:
        if inp.compression is None:
            yield raw, raw
            return
        stream = gzip.GzipFile(fileobj=raw) if inp.compression == ".gz" else io.BufferedReader(_ZstdReader(raw))
        try:
            yield stream, raw
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile and _ZstdReader's errors are OSErrors
            raise UserError(f"source '{inp.path}': corrupt or truncated {inp.compression} data ({e}); "
                            f"check it with `{COMPRESSIONS[inp.compression]} FILE` and fetch it again") from None


class _ZstdReader(io.RawIOBase):
    """Zstandard frames, one after another, decompressed. A stream that ends inside a frame raises
    EOFError (the zstandard package's own stream_reader returns short data there without a word);
    bytes that are not zstd raise OSError."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame, self._out, self._at = None, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(1 << 14)  # so that one call's output stays small even at high ratios
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        pieces = []
        try:
            while chunk:
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                pieces.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
        except self._error as e:
            raise OSError(str(e)) from None
        return b"".join(pieces)
# ----------------------------------------------------------------------------------------------
# tokenizers


class TokenizerSpec(NamedTuple):
    kind: str  # "byte" | "bpe" | "file"
    vocab: int | None = None  # bpe: the requested vocab
    path: Path | None = None  # file: the tokenizer.json


def parse_tokenizer_spec(spec: str) -> TokenizerSpec:
    """``byte`` | ``bpe:VOCAB`` | a path to a tokenizer.json (or to a folder holding one)."""
    if spec == "byte":
        return TokenizerSpec("byte")
    if spec.startswith("bpe:"):
        vocab = spec[4:]
        if not vocab.isdigit():
            raise UserError(f"tokenizer '{spec}': VOCAB must be a whole number, e.g. bpe:4096")
        if not BYTE_VOCAB <= int(vocab) <= 2**32:
            raise UserError(f"tokenizer '{spec}': VOCAB must be between 257 (256 bytes + {EOT}) and 2^32; "
                            "e.g. bpe:4096")
        return TokenizerSpec("bpe", vocab=int(vocab))
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".json" and path.is_file():
        return TokenizerSpec("file", path=path.resolve())
    if path.suffix == ".json":
        raise UserError(f"tokenizer '{spec}': no such file; pass an existing tokenizer.json")
    raise UserError(f"tokenizer '{spec}': unknown; use byte, bpe:VOCAB (e.g. bpe:4096) or PATH/tokenizer.json")


def _train_bpe(texts: Iterable[str], vocab: int):
    """A byte-level BPE (GPT-2's pre-tokenizer, no normalizer) with <|endoftext|> as id 0, trained on
    `texts` as they stream by (the trainer keeps word counts, not the texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _load_tokenizer_file(path: Path):
    """An HF tokenizer that reads a literal "<|endoftext|>" in text as text, not as the special id."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise UserError(f"tokenizer '{path}': cannot be read by HF tokenizers ({str(e).splitlines()[0]}); "
                        "pass a tokenizer.json saved by tokenizers") from None
    tok.encode_special_tokens = True
    return tok


def _eot_id(tok, path: Path) -> int:
    for name in EOT_NAMES:
        if (i := tok.token_to_id(name)) is not None:
            return i
    raise UserError(f"tokenizer '{path}': has none of the end-of-text tokens {', '.join(EOT_NAMES)}; "
                    f"add {EOT} as a special token or use bpe:VOCAB")


# ----------------------------------------------------------------------------------------------
# the split


def split_documents(sizes: Iterable[int] | np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents go to val (a bool per document). Documents are shuffled by numpy PCG64(seed);
    val takes them in that order until it holds ≥ val_fraction of all bytes: at least one, leaving one
    for train. Sizes are UTF-8 bytes, so the split is the same whatever the tokenizer."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(sizes))[: len(sizes) - 1]
    held_before = np.cumsum(sizes[order]) - sizes[order]  # what val holds when each document comes up
    is_val = np.zeros(len(sizes), dtype=bool)
    is_val[order[held_before < val_fraction * int(sizes.sum())]] = True  # a prefix of `order`
    return is_val


def _split_rule(val_fraction: float, seed: int) -> str:
    return (f"by document: documents shuffled by numpy PCG64(seed={seed}); val takes them in that order "
            f"until it holds >= {val_fraction:g} of the corpus's UTF-8 bytes (at least one document, leaving "
            f"one for train); each split keeps source order with {EOT} between documents; a single document "
            f"is split by tokens instead: val = its last ceil({val_fraction:g} x tokens)")


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(sources: list[Path], out: Path, *, tokenizer: str = "byte", text_column: str = "text",
            val_fraction: float = 0.05, seed: int = 0, batch_bytes: int = BATCH_BYTES,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Tokenize the documents under `sources` into `out`/train.bin, val.bin and meta.json; return the meta.

    Every argument and every input file is checked before anything is written: a bad one raises
    `UserError` and leaves `out` as it was. `out` must be new, empty, or a previous `prepare` output
    (then overwritten). `batch_bytes` of text are tokenized at once (the output does not depend on
    it). `progress(stage, done, total)` hears, for each pass over the sources ("reading", "training
    BPE", "tokenizing"), how many of their bytes on disk have been read.
    """
    out = Path(out)
    if isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must lie strictly between 0 and 1; e.g. 0.05")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed={seed}: must be a whole number ≥ 0")
    if not text_column:
        raise UserError("text_column: empty; name the text field of the .jsonl/Parquet records, e.g. text")
    spec = parse_tokenizer_spec(tokenizer)
    given = None if spec.kind == "bpe" else _encoder(spec)  # a bad tokenizer.json fails before any reading
    _check_out_dir(out)
    inputs = find_inputs(list(sources), exclude=out)
    total = sum(i.size for i in inputs)

    def read(stage: str, skipped: list[dict] | None = None) -> Iterator[Document]:
        on_bytes = (lambda n: progress(stage, n, total)) if progress else None
        return read_documents(inputs, text_column, skipped=skipped, on_bytes=on_bytes)

    skipped: list[dict] = []
    sizes = np.fromiter((len(d.text.encode()) for d in read("reading", skipped)), dtype=np.int64)
    if not len(sizes):
        raise UserError(f"sources {', '.join(map(str, sources))}: no text found ({len(skipped)} files skipped "
                        "as binary, non-UTF-8 or empty); pass UTF-8 text files, .jsonl or Parquet")
    is_val = split_documents(sizes, val_fraction, seed)
    encoder = given or _encoder(spec, lambda: (d.text for d, v in zip(read("training BPE"), is_val) if not v))
    shards = _write_shards(out, read("tokenizing"), sizes, is_val, encoder, val_fraction, batch_bytes)

    meta = {
        "format": FORMAT,
        "tokenizer": {"kind": spec.kind, "spec": tokenizer if spec.kind != "file" else str(spec.path),
                      "path": "tokenizer.json" if encoder.tokenizer_json else None},
        "vocab_size": encoder.vocab_size,
        "dtype": token_dtype(encoder.vocab_size).name,
        "eot_id": encoder.eot_id,
        "tokens": {"train": shards.train_tokens, "val": shards.val_tokens},
        "documents": {"train": len(sizes) - len(shards.val_documents), "val": len(shards.val_documents)},
        "val_fraction": val_fraction,
        "seed": seed,
        "split": _split_rule(val_fraction, seed),
        "sources": [str(Path(s).resolve()) for s in sources],
        "text_column": text_column,
        "val_documents": shards.val_documents,
        "skipped": skipped,
        "content_hash": _content_hash(out / "train.bin", out / "val.bin"),
        "content_hash_of": "sha256 of the train.bin bytes followed by the val.bin bytes",
    }
    if encoder.tokenizer_json is not None:
        write_atomic(out / "tokenizer.json", encoder.tokenizer_json)
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if encoder.tokenizer_json is None:
        (out / "tokenizer.json").unlink(missing_ok=True)
    return meta


class Encoder(NamedTuple):
    encode: Callable[[list[Document]], list[np.ndarray]]  # documents → their ids, in token_dtype(vocab_size)
    vocab_size: int
    eot_id: int
    tokenizer_json: bytes | None  # what OUT/tokenizer.json gets (None for byte)


def _encoder(spec: TokenizerSpec, train_texts: Callable[[], Iterable[str]] | None = None) -> Encoder:
    """The tokenizer of `spec`; bpe trains on `train_texts()` first."""
    if spec.kind == "byte":
        dtype = token_dtype(BYTE_VOCAB)
        return Encoder(lambda docs: [np.frombuffer(d.text.encode(), np.uint8).astype(dtype) for d in docs],
                       BYTE_VOCAB, BYTE_VOCAB - 1, None)
    if spec.kind == "bpe":
        tok = _train_bpe(train_texts(), spec.vocab)
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
        tok_json, eot_id = tok.to_str().encode(), tok.token_to_id(EOT)
    else:
        tok = _load_tokenizer_file(spec.path)
        tok_json, eot_id = spec.path.read_bytes(), _eot_id(tok, spec.path)
    dtype = token_dtype(tok.get_vocab_size())

    def encode(docs: list[Document]) -> list[np.ndarray]:
        encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
        ids = [np.array(e.ids, dtype=dtype) for e in encodings]
        if spec.kind == "file":
            _check_round_trip(tok, docs, ids, spec.path)
        return ids

    return Encoder(encode, tok.get_vocab_size(), eot_id, tok_json)


def _check_round_trip(tok, docs: list[Document], ids: list[np.ndarray], path: Path) -> None:
    for doc, text in zip(docs, tok.decode_batch([a.tolist() for a in ids], skip_special_tokens=False)):
        if text != doc.text:
            raise UserError(f"tokenizer '{path}': decoding does not give back '{doc.name}' exactly "
                            "(it normalizes or drops text); use byte or bpe:VOCAB")


class Shards(NamedTuple):
    train_tokens: int
    val_tokens: int
    val_documents: list[str]  # their names


def _write_shards(out: Path, docs: Iterator[Document], sizes: np.ndarray, is_val: np.ndarray, encoder: Encoder,
                  val_fraction: float, batch_bytes: int) -> Shards:
    """Tokenize `docs` batch by batch into `out`/train.bin and val.bin, appending each document to its
    split, in source order, with EOT between documents. A single document is split by tokens: val =
    its last ceil(val_fraction × tokens). Both files appear only once complete."""
    eot = np.array([encoder.eot_id], dtype=token_dtype(encoder.vocab_size)).tobytes()
    tokens, started, val_documents = [0, 0], [False, False], []

    def append(split: int, ids: np.ndarray, files: tuple[BinaryIO, BinaryIO]) -> None:
        if started[split]:
            files[split].write(eot)
            tokens[split] += 1
        files[split].write(ids.tobytes())
        tokens[split] += len(ids)
        started[split] = True

    def write(files: tuple[BinaryIO, BinaryIO]) -> None:
        for batch in _batches(docs, sizes, batch_bytes):
            for (i, doc), ids in zip(batch, encoder.encode([doc for _, doc in batch])):
                if len(sizes) == 1:
                    n_val = _single_document_val(doc, ids, val_fraction)
                    append(0, ids[:-n_val], files)
                    append(1, ids[-n_val:], files)
                else:
                    append(int(is_val[i]), ids, files)
                    if is_val[i]:
                        val_documents.append(doc.name)

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "train.bin", lambda train: write_atomic(out / "val.bin", lambda val: write((train, val))))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # write_atomic removed its temporary files; a bad input leaves no trace
        raise
    return Shards(tokens[0], tokens[1], val_documents)


def _batches(docs: Iterator[Document], sizes: np.ndarray,
             batch_bytes: int) -> Iterator[list[tuple[int, Document]]]:
    """(index, document) in runs of about `batch_bytes` of text; the documents must be those that
    `sizes` measured."""
    batch, held, n = [], 0, 0
    for n, doc in enumerate(docs, 1):
        if n > len(sizes):
            break
        batch.append((n - 1, doc))
        held += int(sizes[n - 1])
        if held >= batch_bytes:
            yield batch
            batch, held = [], 0
    if n != len(sizes):
        raise UserError("sources: they changed while being read (other documents than a moment ago); "
                        "re-run once they are still")
    if batch:
        yield batch


def _single_document_val(doc: Document, ids: np.ndarray, val_fraction: float) -> int:
    n_val = math.ceil(val_fraction * len(ids))
    if len(ids) - n_val < 1:
        raise UserError(f"source '{doc.name}': {len(ids)} tokens are too few to split into train and val; "
                        "pass more text")
    return n_val


def _content_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _check_out_dir(out: Path) -> None:
    """`out` may be missing, empty, or a previous `prepare` output; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out '{out}': is a file; pass a new or empty folder")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if not _is_temp_name(p.name))
    if not names:
        return
    foreign = [n for n in names if n not in OUTPUT_FILES]
    if not foreign and _read_json(out / "meta.json").get("format") == FORMAT:
        return
    what = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "") if foreign else "no umv2 meta.json"
    raise UserError(f"out '{out}': holds files that are not a `umv2 data prepare` output ({what}); "
                    "choose a new or empty folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# reading: open_data → TokenData


class Codec(NamedTuple):
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


@dataclass(frozen=True, eq=False)
class TokenData:
    """Both splits of a token folder, read-only memmaps, and the tokenizer that wrote them."""

    root: Path
    """The folder holding train.bin and val.bin."""
    meta: dict = field(repr=False)
    """meta.json (a nanoGPT folder gets an equivalent dict with format "nanogpt")."""
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, read as plain text: a literal "<|endoftext|>" is not `meta["eot_id"]`."""
        return self._codec.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids` (list, numpy array or CPU tensor); the end-of-text id reads "<|endoftext|>"."""
        return self._codec.decode(np.asarray(ids).ravel().tolist())

    @cached_property
    def _codec(self) -> Codec:
        return _load_codec(self.root, self.meta["tokenizer"])


def open_data(spec: str | Path) -> TokenData:
    """Open token data: ``"builtin"``, a `prepare` folder (meta.json), or a nanoGPT folder.

    A nanoGPT folder holds train.bin and val.bin as np.uint16 ids. Its meta.pkl (as
    data/shakespeare_char writes it) gives vocab_size and, for character data, itos/stoi; only plain
    dicts, strings and numbers are unpickled. With no meta.pkl the ids are assumed GPT-2's
    (vocab 50257, end-of-text 50256, as data/openwebtext); such data cannot be decoded offline.

    Checks (`UserError`, naming the file and the fix): the folder and both shards exist, each shard's
    size is a whole number of ids (and matches meta.json's count), and the first and last 1M ids
    of each shard are below vocab_size.
    """
    root = builtin_dir() if str(spec) == "builtin" else Path(spec).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "no such folder"
        raise UserError(f"data '{spec}': {what}; pass a folder made by `umv2 data prepare SRC --out DIR`, "
                        "a nanoGPT data folder, or builtin")
    meta = _read_meta(root)
    dtype = np.dtype(meta["dtype"])
    splits = {name: _open_shard(root / f"{name}.bin", dtype, meta["vocab_size"], meta.get("tokens", {}).get(name))
              for name in ("train", "val")}
    return TokenData(root=root, meta=meta, vocab_size=meta["vocab_size"], **splits)


def _read_meta(root: Path) -> dict:
    """meta.json; or, for a nanoGPT folder, a dict with the same keys built from meta.pkl or GPT-2."""
    if (root / "meta.json").exists():
        meta = _read_json(root / "meta.json")
        if meta.get("format") != FORMAT or not {"vocab_size", "dtype", "tokenizer"} <= meta.keys():
            raise UserError(f"{root / 'meta.json'}: not a readable `umv2 data prepare` meta.json; "
                            "re-run umv2 data prepare into this folder")
        return meta
    if (root / "meta.pkl").exists():
        try:
            with open(root / "meta.pkl", "rb") as f:
                pkl = _PlainUnpickler(f).load()
            vocab_size = int(pkl["vocab_size"])
        except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
            raise UserError(f"{root / 'meta.pkl'}: cannot read vocab_size ({e}); write a meta.pkl holding "
                            "a dict with vocab_size, as nanoGPT's prepare.py does") from None
        tokenizer = {"kind": "chars", "itos": pkl["itos"]} if "itos" in pkl else {"kind": "unknown"}
        return {"format": "nanogpt", "tokenizer": {**tokenizer, "path": "meta.pkl"}, "vocab_size": vocab_size,
                "dtype": "uint16", "eot_id": None}
    return {"format": "nanogpt", "tokenizer": {"kind": "gpt2", "path": None}, "vocab_size": GPT2_VOCAB,
            "dtype": "uint16", "eot_id": GPT2_EOT}


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: loading a meta.pkl must not run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _open_shard(path: Path, dtype: np.dtype, vocab_size: int, expected: int | None) -> np.ndarray:
    """A read-only memmap of `path`, after the cheap corruption checks."""
    fix = "re-run `umv2 data prepare`" if expected is not None else "re-create it"
    if not path.is_file():
        raise UserError(f"{path}: missing; {fix} (a data folder holds train.bin and val.bin)")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise UserError(f"{path}: corrupt shard: {size} bytes is not a positive multiple of {dtype.itemsize} "
                        f"({dtype.name}); {fix}")
    if expected is not None and size // dtype.itemsize != expected:
        raise UserError(f"{path}: corrupt shard: {size // dtype.itemsize} tokens but meta.json says {expected}; {fix}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    for start in (0, max(len(tokens) - CHECK_TOKENS, 0)):
        window = tokens[start:start + CHECK_TOKENS]
        if window.max() >= vocab_size:
            pos = start + int(np.argmax(window >= vocab_size))
            raise UserError(f"{path}: corrupt shard: token id {int(tokens[pos])} at position {pos} is ≥ "
                            f"vocab_size {vocab_size}; {fix}, or fix the vocab_size in its meta")
    return tokens


def _load_codec(root: Path, tokenizer: dict) -> Codec:
    kind = tokenizer["kind"]
    if kind == "byte":
        return Codec(lambda text: list(text.encode()), _decode_bytes)
    if kind in ("bpe", "file"):
        tok = _load_tokenizer_file(root / tokenizer["path"])
        return Codec(lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False))
    if kind == "chars":
        itos = dict(enumerate(tokenizer["itos"])) if isinstance(tokenizer["itos"], list) else tokenizer["itos"]
        stoi = {s: i for i, s in itos.items()}
        return Codec(lambda text: [stoi[c] for c in text], lambda ids: "".join(itos[i] for i in ids))

    def unavailable(_):
        raise UserError(f"{root}: no tokenizer recorded ({kind}: nanoGPT folder without itos in meta.pkl); "
                        "decode elsewhere (GPT-2 ids: tiktoken.get_encoding('gpt2'), which needs a download)")

    return Codec(unavailable, unavailable)


def _decode_bytes(ids: list[int]) -> str:
    """Byte ids → text; 256 reads "<|endoftext|>"; a broken UTF-8 sequence (a sample) reads U+FFFD."""
    pieces, start = [], 0
    for i, t in enumerate(ids + [BYTE_VOCAB - 1]):
        if t == BYTE_VOCAB - 1:
            pieces.append(bytes(ids[start:i]).decode("utf-8", errors="replace"))
            start = i + 1
    return EOT.join(pieces)


# ----------------------------------------------------------------------------------------------
# the builtin corpus

# CPython standard-library modules, pure Python and no tests: 73 files, 2.50 MB on 3.11.7 (2.53 on
# 3.12.1, 2.64 on 3.13.0). Pinned to paths that exist from 3.11 to 3.13 and that 3.14 keeps as
# files (pathlib, string, sysconfig, zipfile became packages; decimal, datetime became shims).
BUILTIN_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py", "colorsys.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py",
    "enum.py", "fnmatch.py", "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
    "graphlib.py", "gzip.py", "heapq.py", "hmac.py", "inspect.py", "ipaddress.py", "keyword.py",
    "linecache.py", "locale.py", "mimetypes.py", "numbers.py", "operator.py", "optparse.py",
    "pickle.py", "pprint.py", "queue.py", "random.py", "reprlib.py", "sched.py", "secrets.py",
    "selectors.py", "shlex.py", "shutil.py", "statistics.py", "tarfile.py", "tempfile.py",
    "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "types.py", "typing.py", "uuid.py",
    "weakref.py",
    "asyncio/locks.py", "asyncio/queues.py", "collections/__init__.py", "concurrent/futures/_base.py",
    "email/message.py", "email/utils.py", "html/parser.py", "http/client.py",
    "importlib/metadata/__init__.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "json/scanner.py", "logging/__init__.py", "tomllib/_parser.py", "unittest/case.py",
    "urllib/parse.py", "xml/dom/minidom.py",
)


def cache_dir() -> Path:
    """$UMV2_CACHE_DIR, else ~/.cache/umv2."""
    return Path(os.environ.get("UMV2_CACHE_DIR") or Path.home() / ".cache" / "umv2").expanduser()


def builtin_dir() -> Path:
    """The builtin corpus, prepared on first use (byte tokenizer, val_fraction 0.05, seed 0) into
    cache_dir()/builtin-<hash of BUILTIN_FILES and the Python version>.

    Safe under concurrency: each caller prepares into its own temporary folder and renames it into
    place; if another got there first, the rename fails and the caller uses theirs.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in BUILTIN_FILES]
    for name, path in zip(BUILTIN_FILES, files):
        if not path.is_file():
            raise UserError(f"builtin corpus: {name} is missing from this Python's standard library ({stdlib}); "
                            "prepare your own text with `umv2 data prepare SRC --out DIR` and pass DIR")
    key = hashlib.sha256("\n".join([platform.python_version(), *BUILTIN_FILES]).encode()).hexdigest()[:12]
    target = cache_dir() / f"builtin-{key}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            prepare(files, tmp, tokenizer="byte", val_fraction=0.05, seed=0)
            os.rename(tmp, target)  # atomic; fails if the target appeared meanwhile
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "meta.json").is_file():
        raise UserError(f"builtin corpus: {target} is incomplete; delete that folder and it is rebuilt")
    return target


# ----------------------------------------------------------------------------------------------
# batches


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int,
              index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, both int64 [batch_size, seq_len], y = x shifted by one token.

    The batch_size start offsets are uniform in [0, len(tokens) - seq_len) from numpy PCG64 seeded by
    SeedSequence([seed, index]): a pure function of its arguments, so batch `index` is the same on
    every call and a resumed run needs no sampler state, only its step.
    """
    import torch

    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch_size={batch_size}, seq_len={seq_len}: both must be ≥ 1")
    if len(tokens) <= seq_len:
        name = Path(tokens.filename).name if getattr(tokens, "filename", None) else "the token split"
        raise UserError(f"{name}: {len(tokens)} tokens, but a batch needs more than seq_len={seq_len}; "
                        "lower seq_len or prepare more text")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    window_BT1 = np.asarray(tokens[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(window_BT1[:, :-1].copy()), torch.from_numpy(window_BT1[:, 1:].copy())
