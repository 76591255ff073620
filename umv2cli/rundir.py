"""A run directory: who trains it (its lock), and each of its files read back through one checking reader.

    LOCK           locked by the process that trains the run; names it (pid, host, start, Slurm job)  `hold`, `holder`
    spec.json      the run's `RunSpec`                   `read_run_spec`
    metrics.jsonl  one JSON object per optimizer step    `read_metrics`, `tail_metrics`, `eval_lines`, `MetricsLog`
    eval.json      the final evaluation                  `read_eval`
    ckpt/last.pt   the checkpoint                        `reading` (around `umv2cli.train.load_checkpoint`)
    STATUS         "done" or "failed: <reason>"          `read_status`

The lock. Whoever trains a run (`umv2 train`, a sweep's worker, a Slurm job) holds an exclusive `fcntl.flock` on
LOCK while it trains (`hold`). A second writer retries for LOCK_WAIT_S, then gives up with `RunBusy`, naming the
holder. The kernel drops a flock when its holder ends, however it ends (kill -9 too), so no lock outlives its
process and no rule has to guess whether a lock is stale. LOCK itself stays: deleting it would let two writers
lock two different files. A Slurm job's process takes the same lock. When Slurm requeues the job, the old process
is gone and so is its lock. Readers ask `holder`, which holds a lock only for a moment.

Damage. A file of the run that reads back wrong raises `umv2cli.files.Damaged`. Training then marks the run
``failed: damaged <file> (<cause>)``, the ledger shows it failed, and a sweep goes on with its other runs.
metrics.jsonl is append-only truth. A line that is not a JSON object whose step follows the previous line's is
damage: it is skipped, and the lines after it are kept. `keep_metrics` rewrites the file for a resume: it
drops those lines and the ones past the checkpoint, and keeps every other line byte for byte.
"""

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from umv2cli.config import RunSpec, run_spec_from_dict
from umv2cli.errors import UserError, warn
from umv2cli.files import Damaged, WriteError, is_temporary, make_dir, read_json, read_text, remove_temporaries, \
    write_atomic

LOCK = "LOCK"
LOCK_WAIT_S = 1.0
"""How long a writer retries a held lock before it gives up: far longer than a reader's probe holds it."""
CHECKPOINT = "ckpt/last.pt"


class RunBusy(UserError):
    """Another live process trains this run."""

    def __init__(self, run: Path, holder: str):
        self.holder = holder
        super().__init__(f"{run}: in use by {holder}; wait for it to end, or stop it and run this again")


# ----------------------------------------------------------------------------------------------
# the lock


@contextmanager
def hold(run: Path) -> Iterator[None]:
    """Hold `run`'s lock while the block runs (the folder and LOCK are made if missing); `RunBusy` if another
    process holds it. On taking it, the temporary files of an earlier writer killed mid-write are deleted."""
    make_dir(run)
    try:
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise WriteError(run / LOCK, e) from None
    try:
        if _lock(fd, run):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (_me() + "\n").encode(), 0)
            except OSError as e:
                raise WriteError(run / LOCK, e) from None
        remove_temporaries(run)
        remove_temporaries(run / "ckpt")
        yield
    finally:
        os.close(fd)  # lets the lock go


def _lock(fd: int, run: Path) -> bool:
    """Take the lock on `fd` (True), or find the file system has no locks (False: the run goes on unlocked)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RunBusy(run, _holder(fd)) from None
            time.sleep(0.05)
        except OSError as e:  # e.g. Lustre mounted without -o flock
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise WriteError(run / LOCK, e) from None
            warn(f"{run / LOCK}: this file system has no file locks ({e.strerror}); the run trains unlocked")
            return False


def _me() -> str:
    """This process, as LOCK names it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}" + (f" (Slurm job {job})" if job else "")


