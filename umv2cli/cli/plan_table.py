"""The table of `umv2 sweep plan`: plain text, its columns chosen for the terminal's width.

A narrow terminal gets short run ids, human units and the columns that fit, dropped in the order of
`DROP` (the footer names them); `--wide` prints every column at full length, `--json` every field.
A plan longer than `LONG` runs prints its first `HEAD` and last `TAIL` rows and the ranges of the rest
(`--all` prints every row). No Rich table: 10,000 rows print in a fraction of a second.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

from umv2cli.cli.model import _count

LONG, HEAD, TAIL = 40, 20, 5
SHORT_ID = 8
"""Characters of a run id in the narrow table (its folder name starts with them)."""
GAP = "  "
SHORTHANDS = ("grid.sparse_params", "grid.topm")
"""Grid axes that the P and m columns already show (as planned, after rounding to whole tables)."""
TEXT = 16
"""A narrow table cuts longer names (grid values) to this many characters, ending them with "…"."""
DROP = ("tokens", "GPU-h", "kind", "activated", "Δ match", "FLOPs/tok", "m/N")
"""Columns a narrow terminal loses first, in this order."""
WIDE_ONLY = ("total", "FFN", "N")


@dataclass(frozen=True)
class Column:
    name: str
    cell: Callable[[dict], str]
    left: bool = False
    """Left-aligned (names and ids); numbers align right."""


def plan_lines(rows: list[dict], title: str, width: int, wide: bool = False, show_all: bool = False) -> list[str]:
    """The plan's table as lines of at most `width` characters (unless `wide`), then its notes."""
    shown = rows if show_all or len(rows) <= LONG else rows[:HEAD] + rows[-TAIL:]
    columns = _columns(rows, wide)
    cells = {c.name: [c.cell(r) for r in shown] for c in columns}
    widths = {c.name: max(len(c.name), *map(len, cells[c.name])) for c in columns}

    def too_wide() -> bool:
        return not wide and sum(widths.values()) + len(GAP) * (len(widths) - 1) > width

    if too_wide():  # long names (a grid axis of model tables) are cut first …
        widths |= {c.name: max(len(c.name), TEXT) for c in columns if c.left and widths[c.name] > TEXT}
    dropped = []
    for name in DROP:  # … then whole columns go
        if too_wide():
            dropped += [name] if widths.pop(name, None) else []
    columns = [c for c in columns if c.name in widths]

    def line(values: list[str]) -> str:
        return GAP.join(_cut(v, widths[c.name]).ljust(widths[c.name]) if c.left else v.rjust(widths[c.name])
                        for c, v in zip(columns, values)).rstrip()

    kinds = sorted({r["kind"] for r in rows})
    table = [line([c.name for c in columns])] + [line([cells[c.name][i] for c in columns]) for i in range(len(shown))]
    if len(shown) < len(rows):
        table[1 + HEAD:1 + HEAD] = [f"… {len(rows) - len(shown):,} more runs (--all prints every one) …"]
    notes = [_ranges(rows)] if len(shown) < len(rows) else []
    if dropped:
        notes.append(f"not shown at this width: {', '.join(dropped)} (--wide shows every column, --json every field)")
    return ([f"{title}: {len(rows)} runs" + ("" if "kind" in widths else f" of {', '.join(kinds)}")]
            + [ln if wide else _cut(ln, width) for ln in table] + notes)


def _columns(rows: list[dict], wide: bool) -> list[Column]:
    axes = [k for k in dict.fromkeys(k for r in rows for k in r)  # a recipe's references may add a model axis
            if k.startswith("grid.") and (wide or k not in SHORTHANDS)]
    columns = [Column("run", (lambda r: r["run_id"]) if wide else (lambda r: r["run_id"][:SHORT_ID]), left=True),
               Column("seed", lambda r: str(r["seed"]))]
    columns += [Column(a.removeprefix("grid."), lambda r, a=a: _value(r[a]) if a in r else "—", left=True) for a in axes]
    if wide or len({r["kind"] for r in rows}) > 1:
        columns.append(Column("kind", lambda r: r["kind"], left=True))
    columns += [
        Column("P", lambda r: _count(r["sparse_params"])),
        Column("m", lambda r: str(r["topm"])),
        Column("N", lambda r: _count(r["values_per_layer"])),
        Column("m/N", lambda r: _percent(r["density"])),
        Column("activated", lambda r: _count(r["activated_params"])),
        Column("total", lambda r: _count(r["total_params"])),
        Column("FLOPs/tok", lambda r: _count(r["flops_per_token"])),
        Column("tokens", lambda r: _count(r["tokens"])),
        Column("FFN", lambda r: str(r["ffn_hidden"])),
        Column("Δ match", lambda r: f"{round(100 * r['match_residual'], 2) + 0.0:+.2f}%"),  # no "-0.00%"
        Column("GPU-h", lambda r: f"{r['gpu_hours']:.2g}"),
    ]
    return [c for c in columns if wide or c.name not in WIDE_ONLY]


def _ranges(rows: list[dict]) -> str:
    """One line: the range of P, m, FLOPs/token and tokens over every run."""
    def span(key: str, fmt: Callable = _count) -> str:
        low, high = min(r[key] for r in rows), max(r[key] for r in rows)
        return fmt(low) if low == high else f"{fmt(low)}–{fmt(high)}"

    return (f"all runs: P {span('sparse_params')}, m {span('topm', str)}, m/N {span('density', _percent)}, "
            f"FLOPs/tok {span('flops_per_token')}, tokens {span('tokens')}")


def _value(v) -> str:
    """A grid value: numbers in human units, a table of model fields as compact JSON."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return _count(v)


def _percent(x: float) -> str:
    return f"{100 * x:.2g}%"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
