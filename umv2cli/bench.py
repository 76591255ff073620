"""Speed on this device, as ratios to references. Benchmarks, not tests: nothing here asserts.

`train_overhead` answers "what does the training loop cost beyond the math?": it times whole
iterations of `train.train` (data, forward, backward, clipping, optimizer, rank-1 refresh,
metrics line) against a bare loop of forward/backward/step on the same batches, both after
warm-up, on the same model, and reports the median step times and their ratio.

`pack_throughput` answers "how many small runs should share a GPU?": it trains K copies of one run
at once on one GPU, in the worker pool of `umv2 sweep run --runs-per-gpu K`, and counts the tokens
of all of them per second while all of them train.

`distributed_speed` answers "what does a run on N processes gain, and what does torch.distributed
cost?": `umv2 train` under torchrun against the same run as one process without torch.distributed.
`python -m umv2cli.bench dist …` runs it without the CLI's packages (the GPU image), and
`python -m umv2cli.bench run DIR` is what torchrun starts in each process.
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from umv2cli.errors import UserError


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


# ----------------------------------------------------------------------------------------------
# plan: a side × side grid of distinct configs


def plan_seconds(side: int = 100, repeats: int = 3, match: str = "iso-flop") -> dict:
    """Median wall time of reading and planning a side × side recipe (sparse_params × topm of
    ultramemv2-227m: every run a distinct config whose table is sized, then matched), and of what
    `umv2 sweep plan` prints: the JSON of `--json`, the 80-column table, and the table with `--all`;
    imports and one small plan come first, untimed."""
    import json

    from umv2cli.cli.plan_table import plan_lines
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe

    knums = range(20, 20 + side)  # 20 layers × (D_v + D_p = 384) values of knum² rows: knum = k exactly
    text = (f'model = "ultramemv2-227m"\nmatch = "{match}"\ntokens = 1e9\n[grid]\n'
            f"sparse_params = {[20 * 384 * k * k for k in knums]}\ntopm = {list(range(1, side + 1))}\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.toml"
        path.write_text(text)
        build_plan(load_recipe(Path(__file__).parents[1] / "recipes" / "smoke.toml"))
        times = {"load_s": [], "plan_s": [], "json_s": [], "table_s": [], "table_all_s": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            recipe = load_recipe(path)
            t1 = time.perf_counter()
            runs = build_plan(recipe)
            t2 = time.perf_counter()
            json.dumps([run.row for run in runs], indent=2)
            t3 = time.perf_counter()
            "\n".join(plan_lines([run.row for run in runs], "plan", 80))
            t4 = time.perf_counter()
            "\n".join(plan_lines([run.row for run in runs], "plan", 80, show_all=True))
            t5 = time.perf_counter()
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[key].append(seconds)
    medians = {key: statistics.median(v) for key, v in times.items()}
    return {"runs": len(runs), "match": match, **medians,
            "total_s": medians["load_s"] + medians["plan_s"] + medians["json_s"]}


# ----------------------------------------------------------------------------------------------
# aggregate: a synthetic sweep of finished, failed, running and pending runs


def synthetic_sweep(sweep: Path, runs: int, rows: int, eval_every: int = 500) -> None:
    """A sweep directory shaped like `umv2 sweep run`'s: a 10 × 10 grid of (P, m) cycled over seeds,
    `rows` metrics lines per run (eval fields every `eval_every` steps and at the end), eval.json
    and STATUS. Of every 100 runs, one failed (at mid-run), one is running (its last line cut short,
    as by a kill) and one is pending (no directory); the rest are done."""
    import json

    import numpy as np
    import polars as pl

    from umv2cli.files import write_atomic

    (sweep / "runs").mkdir(parents=True)
    (sweep / "recipe.toml").write_text('name = "synthetic"\nmodel = "tiny-ultramemv2"\nmatch = "iso-flop"\n'
                                       "[grid]\ntopm = [4]\n")
    rng = np.random.default_rng(0)
    P = np.tile(np.repeat(2.0 ** np.arange(14, 24), 10), runs // 100 + 1)[:runs]
    m = np.tile(2 ** np.arange(2, 12), runs // 10 + 1)[:runs]
    tokens_per_step = 8 * 64
    plan = pl.DataFrame({
        "run_id": [f"{i:012x}" for i in range(runs)], "seed": np.arange(runs) // 100, "kind": "ultramemv2",
        "grid.sparse_params": P.astype(int), "grid.topm": m, "sparse_params": P.astype(int), "topm": m,
        "values_per_layer": (P / 32).astype(int), "density": m / (P / 32), "activated_params": 230_000,
        "total_params": 230_000 + P.astype(int), "flops_per_token": 590_000, "tokens": rows * tokens_per_step,
        "ffn_hidden": 128, "match_residual": 0.0, "gpu_hours": 1e-6, "steps": rows,
    }).with_columns(pl.selectors.integer().cast(pl.Int64))  # as the real plan's columns
    write_atomic(sweep / "plan.parquet", lambda f: plan.write_parquet(f))
    step = np.arange(1, rows + 1)
    for i, row in enumerate(plan.iter_rows(named=True)):
        fate = {97: "failed", 98: "running", 99: "pending"}.get(i % 100, "done")
        if fate == "pending":
            continue
        run = sweep / "runs" / row["run_id"]
        run.mkdir()
        floor = 2.0 + 0.5 * (row["sparse_params"] / 2**14) ** -0.1 * (row["topm"] / 4) ** -0.05
        train = pl.DataFrame({"step": step, "tokens": step * tokens_per_step, "lr": 3e-3,
                              "train_loss": floor + 4 / np.sqrt(step) + rng.normal(0, 0.01, rows),
                              "grad_norm": rng.random(rows), "tokens_per_s": 1e4 * rng.random(rows)})
        lines = train.write_ndjson().splitlines()
        final = {}
        for s in [*range(eval_every, rows, eval_every), rows]:
            final = {"step": s, "train_loss": floor + 4 / np.sqrt(s), "eval_loss": floor + 4 / np.sqrt(s) + 0.05,
                     "memory_values_touched": 0.5, "task_associative_recall": 0.25}
            lines[s - 1] = lines[s - 1][:-1] + ", " + json.dumps(final)[1:]
        if fate == "failed":
            lines = lines[: rows // 2]
            (run / "STATUS").write_text(f"failed: non-finite loss (nan) at step {rows // 2 + 1}\n")
        elif fate == "running":
            lines = lines[: rows // 2] + [lines[rows // 2][:20]]
        (run / "metrics.jsonl").write_text("\n".join(lines) + ("" if fate == "running" else "\n"))
        if fate == "done":
            (run / "eval.json").write_text(json.dumps(final, indent=2) + "\n")
            (run / "STATUS").write_text("done\n")


def aggregate_seconds(runs: int = 1000, rows: int = 10_000, repeats: int = 3,
                      at_flops: tuple[float, ...] = (1e12, 3e12, 1e13)) -> dict:
    """Median wall time of `aggregate` over a synthetic sweep (page cache warm: it was just
    written), by default and with FLOP budgets, against parsing every metrics line with Polars."""
    import polars as pl

    from umv2cli.sweeps.aggregate import aggregate

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        synthetic_sweep(sweep, runs, rows)
        build = time.perf_counter() - t0
        paths = sorted(str(p.parent / "metrics.jsonl") for p in sweep.glob("runs/*/STATUS"))  # no line cut short
        return {"runs": runs, "rows_per_run": rows,
                "metrics_bytes": sum(p.stat().st_size for p in sweep.glob("runs/*/metrics.jsonl")),
                "build_s": build, "default_s": timed(lambda: aggregate(sweep)),
                "at_flops_s": timed(lambda: aggregate(sweep, at_flops)), "budgets": len(at_flops),
                "parse_every_line_s": timed(lambda: parse_every_line(paths))}


def parse_every_line(paths: list[str]) -> "pl.DataFrame":
    """The reference: what the default aggregate reads (last step, final train loss) by parsing every
    line of the finished runs' metrics."""
    import polars as pl

    return (pl.scan_ndjson(paths, include_file_paths="path", ignore_errors=True).group_by("path")
            .agg(pl.col("step").max(), pl.col("train_loss").tail(10).mean()).collect())


