"""One training run: the unit of work a sweep launches many times.

`train(spec, out)` starts a run and `train(rundir.read_run_spec(out), out, resume=True)` continues
one. A run directory holds:

    LOCK           held by the process that trains the run (`umv2cli.rundir`: a second writer is refused)
    spec.json      the full resolved `RunSpec` (written once, at the start)
    metrics.jsonl  one JSON line per optimizer step; eval steps add their results to the line
    eval.json      the final evaluation
    ckpt/last.pt   model, optimizer, step (which is the data position) and every RNG state
                   (a run on several processes: ckpt/sharded-<step>/, named by ckpt/sharded.json)
    STATUS         written last: "done", or "failed: <reason> at step <n>"

Every file is written to a temporary name and renamed, and read back through `umv2cli.rundir`'s
checks. The data order is a pure function of (seed, step) (`data.get_batch`) and the learning rate
a pure function of the step, so a checkpoint needs no sampler or scheduler state, and a run killed
at any moment and resumed from its last checkpoint ends exactly where an uninterrupted run would
(bit for bit on CPU). SIGTERM, SIGUSR1 and SIGUSR2 (Slurm's warning signals) make the loop
checkpoint after the current step and stop. A NaN or Inf loss or gradient norm stops the run with
STATUS "failed: …"; so does a write that fails (disk full: "failed: disk full at step n"; the last
checkpoint stays intact), and a damaged file of the run found on resuming ("failed: damaged
ckpt/last.pt (…)"). Started by torchrun or as a Slurm job of several tasks, the run spreads over
the processes (`umv2cli.parallel`); the loop's few calls to it are `if dist:` branches, and one
process runs exactly as before.
"""

import contextlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from umv2cli import parallel, rundir
from umv2cli.config import RunSpec, TrainConfig
from umv2cli.errors import UserError
from umv2cli.files import Damaged, WriteError, make_dir, write_atomic
from umv2cli.rundir import read_metrics

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class RunFailed(Exception):
    """The run stopped and its STATUS says why (e.g. a non-finite loss)."""


@dataclass(frozen=True)
class RunResult:
    out: Path
    status: str
    """"done", "stopped by SIGTERM at step n" (resumable) or "failed: … at step n"."""
    step: int
    final: dict
    """The last metrics line."""


# ----------------------------------------------------------------------------------------------
# schedules (pure functions of the step)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based):
    1) linear warmup over warmup·steps; 2) cosine to min_lr_ratio, or (WSD) constant then a linear
    cooldown to min_lr_ratio over the last cooldown·steps."""
    warmup = math.ceil(cfg.warmup * cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = cfg.steps - math.ceil(cfg.cooldown * cfg.steps)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / max(1, cfg.steps - decay_start)
    return 1 - (1 - cfg.min_lr_ratio) * progress


def value_lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Extra multiplier of the memory tables' lr: constant k, or k → 1 linearly over the run
    (the official code's mem_value_lr_times with max_steps_rate 1; docs/fidelity.md §4)."""
    if not cfg.value_lr_decay:
        return cfg.value_lr_mult
    return 1 + (cfg.value_lr_mult - 1) * max(0.0, 1 - step / cfg.steps)


# ----------------------------------------------------------------------------------------------
# files of a run


