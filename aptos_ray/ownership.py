"""One writer per output folder: a run, a search or a cross-validation is claimed by the process that
writes it, and a folder name the user did not choose is never shared.

The claim is an exclusive ``flock`` on ``<folder>/.owner.lock``, held while the job runs. The kernel
drops it when the process ends, however it ends (``kill -9``, a power cut of the node), so a dead
owner never leaves a stale claim to clean up, and the file itself may stay. The file holds the
owner's host, pid and start time for the message the next writer gets. On NFS, ``flock`` is an NFS
lock (Linux maps it onto POSIX locks since 2.6.12), so drivers on two nodes sharing the folder exclude
each other too (``file://`` URIs are paths). Object stores (s3://, gs://) have no locks: such
folders are not claimed, and a default name there is the first ``-N`` not listed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pyarrow.fs as pafs

from aptos_ray import storage
from aptos_ray.errors import ExistingFileError, UserError

LOCK_FILE = ".owner.lock"


def check_is_folder(folder: str) -> None:
    """ExistingFileError when ``folder`` is taken by a file (an output folder is created there)."""
    if storage.file_type(folder) == "File":
        raise ExistingFileError(f"{folder} is a file, not a folder: remove it or pick another name")


@contextmanager
def claimed(folder: str, what: str, hint: str) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for this process while the block runs; ExistingFileError
    naming the owner when another live process holds it. ``what``: "run", "search", ...; ``hint``:
    what to do instead, for the message."""
    if not storage.is_local(folder):
        yield
        return
    check_is_folder(folder)
    path = Path(storage.filesystem(folder)[1])  # file:// URIs too
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Not O_TRUNC: a refused writer must not erase the owner's line before reading it.
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{folder}: cannot be written ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "owner unknown"
            raise ExistingFileError(f"{folder} is in use by another {what} ({owner}): {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner_text()}\n".encode(), 0)
        try:
            yield
        except BaseException:
            remove_if_unused(path)
            raise
    finally:
        os.close(fd)  # releases the lock


def remove_if_unused(path: Path) -> None:
    """A job refused before it wrote anything leaves no folder behind: one holding only our lock goes."""
    with contextlib.suppress(OSError):
        if [p.name for p in path.iterdir()] == [LOCK_FILE]:
            (path / LOCK_FILE).unlink()
            path.rmdir()


def owner_text() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}, since {datetime.now():%Y-%m-%d %H:%M:%S}"


def fresh_name(output: str, prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS``, or with ``-2``, ``-3``, ... when a folder of that name exists under
    ``output``: two jobs started in the same second get their own folders. Locally the folder is
    created here, exclusively (``mkdir`` fails for the second process), so the name is this job's."""
    stamp = datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")
    names = (stamp if n == 1 else f"{stamp}-{n}" for n in itertools.count(1))
    if not storage.is_local(output):  # no exclusive create on an object store: the first name not listed
        return next(name for name in names if not storage.exists(storage.join(output, name)))
    local = Path(storage.filesystem(output)[1])  # file:// URIs too
    try:
        local.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                os.mkdir(local / name)
                return name
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"{output}: cannot be written ({e.strerror or e})") from None
    raise AssertionError("names is endless")


def latest_name(output: str, marker: str) -> str | None:
    """The name of the folder under ``output`` whose ``marker`` file was written last (what a resume
    with no name continues); None when no folder holds one. Listed through pyarrow: ``output`` may be
    a URI (s3://, gs://, file://)."""
    fs, root = storage.filesystem(output)
    folders = [d.path for d in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
               if d.type == pafs.FileType.Directory]
    found = [f for f in fs.get_file_info([f"{d}/{marker}" for d in folders]) if f.type == pafs.FileType.File]
    return max(found, key=lambda f: f.mtime).path.rstrip("/").split("/")[-2] if found else None