# ----------------------------------------------------------------------------------------------
# fit: the case bootstrap of a 64-run loglinear fit


def synthetic_runs(seeds: int = 4, noise: float = 0.01) -> "pl.DataFrame":
    """A runs table for `umv2 fit`: a 4 × 4 (P, m) grid × `seeds` runs, log L = 1.5 − 0.02·log P − 0.04·log m
    + 0.001·log P·log m + N(0, noise²)."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    P, m, seed = (a.ravel() for a in np.meshgrid(2.0 ** np.arange(4) * 1e8, 2.0 ** np.arange(4) * 32,
                                                 np.arange(seeds), indexing="ij"))
    lL = 1.5 - 0.02 * np.log(P) - 0.04 * np.log(m) + 0.001 * np.log(P) * np.log(m)
    return pl.DataFrame({"run_id": [f"run-{i}" for i in range(len(P))], "sparse_params": P, "topm": m,
                         "activated_params": 2e8, "total_params": 2e8 + P, "tokens": 4e9, "flops_per_token": 4e8,
                         "seed": seed, "loss": np.exp(lL + noise * rng.standard_normal(len(P)))})


def fit_seconds(resamples: int = 2000, seeds: int = 4, repeats: int = 3) -> dict:
    """Median wall time of the case bootstrap of a `loglinear` fit of 16 configurations × `seeds` runs (64 by
    default), and of the whole `run_fit` (fit, bootstrap, leave-one-config-out, extrapolation split, iso-cost
    pairs) that `umv2 fit --bootstrap RESAMPLES` runs; one untimed run first."""
    import numpy as np

    from umv2cli import fit

    runs = fit.runs_from_frame(synthetic_runs(seeds))
    centre = fit.design_centre(runs)
    law = fit.fit_form(runs, "loglinear", centre)

    def timed(fn) -> tuple[float, object]:
        out, times = fn(), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    boot_s, boot = timed(lambda: fit.bootstrap(runs, "loglinear", law, centre, resamples, seed=0))
    run_fit_s, report = timed(lambda: fit.run_fit(runs, "loglinear", resamples, seed=0))
    return {"runs": len(runs.run_ids), "resamples": resamples, "bootstrap_s": boot_s, "run_fit_s": run_fit_s,
            "failed": int(np.isnan(boot[:, 0]).sum()), "R": report["R"], "R_ci": report["R_ci"]}


# ----------------------------------------------------------------------------------------------
# pack: K small runs sharing one GPU, as `umv2 sweep run --runs-per-gpu K` places them


PACK_TRAIN = {"steps": 1_000_000, "batch_size": 32, "seq_len": 128, "eval_batches": 1, "task_samples": 0}
"""Training of the default packed run: the time limit ends it, long before its steps."""


def pack_spec(recipe: Path | None, preset: str):
    """The run to pack: the recipe's middle grid point at its first seed, else `preset` on the builtin
    corpus (PACK_TRAIN)."""
    import dataclasses

    from umv2cli.config import run_spec_from_dict
    from umv2cli.sweeps.plan import build_plan
    from umv2cli.sweeps.recipe import load_recipe

    if recipe is None:
        return run_spec_from_dict({"model": preset, "data": "builtin", "train": PACK_TRAIN})
    loaded = load_recipe(recipe)
    middle = {axis: [value] for axis, value in loaded.middle().items()}
    plan = build_plan(dataclasses.replace(loaded, grid=middle, seeds=loaded.seeds[:1], corner_seeds=()))
    return next(run.spec for run in plan if not run.row.get("reference"))  # not a dense or MoE reference


def pack_run(spec, run_dir: Path, meeting: Path, runs: int, seconds: float) -> dict:
    """In a worker: train `spec`; after its first step, wait until all `runs` runs have had theirs
    (each leaves a file in `meeting`), so that they train together from then on; stop it `seconds`
    later as a stopping pool does (train's stop signal: a checkpoint, then it returns). The end time
    and the tokens of every step after the first (from its metrics line), and the GPU memory it
    reserved at most."""
    import signal

    from umv2cli.sweeps.workers import pool_stopping, stop_if_pool_stops
    from umv2cli.train import train

    steps: list[tuple[float, int]] = []

    def on_step(line: dict) -> None:
        stop_if_pool_stops(line)
        if not steps:  # the first step (Triton compiles here): meet the other runs
            (meeting / run_dir.name).touch()
            while len(list(meeting.iterdir())) < runs and not pool_stopping():
                time.sleep(0.01)
        steps.append((time.time(), line["tokens"]))
        if steps[-1][0] - steps[0][0] >= seconds:
            signal.raise_signal(signal.SIGTERM)

    train(spec, run_dir, on_step=on_step)
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_initialized() else 0
    return {"steps": steps, "gpu_reserved_gb": reserved / 1e9}


def overlap_throughput(runs: list[list[tuple[float, int]]], warmup: float) -> dict:
    """Tokens/s of runs trained at once: the tokens of the steps that all of them ended in the
    window where every run was training and past its first `warmup` seconds, over that window."""
    start = max(steps[0][0] for steps in runs) + warmup
    end = min(steps[-1][0] for steps in runs)
    if end <= start:
        raise UserError(f"the runs trained together for {end - start + warmup:.1f} s only, not past a {warmup} s "
                        "warm-up; raise --seconds")
    tokens = sum(b[1] - a[1] for steps in runs for a, b in zip(steps, steps[1:]) if start < b[0] <= end)
    return {"window_s": end - start, "tokens": tokens, "tokens_per_s": tokens / (end - start)}


def pack_throughput(spec, runs_per_gpu: list[int], gpu: str, seconds: float = 20, warmup: float = 2) -> list[dict]:
    """For each K of `runs_per_gpu`: K copies of `spec` (seeds 0 … K-1) trained at once on `gpu` by a
    pool of K workers placed as `umv2 sweep run --runs-per-gpu K` places them; their tokens/s in all
    (`overlap_throughput`), per run, and against K = 1 (the first K), and their GPU memory."""
    import dataclasses

    from umv2cli.sweeps.workers import WorkerPool, first_done, plan_workers

    rows = []
    for k in runs_per_gpu:
        specs = [dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=seed)) for seed in range(k)]
        with tempfile.TemporaryDirectory() as tmp, WorkerPool(plan_workers([gpu], os.sched_getaffinity(0), k)) as pool:
            (Path(tmp) / "meeting").mkdir()
            futures = [pool.submit(pack_run, s, Path(tmp) / f"run{i}", Path(tmp) / "meeting", k, seconds)
                       for i, s in enumerate(specs)]
            waiting = set(futures)
            while waiting:  # in ticks, so that Ctrl-C stops the pool
                waiting -= first_done(waiting)
            runs = [future.result() for future in futures]
        row = {"runs_per_gpu": k, **overlap_throughput([r["steps"] for r in runs], warmup),
               "gpu_reserved_gb": max(r["gpu_reserved_gb"] for r in runs)}
        row["tokens_per_s_per_run"] = row["tokens_per_s"] / k
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# dist: a run on several processes against the one-process loop

COLLECTIVES = {"SendRecv": "all_to_all", "AllGather": "all_gather", "ReduceScatter": "reduce_scatter",
               "AllReduce": "all_reduce", "Broadcast": "broadcast"}
"""NCCL kernel name parts → the collective (torch's all-to-all runs as NCCL's grouped SendRecv)."""


def distributed_speed(preset: str = "ultramemv2-227m", *, processes: int = 1, memory_parallel: int = 1,
                      data_parallel: str = "ddp", batch_size: int = 8, seq_len: int = 2048, steps: int = 30,
                      warmup: int = 5, baseline: bool = True, profile: bool = False) -> dict:
    """Median training tokens/s (whole steps: data, forward, backward, exchanges, clipping, AdamW)
    of `preset` on the builtin data under torchrun as `processes` processes (NCCL on GPUs), and of the
    same run as one process without torch.distributed (`baseline`); each in fresh processes, one after
    the other. `batch_size` is the global micro-batch: each process reads batch_size/processes of it.
    Also the largest loss gap between the two runs over the steps, and with `profile` the share of a
    step that rank 0's NCCL kernels take, by collective (all_to_all: the memory layers' exchanges;
    kernels on their own streams may overlap computation, so these shares bound what they cost)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from umv2cli.config import run_spec_from_dict
    from umv2cli.train import create_run_dir, read_metrics

    train = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "eval_batches": 1, "task_samples": 0,
             "data_parallel": data_parallel, "memory_parallel": memory_parallel}
    spec = run_spec_from_dict({"model": preset, "data": "builtin", "train": train})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]

    def timed(spec, out: Path, launcher: list[str], profile: bool = False) -> tuple[list[dict], dict]:
        """The run's metrics and its profile; its directory is removed (a 227M checkpoint is ~15 GB)."""
        create_run_dir(spec, out)
        command = [*launcher, "-m", "umv2cli.bench", "run", str(out), *(["--profile"] if profile else [])]
        subprocess.run(command, env=env, check=True)
        metrics, shares = read_metrics(out), json.loads((out / "profile.json").read_text()) if profile else {}
        shutil.rmtree(out)
        return metrics, shares

    def tokens_per_s(metrics: list[dict]) -> float:
        return statistics.median(m["tokens_per_s"] for m in metrics[warmup:])

    with tempfile.TemporaryDirectory() as tmp:
        many, shares = timed(spec, Path(tmp) / "dist", torchrun, profile)
        result = {"preset": preset, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "processes": processes, "memory_parallel": memory_parallel, "data_parallel": data_parallel,
                  "tokens_per_step": batch_size * seq_len, "tokens_per_s": tokens_per_s(many)}
        if profile:
            result["collective_share"] = shares
        if baseline:
            one_spec = run_spec_from_dict({**spec.to_dict(), "train": {**spec.to_dict()["train"], "memory_parallel": 1}})
            one, _ = timed(one_spec, Path(tmp) / "one", [sys.executable])
            result |= {"one_process_tokens_per_s": tokens_per_s(one),
                       "ratio": tokens_per_s(many) / tokens_per_s(one),
                       "scaling": tokens_per_s(many) / (processes * tokens_per_s(one)),
                       "max_loss_gap": max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(many, one))}
    return result


