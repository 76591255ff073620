"""Project-wide test settings.

`umv2` runs the CLI in this process through its real entry point. Without CUDA, Triton kernels run
under its interpreter (TRITON_INTERPRET=1, set before anything imports triton); with CUDA, the tests
of Triton kernels put their tensors on it (tests/devices.py), since compiled kernels take no CPU
tensor. Some machines lack a few of umv2's dependencies (NOT_ON_EVERY_MACHINE; e.g. a GPU image
with torch and Triton but not polars): a test that needs one skips there, naming it. Under CI
(CI=true) a skipped test is a failure: tests that need Slurm or Chromium skip on a developer's
machine without them, but CI installs everything and must run them all.
"""

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under its interpreter here. The switch must be on before `triton` itself is
    # imported (triton.language's own jit functions are bound then), so it lives in the root conftest.
    os.environ.setdefault("TRITON_INTERPRET", "1")

CI = os.environ.get("CI") == "true"
NOT_ON_EVERY_MACHINE = ("polars", "plotly", "optuna", "submitit", "zstandard")
"""Dependencies that a test may find missing: test modules that import one at the top do so with
pytest.importorskip, and a test that stops on importing one skips (see `missing_package`)."""


def missing_package(error: BaseException | None) -> str | None:
    """The package of NOT_ON_EVERY_MACHINE, not installed here, whose import raised `error`."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    package = error.name.split(".")[0]
    return package if package in NOT_ON_EVERY_MACHINE and importlib.util.find_spec(package) is None else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    package = missing_package(call.excinfo.value if call.excinfo else None)
    if report.failed and package:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {package}, not installed here")
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true, a module skipped as a whole (pytest.importorskip) is a failure too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"


@pytest.fixture
def umv2(capsys, monkeypatch):
    """Run `umv2 ARGS…` through `umv2cli.cli.app.main` (exit codes included); (code, stdout, stderr)."""
    from umv2cli.cli.app import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["umv2", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
