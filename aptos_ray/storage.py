"""Local paths and URIs (s3://, gs://, ...) through pyarrow filesystems.

Workers on several nodes need shared storage for data, runs and checkpoints; every path the
jobs read or write goes through these helpers so that a URI works wherever a path does.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from aptos_ray.errors import MissingFileError, StorageError, storage_failure


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_local(path: str) -> bool:
    """A path on this machine's disk: no scheme, or ``file://``."""
    return not is_uri(path) or str(path).startswith("file://")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI.

    Filesystems are cached per scheme, bucket and options: building an S3 one asks the bucket's
    region over the network, which per image (inside the Ray tasks) would cost more than the read.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    # Keys are taken as written (no %-decoding, "#" is part of the name): they come from listings.
    parts = urlsplit(str(path), allow_fragments=False)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), parts.path
    if parts.scheme in BUCKET_SCHEMES and "@" not in parts.netloc:  # inside: "bucket/key", whatever the options
        return _bucket_filesystem(parts.scheme, parts.netloc, parts.query), parts.netloc + parts.path
    return pafs.FileSystem.from_uri(str(path))


BUCKET_SCHEMES = ("s3", "gs", "gcs")


@lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))[0]


@contextmanager
def named(path: str) -> Iterator[None]:
    """Turn a failure no retry changes (disk full, read-only, no permission, endpoint unreachable)
    into one ``StorageError`` line naming ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as e:  # also Ray's wrappers of a task's OSError, which need not be OSErrors
        failure = storage_failure(e, str(path))
        if failure is None or failure is e:
            raise
        raise failure from None


def file_type(path: str) -> str:
    """'File', 'Directory' or 'NotFound' for a local path or URI (links followed)."""
    with named(path):
        fs, inner = filesystem(path)
        return fs.get_file_info(inner).type.name


def list_dir(path: str) -> list[tuple[str, str]]:
    """[(name, 'File' | 'Directory')] of a folder's entries, sorted by name; hidden ones left out.

    Local symlinks count as what they point to (as ``os.path.isdir`` does)."""
    with named(path):
        fs, inner = filesystem(path)
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted((i.base_name, i.type.name) for i in infos if not i.base_name.startswith("."))


def ray_storage(path: str) -> dict:
    """Ray Train / Tune's ``storage_path`` (and ``storage_filesystem``) for a local path or URI: a
    bucket URI goes through this module's filesystem, so its options (endpoint, region) hold there too."""
    if is_local(path):
        return {"storage_path": absolute(path)}
    fs, inner = filesystem(path)
    return {"storage_path": inner, "storage_filesystem": fs}


def ray_data_source(path: str) -> dict:
    """``paths`` (and ``filesystem``) for a Ray Data reader: its read tasks open a bucket URI
    through this module's filesystem, options included, on whichever node they run."""
    if is_local(path):
        return {"paths": absolute(path)}
    fs, inner = filesystem(path)
    return {"paths": inner, "filesystem": fs}


def local_disk() -> str:
    """Which disk this process sees: host plus mount namespace (a node started with ``unshare -m``
    on the same host sees other files). Records of local files carry the driver's, so a Ray task
    can tell "not on this node" from "removed since it was listed"."""
    try:
        namespace = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:  # not Linux: the host alone
        namespace = 0
    return f"{socket.gethostname()}:{namespace}"


def absolute(path: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs stay as they are."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return file_type(path) != "NotFound"


def open_input(path: str):
    with named(path):
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
    write_bytes(path, text.encode())


def upload_dir(local_dir: str | Path, target: str) -> None:
    """Copy a local folder to a path or URI (used for run outputs when output is a URI)."""
    fs, inner = filesystem(target)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local_dir), inner, destination_filesystem=fs)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. Local files are written aside and renamed into place, so a full disk or a
    kill leaves the old file or the new one, never half of one (object stores publish whole objects)."""
    with named(path):
        fs, inner = filesystem(path)
        fs.create_dir(os.path.dirname(inner), recursive=True)
        if not is_local(path):
            with fs.open_output_stream(inner) as f:
                f.write(data)
            return
        aside = os.path.join(os.path.dirname(inner), f".{os.path.basename(inner)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(aside, "wb") as f:
                f.write(data)
            os.replace(aside, inner)
        finally:
            if os.path.exists(aside):
                os.remove(aside)


PROBE_BYTES = 64 * 1024  # written and flushed to disk: a full disk refuses it, where an empty file may pass


def check_writable(path: str, key: str) -> None:
    """Refuse, before any work, an output folder this job cannot write: a file in its place, a
    read-only or full disk, no permission, an S3 endpoint that does not answer. A small file is
    written to the folder (or, when the folder does not exist yet, to the nearest existing parent:
    nothing is created) and removed again."""
    where = f"--{key}={path}"
    if not is_local(path):
        probe = join(path, f".aptos-write-probe-{uuid.uuid4().hex[:8]}")
        with named(where):
            fs, inner = filesystem(probe)
            with fs.open_output_stream(inner) as f:
                f.write(b"probe")
            fs.delete_file(inner)
        return
    folder = Path(filesystem(path)[1])
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise StorageError(f"{where}: cannot write there: {folder} is a file, not a folder")
    probe = folder / f".aptos-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with named(where):
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if probe.exists():
                probe.unlink()


def join(base: str, *parts: str) -> str:
    """``base/part/...``; a URI's options (``?endpoint_override=...``) stay at the end."""
    base, options = split_options(base)
    return "/".join([base.rstrip("/"), *parts]) + options


def split_options(path: str) -> tuple[str, str]:
    """(path, "?options" or "") of a URI; a local path has no options."""
    if not is_uri(path) or "?" not in str(path):
        return str(path), ""
    base, query = str(path).split("?", 1)
    return base, f"?{query}"


def parent(path: str) -> str:
    """The folder holding ``path`` (a local path or URI, its options kept)."""
    base, options = split_options(path)
    return base.rstrip("/").rsplit("/", 1)[0] + options


def name(path: str) -> str:
    """The last part of a local path or URI."""
    return split_options(path)[0].rstrip("/").rsplit("/", 1)[-1]


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
    remove_dead_leftovers(final)
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


def remove_dead_leftovers(final: Path) -> None:
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
