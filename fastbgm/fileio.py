"""Crash-safe file writes and checksums.

Every file fastbgm writes goes through here: write to a temporary file in the same
folder, fsync, then rename, so a kill at any moment leaves the previous complete
version (rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised in the block names ``path`` when it names no file (a failed
    write does not), so that the message says which file found no space."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; use what open() would
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import io

    import torch

    # serialised in memory first: torch's own file writer reports a full disk as an
    # opaque RuntimeError ("unexpected pos ..."), Python's as OSError(ENOSPC), which
    # the trainer and the launcher know to be resumable (see no_space)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = tuple(os.strerror(n) for n in NO_SPACE_ERRNOS)  # how such an error reads in a log


def no_space(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of space (a full disk, or a quota):
    nothing wrong with the run, which resumes from its last complete files once space
    is freed."""
    return isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync; a torn last line is ignored by :func:`read_jsonl`."""
    with _naming(path), open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return rows


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class FolderBusy(RuntimeError):
    """Another live process holds a folder's lock; the message names it."""


LOCK_FILE = ".lock"


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock ("pid P on HOST since T"), or None when it is free."""
    import fcntl

    p = Path(folder) / LOCK_FILE
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return (os.read(fd, 512).decode(errors="replace").strip() or "another process")
    finally:
        os.close(fd)  # closing drops a shared lock we may have taken
    return None


@contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str = "folder") -> Iterator[None]:
    """Hold ``folder``'s lock for the life of the block; raise :class:`FolderBusy` if a
    live process holds it. The kernel drops the lock when its holder dies, however it
    dies, so a killed process never leaves a stale lock behind."""
    import datetime
    import fcntl
    import socket

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            raise FolderBusy(f"{what} {folder} is in use by {holder}: stop that process first "
                             "(or wait for it to end)") from None
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
