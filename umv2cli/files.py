"""The files umv2 writes and reads back: whole or not at all, and a failure is one line naming the file.

Writing: `write_atomic` writes a temporary file beside the target (``.<name>.<random>.tmp``), flushes it to
disk, then renames it over the target, so a reader, or a process killed halfway, never sees half a file. Any
OSError on the way (disk full, read-only, no such folder) becomes `WriteError`: the path and the cause.

Reading: `read_text`, `read_json` and `read_parquet` check what they read. A file that reads back wrong (not
UTF-8, not JSON, not a table, the wrong shape) raises `Damaged`, naming the file and what is wrong. A missing
file is the caller's question (FileNotFoundError).
"""

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from umv2cli.errors import UserError

TEMPORARY = ".*.tmp"
"""The glob of `write_atomic`'s temporary files: one a killed writer left behind matches it."""


class WriteError(UserError):
    """A file or folder could not be written."""

    def __init__(self, path: Path | str, error: OSError):
        self.path, self.errno = Path(path), error.errno
        super().__init__(f"{path}: cannot write ({error.strerror or error})")

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class Damaged(UserError):
    """A file umv2 wrote reads back wrong."""

    def __init__(self, path: Path | str, cause: str, fix: str = ""):
        self.path, self.cause = Path(path), cause
        super().__init__(f"{path}: damaged ({cause})" + (f"; {fix}" if fix else ""))


def write_atomic(path: Path, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to a temporary
    file beside `path`, flush it to disk, then rename it over `path`. The file gets the mode a
    plain open() would give it (mkstemp's is 0600: a shared report would be unreadable)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None:
            raise WriteError(path, cause) from None
        raise


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: itself, or the one a library raised it from (torch.save turns a failed
    write into a RuntimeError whose context is the OSError)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def make_dir(path: Path) -> None:
    """`path` and its parents, as folders; `WriteError` where that cannot be (a file in the way, no right)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed `write_atomic` left in `folder` (only its writer may call this)."""
    for tmp in folder.glob(TEMPORARY):
        tmp.unlink(missing_ok=True)


def is_temporary(path: Path) -> bool:
    return path.match(TEMPORARY)


# ----------------------------------------------------------------------------------------------
# reading back


def read_text(path: Path, fix: str = "") -> str:
    """A UTF-8 text file; `Damaged` if it is not one (FileNotFoundError if it is missing)."""
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise Damaged(path, f"not UTF-8 text: byte {e.start}", fix) from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Damaged(path, f"cannot read: {e.strerror or e}", fix) from None


def read_json(path: Path, fix: str = "") -> dict[str, Any]:
    """A file holding one JSON object."""
    import json

    try:
        data = json.loads(read_text(path, fix))
    except ValueError as e:
        raise Damaged(path, f"not valid JSON: {str(e).splitlines()[0]}", fix) from None
    if not isinstance(data, dict):
        raise Damaged(path, "expected a JSON object", fix)
    return data


def read_parquet(path: Path, columns: list[str], fix: str = "") -> "pl.DataFrame":
    """A Parquet table with (at least) these columns, all of them read."""
    import polars as pl

    try:
        table = pl.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # polars raises many kinds for a file that is not Parquet
        raise Damaged(path, f"not a Parquet table: {(str(e).strip().splitlines() or [type(e).__name__])[0]}",
                      fix) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise Damaged(path, f"no column {', '.join(missing)}", fix)
    return table
