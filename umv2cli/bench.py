"""Speed on this device, as ratios to references. Benchmarks, not tests: nothing here asserts.

`train_overhead` answers "what does the training loop cost beyond the math?": it times whole
iterations of `train.train` (data, forward, backward, clipping, optimizer, rank-1 refresh,
metrics line) against a bare loop of forward/backward/step on the same batches, both after
warm-up, on the same model, and reports the median step times and their ratio.
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bare_step_seconds(spec, steps: int) -> list[float]:
    """Forward, backward, optimizer step and zero_grad only, on the run's own batches."""
    from umv2cli.data import get_batch, open_data
    from umv2cli.model.transformer import build_model
    from umv2cli.train import build_optimizer

    cfg, seq_len = spec.train, spec.train.seq_len or spec.model.seq_len
    data = open_data(spec.data)
    model = build_model(spec.model, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    batches = [get_batch(data.train, cfg.batch_size, seq_len, seed=cfg.seed, index=i) for i in range(steps)]
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        logits, aux = model(x)
        (F.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def loop_step_seconds(spec) -> list[float]:
    """Wall time between consecutive metrics lines of a real run: one whole loop iteration."""
    from umv2cli.train import train

    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        train(spec, Path(tmp) / "run", on_step=lambda line: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:-1])]  # the last iteration includes the final eval


def train_overhead(preset: str, *, steps: int = 40, warmup: int = 5, batch_size: int = 16) -> dict:
    """Median step time of the training loop vs the bare loop, for one model preset on CPU."""
    from umv2cli.config import run_spec_from_dict
    from umv2cli.train import configure_cpu

    configure_cpu()  # as train() does, so both loops run alike
    spec = run_spec_from_dict({"model": preset, "data": "builtin", "train": {
        "steps": steps + warmup, "batch_size": batch_size, "eval_batches": 1, "task_samples": 0,
        "device": "cpu"}})
    bare = statistics.median(bare_step_seconds(spec, steps + warmup)[warmup:])
    loop = statistics.median(loop_step_seconds(spec)[warmup:])
    return {"preset": preset, "bare_ms": 1e3 * bare, "loop_ms": 1e3 * loop, "overhead": loop / bare - 1,
            "tokens_per_step": batch_size * spec.model.seq_len}