def save_checkpoint(out: Path, model, optimizer, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    make_dir(out / "ckpt")
    write_atomic(out / "ckpt" / "last.pt", lambda f: torch.save(state, f))


def load_checkpoint(out: Path, model, optimizer) -> int:
    """Restore the checkpoint's state into `model`, `optimizer` and every RNG; its step. Call it inside
    `rundir.reading(...)`: a truncated or foreign checkpoint fails anywhere in here."""
    state = torch.load(out / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state["step"]


def configure_cpu() -> None:
    """Threads from the CPUs this job was given (Slurm's allocation, else the affinity mask shared
    by the run's processes on this machine), and denormal floats flushed to zero: early in
    training they made CPU steps 60× slower here."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes of a run on this machine
    torch.set_num_threads(int(slurm) if slurm else max(1, len(os.sched_getaffinity(0)) // local))
    torch.set_flush_denormal(True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r}: no CUDA device here; use \"cpu\" or \"auto\"")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# evaluation


EVAL_SEED = 0
"""Seed of the validation batches and the memory-task samples: the same for every run, whatever its training
seed, so every run of a sweep is scored on the same held-out tokens and seed-to-seed spread is training noise."""
TASK_SEQ_LEN = 128
"""The memory tasks' sequences are the run's, up to this many tokens."""
HEALTH_TOKENS = 4096
"""UltraMemV2 layer health is measured on the first this many validation tokens of each layer's input: a bounded
sample (HEALTH_TOKENS × d_model activations per layer), the same tokens in every run."""


@torch.no_grad()
def evaluate(model, data, spec: RunSpec, device: torch.device) -> dict:
    """Validation loss on fixed batches, memory-task accuracies, and UltraMemV2 layer health, all drawn with
    `EVAL_SEED`."""
    from umv2cli.data import get_batch
    from umv2cli.evals import memory_task_accuracies
    from umv2cli.model.ultramemv2 import UltraMemV2, selection_health

    cfg, seq_len = spec.train, spec.train.seq_len or spec.model.seq_len
    was_training = model.training
    model.eval()
    inputs: dict[int, list[torch.Tensor]] = {}

    def keep_sample(i: int, u: torch.Tensor) -> None:
        kept = sum(len(t) for t in inputs.get(i, []))
        if kept < HEALTH_TOKENS:
            inputs.setdefault(i, []).append(u.flatten(0, -2)[:HEALTH_TOKENS - kept].clone())  # not a view of the batch

    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: keep_sample(i, args[0]))
             for i, layer in enumerate(model.sparse) if isinstance(layer, UltraMemV2)]
    losses = []
    for index in range(cfg.eval_batches):
        x, y = get_batch(data.val, cfg.batch_size, seq_len, seed=EVAL_SEED, index=index)
        with autocast(device):
            logits, _ = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    for hook in hooks:
        hook.remove()
    result = {"eval_loss": sum(losses) / len(losses)}
    if inputs:
        health = [selection_health(model.sparse[i], torch.cat(us)) for i, us in inputs.items()]
        result |= {f"memory_{k}": sum(h[k] for h in health) / len(health) for k in health[0]}
    if cfg.task_samples:
        accuracies = memory_task_accuracies(model, vocab_size=spec.model.vocab_size,
                                            seq_len=min(seq_len, TASK_SEQ_LEN), seed=EVAL_SEED, n=cfg.task_samples)
        result |= {f"task_{name}": acc for name, acc in accuracies.items()}
    model.train(was_training)
    return result


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# the loop


def build_optimizer(model, cfg: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with two groups: the memory tables (value-lr multiplier) and everything else.
    Weight decay applies to every parameter, as in the official code (docs/fidelity.md §9.18).
    On CUDA the fused implementation (one kernel for all parameters: the memory pool makes most
    of a model's bytes, and AdamW reads and writes each of them four times a step).
    `capturable`: its step may be captured in a CUDA graph (step counts kept on the device)."""
    tables = {id(t) for t in model.memory_tables()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in tables], "name": "dense"},
        {"params": [p for p in model.parameters() if id(p) in tables], "name": "tables"},
    ]
    on_cuda = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, fused=on_cuda or None, capturable=capturable)


