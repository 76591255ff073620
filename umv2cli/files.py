"""Writing files so that a reader, or a process killed halfway, never sees half a file."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to a temporary
    file beside `path`, flush it to disk, then rename it over `path`. The file gets the mode a
    plain open() would give it (mkstemp's is 0600: a shared report would be unreadable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
