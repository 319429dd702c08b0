"""Atomic outputs: a reader sees the old file or the new one, never half of one.

Every output is built under a temporary name beside its target and renamed over
it only when complete.  A temporary name says who made it,

    .<target>.~<host>~<pid>~<random>.tmp

so that when a process is killed outright (SIGKILL, power loss: no cleanup
runs), the next atomic write into the same directory recognises the leftovers
of a process of this host that is no longer alive and removes them.  Leftovers
of live processes (another run sharing a cache) are never touched.  Outputs get
the modes a plain `open` would give them (the umask's), not the private ones of
temporary files, so a shared cache or a saved model stays readable by others;
`locked` serialises read-merge-write updates of one file by several processes.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import BitallocError

_HOST = re.sub(r"\W", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.(?P<target>.+)\.~(?P<host>\w+)~(?P<pid>\d+)~(?P<tag>\w*)\.tmp$")
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
_AT_FDCWD = -100


def _owner_prefix(path: Path) -> str:
    return f".{path.name}.~{_HOST}~{os.getpid()}~"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def sweep_stale(directory: Path) -> list[Path]:
    """Remove temporaries left in `directory` by dead processes of this host; returns what was removed.

    A directory moved aside by the fallback swap of `atomic_dir` is put back if its
    target is missing (the process died between the two renames).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        target = path.with_name(match["target"])
        if match["tag"] == "old" and not target.exists():
            os.replace(path, target)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@functools.cache
def _umask() -> int:
    """The process's umask: from /proc where Linux shows it, else set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_directory(directory: Path, what: Path) -> None:
    """mkdir -p, or one line naming the output that cannot be written (a file where a folder must be)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise BitallocError(f"cannot write {what}: {err.filename or directory} is a file, not a folder") from None
    except OSError as err:
        raise BitallocError(f"cannot write {what}: {err.strerror or err}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    _make_directory(path.parent, path)
    if path.is_dir():
        raise BitallocError(f"cannot write {path}: it is a directory")
    sweep_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_owner_prefix(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def to_json(obj) -> str:
    """Deterministic JSON (sorted keys, fixed indent): same inputs give the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path, obj) -> None:
    write_text(path, to_json(obj))


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike):
    """Yield a temporary directory; on success move each file made there into `directory`, one rename each.

    For writers that name their own files (TensorBoard event files): every file
    appears complete or not at all.
    """
    directory = Path(directory)
    _make_directory(directory, directory)
    sweep_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=_owner_prefix(directory / "files"), suffix=".tmp", dir=directory))
    try:
        yield tmp
        for file in sorted(tmp.iterdir()):
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(file, directory / file.name)
        _fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically where the OS can (Linux renameat2); False where it cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory under a temporary name and swap it in whole on success."""
    path = Path(path)
    _make_directory(path.parent, path)
    sweep_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_owner_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make a saved model private
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # two renames; `sweep_stale` repairs a death between them
            old = path.with_name(f"{_owner_prefix(path)}old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap, this is the old directory


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on `path` (through a `.<name>.lock` file beside it) for a read-merge-write:
    processes that add to one file take turns, so none writes over rows another has just added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
