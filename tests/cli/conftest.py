"""The `umv2` fixture: run the CLI in this process through its real entry point."""

import sys

import pytest


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
