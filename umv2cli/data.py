"""Token data: text files → token shards (`prepare`), shards → batches (`open_data`, `get_batch`).

`prepare(sources, out)` reads text files and folders and writes, into the folder `out`:

    train.bin, val.bin   flat token ids, nanoGPT's layout: np.uint16 when the vocab fits in 65,536
                         ids, else np.uint32 (`token_dtype`); <|endoftext|> between documents
    tokenizer.json       the HF `tokenizers` file, for bpe:VOCAB and PATH/tokenizer.json
    meta.json            written last: tokenizer, vocab_size, dtype, eot_id, token and document
                         counts per split, the split rule, the sources, skipped files, content_hash

Every file goes to a temporary name in `out` and is renamed into place, so a reader never sees half a
file. Runs are deterministic: the same inputs give byte-identical files (meta.json holds no time).

What counts as a document: each file is one document. A file named as a source must be UTF-8 text.
In a folder (read recursively, in sorted path order) every file is a candidate whatever its suffix,
except hidden entries (name starts with ".", e.g. .git/) and the output folder itself; a file is
skipped as binary if its first 8 KiB hold a NUL byte (git's rule) or it is not valid UTF-8, and an
empty file is skipped. meta.json lists the skipped files and why. Text is kept byte for byte (no
newline or Unicode normalization), so decoding gives back the exact file.

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

import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

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
CHECK_TOKENS = 1 << 20  # open_data range-checks this many ids at each end of a shard
GPT2_VOCAB, GPT2_EOT = 50257, 50256  # a nanoGPT folder without meta.pkl holds GPT-2 ids
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")  # looked for in a given tokenizer.json


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits (vocab ≤ 65,536, as nanoGPT assumes), else np.uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise UserError(f"vocab_size={vocab_size}: token ids must fit in uint32; use a vocab of 1 to 2^32")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------------------------
# sources → documents


class Document(NamedTuple):
    path: Path
    text: str


def find_documents(sources: list[Path], *, exclude: Path | None = None) -> tuple[list[Document], list[dict]]:
    """Read the text documents under `sources` (see the module docstring for what counts as text).
    Returns the documents in order (each file once) and the skipped files as {path, reason}."""
    if not sources:
        raise UserError("sources: none given; pass at least one text file or folder")
    docs, skipped, seen = [], [], set()
    for source in map(Path, sources):
        if not source.exists():
            raise UserError(f"source '{source}': no such file or folder; check the path")
        if source.is_file():
            text, reason = _read_text(source)
            if reason == "empty":
                skipped.append({"path": str(source.resolve()), "reason": reason})
            elif reason:
                raise UserError(f"source '{source}': {reason}, not UTF-8 text; pass text files "
                                "(convert other encodings first, e.g. iconv -f cp1252 -t utf-8)")
            elif source.resolve() not in seen:
                seen.add(source.resolve())
                docs.append(Document(source.resolve(), text))
            continue
        for path in _files_under(source, exclude):
            if path in seen:
                continue
            seen.add(path)
            text, reason = _read_text(path)
            if reason:
                skipped.append({"path": str(path), "reason": reason})
            else:
                docs.append(Document(path, text))
    if not docs:
        raise UserError(f"sources {', '.join(map(str, sources))}: no text found "
                        f"({len(skipped)} files skipped as binary, non-UTF-8 or empty); pass UTF-8 text files")
    return docs, skipped


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


def _read_text(path: Path) -> tuple[str, str | None]:
    """(text, None) for a UTF-8 text file, else ("", why it is not one)."""
    with open(path, "rb") as f:
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


def _train_bpe(texts: list[str], vocab: int):
    """A byte-level BPE (GPT-2's pre-tokenizer, no normalizer) with <|endoftext|> as id 0."""
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


def split_documents(sizes: list[int], val_fraction: float, seed: int) -> list[bool]:
    """Which documents go to val (True). Documents are shuffled by numpy PCG64(seed); val takes them
    in that order until it holds ≥ val_fraction of all bytes: at least one, leaving one for train.
    Sizes are UTF-8 bytes, so the split is the same whatever the tokenizer."""
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(sizes))
    is_val, held, target = [False] * len(sizes), 0, val_fraction * sum(sizes)
    for i in order[: len(sizes) - 1]:
        if held >= target:
            break
        is_val[i], held = True, held + sizes[i]
    return is_val


def _split_rule(val_fraction: float, seed: int) -> str:
    return (f"by document: documents shuffled by numpy PCG64(seed={seed}); val takes them in that order "
            f"until it holds >= {val_fraction:g} of the corpus's UTF-8 bytes (at least one document, leaving "
            f"one for train); each split keeps source order with {EOT} between documents; a single document "
            f"is split by tokens instead: val = its last ceil({val_fraction:g} x tokens)")


