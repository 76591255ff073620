"""`umv2 bench all`'s bookkeeping, without a GPU: the goals of issue 15 read from a results dict of
the shape `run_all` writes, and the text tables (the measurements themselves need CUDA)."""

import pytest
import torch

from umv2cli.kernel_bench import done_when, render


def results(**sections):
    env = {"device": "H100", "torch": "2.11", "triton": "3.6", "python": "3.12", "date": "2026-12-07"}
    return {"environment": env, "seconds": {}, "skipped": ["select"], "errors": {"layer": "boom"}, **sections}


LOOKUP = [  # one shape missing the backward's goal, one meeting it, one crowded onto popular rows
    {"row_bytes": 576, "m": 32, "tokens": 16384, "rows": 10**6, "fwd_ms": 0.12, "fwd_of_copy": 0.83,
     "bwd_over_fwd": 5.1, "zero_fill_over_fwd": 2.6},
    {"row_bytes": 2048, "m": 32, "tokens": 16384, "rows": 10**6, "fwd_ms": 0.4, "fwd_of_copy": 0.9,
     "bwd_over_fwd": 2.9, "zero_fill_over_fwd": 1.5},
    {"row_bytes": 768, "m": 32, "tokens": 16384, "rows": 129600, "crowd": 8, "fwd_ms": 0.15, "fwd_of_copy": 1.0,
     "bwd_over_fwd": 2.5, "zero_fill_over_fwd": 0.4},
    {"shape": (96, 192, 32, 65536, 10**8, 0), "skipped": "out of memory"},
]
TRAIN = [
    {"model": "ultramemv2-227m (Triton)", "step": "eager", "tokens_per_s": 90_000.0},
    {"model": "dense (iso-activated)", "step": "eager", "tokens_per_s": 110_000.0},
    {"model": "ultramemv2-227m (Triton)", "step": "compiled", "tokens_per_s": 80_000.0},
    {"model": "dense (iso-activated)", "step": "compiled", "error": "RuntimeError: no"},
    {"model": "ultramemv2-227m (Triton)", "step": "CUDA graph", "tokens_per_s": 120_000.0},
    {"model": "dense (iso-activated)", "step": "CUDA graph", "tokens_per_s": 200_000.0},
]


def test_goals_are_read_from_every_section():
    goals = {g["goal"]: g for g in done_when(results(
        kernels={"copy_TBps": 3.0, "lookup": LOOKUP, "select": []},
        layer=[{"path": "triton", "fb_ms": 1.0, "fb_speedup_over_torch": 4.2, "fb_speedup_over_torch+compile": 1.4},
               {"path": "torch", "fb_ms": 4.2}, {"path": "triton+cudagraphs", "error": "x"}],
        train=TRAIN[:2], train_compiled=TRAIN[2:4], train_graphed=TRAIN[4:],
        curves={"steps": 300, "max_abs_gap": 0.03, "final": {"triton": 1.50, "torch": 1.51}}))}
    met = {name: g["met"] for name, g in goals.items()}
    assert met["lookup bwd / fwd, 576 B rows, m 32, 16384 tokens"] is False
    assert met["lookup bwd / fwd, 2048 B rows, m 32, 16384 tokens"] is True
    assert met["lookup bwd / fwd, 768 B rows, m 32, 16384 tokens, 8 of m on 32 rows"] is True
    assert met["lookup fwd of copy bandwidth, 576 B rows, 16384 tokens, 1000000 rows"] is True
    assert met["layer fwd+bwd, triton over torch"] and not met["layer fwd+bwd, triton over torch+compile"]
    assert goals["training tokens/s, UltraMemV2 / dense (eager)"]["measured"] == 90_000 / 110_000
    assert goals["training tokens/s, UltraMemV2 / dense (CUDA graph)"]["measured"] == 120_000 / 200_000
    assert not any("compiled" in name for name in goals), "no dense compiled row: no compiled ratio"
    assert met[next(n for n in goals if n.startswith("curves"))] is True
    assert len(goals) == 9


def test_render_prints_goals_tables_and_failures():
    text = render(results(kernels={"copy_TBps": 3.01, "lookup": LOOKUP, "select": []}, train=TRAIN,
                          done_when=[{"goal": "g", "measured": 1.0, "target": "≤ 3", "met": True}]))
    assert text.startswith("H100, torch 2.11, triton 3.6")
    assert "errors: {'layer': 'boom'}" in text and "skipped: ['select']" in text
    assert "copy bandwidth 3.01 TB/s" in text and "out of memory" in text
    assert "training dense (iso-activated) (compiled): RuntimeError: no" in text
    assert "zero_fill_over_fwd" in text.splitlines()[text.splitlines().index(
        "value lookup, bf16 rows (fp32 gradient)") + 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the benchmarks")
def test_bench_all_without_cuda_is_one_line_and_writes_nothing(umv2, tmp_path):
    code, out, err = umv2("bench", "all", "--out", tmp_path / "bench")
    assert code == 2 and "needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bench").exists()
