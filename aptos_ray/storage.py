"""Local paths and URIs (s3://, gs://, ...) through pyarrow filesystems.

Workers on several nodes need shared storage for data, runs and checkpoints; every path the
jobs read or write goes through these helpers so that a URI works wherever a path does.
"""

from __future__ import annotations

import os
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
