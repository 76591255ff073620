"""Fixtures of the Triton kernel tests (helpers: kernel_checks.py)."""

import pytest
import torch


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floats (and -1 ints) while a test runs, so any
    output element a kernel fails to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
