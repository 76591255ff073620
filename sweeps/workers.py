"""Local workers: the processes that train a sweep's runs (and tune's trials) on this machine,
where each one runs, and how they end.

Placement (`plan_workers`, a pure function of the GPUs and CPUs this process may use):

    no GPU   `workers` processes (default and at most: one per CPU), worker w pinned to the CPUs
             cpus[w::n]. A sweep of 2-core runs on 8 CPUs: --workers 4.
    G GPUs   `workers` processes (default: G × runs_per_gpu), worker w on GPU w mod G (so the first
             G workers take one GPU each, and `runs_per_gpu` workers share each GPU), pinned to
             cpus[w::n]; with more workers than CPUs, to one CPU each, round robin.

A worker sees only its GPU: CUDA_VISIBLE_DEVICES is set in it before torch starts CUDA, so a run's
device "auto" or "cuda" is that GPU (its cuda:0). Its torch uses one thread per CPU of its share
(`train.configure_cpu` reads the affinity mask). The GPUs this process may use are counted without
starting CUDA here, and an existing CUDA_VISIBLE_DEVICES is respected: `CUDA_VISIBLE_DEVICES=2,3`
places runs on GPUs 2 and 3 only, and `CUDA_VISIBLE_DEVICES=` on none (the CPU placement).

Runs that ask for the CPU (`train.device = "cpu"`): when every run does, they are placed as on a
machine without GPU, one worker per CPU, with the GPUs hidden from them. In a sweep that mixes both,
every worker holds a GPU, and a "cpu" run trains on its worker's CPUs while that GPU waits. A run
that names a GPU (`cuda:1`) is refused before anything starts: each worker has only its cuda:0.

Lifecycle (`WorkerPool`):

- A worker dies with the process that started it (`umv2 sweep run`, `umv2 tune`), even by kill -9:
  it asks Linux for SIGKILL at its parent's death (PR_SET_PDEATHSIG) as it starts, then checks that
  its parent is still the process that started it (it may have died before the request).
- Workers ignore Ctrl-C (SIGINT): the pool decides. When any exception leaves the pool (Ctrl-C, a
  run that raised), no queued run starts, and each running run stops at the end of its current
  step with a checkpoint, as on SIGTERM (`stop_if_pool_stops`); then the pool shuts down and the
  exception goes on. To end at once instead, kill the parent: its workers die with it.
- The parent waits for its runs in ticks of TICK_S (`first_done`): a signal that the kernel hands to
  another of its threads (the pool's own) interrupts no wait of the main thread, which therefore
  never waits longer, so that its Ctrl-C handler runs.
"""

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from umv2cli.errors import UserError

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies."""
TICK_S = 0.5
"""Seconds between two looks at the runs in flight (see `first_done`)."""


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs: the GPUs it sees (as CUDA_VISIBLE_DEVICES names them; none: CPU
    only) and the CPUs it is pinned to. One GPU per slot today; a run over several GPUs would hold
    several."""

    gpus: tuple[str, ...]
    cpus: frozenset[int]


# ----------------------------------------------------------------------------------------------
# placement


def plan_workers(gpus: Sequence[str], cpus: Sequence[int], runs_per_gpu: int = 1, workers: int | None = None,
                 runs: int | None = None) -> list[WorkerSlot]:
    """One slot per worker (the module's docstring has the rule); never more than `runs` workers."""
    cpus = sorted(cpus)
    if not gpus:
        n = min(workers or len(cpus), len(cpus), runs or len(cpus))
        return [WorkerSlot((), frozenset(cpus[w::n])) for w in range(n)]
    n = workers or len(gpus) * runs_per_gpu
    n = min(n, runs or n)
    return [WorkerSlot((gpus[w % len(gpus)],), frozenset(cpus[w::n] if n <= len(cpus) else [cpus[w % len(cpus)]]))
            for w in range(n)]


