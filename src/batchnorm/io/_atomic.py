"""Atomic file replacement: temporary files beside the targets, fsync, rename.

A crash or ``kill -9`` at any moment leaves either the previous file or the new
one at a target, never a mixture: the bytes go to a temporary file in the
target's directory (so the rename stays on one file system), are flushed and
fsynced, moved over the target with :func:`os.replace` (atomic on POSIX and
Windows), and the directory is fsynced so that the rename survives a power loss.

What every writer of :mod:`batchnorm.io` gets from here:

- permissions: a new file gets ``0o666 & ~umask``, as :func:`open` would give
  it; a replaced file keeps its mode;
- symbolic links: the file a link points to is written, the link stays;
- temporary names ``.<name>.<host>.<pid>.<random>.tmp``: the next save to the
  same path removes the temporary files of writers on this host whose process is
  gone (killed mid-save), and leaves those of live, concurrent writers alone;
- several files at once (:func:`atomic_write_all`): every temporary file is
  complete and fsynced before the first rename, and the renames run under an
  exclusive ``flock`` of the directories, which :func:`read_together` takes
  shared, so concurrent writers and readers see whole sets. Only a crash between
  two renames can leave a set mixed (microseconds in each save).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: renames are still atomic, sets are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "atomic_write_all", "read_together"]

Writer = Callable[[IO[bytes]], object]

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
_TEMP_TAIL = re.compile(r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")
_NAME_MAX = 255


def atomic_write(path: str | os.PathLike[str], write: Writer) -> None:
    """Call ``write(file)`` on a temporary file, then move it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> atomic_write(target, lambda f: f.write(b"new"))
    >>> target.read_bytes()
    b'new'
    """
    atomic_write_all([(path, write)])


def atomic_write_all(items: Sequence[tuple[str | os.PathLike[str], Writer]]) -> None:
    """Write every ``(path, write)`` pair, replacing the targets only if all succeed.

    Raises
    ------
    OSError
        A file that cannot be written, with a message naming the path as given
        (``FileNotFoundError`` for a missing folder); no target is touched.
    ValueError
        Two paths that name the same file.
    """
    targets = [(Path(path), _resolve(Path(path)), write) for path, write in items]
    seen: dict[Path, Path] = {}
    for shown, real, _ in targets:
        if real in seen:
            raise ValueError(
                f"{seen[real]} and {shown} are the same file; give each output its "
                "own path."
            )
        seen[real] = shown
    directories = sorted({real.parent for _, real, _ in targets})
    temporaries: list[Path] = []
    renamed = 0
    try:
        for shown, real, write in targets:
            _remove_stale_temporaries(real)
            temporaries.append(_write_temporary(shown, real, write))
        with _locked(directories if len(targets) > 1 else [], exclusive=True):
            for (shown, real, _), temporary in zip(targets, temporaries, strict=True):
                try:
                    os.replace(temporary, real)
                except OSError as exc:
                    raise _cannot_write(shown, real, exc) from None
                renamed += 1
    except BaseException:
        for temporary in temporaries[renamed:]:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    for directory in directories:
        _fsync_directory(directory)


def read_together(paths: Iterable[str | os.PathLike[str]]) -> list[bytes]:
    """The contents of files written together by :func:`atomic_write_all`.

    The files are opened under a shared lock of their directories, so no
    concurrent :func:`atomic_write_all` renames between the opens; they are read
    after the lock is released (an open file keeps its contents across renames).
    Raises ``OSError`` (with ``filename`` set) for a file that cannot be read.
    """
    names = [Path(path) for path in paths]
    directories = sorted({_resolve(name).parent for name in names})
    files: list[IO[bytes]] = []
    try:
        with _locked(directories, exclusive=False):
            for name in names:
                files.append(open(name, "rb"))  # noqa: SIM115 (closed below)
        return [file.read() for file in files]
    finally:
        for file in files:
            file.close()


def _resolve(path: Path) -> Path:
    """The file a save to ``path`` writes: symlinks followed, even dangling ones."""
    return Path(os.path.realpath(path))


def _temporary_prefix(real: Path) -> str:
    room = _NAME_MAX - len(f"..{_HOST}.{2**32}.{'0' * 8}.tmp")
    return f".{real.name[:room]}."


def _write_temporary(shown: Path, real: Path, write: Writer) -> Path:
    if real.is_dir():
        raise IsADirectoryError(f"cannot write {shown}: it is a folder.")
    mode = None
    with contextlib.suppress(OSError):
        status = os.stat(real)
        if stat.S_ISREG(status.st_mode):
            mode = stat.S_IMODE(status.st_mode)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    prefix = _temporary_prefix(real)
    while True:
        temporary = real.parent / (
            f"{prefix}{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )
        try:
            # 0o666: the umask applies, as for open(); a replaced file's mode wins
            fd = os.open(temporary, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _cannot_write(shown, real, exc) from None
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise _cannot_write(shown, real, exc) from None
        raise
    return temporary


def _cannot_write(shown: Path, real: Path, exc: OSError) -> OSError:
    """``exc`` retold with the path the caller gave, not a temporary file's."""
    same = os.path.realpath(shown.parent) == str(real.parent)
    folder = shown.parent if same else real.parent
    if isinstance(exc, FileNotFoundError) and not folder.exists():
        message = f"the folder {folder} does not exist; create it first."
    elif isinstance(exc, NotADirectoryError):
        message = f"{folder} is not a folder."
    elif isinstance(exc, PermissionError):
        message = f"no permission to write in the folder {folder}."
    else:
        message = f"{exc.strerror or exc}."
    try:
        retold = type(exc)(f"cannot write {shown}: {message}")
    except TypeError:
        retold = OSError(f"cannot write {shown}: {message}")
    retold.errno = exc.errno
    return retold


def _remove_stale_temporaries(real: Path) -> None:
    """Remove the temporary files that killed writers left for ``real``."""
    prefix = _temporary_prefix(real)
    try:
        names = os.listdir(real.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        match = _TEMP_TAIL.fullmatch(name[len(prefix) :])
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(real.parent / name)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still be writing (True if unsure)."""
    if pid == os.getpid() or os.name != "posix":  # Windows' kill(pid, 0) is Ctrl-C
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    # A killed process that its parent has not reaped yet still answers kill().
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"


@contextlib.contextmanager
def _locked(directories: Iterable[Path], *, exclusive: bool) -> Iterator[None]:
    """``flock`` of each directory (sorted, so two lockers cannot deadlock).

    Best effort: where a directory cannot be opened or locked (Windows, some
    network file systems) the renames are still atomic one by one.
    """
    descriptors: list[int] = []
    try:
        for directory in directories:
            if fcntl is None:
                break
            try:
                fd = os.open(directory, os.O_RDONLY)
            except OSError:
                continue
            descriptors.append(fd)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        for fd in descriptors:
            os.close(fd)  # releases the lock


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
