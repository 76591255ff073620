"""`umv2 model info|presets`: what a config costs, before anything is trained."""

import json
from typing import Annotated

import typer

app = typer.Typer(help="Model presets and their accounting.", no_args_is_help=True)


@app.command()
def info(
    config: Annotated[str, typer.Argument(help="A preset name (see `umv2 model presets`) or a .toml/.json config.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    bytes_per_element: Annotated[int, typer.Option(min=1, help="Bytes per table element for decode traffic (bf16: 2).")] = 2,
) -> None:
    """Parameters, FLOPs per token, memory compute share (MCP) and decode bytes of CONFIG."""
    from umv2cli.config import load_config
    from umv2cli.model.accounting import account

    cfg = load_config(config)
    acc = account(cfg, bytes_per_element)
    if as_json:
        print(json.dumps({"source": config, **acc.to_dict(), "config": cfg.to_dict()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config} ({acc.kind})", show_header=False)
    for name, value in [
        ("activated params", _count(acc.activated_params)),
        ("activated params, no embedding", _count(acc.activated_params_no_embedding)),
        ("total params", _count(acc.total_params)),
        ("total params, no embedding", _count(acc.total_params_no_embedding)),
        ("paper convention (Table 10)", f"{_count(acc.paper_convention['activated'])} activated / "
                                        f"{_count(acc.paper_convention['total'])} total"),
        ("sparse params", f"{_count(acc.sparse_params)} in {acc.n_sparse_layers} layers"),
        ("forward FLOPs per token", _count(acc.flops_per_token)),
        *[(f"  {part}", _count(f)) for part, f in acc.flops_by_component.items()],
        ("memory compute share (MCP)", f"{100 * acc.mcp:.2f}%"),
        ("decode bytes per token", _count(acc.decode_bytes_per_token, "B")),
    ]:
        table.add_row(name, value)
    Console().print(table)


@app.command()
def presets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List the presets with their kind and size."""
    from umv2cli.model.accounting import account
    from umv2cli.model.presets import PRESETS

    rows = []
    for name, make in PRESETS.items():
        cfg = make()
        acc = account(cfg)
        rows.append({"name": name, "kind": acc.kind, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                     "activated_params": acc.activated_params, "total_params": acc.total_params})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("preset", "kind", "h", "L", "activated", "total")
    for r in rows:
        table.add_row(r["name"], r["kind"], str(r["d_model"]), str(r["n_layers"]),
                      _count(r["activated_params"]), _count(r["total_params"]))
    Console().print(table)


def _count(n: float, unit: str = "") -> str:
    """1234567 → '1.23M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:g}{unit}"