def _join(arrays: list[np.ndarray], eot_id: int) -> np.ndarray:
    """doc0 EOT doc1 EOT … docN (no EOT at either end)."""
    eot = np.array([eot_id], dtype=arrays[0].dtype)
    return np.concatenate([p for a in arrays for p in (eot, a)][1:])


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(sources: list[Path], out: Path, *, tokenizer: str = "byte", val_fraction: float = 0.05,
            seed: int = 0) -> dict:
    """Tokenize the text under `sources` into `out`/train.bin, val.bin and meta.json; return the meta.

    Everything is checked before anything is written: a bad argument raises `UserError` and leaves
    `out` as it was. `out` must be new, empty, or a previous `prepare` output (then overwritten).
    Memory: the corpus text and its token ids are held in memory at once.
    """
    out = Path(out)
    if isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must lie strictly between 0 and 1; e.g. 0.05")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed={seed}: must be a whole number ≥ 0")
    spec = parse_tokenizer_spec(tokenizer)
    _check_out_dir(out)
    docs, skipped = find_documents(list(sources), exclude=out)
    is_val = split_documents([len(d.text.encode()) for d in docs], val_fraction, seed)
    tokenized = _tokenize(docs, is_val, spec)
    train, val = _split_tokens(docs, tokenized, is_val, val_fraction)

    meta = {
        "format": FORMAT,
        "tokenizer": {"kind": spec.kind, "spec": tokenizer if spec.kind != "file" else str(spec.path),
                      "path": "tokenizer.json" if tokenized.tokenizer_json else None},
        "vocab_size": tokenized.vocab_size,
        "dtype": train.dtype.name,
        "eot_id": tokenized.eot_id,
        "tokens": {"train": len(train), "val": len(val)},
        "documents": {"train": len(docs) - sum(is_val), "val": sum(is_val)},  # one document: {1, 0}
        "val_fraction": val_fraction,
        "seed": seed,
        "split": _split_rule(val_fraction, seed),
        "sources": [str(Path(s).resolve()) for s in sources],
        "val_documents": [str(d.path) for d, v in zip(docs, is_val) if v],
        "skipped": skipped,
        "content_hash": _content_hash(train, val),
        "content_hash_of": "sha256 of the train.bin bytes followed by the val.bin bytes",
    }
    _write_outputs(out, train, val, tokenized.tokenizer_json, meta)
    return meta


class Tokenized(NamedTuple):
    ids: list[np.ndarray]  # one array per document, in token_dtype(vocab_size)
    vocab_size: int
    eot_id: int
    tokenizer_json: bytes | None  # what DIR/tokenizer.json gets (None for byte)


def _tokenize(docs: list[Document], is_val: list[bool], spec: TokenizerSpec) -> Tokenized:
    """Encode every document; bpe trains on the train documents first."""
    if spec.kind == "byte":
        dtype = token_dtype(BYTE_VOCAB)
        ids = [np.frombuffer(d.text.encode(), np.uint8).astype(dtype) for d in docs]
        return Tokenized(ids, BYTE_VOCAB, BYTE_VOCAB - 1, None)
    if spec.kind == "bpe":
        tok = _train_bpe([d.text for d, v in zip(docs, is_val) if not v], spec.vocab)
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
        tok_json, eot_id = tok.to_str().encode(), tok.token_to_id(EOT)
    else:
        tok = _load_tokenizer_file(spec.path)
        tok_json, eot_id = spec.path.read_bytes(), _eot_id(tok, spec.path)
    dtype = token_dtype(tok.get_vocab_size())
    ids = [np.array(e.ids, dtype=dtype) for e in tok.encode_batch([d.text for d in docs], add_special_tokens=False)]
    if spec.kind == "file":
        _check_round_trip(tok, docs, ids, spec.path)
    return Tokenized(ids, tok.get_vocab_size(), eot_id, tok_json)


def _split_tokens(docs: list[Document], tokenized: Tokenized, is_val: list[bool],
                  val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays: whole documents, or a single document's tail as val."""
    ids, eot_id = tokenized.ids, tokenized.eot_id
    if len(docs) > 1:
        return (_join([a for a, v in zip(ids, is_val) if not v], eot_id),
                _join([a for a, v in zip(ids, is_val) if v], eot_id))
    n_val = math.ceil(val_fraction * len(ids[0]))
    if len(ids[0]) - n_val < 1:
        raise UserError(f"source '{docs[0].path}': {len(ids[0])} tokens are too few to split into train "
                        "and val; pass more text")
    return ids[0][:-n_val], ids[0][-n_val:]


def _check_round_trip(tok, docs: list[Document], ids: list[np.ndarray], path: Path) -> None:
    for doc, a in zip(docs, ids):
        if tok.decode(a.tolist(), skip_special_tokens=False) != doc.text:
            raise UserError(f"tokenizer '{path}': decoding does not give back '{doc.path}' exactly "
                            "(it normalizes or drops text); use byte or bpe:VOCAB")


def _content_hash(train: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train).data)
    h.update(np.ascontiguousarray(val).data)
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


def _write_outputs(out: Path, train: np.ndarray, val: np.ndarray, tok_json: bytes | None, meta: dict) -> None:
    """Each file to a temporary name, then renamed; meta.json last, then a stale tokenizer.json goes."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "train.bin", train.tofile)
    write_atomic(out / "val.bin", val.tofile)
    if tok_json is not None:
        write_atomic(out / "tokenizer.json", tok_json)
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if tok_json is None:
        (out / "tokenizer.json").unlink(missing_ok=True)


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
