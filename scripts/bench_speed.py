"""Every speed measurement of issue 15 on one CUDA device, in one process: `umv2 bench all` for a
checkout that is not installed (a GPU machine with torch and Triton but not umv2's other
dependencies). Usage: python scripts/bench_speed.py OUT_DIR [--section NAME ...] [--budget-s S]

Writes OUT_DIR/results.json and OUT_DIR/results.txt after each section, and prints the tables.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import umv2cli  # noqa: E402

# installed, kernels/ and sweeps/ are umv2cli.kernels and umv2cli.sweeps (pyproject's package-dir);
# from a bare checkout, let the package find them at the top of the checkout
umv2cli.__path__.append(str(ROOT))

from umv2cli.kernel_bench import SECTIONS, render, run_all  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out")
parser.add_argument("--section", action="append", choices=SECTIONS, help="run only these, in this order")
parser.add_argument("--preset", default="ultramemv2-227m")
parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
args = parser.parse_args()
print(render(run_all(args.out, args.preset, args.section or SECTIONS, args.budget_s)))
