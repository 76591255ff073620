"""One run on several processes: data-parallel replicas and memory-parallel groups.

A launcher starts the processes and tells each its rank: `torchrun --nproc-per-node N -m umv2cli
train …`, the local executor's `--gpus-per-run N` (torchrun per run), or a Slurm job of nodes ×
tasks (`sweeps.slurm`, from submitit's JobEnvironment). `start` reads WORLD_SIZE, RANK and
LOCAL_RANK from the environment and joins the process group (NCCL on GPUs, gloo on CPUs); without
WORLD_SIZE a run is one process without torch.distributed, exactly as before. The trainer calls the
`Distributed` it returns at a few places of its loop.

Layout. W processes form a grid of W/M data-parallel replicas × M memory-parallel ranks
(M = train.memory_parallel; a memory group is M consecutive ranks, which share a node when M
divides the GPUs per node):
- tokens: process r reads rows [r·B/W, (r+1)·B/W) of every micro-batch of B sequences, so the global
  batch, the data order (`data.get_batch`) and the learning rate are the one-process run's; its loss
  is the mean over its rows, and the run's loss the mean over processes;
- the dense backbone, MoE experts included: whole on every process with gradients averaged (DDP,
  `data_parallel = "ddp"`), or split over all W by FSDP2's fully_shard (weights, gradients and AdamW
  state 1/W each, `"fsdp"`);
- the memory tables (UltraMemV2 pool, Memory+ values): split by columns within each memory group
  (`model.distributed`), whole within a replica; their gradients are summed over the replicas and divided
  by W, so that they come out as the average over processes that the dense gradients are. The
  gradient norm that clipping uses is the whole model's.
So a run on N processes follows the one-process run up to floating-point rounding.

Checkpoints. `ckpt/sharded-<step>/` (torch.distributed.checkpoint: each process writes its shards)
becomes the run's checkpoint when rank 0 names it in `ckpt/sharded.json`, written last. Tensors are
stored in their whole shapes (memory tables as whole tables, `model.distributed.table_pieces`), so a run
resumes under any world size and layout (DCP reshards on load), and also as one process. A run
resumed under the other kind converts the newest checkpoint first: one process rewrites a sharded
checkpoint as `ckpt/last.pt`, several processes a `last.pt` as a sharded one.

Only rank 0 writes spec.json, metrics.jsonl, eval.json, STATUS and the checkpoint's name. All
processes evaluate the same batches (the memory layers' exchanges need every process).

Failures. Every process adds its failure to the process group's store and beats a heartbeat in it.
When a process fails, rank 0 waits `GRACE_S` and decides: processes whose heartbeat stopped without
a failure were killed (out of memory, a node lost, kill -9): the run stops, resumable, and rank 0
names them; otherwise the first failure is the run's, and STATUS says "failed: rank k: … at step n".
Rank 0 learns of a failure either from its own collective (gloo: at once) or, when that collective
hangs (NCCL), from a watcher thread that reads the store; collectives time out after
`COLLECTIVE_TIMEOUT_S` in any case, and torchrun and Slurm (srun --kill-on-bad-exit) end the other
processes of a run whose process died.
"""

import contextlib
import datetime
import inspect
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from umv2cli.config import RunSpec, layout_problems
from umv2cli.errors import UserError
from umv2cli.files import write_atomic

COLLECTIVE_TIMEOUT_S = 600
"""A collective that waits longer for a process fails (NCCL's default)."""
BEAT_S = 1.0
"""Seconds between two heartbeats of a process (and two looks of rank 0's watcher at the store)."""
GRACE_S = 3.0
"""After a failure, rank 0 waits this long for the other processes' failures and heartbeats."""
POINTER = "sharded.json"


