"""`umv2 data prepare`: text files → the token shards that training reads."""

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Token data: text files → train.bin / val.bin / meta.json.", no_args_is_help=True)


@app.command()
def prepare(
    sources: Annotated[list[Path], typer.Argument(metavar="SRC...",
        help="Text files or folders (read recursively; hidden, binary and non-UTF-8 files skipped).")],
    out: Annotated[Path, typer.Option("--out", "-o",
        help="Folder to write: new, empty, or a previous `umv2 data prepare` output.")],
    tokenizer: Annotated[str, typer.Option(
        help="byte (257 ids), bpe:VOCAB (trained here), or PATH/tokenizer.json (HF, used as is).")] = "byte",
    val_fraction: Annotated[float, typer.Option(
        help="Share of the corpus bytes held out for val, by whole documents.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle that picks the val documents.")] = 0,
) -> None:
    """Tokenize SOURCES into OUT/train.bin and OUT/val.bin (nanoGPT layout) plus OUT/meta.json."""
    from umv2cli.data import prepare as prepare_shards

    meta = prepare_shards(sources, out, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed)
    docs, tokens = meta["documents"], meta["tokens"]
    n_skipped = len(meta["skipped"])
    skipped = f", {n_skipped} file{'s' * (n_skipped > 1)} skipped" if n_skipped else ""
    print(f"{tokens['train']:,} train + {tokens['val']:,} val tokens from {docs['train'] + docs['val']} "
          f"documents{skipped} ({meta['tokenizer']['kind']}, vocab {meta['vocab_size']}, {meta['dtype']}) "
          f"→ {out / 'meta.json'}")
