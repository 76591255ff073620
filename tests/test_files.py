"""Atomic writes: a whole file or none, with the mode a plain open() would give."""

import os
import stat

import pytest

from umv2cli.files import write_atomic


def test_written_file_gets_the_mode_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.parquet"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]


def test_a_write_that_fails_is_one_line_naming_the_file_and_the_cause(tmp_path):
    from umv2cli.errors import UserError
    from umv2cli.files import WriteError, make_dir

    with pytest.raises(WriteError) as e:
        write_atomic(tmp_path / "no-such-folder" / "results.parquet", b"x")
    assert isinstance(e.value, UserError) and not e.value.disk_full
    assert e.value.problems == [f"{tmp_path / 'no-such-folder' / 'results.parquet'}: cannot write (No such file or "
                                "directory)"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(WriteError, match="a-file/sub: cannot write \\(Not a directory\\)"):
        make_dir(tmp_path / "a-file" / "sub")