class RanksLost(Exception):
    """Processes of a distributed run died without a reason of their own (killed): the run stopped
    and resumes from its checkpoint; no STATUS is written."""


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) that a launcher put in the environment; None for one process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ.get("RANK", 0))
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def start(spec: RunSpec, out: Path) -> "Distributed | None":
    """Join the process group when a launcher started the run in `out` as one of several processes
    (after checking the layout); None for a run of one process (checked too)."""
    env = world_from_env()
    problems = layout_problems(spec, env[1] if env else 1)
    if problems:
        raise UserError(*problems)
    return None if env is None else Distributed(spec, out, *env)


# ----------------------------------------------------------------------------------------------
# the process group and the loop's collectives


class Distributed:
    """This process's part of a run on several processes. A context manager: leaving it leaves the
    process group, and an exception inside becomes the run's failure (module docstring)."""

    def __init__(self, spec: RunSpec, out: Path, rank: int, world: int, local_rank: int):
        from torch.distributed.device_mesh import init_device_mesh

        self.spec, self.cfg, self.out, self.rank, self.world = spec, spec.train, out, rank, world
        self.lead = rank == 0
        self.device = _device(self.cfg.device, local_rank)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                                device_id=self.device if cuda else None)
        mp = self.cfg.memory_parallel
        self.mesh = init_device_mesh(self.device.type, (world // mp, mp), mesh_dim_names=("data", "memory"))
        self.store = dist.distributed_c10d._get_default_store()
        self.signals: list[int] = []
        """Stop signals received and not yet shared (`stop_together`)."""
        self.wrapped: torch.nn.Module | None = None
        self.manual: list[torch.nn.Parameter] = []
        """Parameters whose gradients this module averages (the tables; under FSDP, the TDQKR cores too)."""
        self._done = threading.Event()
        self._deciding = threading.Lock()
        self._beating = threading.Thread(target=self._beat, daemon=True)
        self._beating.start()

    # ------------------------------------------------------------------------------------------
    # model and batches

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Split the memory tables over the memory groups and wrap the backbone (DDP or FSDP2);
        returns what the loop calls for the forward. Call before building the optimizer."""
        from umv2cli.model.distributed import balance_whole_batches, split_memory_tables

        if self.cfg.memory_parallel > 1:
            split_memory_tables(model, self.mesh["memory"].get_group())
        balance_whole_batches(model, dist.group.WORLD)
        tables = model.memory_tables()
        if self.cfg.data_parallel == "fsdp":
            # read outside the forward (the rank-1 refresh): kept whole, averaged here
            cores = [layer.cores_CRR for layer in model.sparse if hasattr(layer, "refresh_rank1")]
            self.manual = tables + cores
            self.wrapped = _fully_shard(model, set(self.manual), self.device.type, self.world)
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.manual = tables
            ids = {id(p) for p in tables}
            names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]
            names += ["." + n for n in names if "." not in n]  # DDP names the root's own parameters so too
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
            # the buffers (TDQKR shuffles and rank-1 vectors) are the same everywhere: no syncing per forward
            keep = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")  # torch ≥ 2.13 / older
            self.wrapped = DistributedDataParallel(model, device_ids=None if self.device.index is None
                                                   else [self.device.index], **{keep: False})
        return self.wrapped

    def own_rows(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This process's rows of each [B, …] tensor of a micro-batch."""
        n = batch[0].shape[0] // self.world
        return tuple(t[self.rank * n:(self.rank + 1) * n] for t in batch)

    def sync_gradients(self, last: bool) -> None:
        """Exchange the backbone's gradients in the next backward only when it is the step's last
        micro-batch (earlier ones accumulate locally)."""
        if self.cfg.data_parallel == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        else:
            self.wrapped.require_backward_grad_sync = last

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Average the gradients this module keeps (tables over the replicas, FSDP's whole cores over
        all processes), then clip every gradient by the whole model's norm, as
        `torch.nn.utils.clip_grad_norm_` does for one process; returns the norm."""
        from torch.distributed.tensor import DTensor

        tables = {id(p) for p in model.memory_tables()}
        data = self.mesh["data"].get_group()
        for p in self.manual:  # each process's gradient is of its own loss, 1/W of the run's
            group = data if id(p) in tables else dist.group.WORLD
            if group.size() > 1:
                dist.all_reduce(p.grad, group=group)
            if self.world > 1:
                p.grad.div_(self.world)
        # one all-reduce of Σ g² over the processes: a gradient whole on every process counts 1/W on
        # each, a table's column block 1/(W/M) on each replica that holds it, an FSDP shard once
        split = tables if self.cfg.memory_parallel > 1 else set()
        grads, weights = [], []
        for p in model.parameters():
            if p.grad is not None:
                sharded = isinstance(p.grad, DTensor)
                grads.append(p.grad.to_local() if sharded else p.grad)
                weights.append(1.0 if sharded else 1 / data.size() if id(p) in split else 1 / self.world)
        norms = torch.stack(torch._foreach_norm(grads))
        total_sq = (norms.square() * torch.tensor(weights, device=norms.device)).sum()
        dist.all_reduce(total_sq)
        total = total_sq.sqrt()
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total.item()

    def mean(self, value: float) -> float:
        """The mean over processes of a per-process number (each process's loss over its rows)."""
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def stop_together(self, stop: list[int]) -> None:
        """Put a stop signal that any process received into every process's `stop` (the same step
        for all: the loop's collectives must stay in step)."""
        t = torch.tensor(self.signals[0] if self.signals else 0, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() and not stop:
            stop.append(int(t.item()))

    def on_lead(self, fn) -> None:
        """Run `fn` on rank 0; a UserError it raises is raised on every process (as itself on rank 0)."""
        raised = None
        if self.lead:
            try:
                fn()
            except UserError as e:
                raised = e
        box = [raised.problems if raised else None]
        dist.broadcast_object_list(box, src=0)
        if raised:
            raise raised
        if box[0]:
            raise UserError(*box[0])

    def agree(self, value):
        """Rank 0's `value`, on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, out: Path, model: torch.nn.Module, optimizer, step: int) -> None:
        """Every process writes its shards of the checkpoint of `step`; rank 0 then names it."""
        import torch.distributed.checkpoint as dcp

        name = f"sharded-{step:09d}"
        dcp.save(checkpoint_state(model, optimizer, self.mesh) | _extras(step), checkpoint_id=out / "ckpt" / name)
        if self.lead:
            _commit(out, name, step, {"world_size": self.world, "memory_parallel": self.cfg.memory_parallel,
                                      "data_parallel": self.cfg.data_parallel})

    def load(self, out: Path, model: torch.nn.Module, optimizer) -> int:
        """Load the run's newest checkpoint, whatever layout wrote it; its step (0 without one)."""
        kind = self.agree(newest_checkpoint(out) if self.lead else None)
        if kind is None:
            return 0
        if kind == "last.pt":
            self.on_lead(lambda: shard_last_pt(out, self.spec))
        return load_sharded(out, model, optimizer, self.mesh)

    # ------------------------------------------------------------------------------------------
    # failures

    def __enter__(self) -> "Distributed":
        # SIGTERM is how torchrun ends the others when a process died, and how Slurm stops a job: it
        # must never kill a process before rank 0 has settled the run (in the loop it stops it)
        self._previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: self.signals.append(signum))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        from umv2cli.train import RunFailed

        if error is None:
            self._done.set()
            self._beating.join()
            dist.destroy_process_group()
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            return
        if isinstance(error, RunFailed) or not isinstance(error, Exception):
            self._done.set()  # every process stopped at the same step (rank 0 wrote STATUS), or an interrupt
            return
        if not self.lead:
            self._publish(error)
            return
        if isinstance(error, UserError):  # bad input, as for one process (exit code 2)
            self._done.set()
            return
        if not self._deciding.acquire(blocking=False):  # the watcher is at it, and ends this process
            threading.Event().wait()
        self._publish(error)
        failed, message = self._decide()
        self._done.set()
        raise (RunFailed if failed else RanksLost)(message) from error

    def _publish(self, error: Exception) -> None:
        reason = f"rank {self.rank}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        try:
            n = self.store.add("umv2/failures", 1)
            self.store.set(f"umv2/failure/{n}", reason)
        except Exception:  # noqa: BLE001 (the store's host is gone: nobody is left to tell)
            pass

    def _decide(self) -> tuple[bool, str]:
        """Rank 0 after a failure: wait for the others' failures and heartbeats, then either write
        STATUS with the first failure (True, it) or name the processes that died without one (False)."""
        beats = self._beats()
        time.sleep(GRACE_S)
        failures = [self.store.get(f"umv2/failure/{i}").decode()
                    for i in range(1, self.store.add("umv2/failures", 0) + 1)]
        failed_ranks = {int(f.split(":")[0].removeprefix("rank ")) for f in failures}
        lost = [r for r, (a, b) in enumerate(zip(beats, self._beats()))
                if a == b and r != self.rank and r not in failed_ranks]
        from umv2cli.train import read_metrics

        metrics = read_metrics(self.out)
        step = (metrics[-1]["step"] if metrics else 0) + 1
        if lost:
            ranks = ", ".join(map(str, lost))
            return False, (f"rank{'s' if len(lost) > 1 else ''} {ranks} of {self.world} died without an error "
                           f"(killed?) at step {step}; the run resumes from its checkpoint")
        write_atomic(self.out / "STATUS", f"failed: {failures[0]} at step {step}\n")
        return True, f"{self.out}: {failures[0]} at step {step}; STATUS says failed"

    def _beats(self) -> list[int]:
        return [self.store.add(f"umv2/beat/{r}", 0) for r in range(self.world)]

    def _beat(self) -> None:
        """Every BEAT_S, this process's heartbeat; on rank 0 also a watch on the store: a failure
        that another process reported while this one hangs in a collective (NCCL) ends the run."""
        try:
            while not self._done.wait(BEAT_S):
                self.store.add(f"umv2/beat/{self.rank}", 1)
                if self.lead and self.store.add("umv2/failures", 0) and self._deciding.acquire(blocking=False):
                    _, message = self._decide()
                    print(f"failed: {message}", file=sys.stderr, flush=True)
                    os._exit(1)
        except Exception:  # noqa: BLE001 (the store's host is gone: the run is over)
            return


# ----------------------------------------------------------------------------------------------
# helpers


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"train.device={name!r}: no CUDA device here; use \"cpu\" or \"auto\"")
    return torch.device("cuda", local_rank % torch.cuda.device_count())  # all GPUs visible, or just its own


def _fully_shard(model: torch.nn.Module, ignored: set, device_type: str, world: int) -> torch.nn.Module:
    """FSDP2 over all processes: a unit per attention, FFN and sparse layer, the rest in the root
    unit. UltraMemV2 layers stay in the root unit, which keeps its weights gathered after the
    forward: evaluation reads them outside it (layer health)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from umv2cli.model.ultramemv2 import UltraMemV2

    mesh = init_device_mesh(device_type, (world,))
    units = [m for block in model.blocks for m in (block.attn, block.ffn) if m is not None]
    units += [layer for layer in model.sparse if not isinstance(layer, UltraMemV2)]
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    return fully_shard(model, mesh=mesh, ignored_params=ignored)


def checkpoint_state(model: torch.nn.Module, optimizer, mesh=None) -> dict:
    """The model's and the optimizer's tensors by name, for torch.distributed.checkpoint: views of
    the live tensors (a load writes into them) in their whole shapes. Memory tables split over the
    memory groups are DTensors on `mesh` (replicated over its data dim, split over its memory dim),
    FSDP's are its own DTensors; the rest is whole on every process."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from umv2cli.model.distributed import table_pieces

    pieces = table_pieces(model)
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a shared table, under each layer's name too
            continue
        seen.add(id(tensor))
        for key, view, dim in pieces.get(id(tensor), [(None, lambda t: t, None)]):
            key = key or name

            def place(t: torch.Tensor) -> torch.Tensor:
                t = view(t.detach())
                return t if dim is None or mesh is None else DTensor.from_local(t, mesh, [Replicate(), Shard(dim)],
                                                                                run_check=False)

            state[f"model.{key}"] = place(tensor)
            for what, value in optimizer.state.get(tensor, {}).items():
                state[f"optimizer.{key}.{what}"] = value if value.dim() == 0 else place(value)
    return state


def init_optimizer_state(optimizer) -> None:
    """AdamW makes its state at its first step; make it now, by a step of lr 0 on zero gradients
    (which changes no weight), so that a checkpoint can load into it."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
        for p in group["params"]:
            p.grad = None


def _extras(step: int) -> dict:
    """The step, and the host's random generators (training draws none; kept for exact resume).
    Not the GPUs' generators: reading them all would open every GPU from every process."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return {"step": step, "rng": io.BytesIO(pickle.dumps(rng))}


def newest_checkpoint(out: Path) -> str | None:
    """"last.pt", "sharded" or None: the newer of ckpt/last.pt (one process) and the sharded
    checkpoint that ckpt/sharded.json names. Each kind of save removes the other kind, so both
    exist only after a kill between the two."""
    paths = {"last.pt": out / "ckpt" / "last.pt", "sharded": out / "ckpt" / POINTER}
    times = {kind: path.stat().st_mtime_ns for kind, path in paths.items() if path.exists()}
    return max(times, key=times.get) if times else None


def load_sharded(out: Path, model: torch.nn.Module, optimizer, mesh=None) -> int:
    """Load the sharded checkpoint of `out` into this process's model and optimizer (`mesh`: the
    run's, or None for one process); its step."""
    import torch.distributed.checkpoint as dcp

    init_optimizer_state(optimizer)
    name = json.loads((out / "ckpt" / POINTER).read_text())["checkpoint"]
    state = checkpoint_state(model, optimizer, mesh) | {"step": 0, "rng": io.BytesIO()}
    with _quiet_one_process():
        dcp.load(state, checkpoint_id=out / "ckpt" / name, no_dist=mesh is None)
    state["rng"].seek(0)
    rng = pickle.load(state["rng"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state["step"]


@contextlib.contextmanager
def _quiet_one_process():
    """torch.distributed.checkpoint warns that it works in one process even when told so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def remove_sharded(out: Path) -> None:
    """Remove the sharded checkpoints of `out` (after a one-process checkpoint replaced them)."""
    (out / "ckpt" / POINTER).unlink(missing_ok=True)
    for old in (out / "ckpt").glob("sharded-*"):
        shutil.rmtree(old, ignore_errors=True)


def _commit(out: Path, name: str, step: int, layout: dict) -> None:
    """Name ckpt/<name> the run's checkpoint, then remove the ones it replaces."""
    write_atomic(out / "ckpt" / POINTER, json.dumps({"checkpoint": name, "step": step, **layout}, indent=2) + "\n")
    (out / "ckpt" / "last.pt").unlink(missing_ok=True)
    for old in (out / "ckpt").glob("sharded-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def shard_last_pt(out: Path, spec: RunSpec) -> None:
    """Rewrite a one-process checkpoint (ckpt/last.pt) as a sharded one, through a one-process model
    on the CPU."""
    import torch.distributed.checkpoint as dcp

    from umv2cli.model.transformer import build_model
    from umv2cli.train import build_optimizer, load_checkpoint

    model = build_model(spec.model, seed=spec.train.seed)
    optimizer = build_optimizer(model, spec.train)
    step = load_checkpoint(out, model, optimizer)
    name = f"sharded-{step:09d}"
    with _quiet_one_process():
        dcp.save(checkpoint_state(model, optimizer) | _extras(step), checkpoint_id=out / "ckpt" / name, no_dist=True)
    _commit(out, name, step, {"world_size": 1, "converted_from": "last.pt"})