def run_for_bench(out: Path, profile: bool) -> None:
    """Train the run in `out` (this process's part of it, under torchrun); with `profile`, rank 0
    writes the share of a step that each collective's NCCL kernels take to out/profile.json."""
    import json
    import os

    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    from umv2cli.rundir import read_metrics, read_run_spec
    from umv2cli.train import train

    spec = read_run_spec(out)
    if not profile:
        train(spec, out, resume=True)
        return
    wait, active = 5, 5  # profile steps 8-12, after warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities, schedule=schedule(wait=wait, warmup=2, active=active, repeat=1)) as prof:
        train(spec, out, resume=True, on_step=lambda line: prof.step())
    if os.environ.get("RANK", "0") != "0":
        return
    kernel_s = dict.fromkeys(COLLECTIVES.values(), 0.0)
    for event in prof.key_averages():
        for part, name in COLLECTIVES.items():
            if "nccl" in event.key.lower() and part.lower() in event.key.lower():
                kernel_s[name] += event.self_device_time_total / 1e6
    metrics = read_metrics(out)
    step_s = statistics.median(spec.train.batch_size * (spec.train.seq_len or spec.model.seq_len)
                               * spec.train.grad_accum / m["tokens_per_s"] for m in metrics[wait + 2:wait + 2 + active])
    (out / "profile.json").write_text(json.dumps({k: v / (active * step_s) for k, v in kernel_s.items()}))


def main(argv: list[str] | None = None) -> None:
    """`python -m umv2cli.bench dist [options]` prints `distributed_speed` as JSON; `python -m umv2cli.bench
    run DIR [--profile]` is one process of the run in DIR."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m umv2cli.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("out", type=Path)
    run.add_argument("--profile", action="store_true")
    dist = commands.add_parser("dist")
    dist.add_argument("--preset", default="ultramemv2-227m")
    for name, default in (("processes", 1), ("memory-parallel", 1), ("batch-size", 8), ("seq-len", 2048),
                          ("steps", 30), ("warmup", 5)):
        dist.add_argument(f"--{name}", type=int, default=default)
    dist.add_argument("--data-parallel", choices=("ddp", "fsdp"), default="ddp")
    dist.add_argument("--no-baseline", action="store_true")
    dist.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_for_bench(args.out, args.profile)
        return
    print(json.dumps(distributed_speed(
        args.preset, processes=args.processes, memory_parallel=args.memory_parallel, data_parallel=args.data_parallel,
        batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
        baseline=not args.no_baseline, profile=args.profile), indent=2))


if __name__ == "__main__":
    main()
