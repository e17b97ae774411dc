"""Errors a job reports as one line (``jobs/_cli.py``): the user named a path that is missing or taken.

Subclasses of the built-in errors, so callers may still catch FileNotFoundError / FileExistsError;
a built-in one raised anywhere else is a bug and keeps its traceback.
"""


class MissingFileError(FileNotFoundError):
    """A file, folder or run the user pointed at does not exist."""


class ExistingFileError(FileExistsError):
    """The output the user named already holds something that must not be overwritten."""
