"""A real S3 API on localhost for the tests: moto's standalone server, reached through pyarrow.

The endpoint and dummy credentials are environment variables (pyarrow reads ``AWS_ENDPOINT_URL``),
set when conftest imports this module, before any test starts Ray: Ray's worker processes inherit
the environment of the process that started Ray, so tasks, actors and Ray Train workers reach the
same server. The server itself starts with the first test that asks for the ``s3`` fixture.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pyarrow.fs as pafs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
ENV = {
    "AWS_ENDPOINT_URL": ENDPOINT,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (seconds of timeouts) for credentials
}


class S3:
    """The running server: make buckets, upload folders, list keys."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
        self.server.start()
        self.fs = pafs.S3FileSystem(endpoint_override=ENDPOINT, allow_bucket_creation=True,
                                    allow_bucket_deletion=True, access_key="testing", secret_key="testing",
                                    region="us-east-1")
        self.buckets = 0

    def bucket(self) -> str:
        """A new, empty bucket; returns its URI (``s3://test-N``)."""
        self.buckets += 1
        name = f"test-{self.buckets}"
        self.fs.create_dir(name)
        return f"s3://{name}"

    def upload(self, local: Path, uri: str) -> str:
        """Copy a local folder or file to ``uri``; returns ``uri``."""
        inner = uri.removeprefix("s3://")
        if Path(local).is_dir():
            pafs.copy_files(str(local), inner, destination_filesystem=self.fs)
        else:
            with self.fs.open_output_stream(inner) as f:
                f.write(Path(local).read_bytes())
        return uri

    def keys(self, uri: str) -> list[str]:
        """Every object below ``uri``, relative to it, sorted."""
        inner = uri.removeprefix("s3://").rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
        return sorted(i.path[len(inner) + 1:] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self.server.stop()


def set_environment() -> None:
    for key, value in ENV.items():
        os.environ[key] = value
