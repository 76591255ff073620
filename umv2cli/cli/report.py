"""`umv2 report`: one self-contained HTML page of a sweep or runs table: curves, grid, fit, verdict; with
`--format png|svg`, each figure as a static image too."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from umv2cli.cli.fit import Form


class Format(str, Enum):
    """What `umv2 report` writes: the HTML page, or the page and each figure as an image."""

    html = "html"
    png = "png"
    svg = "svg"


def report(
    path: Annotated[Path, typer.Argument(help="A sweep directory (OUT/<recipe name>) or a .csv/.parquet runs table.")],
    out: Annotated[Path | None, typer.Option(help="The HTML file (default: PATH/report.html for a sweep, "
                                                  "<table>-report.html beside a table).")] = None,
    form: Annotated[Form, typer.Option(help="The law fitted for the verdict (as `umv2 fit --form`).")] = Form.loglinear,
    bootstrap: Annotated[int, typer.Option(min=1, help="Case-bootstrap resamples: configurations with all their "
                                                       "runs, never checkpoints.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
    fmt: Annotated[Format, typer.Option("--format", help="png or svg: also write each figure as an image (for "
                                                         "papers and slides), drawn offline by kaleido in headless "
                                                         "Chromium.")] = Format.html,
    images: Annotated[Path | None, typer.Option(help="The folder of the images (default: beside the HTML file, named "
                                                     "after it: report-figures/ for report.html); implies --format "
                                                     "png unless svg is given.")] = None,
) -> None:
    """Write one HTML file that opens offline (plotly.js inlined): the verdict, loss curves, the (P, m) grid,
    the fitted law and its residuals, bootstrap distributions, iso-cost pairs, memory tasks, every run."""
    from umv2cli.errors import UserError
    from umv2cli.report import build_report

    if out is not None and out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name such as {out / 'report.html'}")
    image_format = fmt.value if fmt != Format.html else "png" if images else None
    page, written = build_report(path, out, form.value, bootstrap, seed, image_format, images)
    typer.echo(f"report: {page}")
    for image in written:
        typer.echo(f"image: {image}")