def set_lr(optimizer, step: int, cfg: TrainConfig) -> float:
    lr = cfg.lr * lr_multiplier(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * (value_lr_multiplier(step, cfg) if group["name"] == "tables" else 1.0)
    return lr


def spec_problems(spec: RunSpec) -> list[str]:
    """What a run of `spec` would fail on only after compute was spent, each a line naming the field and the fix:
    `umv2 sweep plan` and `train` check it first. (The data is checked by `open_run_data`.)"""
    from umv2cli.evals import check_tasks

    seq_len, problems = spec.train.seq_len or spec.model.seq_len, []
    if seq_len > spec.model.seq_len:
        problems.append(f"train.seq_len={seq_len}: exceeds the model's seq_len={spec.model.seq_len}; lower it")
    if spec.train.task_samples:
        try:
            check_tasks(min(seq_len, TASK_SEQ_LEN), spec.model.vocab_size)
        except UserError as e:
            problems += [f"memory task {p}; raise it, or set train.task_samples = 0 (no memory tasks)"
                         for p in e.problems]
    return problems


def check_new_run_dir(out: Path) -> None:
    if not rundir.is_new(out):
        raise UserError(f"--out {out}: exists and is not empty; resume it with --resume {out} or pick a new --out")


def open_run_data(spec: RunSpec):
    """The run's token data (`umv2cli.data.TokenData`), checked against its model and its evaluation:
    the sequence length and the vocabulary fit, and so do the memory tasks. `UserError` otherwise."""
    from umv2cli.data import open_data

    if problems := spec_problems(spec):
        raise UserError(*problems)
    data = open_data(spec.data)
    if data.vocab_size > spec.model.vocab_size:
        raise UserError(f"data {spec.data}: vocabulary {data.vocab_size} exceeds the model's "
                        f"vocab_size={spec.model.vocab_size}; raise model.vocab_size")
    return data


def create_run_dir(spec: RunSpec, out: Path) -> None:
    check_new_run_dir(out)  # again, under the lock: the folder may have become a run since the first look
    make_dir(out)  # the lock made it already, where there is one
    write_atomic(out / "spec.json", json.dumps(spec.to_dict(), indent=2) + "\n")


def write_failed(out: Path, error: WriteError, step: int) -> RunFailed:
    """Mark the run failed by a write that failed (if STATUS can still be written); the error to raise."""
    what = "disk full" if error.disk_full else f"cannot write {error.path.name}"
    with contextlib.suppress(WriteError):  # a disk that cannot take STATUS either: the run shows as stopped
        write_atomic(out / "STATUS", f"failed: {what} at step {step}\n")
    return RunFailed(f"{error} at step {step}; the last checkpoint is intact, resume once the disk has room")


def resume_step(out: Path, model, optimizer, dist: "parallel.Distributed | None") -> int:
    """Load the newest checkpoint of `out` into model and optimizer; its step (0 without one). One
    process reads ckpt/last.pt, or a sharded checkpoint of several processes, which it rewrites as
    last.pt; several processes read a sharded checkpoint (`parallel.Distributed.load`)."""
    if dist:
        return dist.load(out, model, optimizer)
    newest = parallel.newest_checkpoint(out)
    if newest == "sharded":
        step = parallel.load_sharded(out, model, optimizer)
        save_checkpoint(out, model, optimizer, step)
        parallel.remove_sharded(out)
        return step
    return load_checkpoint(out, model, optimizer) if newest else 0


def train(spec: RunSpec, out: Path, *, resume: bool | None = False,
          on_step: Callable[[dict], None] | None = None) -> RunResult:
    """Run `spec` in a new directory `out`, or with `resume` continue the run there (pass
    `read_run_spec(out)`); `resume=None` continues the run `out` holds, or starts it if it holds none (a
    sweep's worker). The run's lock is held throughout: a second writer gets `rundir.RunBusy`. A damaged file
    of the run marks it failed and raises `Damaged`. `on_step` sees every metrics line (for a progress bar).
    Started as one of several processes (torchrun, Slurm), the run spreads over them (`umv2cli.parallel`);
    rank 0 holds the lock and writes the run's files."""
    out = Path(out)
    dist = parallel.start(spec, out)
    lead = dist is None or dist.lead
    with dist or contextlib.nullcontext(), contextlib.ExitStack() as lock:
        data = open_run_data(spec)  # every check before the lock makes the folder: a refused run leaves nothing
        device = dist.device if dist else resolve_device(spec.train.device)

        def take_lock() -> None:
            if resume is False:
                check_new_run_dir(out)  # before the lock writes anything into a folder that holds no run
            lock.enter_context(rundir.hold(out))

        dist.on_lead(take_lock) if dist else take_lock()
        try:
            return _train(spec, out, not rundir.is_new(out) if resume is None else resume, on_step, dist, data,
                          device)
        except Damaged as e:
            if lead:
                with contextlib.suppress(WriteError):
                    write_atomic(out / "STATUS", f"failed: {rundir.damage_reason(out, e)}\n")
            raise


def _train(spec: RunSpec, out: Path, resume: bool, on_step: Callable[[dict], None] | None,
           dist: "parallel.Distributed | None", data, device: torch.device) -> RunResult:
    from umv2cli.data import get_batch
    from umv2cli.model.transformer import build_model

    lead = dist is None or dist.lead  # the one process that writes the run's files
    if dist:
        resume = dist.agree(resume)  # rank 0 holds the run: its view decides
    if resume and rundir.is_done(out):
        metrics = read_metrics(out)
        return RunResult(out, "done", metrics[-1]["step"] if metrics else 0, metrics[-1] if metrics else {})
    if resume:
        rundir.check_resumable(out)
    cfg, seq_len = spec.train, spec.train.seq_len or spec.model.seq_len
    configure_cpu()
    if resume and lead:
        (out / "STATUS").unlink(missing_ok=True)  # a failed run, resumed, is failed no longer
    elif not resume:
        dist.on_lead(lambda: create_run_dir(spec, out)) if dist else create_run_dir(spec, out)
    model = build_model(spec.model, seed=cfg.seed, device=device)
    forward = dist.prepare(model) if dist else model  # splits the tables: before the optimizer
    optimizer = build_optimizer(model, cfg)
    with rundir.reading(out / rundir.CHECKPOINT, fix="move ckpt/ aside to train the run again from step 0"):
        step = resume_step(out, model, optimizer, dist) if resume else 0
    metrics = rundir.keep_metrics(out, step) if lead else None
    metrics = dist.agree(metrics) if dist else metrics  # every process decides alike on them
    forward = torch.compile(forward) if cfg.compile else forward

    stop: list[int] = []  # several processes stop together: a signal waits in dist.signals until shared
    previous = {s: signal.signal(s, lambda signum, frame: (dist.signals if dist else stop).append(signum))
                for s in STOP_SIGNALS}
    line = metrics[-1] if metrics else {}
    log = rundir.MetricsLog(out if lead else None)
    try:
        while step < cfg.steps and not stop:
            t0 = time.perf_counter()
            lr = set_lr(optimizer, step, cfg)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train, cfg.batch_size, seq_len, seed=cfg.seed,
                                 index=step * cfg.grad_accum + micro)
                if dist:
                    x, y = dist.own_rows(x, y)
                    dist.sync_gradients(last=micro == cfg.grad_accum - 1)
                # both to the device before the forward: a copy from host memory waits for the
                # kernels queued before it, and the targets' would wait for the whole forward
                x, y = x.to(device), y.to(device)
                with autocast(device):
                    logits, aux = forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                ((loss + aux) / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            if dist:
                loss_sum = dist.mean(loss_sum)
                grad_norm = dist.clip_grad_norm(model, cfg.grad_clip or math.inf)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                what, value = ("loss", loss_sum) if not math.isfinite(loss_sum) else ("gradient norm", grad_norm)
                if lead:
                    write_atomic(out / "STATUS", f"failed: non-finite {what} ({value:g}) at step {step + 1}\n")
                raise RunFailed(f"{out}: non-finite {what} at step {step + 1}; STATUS says failed")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.refresh_rank1()
            step += 1
            tokens = cfg.batch_size * seq_len * cfg.grad_accum
            line = {"step": step, "tokens": step * tokens, "lr": lr, "train_loss": loss_sum,
                    "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                line |= evaluate(model, data, spec, device)
            log.append(line)
            if on_step:
                on_step(line)
            if dist:
                dist.stop_together(stop)
            if stop or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                if dist:
                    dist.save(out, model, optimizer, step)
                else:
                    save_checkpoint(out, model, optimizer, step)
        if stop:
            return RunResult(out, f"stopped by {signal.Signals(stop[0]).name} at step {step}", step, line)
        if line.get("step") != step:  # resumed at its last step, whose metrics line was lost: evaluate again
            line = {"step": step, "tokens": step * cfg.batch_size * seq_len * cfg.grad_accum,
                    **evaluate(model, data, spec, device)}
            log.append(line)
        evaluation = {k: v for k, v in line.items() if k not in ("tokens", "lr", "grad_norm", "tokens_per_s")}
        if lead:
            write_atomic(out / "eval.json", json.dumps(evaluation, indent=2) + "\n")
            write_atomic(out / "STATUS", "done\n")
        return RunResult(out, "done", step, line)
    except WriteError as e:
        raise write_failed(out, e, step) from None
    finally:
        log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
