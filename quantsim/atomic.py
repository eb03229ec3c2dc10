"""Atomic file writes: what exists is replaced only by a complete new file (or set of files).

Every file quantsim writes (encodings, checkpoints, records, configs) goes through
:func:`atomic_write`: the bytes go to a temporary file in the destination folder, are flushed
to disk, and ``os.replace`` swaps it in. A failure at any point leaves the old file as it was
and no temporary file behind.

Files that belong together (an export's ``.onnx``, ``.encodings``, ... ) are committed with
:func:`replace_files`: written first into a staging folder inside the destination, then renamed
into place one by one after the old versions were kept as hard links; if any step fails, every
old file is put back, so the destination holds the complete old set or the complete new one.
Other files in the destination are never touched. (A process killed during the renames, a
window of a few system calls, leaves the new files moved so far and the old versions in a
``.quantsim-old-*`` folder beside them.)
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically.

    The parent folder is created if missing; an existing file keeps its permission bits.

    Raises:
        OSError: the folder is not writable (nothing is changed); callers wrap it in their
            own error type naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class PartialCommitError(OSError):
    """:func:`replace_files` failed and could not put every old file back.

    Attributes:
        kept: the folder holding the old versions (hard links) that were not restored.
        mixed: the names in the destination that may hold a new version.
    """

    def __init__(self, message: str, kept: Path, mixed: List[str]) -> None:
        super().__init__(message)
        self.kept = kept
        self.mixed = mixed


def replace_files(staging: PathLike, target: PathLike, names: Sequence[str],
                  remove: Iterable[str] = ()) -> None:
    """Move ``staging/<name>`` to ``target/<name>`` for every name, and delete the ``remove``
    names from ``target``, as one set.

    ``staging`` must be on the file system of ``target`` (a folder inside it, typically).
    The new files are flushed to disk first; each old file is kept as a hard link (a copy
    where the file system has none) until the last rename succeeded. When a step fails, the
    renames already done are undone in reverse order: ``target`` holds exactly its old files
    again and the error is raised. Entries of ``target`` not named are left alone.

    Raises:
        OSError: the step that failed (nothing changed in ``target``);
            :class:`PartialCommitError` when undoing failed too.
        IsADirectoryError: a name is a folder in ``target``.
    """
    staging, target = Path(staging), Path(target)
    remove = [n for n in remove if n not in names and os.path.lexists(target / n)]
    for name in list(names) + remove:
        if (target / name).is_dir() and not (target / name).is_symlink():
            raise IsADirectoryError(errno.EISDIR, "a folder has the name of an output file",
                                    str(target / name))
    for name in names:
        _fsync_file(staging / name)
    keep = Path(tempfile.mkdtemp(prefix=".quantsim-old-", dir=target))
    try:
        for name in list(names) + remove:
            if os.path.lexists(target / name):
                _keep(target / name, keep / name)
        done: List[Tuple[str, bool]] = []  # (name, had an old version)
        try:
            for name in names:
                had_old = os.path.lexists(keep / name)
                _rename(staging / name, target / name)
                done.append((name, had_old))
            for name in remove:
                _rename(target / name, staging / name)  # out of target; staging is deleted
                done.append((name, True))
        except BaseException:
            _undo(done, keep, target)
            raise
    except PartialCommitError:
        raise
    except BaseException:
        shutil.rmtree(keep, ignore_errors=True)
        raise
    shutil.rmtree(keep, ignore_errors=True)
    _sync_dir(target)


def _undo(done: List[Tuple[str, bool]], keep: Path, target: Path) -> None:
    """Put the old versions of ``done`` back, last first. Names that cannot be restored are
    reported together, and ``keep`` (their old versions) is then left in place."""
    failed: List[Tuple[str, OSError]] = []
    for name, had_old in reversed(done):
        try:
            if had_old:
                _rename(keep / name, target / name)
            else:
                os.unlink(target / name)
        except OSError as exc:
            failed.append((name, exc))
    if failed:
        mixed = [name for name, _ in reversed(failed)]
        first = failed[0][1]
        raise PartialCommitError(
            f"could not restore {mixed} in {target} ({first.strerror or first}): they may hold "
            f"the new versions; the old versions are in {keep}", keep, mixed) from first


def _rename(src: PathLike, dst: PathLike) -> None:
    """``os.replace``; every rename of :func:`replace_files` (commit and undo) goes through
    here, so tests can make step k fail."""
    os.replace(src, dst)


def _keep(path: Path, copy: Path) -> None:
    """``copy`` becomes a second name of ``path`` (a hard link; a copy where the file system
    has no hard links), so the old bytes survive ``path`` being replaced."""
    try:
        os.link(path, copy, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP,
                             errno.EOPNOTSUPP):
            raise
        shutil.copy2(path, copy, follow_symlinks=False)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