def gpu_names(visible: str | None, count: int) -> list[str]:
    """The names of the `count` GPUs that CUDA shows this process, given CUDA_VISIBLE_DEVICES
    (`visible`, None when unset): its first `count` entries ("2", "GPU-8f…"), else 0 … count-1."""
    if visible is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in visible.split(",")][:count]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, counted through NVML (torch.cuda.device_count), which does not
    start CUDA here, and named as CUDA_VISIBLE_DEVICES names them."""
    import torch

    return gpu_names(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


def gpus_for(devices: Sequence[str], gpus: Sequence[str]) -> list[str]:
    """The GPUs to place runs whose `train.device`s are `devices` on: none when every run asks for the
    CPU, else `gpus`; a run that names a GPU other than cuda:0 is refused."""
    if all(device == "cpu" for device in devices):
        return []
    for device in sorted(set(devices)):
        if gpus and device.startswith("cuda:") and device != "cuda:0":
            raise UserError(f"train.device={device!r}: each local worker sees one GPU, as cuda:0; use \"auto\" "
                            "or \"cuda\", and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return list(gpus)


def place(devices: Sequence[str], workers: int | None = None, runs_per_gpu: int = 1,
          runs: int | None = None) -> list[WorkerSlot]:
    """The slots, on this machine, for runs whose `train.device`s are `devices`."""
    return plan_workers(gpus_for(devices, visible_gpus()), sorted(os.sched_getaffinity(0)), runs_per_gpu, workers,
                        runs)


# ----------------------------------------------------------------------------------------------
# the pool


class WorkerPool:
    """Spawned processes, one per slot, each placed by its slot and tied to this process (the
    module's docstring). Use it with `with`: leaving on an exception stops it."""

    def __init__(self, slots: Sequence[WorkerSlot]):
        context = multiprocessing.get_context("spawn")
        unclaimed = context.Queue()
        for slot in slots:
            unclaimed.put(slot)
        self.size = len(slots)
        self._stopping = context.Event()
        # Workers start lazily, from the thread that submits: keep submitting from the main thread,
        # since a parent-death signal fires when the *thread* that started the worker ends.
        self._executor = ProcessPoolExecutor(self.size, mp_context=context, initializer=_start_worker,
                                             initargs=(unclaimed, os.getpid(), self._stopping))

    def submit(self, fn: Callable, *args) -> Future:
        return self._executor.submit(fn, *args)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stopping.set()  # running runs stop at their step's end; queued ones don't start
        self._executor.shutdown(wait=True, cancel_futures=exc_type is not None)


def first_done(futures) -> set[Future]:
    """Wait until one of `futures` is done; those that are. (In ticks: see the module's docstring.)"""
    while True:
        done, _ = wait(futures, timeout=TICK_S, return_when=FIRST_COMPLETED)
        if done:
            return done


_stopping = None
"""In a worker: its pool's stop event."""
_libc = ctypes.CDLL(None, use_errno=True)  # loaded once, so that a forked child only calls into it


def signal_at_parent_death(sig: int) -> None:
    """Ask Linux to send this process `sig` when the thread that started it ends (its parent's
    death, kill -9 included). Safe as a `subprocess` preexec_fn: it only calls prctl(2)."""
    if _libc.prctl(PR_SET_PDEATHSIG, *map(ctypes.c_ulong, (sig, 0, 0, 0))) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _start_worker(unclaimed, parent: int, stopping) -> None:
    global _stopping
    signal_at_parent_death(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stopping = stopping
    slot = unclaimed.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)  # before torch starts CUDA here
    os.sched_setaffinity(0, slot.cpus)
    # torch's threads follow the affinity mask (train.configure_cpu), not the whole Slurm allocation
    # that a sweep run inside one would otherwise give each worker
    os.environ.pop("SLURM_CPUS_PER_TASK", None)


def pool_stopping() -> bool:
    """In a worker: whether its pool is stopping (never outside a pool)."""
    return _stopping is not None and _stopping.is_set()


def stop_if_pool_stops(line: dict) -> None:
    """`train`'s on_step in a worker: once the pool stops, send this process the stop signal that
    `train` obeys, so the run checkpoints at the end of this step and returns."""
    if pool_stopping():
        signal.raise_signal(signal.SIGTERM)