def _holder(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"


def holder(run: Path) -> str:
    """Who trains `run` now, as its LOCK names them; "" if no live process holds the lock."""
    try:
        fd = os.open(run / LOCK, os.O_RDONLY)
    except OSError:
        return ""  # never trained (or an unreadable LOCK, which nobody could have taken)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go at once, by the close below
        return ""
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return ""  # no locks on this file system
    finally:
        os.close(fd)


def is_new(run: Path) -> bool:
    """`run` holds no run: it is missing, or holds only what a start killed before its spec.json leaves (LOCK,
    temporary files)."""
    try:
        if not run.exists():
            return True
        if not run.is_dir():
            raise UserError(f"{run}: is a file, not a run folder; pick another path")
        return all(p.name == LOCK or is_temporary(p) for p in run.iterdir())
    except OSError as e:  # a name too long, a folder not ours to read
        raise UserError(f"{run}: cannot be a run folder ({e.strerror}); pick another path") from None


# ----------------------------------------------------------------------------------------------
# the files, read back


def damage_reason(run: Path, e: Damaged) -> str:
    """``damaged <file> (<cause>)``, the file named within its run: the reason a damaged run failed."""
    name = e.path.relative_to(run) if e.path.is_relative_to(run) else e.path
    return f"damaged {name} ({e.cause})"


@contextmanager
def reading(path: Path, fix: str = "") -> Iterator[None]:
    """Any failure while the block reads `path` (a truncated or foreign checkpoint: torch raises many kinds) is
    damage to that file."""
    try:
        yield
    except Damaged:
        raise
    except Exception as e:
        raise Damaged(path, (str(e).strip().splitlines() or [type(e).__name__])[0], fix) from None


def read_status(run: Path) -> str:
    """The run's STATUS line: "done", "failed: …", or "" when it has none."""
    try:
        status = read_text(run / "STATUS").strip()
    except FileNotFoundError:
        return ""
    if status != "done" and not status.startswith("failed"):
        raise Damaged(run / "STATUS", f"reads {status[:40]!r}, neither done nor failed")
    return status


def is_done(run: Path) -> bool:
    try:
        return read_status(run) == "done"
    except Damaged:
        return False


def read_run_spec(run: Path) -> RunSpec:
    """The spec of the run in `run`, from its spec.json."""
    path = Path(run) / "spec.json"
    if not path.exists():
        raise UserError(f"--resume {run}: no spec.json there; start a run with --out {run}")
    return run_spec_from_dict(read_json(path, fix="the run cannot resume; train it again in a new folder"),
                              where=str(path))


def check_resumable(run: Path) -> None:
    """`Damaged` unless the run's spec.json reads back: a folder that holds a run must have one."""
    if not (run / "spec.json").exists():
        raise Damaged(run / "spec.json", "missing", "the run cannot resume; train it again in a new folder")
    read_run_spec(run)


def read_eval(run: Path) -> dict[str, float]:
    """eval.json of a done run: the final evaluation, every value a number (missing is damage too)."""
    path = run / "eval.json"
    fix = "delete the run's STATUS and resume it to write it again"
    try:
        final = read_json(path, fix)
    except FileNotFoundError:
        raise Damaged(path, "missing", fix) from None
    wrong = [k for k, v in final.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if wrong:
        raise Damaged(path, f"{wrong[0]}={final[wrong[0]]!r} is not a number", fix)
    return final


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_line(raw: bytes | str) -> dict | None:
    """One line of metrics.jsonl, or None if it is damaged: not a JSON object with an integer step ≥ 1."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(line, dict) and type(line.get("step")) is int and line["step"] >= 1
    return line if ok else None


def _scan(path: Path) -> tuple[list[tuple[bytes, dict]], list[int]]:
    """(raw, parsed) of each valid line, and the numbers of the damaged ones. A last line without its newline was
    cut short by a kill: it is left out, and is no damage."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return [], []
    kept, damaged = [], []
    for number, raw in enumerate(lines, 1):
        line = metrics_line(raw)
        if line is None or (kept and line["step"] <= kept[-1][1]["step"]):
            damaged.append(number)
        else:
            kept.append((raw, line))
    return kept, damaged


def read_metrics(out: Path | str) -> list[dict]:
    """The valid lines of metrics.jsonl, in order (see the module's docstring)."""
    return [line for _, line in _scan(Path(out) / "metrics.jsonl")[0]]


def keep_metrics(run: Path, step: int) -> list[dict]:
    """Make metrics.jsonl hold the valid lines up to `step` (where a resume starts; 0 for a new run), each byte
    for byte, and return them. One warning line says what was damaged or is missing."""
    path = run / "metrics.jsonl"
    kept, damaged = _scan(path)
    kept = [(raw, line) for raw, line in kept if line["step"] <= step]
    write_atomic(path, b"".join(raw + b"\n" for raw, _ in kept))
    missing = step - len(kept)  # the kept steps are distinct, in 1..step
    if damaged or missing:
        skipped = f"skipped {len(damaged)} damaged line{'s' * (len(damaged) > 1)} ({_numbers(damaged)}); " \
            if damaged else ""
        lost = f"{missing} of steps 1-{step} lost; " if missing else ""
        warn(f"{path}: {skipped}{lost}kept the {len(kept)} valid lines up to step {step}")
    return [line for _, line in kept]


def _numbers(numbers: list[int], shown: int = 5) -> str:
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' * (len(numbers) > 1)} " + ", ".join(map(str, numbers[:shown])) + more


def tail_metrics(run: Path, n: int = 1, tail_bytes: int = 65536) -> list[dict]:
    """The last ``n`` valid lines of the run's metrics.jsonl, oldest first, read from the file's end: a line cut
    short by a kill (or by the window's start) or damaged is skipped, the rest of the file never read."""
    try:
        with (run / "metrics.jsonl").open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail_bytes))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    tail = []
    for raw in reversed(lines[1:-1] if size > tail_bytes else lines[:-1]):  # whole lines only
        line = metrics_line(raw)
        if line is not None:
            tail.append(line)
        if len(tail) == n:
            break
    return tail[::-1]


def last_step(run: Path) -> int:
    """The step of the last valid line of metrics.jsonl (0 if none)."""
    tail = tail_metrics(run)
    return tail[-1]["step"] if tail else 0


def eval_lines(run: Path, key: bytes = b'"eval_loss"') -> list[bytes]:
    """The complete lines of metrics.jsonl that hold `key`, found by a byte search so that only they are read (a
    10,000-step run has a few dozen). Unparsed: the caller parses them at once, and with `metrics_line` one by one
    if one is damaged."""
    import mmap

    path = run / "metrics.jsonl"
    if not path.exists() or path.stat().st_size == 0:
        return []
    lines = []
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        hit = m.find(key)
        while hit != -1:
            start, end = m.rfind(b"\n", 0, hit) + 1, m.find(b"\n", hit)
            if end == -1:  # a last line without its newline may be cut short
                break
            lines.append(m[start:end])
            hit = m.find(key, end)
    return lines


class MetricsLog:
    """metrics.jsonl, open for appending: each line goes to the file in one write, or raises `WriteError`.
    `run=None` writes nowhere (the processes of a run on several but its rank 0)."""

    def __init__(self, run: Path | None):
        self.path = run / "metrics.jsonl" if run is not None else Path(os.devnull)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e) from None

    def append(self, line: dict) -> None:
        data = (json.dumps(line) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise WriteError(self.path, e) from None

    def close(self) -> None:
        os.close(self.fd)
