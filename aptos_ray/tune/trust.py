"""Resuming a search unpickles its folder: only resume one this user's searches wrote.

``Tuner.restore`` loads ``tuner.pkl``, ``trainable.pkl``, the searcher state and the trials
cloudpickled inside ``experiment_state-*.json``: whoever can write into the search folder (a
shared ``s3://`` prefix, a world-writable directory) can run code on the driver that resumes it.
So when a search ends (finished, interrupted or failed), the driver signs the folder: a SHA-256
of every file ``Tuner.restore`` may unpickle, under an HMAC with a key only this user can read
(``~/.config/aptos-ray/tune.key``, mode 0600, made on first use). ``--tune.resume`` checks the
signature, and refuses a world-writable folder, before Ray reads any of it. The trust boundary:
anyone who can read that key, or write as this user, can still forge a search (docs/CLUSTER.md).

A search whose driver was killed before it could sign is refused too; if you know the folder is
yours, sign it by hand: ``python -m aptos_ray.tune.trust sign <tune.output>/<tune.name>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
from pathlib import Path

import pyarrow.fs as pafs

from aptos_ray import storage
from aptos_ray.errors import UserError

SIGNATURE = "aptos_ray_signature.json"
SEARCH_CONFIG = "search_config.yaml"  # tune/search.py's; not imported from there: search imports this module
KEY_FILE = "tune.key"


class UntrustedSearchError(UserError):
    """A search folder that this project did not write, or that others could have changed."""


def key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "aptos-ray" / KEY_FILE


def signing_key(create: bool) -> bytes:
    """This user's key (32 random bytes, 0600); made when a search first signs, never by a check."""
    path = key_path()
    if not path.is_file():
        if not create:
            raise UntrustedSearchError(f"{path}: no signing key: this user never signed a search here")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # O_EXCL: two searches signing at once must not overwrite each other's key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UntrustedSearchError(f"{path}: the signing key is readable or writable by others; chmod 600 it")
    return bytes.fromhex(path.read_text().strip())


def restorable_files(exp_dir: str) -> dict[str, str]:
    """{relative path: sha256} of what ``Tuner.restore`` may unpickle: every ``*.pkl`` and every
    ``.json`` at the top (experiment and searcher state), and the config a resume reloads
    (``search_config.yaml``). Trial results and run folders are data."""
    fs, root = storage.filesystem(exp_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    digests = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/")
        top_json = "/" not in rel and rel.endswith(".json") and rel != SIGNATURE
        if rel.endswith(".pkl") or top_json or rel == SEARCH_CONFIG:
            with fs.open_input_stream(info.path) as f:
                digests[rel] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _mac(key: bytes, files: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def sign(exp_dir: str) -> None:
    """Record what the search folder holds now, under this user's key."""
    files = restorable_files(exp_dir)
    storage.write_text(storage.join(exp_dir, SIGNATURE),
                       json.dumps({"files": files, "hmac": _mac(signing_key(create=True), files)}, indent=1))


def check_writers(exp_dir: str) -> None:
    """Local folders: refuse one that others may write to (the folder or anything in it)."""
    if storage.is_uri(exp_dir):
        return  # bucket permissions are the cloud's; the signature still catches a planted file
    for path in [Path(exp_dir), *Path(exp_dir).rglob("*")]:
        mode = path.lstat().st_mode
        if mode & stat.S_IWOTH and not stat.S_ISLNK(mode):
            raise UntrustedSearchError(f"{path}: writable by every user; refusing to resume a search others "
                                       f"could have changed (chmod o-w it if you trust its contents)")


def verify(exp_dir: str) -> None:
    """``UntrustedSearchError`` unless the folder is exactly what this user's search signed."""
    check_writers(exp_dir)
    hint = f"if the folder is yours and its search was killed, sign it: python -m aptos_ray.tune.trust sign {exp_dir}"
    path = storage.join(exp_dir, SIGNATURE)
    if not storage.exists(path):
        raise UntrustedSearchError(f"{exp_dir}: not signed by this project ({SIGNATURE} missing); refusing to "
                                   f"unpickle it; {hint}")
    try:
        saved = json.loads(storage.read_text(path))
        files, mac = dict(saved["files"]), str(saved["hmac"])
    except (ValueError, KeyError, TypeError):
        raise UntrustedSearchError(f"{path}: unreadable signature; refusing to resume") from None
    if not hmac.compare_digest(mac, _mac(signing_key(create=False), files)):
        raise UntrustedSearchError(f"{path}: the signature does not match this user's key; refusing to resume")
    now = restorable_files(exp_dir)
    changed = sorted(set(files) ^ set(now) | {f for f in files if f in now and files[f] != now[f]})
    if changed:
        raise UntrustedSearchError(f"{exp_dir}: changed since this project signed it ({', '.join(changed[:5])}); "
                                   f"refusing to unpickle it")


if __name__ == "__main__":  # python -m aptos_ray.tune.trust sign DIR
    if len(sys.argv) != 3 or sys.argv[1] != "sign":
        sys.exit("usage: python -m aptos_ray.tune.trust sign <search folder>")
    sign(sys.argv[2])
    print(f"signed {sys.argv[2]}")
