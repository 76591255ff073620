"""`umv2 train`: one training run, with a progress bar; `--resume DIR` continues one."""

import os
from pathlib import Path
from typing import Annotated

import typer

LAYOUT = "Layout of a run on several processes"


def train(
    config: Annotated[Path | None, typer.Argument(
        help="A run config (.toml/.json) with `model` (a preset name or a table of model fields), "
             "`[train]` and `data`; or a model config file.", dir_okay=False)] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (see `umv2 model presets`).")] = None,
    data: Annotated[str | None, typer.Option(help="Prepared data directory, or \"builtin\".")] = None,
    steps: Annotated[int | None, typer.Option(help="[train] steps: optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="[train] lr: the peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="[train] batch_size: sequences per micro-batch.")]
    = None,
    seq_len: Annotated[int | None, typer.Option(min=1, help="[train] seq_len: tokens per sequence (at most the "
                                                            "model's).")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="[train] ckpt_every: checkpoint every N steps.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="[train] eval_every: evaluate every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="[train] seed: of the weights and the data order.")] = None,
    device: Annotated[str | None, typer.Option(help="[train] device: auto, cpu, cuda or cuda:N.")] = None,
    use_compile: Annotated[bool | None, typer.Option("--compile/--no-compile",
                                                     help="[train] compile: run the model through torch.compile.")] = None,
    out: Annotated[Path | None, typer.Option(help="The run directory to create.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    data_parallel: Annotated[str | None, typer.Option(
        help="ddp or fsdp: how the processes of a distributed run hold the dense backbone (with --resume too).",
        rich_help_panel=LAYOUT)] = None,
    memory_parallel: Annotated[int | None, typer.Option(
        min=1, help="Processes that split each memory table by columns (with --resume too).",
        rich_help_panel=LAYOUT)] = None,
) -> None:
    """Train one model; results go to --out (spec.json, metrics.jsonl, eval.json, ckpt/, STATUS).

    The [train] flags override those fields of CONFIG's [train] table. Under torchrun
    (`torchrun --nproc-per-node N -m umv2cli train …`) the N processes train it together."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from umv2cli.config import run_spec_from_dict
    from umv2cli.errors import UserError
    from umv2cli.parallel import RanksLost
    from umv2cli.rundir import read_run_spec
    from umv2cli.train import RunFailed, train as run_training

    if (out is None) == (resume is None):
        raise UserError("give exactly one of --out DIR (a new run) or --resume DIR (continue one)")
    layout = {"data_parallel": data_parallel, "memory_parallel": memory_parallel}
    overrides = {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "ckpt_every": ckpt_every,
                 "eval_every": eval_every, "seed": seed, "device": device, "compile": use_compile}
    if resume is None:
        spec = _run_spec(config, preset, data, overrides | layout)
    elif any(v is not None for v in (config, preset, data, *overrides.values())):
        raise UserError("--resume DIR continues the run as its spec.json says; drop the other options "
                        "(but --data-parallel and --memory-parallel, which may change)")
    else:
        spec = read_run_spec(resume)
        given = {k: v for k, v in layout.items() if v is not None}
        if given:  # the layout is not part of the run: it may resume on other processes
            spec = run_spec_from_dict({**spec.to_dict(), "train": {**spec.to_dict()["train"], **given}},
                                      where="options")
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun every process runs this; rank 0 reports
    columns = (TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not lead) as progress:
        bar = progress.add_task("train", total=spec.train.steps, loss=float("nan"), tps=0.0)
        try:
            result = run_training(spec, out or resume, resume=resume is not None,
                                  on_step=lambda m: progress.update(bar, completed=m["step"], loss=m["train_loss"],
                                                                    tps=m["tokens_per_s"]))
        except (RunFailed, RanksLost) as e:
            if lead:
                typer.echo(f"{'failed' if isinstance(e, RunFailed) else 'stopped'}: {e}", err=True)
            raise typer.Exit(1) from None
    if not lead:
        raise typer.Exit(0 if result.status == "done" else 3)
    final = result.final
    typer.echo(f"{result.status}: step {result.step}, train_loss {final.get('train_loss', float('nan')):.4f}"
               + (f", eval_loss {final['eval_loss']:.4f}" if "eval_loss" in final else ""))
    typer.echo(f"results in {result.out}/ (metrics.jsonl, eval.json, ckpt/, STATUS)")
    if result.status != "done":
        raise typer.Exit(3)  # stopped by a signal; resumable with --resume


def _run_spec(config: Path | None, preset: str | None, data: str | None, train_overrides: dict):
    from umv2cli.config import read_table, run_spec_from_dict
    from umv2cli.errors import UserError

    raw: dict = {}
    if config is not None:
        raw = read_table(config)
        if "model" not in raw and "train" not in raw:  # a plain model config file
            raw = {"model": raw}
    if preset is not None:
        raw["model"] = preset
    if "model" not in raw:
        raise UserError("no model: give --preset NAME or a CONFIG file with a `model` entry")
    if data is not None:
        raw["data"] = data
    raw["train"] = {**raw.get("train", {}), **{k: v for k, v in train_overrides.items() if v is not None}}
    return run_spec_from_dict(raw, where=str(config or "options"))

