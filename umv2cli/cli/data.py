"""`umv2 data prepare`: text, .jsonl and Parquet files → the token shards that training reads."""

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Token data: text → train.bin / val.bin / meta.json.", no_args_is_help=True)

TOKENIZER_HELP = (
    "byte (257 ids); bpe:VOCAB (a byte-level BPE trained here on the train documents); or "
    "PATH/tokenizer.json: any tokenizer file the HF tokenizers library saved, used as is, offline "
    "(e.g. GPT-2's or OLMo's, fetched once on a machine with network; see the README's Data section). "
    "It needs an end-of-text token and must decode every document back exactly.")


@app.command()
def prepare(
    sources: Annotated[list[Path], typer.Argument(metavar="SRC...",
        help="Files or folders (read recursively, hidden entries left out). NAME.jsonl and NAME.parquet: a "
             "document per record; NAME.gz, NAME.zst: decompressed first (x.jsonl.zst, x.txt.gz; x.json.zst "
             "is JSON lines, as OLMo-mix shards); any other file: one document. Binary, non-UTF-8 and empty "
             "text files in a folder are skipped.")],
    out: Annotated[Path, typer.Option("--out", "-o",
        help="Folder to write: new, empty, or a previous `umv2 data prepare` output.")],
    tokenizer: Annotated[str, typer.Option(help=TOKENIZER_HELP)] = "byte",
    text_column: Annotated[str, typer.Option(
        help="The field (.jsonl) or column (Parquet) that holds each record's text.")] = "text",
    val_fraction: Annotated[float, typer.Option(
        help="Share of the corpus bytes held out for val, by whole documents.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle that picks the val documents.")] = 0,
) -> None:
    """Tokenize SOURCES into OUT/train.bin and OUT/val.bin (nanoGPT layout) plus OUT/meta.json.

    Streams: a corpus larger than memory works. A progress bar shows on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from umv2cli.data import prepare as prepare_shards

    console = Console(stderr=True)
    columns = (TextColumn("{task.description:>12}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done)

        meta = prepare_shards(sources, out, tokenizer=tokenizer, text_column=text_column,
                              val_fraction=val_fraction, seed=seed, progress=progress)
    docs, tokens = meta["documents"], meta["tokens"]
    n_files = sum("records" not in s for s in meta["skipped"])
    n_records = sum(s.get("records", 0) for s in meta["skipped"])
    skipped = (f", {n_files:,} file{'s' * (n_files > 1)} skipped" if n_files else "") + \
              (f", {n_records:,} empty record{'s' * (n_records > 1)} skipped" if n_records else "")
    print(f"{tokens['train']:,} train + {tokens['val']:,} val tokens from {docs['train'] + docs['val']:,} "
          f"documents{skipped} ({meta['tokenizer']['kind']}, vocab {meta['vocab_size']}, {meta['dtype']}) "
          f"→ {out / 'meta.json'}")
