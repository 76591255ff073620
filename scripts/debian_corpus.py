"""Build a real-English corpus from Debian packages alone, then tokenize it with `umv2 data prepare`.

    python scripts/debian_corpus.py --out data/debian-en          # about 48 MB of text, 17.3M BPE tokens

No download but Debian packages (`apt-get download`, nothing is installed; run it on Debian or Ubuntu):

    package          text                                           licence (the package's copyright file)
    bible-kjv-text   the King James Bible, 4.3 MB (read with the    public domain text; the reader: free use with
    + bible-kjv      package's own `bible` reader)                  its legend kept
    dict-gcide       GCIDE, Webster's 1913 + WordNet, 40 MB         GPL-2+
    fortunes(-min)   the BSD fortune files, 2.6 MB                  BSD package; quotes of mixed provenance
    debian-reference the Debian Reference (English), 0.9 MB         GPL-2+

The corpus is for local experiments: the script builds it on the machine that uses it, and nothing of it is
shipped with umv2. Documents (what `prepare` splits between train and validation) are a Bible chapter, a run of
about 64 KB of whole dictionary entries, about 100 fortunes, and a chapter of the reference.

Writes ``OUT-text/`` (the documents, one UTF-8 file each, beside the token folder) and then, through `umv2 data prepare`, the token
folder ``OUT`` (train.bin, val.bin, tokenizer.json, meta.json) with a byte-level BPE of ``--vocab`` ids.
"""

import argparse
import gzip
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv", "dict-gcide", "fortunes", "fortunes-min", "debian-reference-en",
            "debian-reference-common")
CHUNK_BYTES = 64_000
"""Dictionary entries are grouped into documents of about this many bytes."""
FORTUNES_PER_DOC = 100


def fetch(packages: tuple[str, ...], into: Path) -> Path:
    """`apt-get download` the packages into ``into`` and unpack them (dpkg -x) under ``into/root``."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "-q", *packages], cwd=into, check=True, stdout=subprocess.DEVNULL)
    root = into / "root"
    for deb in sorted(into.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def bible_chapters(root: Path) -> dict[str, str]:
    """The KJV through the package's reader, one document per chapter ("Genesis 1" headings start them)."""
    text = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    parts = re.split(r"\n(?=\S[^\n]* \d+\n)", "\n" + text.strip("\n"))
    return {f"kjv/{i:04d}.txt": p.strip("\n") + "\n" for i, p in enumerate(parts) if p.strip()}


def dictionary_chunks(root: Path) -> dict[str, str]:
    """GCIDE (dictzip = gzip; cp1252 bytes) cut at entry boundaries into ~`CHUNK_BYTES` documents; the
    database's own header entries (00-database-…) are left out."""
    raw = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes()).decode("cp1252", "replace")
    entries = [e for e in re.split(r"\n\n(?=\S)", raw) if e.strip() and not e.startswith("00-database")]
    docs, chunk, size = {}, [], 0
    for entry in entries:
        chunk.append(entry.strip("\n"))
        size += len(entry)
        if size >= CHUNK_BYTES:
            docs[f"gcide/{len(docs):04d}.txt"] = "\n\n".join(chunk) + "\n"
            chunk, size = [], 0
    if chunk:
        docs[f"gcide/{len(docs):04d}.txt"] = "\n\n".join(chunk) + "\n"
    return docs


def fortune_groups(root: Path) -> dict[str, str]:
    """Each fortune file (not its .dat index or .u8 link), split at its `%` lines, in groups of
    `FORTUNES_PER_DOC`; control characters (overstriking) removed. Every file is read as Latin-1: a few are
    UTF-8 and their non-ASCII letters come out as two characters (`Ã¼` for `ü`). Kept so, because the shipped
    results were trained on exactly these tokens."""
    docs = {}
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_dir() or path.is_symlink():
            continue
        text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", path.read_bytes().decode("latin-1"))
        quotes = [q.strip("\n") for q in re.split(r"\n%\n", "\n" + text) if q.strip()]
        for i in range(0, len(quotes), FORTUNES_PER_DOC):
            docs[f"fortunes/{path.name}-{i // FORTUNES_PER_DOC:03d}.txt"] = \
                "\n\n".join(quotes[i:i + FORTUNES_PER_DOC]) + "\n"
    return docs


def reference_chapters(root: Path) -> dict[str, str]:
    """The Debian Reference's plain-text edition, one document per chapter (and the front matter)."""
    text = gzip.decompress((root / "usr/share/debian-reference/debian-reference.en.txt.gz").read_bytes())
    parts = re.split(r"\n(?=Chapter \d+\.|Appendix [A-Z]\.)", text.decode("utf-8"))
    return {f"debian-reference/{i:02d}.txt": p.strip("\n") + "\n" for i, p in enumerate(parts) if p.strip()}


def write_documents(docs: dict[str, str], folder: Path) -> int:
    """Write every document (UTF-8) under ``folder``, replacing what was there; returns the bytes written."""
    if folder.exists():
        shutil.rmtree(folder)
    total = 0
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        path.write_bytes(data)
        total += len(data)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/debian-en"), help="token folder to write")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (ids)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch(PACKAGES, Path(tmp))
        docs = {**bible_chapters(root), **dictionary_chunks(root), **fortune_groups(root),
                **reference_chapters(root)}
        text_dir = args.out.parent / f"{args.out.name}-text"
        size = write_documents(docs, text_dir)
    print(f"{len(docs)} documents, {size / 1e6:.1f} MB of text in {text_dir}", flush=True)
    subprocess.run([sys.executable, "-m", "umv2cli", "data", "prepare", str(text_dir), "--out", str(args.out),
                    "--tokenizer", f"bpe:{args.vocab}"], check=True)


if __name__ == "__main__":
    main()
