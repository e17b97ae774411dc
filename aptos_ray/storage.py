"""Local paths and URIs (s3://, gs://, ...) through pyarrow filesystems.

Workers on several nodes need shared storage for data, runs and checkpoints; every path the
jobs read or write goes through these helpers so that a URI works wherever a path does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from aptos_ray.errors import MissingFileError


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs stay as they are."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def open_input(path: str):
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise MissingFileError(path)
    return fs.open_input_stream(inner)


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path: str) -> str:
    with open_input(path) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def upload_dir(local_dir: str | Path, target: str) -> None:
    """Copy a local folder to a path or URI (used for run outputs when output is a URI)."""
    fs, inner = filesystem(target)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local_dir), inner, destination_filesystem=fs)


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


@contextmanager
def publish_dir(target: str) -> Iterator[Path]:
    """Build a folder aside, then publish it at ``target`` in one step; yields the local folder to fill.

    Local targets: the folder is a hidden sibling (``.NAME.tmp-PID-XXXX``) renamed over ``target``
    when the block ends without an error, and the old contents are removed only after that, so
    readers see the old folder or the new one, never half of one. URI targets: the folder is
    built in a local temporary directory and uploaded over ``target``'s old contents. Leftovers
    of writers that were killed (their process is gone) are removed first.
    """
    if is_uri(target):
        with tempfile.TemporaryDirectory(prefix="aptos-publish-") as tmp:
            yield Path(tmp)
            fs, inner = filesystem(target)
            fs.delete_dir_contents(inner, missing_dir_ok=True)  # nothing stale from an older version
            upload_dir(tmp, target)
        return
    final = Path(target).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(final)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)  # a kill between the two renames leaves both copies, never neither
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # still there only when the block failed


@contextmanager
def publish_location(target: str) -> Iterator[str]:
    """Like ``publish_dir``, but yields a location that Ray workers on any node can write to.

    Local targets: ``publish_dir``'s hidden sibling, as a path (several nodes need the folder on
    shared storage, as for every local path a cluster job writes). URI targets: a hidden sibling
    prefix in the same bucket (``.NAME.tmp-PID-XXXX``), copied over ``target``'s old contents when
    the block ends without an error (object stores copy server-side; there is no rename), then
    removed; removed as well when the block fails.
    """
    if not is_uri(target):
        with publish_dir(target) as folder:
            yield str(folder)
        return
    base = str(target).rstrip("/")
    parent, name = base.rsplit("/", 1)
    staging = f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs, inner = filesystem(staging)
    fs.create_dir(inner, recursive=True)
    try:
        yield staging
        _, final = filesystem(base)
        fs.delete_dir_contents(final, missing_dir_ok=True)  # nothing stale from an older version
        fs.create_dir(final, recursive=True)
        pafs.copy_files(inner, final, source_filesystem=fs, destination_filesystem=fs)
    finally:
        fs.delete_dir(inner)


def _remove_dead_leftovers(final: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings whose writer process no longer runs."""
    for kind in ("tmp", "old"):
        for leftover in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = leftover.name.rsplit(".", 1)[-1].split("-")[1]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
