"""Atomic file replacement: write a temporary file beside the target, fsync, rename.

A crash or ``kill -9`` at any moment leaves either the previous file or the new
one at ``path``, never a mixture: the bytes are written to a temporary file in the
same directory (so the rename stays on one file system), flushed and fsynced,
moved over the target with :func:`os.replace` (atomic on POSIX and Windows), and
the directory is fsynced so that the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write"]


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]
) -> None:
    """Call ``write(file)`` on a temporary file, then move it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> atomic_write(target, lambda f: f.write(b"new"))
    >>> target.read_bytes()
    b'new'
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
