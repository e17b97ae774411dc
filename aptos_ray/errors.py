"""Every error this project raises on purpose, in one place.

The jobs (``jobs/_cli.py``) report ``UserError``s as one line and exit 2: a wrong key or value, bad
data, a path that is missing or taken, unusable weights or checkpoints. Anything else keeps its
traceback, because it is a bug. The file errors subclass the built-in ones, so callers may still
catch FileNotFoundError / FileExistsError.
"""

from __future__ import annotations

import errno
import re
import reprlib
from typing import Any


class UserError(Exception):
    """Base of the errors a job reports as one line (exit status 2)."""


class ConfigError(UserError, ValueError):
    """A config key or value that is unknown, malformed or out of range."""


class DataError(UserError):
    """Input data that cannot be used as a whole (nothing readable, no labels, bad layout)."""


class DriverOnlyPathError(DataError):
    """A local path the driver listed that the node running a task cannot see: no shared storage."""

    def __init__(self, path: str, others: int = 0, node: str = "", key: str = ""):
        more = f" (and {others} other file{'s' if others > 1 else ''})" if others else ""
        more += f" (--{key})" if key else ""
        where = f"node {node}" if node else "the node running the task"
        super().__init__(
            f"{path}{more}: the file is on the driver's disk but not on {where}; use a URI (s3://, gs://) "
            f"or shared storage mounted at the same path on every node")


class WeightsError(UserError, RuntimeError):
    """Pretrained weights could not be found, downloaded or fitted to the model."""


class GpuUnusableError(UserError, RuntimeError):
    """Ray gave a worker or actor a GPU that torch cannot use (a driver too old for torch's CUDA)."""


class CorruptCheckpointError(UserError, ValueError):
    """A checkpoint file exists but cannot be used (truncated, not a checkpoint, another model)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file, folder or run the user pointed at does not exist."""


class ExistingFileError(UserError, FileExistsError):
    """The output the user named already holds something that must not be overwritten."""


class StorageError(UserError, OSError):
    """An output that cannot be written or a store that cannot be reached: the disk is full,
    read-only or not ours, or the S3 endpoint does not answer. The next try fails the same way."""


# Causes that no retry changes, said plainly; the OS's own text follows in brackets.
STORAGE_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# pyarrow's S3 client reports an endpoint that does not answer with these words, and no errno.
UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Could not resolve host")
DETAIL_CHARS = 200  # of the OS's or client's own text
# The errno inside the text of errors that lost it: pyarrow's "Detail: [errno 28] ...", and
# shutil.copytree's shutil.Error, which lists "[Errno 28] No space left on device: ..." per file.
ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def storage_failure(error: BaseException | None, path: str = "") -> StorageError | None:
    """The one-line ``StorageError`` for an error that fails the same way every try (disk full,
    read-only, no permission, endpoint unreachable), naming ``path`` (else the error's own file);
    None for any other error. Ray wraps a task's error (``cause``, ``__cause__``): those are searched."""
    for _ in range(6):  # wrappers nest a few levels at most
        if error is None or isinstance(error, StorageError):
            return error
        if isinstance(getattr(error, "cause", None), BaseException):  # Ray's RayTaskError: the task's own error
            error = error.cause
            continue
        if isinstance(error, OSError) and not isinstance(error, UserError):
            text = str(error.strerror if error.errno in STORAGE_CAUSES and error.strerror else error)
            found = ERRNO_IN_TEXT.search(text)
            cause = STORAGE_CAUSES.get(error.errno or (int(found.group(1)) if found else None))
            if cause is None and any(words in text for words in UNREACHABLE):
                cause = "storage endpoint unreachable"
            if cause is not None:
                where = path or error.filename or "an output"
                detail = " ".join(text.split())[:DETAIL_CHARS]
                return StorageError(f"{where}: {cause} ({detail})")
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


# Failures of a job that ran: each has its own exit status (jobs/export.py, jobs/tune.py).


class ExportError(RuntimeError):
    """The exported model is missing a dependency or does not reproduce PyTorch's outputs (exit 1)."""


class SearchFailed(RuntimeError):
    """No trial of a search finished a single epoch (exit 1)."""


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial finished, e.g. Ctrl+C; its state is saved (exit 130)."""


class ImageError(ValueError):
    """One input image that cannot be used; ``reason`` is the short text its quarantine shows.

    Not a UserError: a bad image is quarantined with its reason, it does not stop a job.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- values quoted in errors ---------------------------------------------------------------------

SHOWN_CHARS = 120  # a value quoted in an error is cut to this length


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, SHOWN_CHARS, SHOWN_CHARS
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 4
    return short


_SHORT = _short_repr()


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: Any) -> str:
    """``repr(value)`` as an error quotes it: nested and long values abridged by ``reprlib`` (which
    never walks more than it shows), then cut to ``SHOWN_CHARS``."""
    return cut(_SHORT.repr(value))
