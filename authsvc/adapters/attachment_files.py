"""Attachment bytes in a folder (`AUTHSVC_ATTACHMENTS_DIR`), content-addressed.

A document lives at `<root>/<org>/<sha[:2]>/<sha256>`: the path is made of the content's
SHA-256 (hex, checked) and a safe form of the organization id, never of anything the uploader
chose (the filename stays a database column), so no upload can name a path outside the
folder. One folder per organization keeps tenants apart on disk: an organization's upload
never shares (or reveals) another's file.

Writes are atomic: the bytes go to a temporary file in the target directory, are flushed to
disk, then renamed over the final name, so a reader sees the whole file or none. The same
content uploaded twice is one file. Deciding whether a file may be deleted (no attachment row
refers to it) needs the database and a lock: `service_layer.case_actions` does that.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_SHA = re.compile(r"[0-9a-f]{64}")
_ORG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TMP_PREFIX = ".tmp-"
MAX_PATH = 500  # attachments.storage_path


class Unreadable(OSError):
    """The stored file is missing, unreadable or not the bytes that were uploaded."""


def org_dir(org_id: str) -> str:
    """A directory name for the organization: its id when plainly safe, else a hash of it."""
    if _ORG.fullmatch(org_id):
        return org_id
    return "h-" + hashlib.sha256(org_id.encode()).hexdigest()[:32]


def path_for(root: Path, org_id: str, sha256: str) -> Path:
    if not _SHA.fullmatch(sha256):
        raise ValueError("not a SHA-256 hex digest")
    return Path(root).absolute() / org_dir(org_id) / sha256[:2] / sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put(root: Path, org_id: str, data: bytes) -> Path:
    """Store `data` (atomically, once per content) and return its absolute path.

    Call it while holding the content's lock (`case_actions`), so a concurrent cleanup of
    the same content cannot delete the file between this write and the caller's commit.
    """
    final = path_for(root, org_id, hashlib.sha256(data).hexdigest())
    if len(str(final)) > MAX_PATH:
        raise ValueError("AUTHSVC_ATTACHMENTS_DIR is too long a path")
    try:
        if final.stat().st_size == len(data):
            return final  # already stored: content-addressed
    except FileNotFoundError:
        pass
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def read(storage_path: str, sha256: str) -> bytes:
    """The stored bytes, only if they are exactly what was uploaded (name and content hash)."""
    path = Path(storage_path)
    if not _SHA.fullmatch(sha256) or path.name != sha256:
        raise Unreadable("the stored path is not this document's")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"cannot read the stored document: {type(exc).__name__}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise Unreadable("the stored document does not match its checksum")
    return data


def stored_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(org directory, sha256, path) of every stored document under `root`."""
    root = Path(root).absolute()
    if not root.is_dir():
        return
    for org in sorted(p for p in root.iterdir() if p.is_dir()):
        for shard in sorted(p for p in org.iterdir() if p.is_dir()):
            for path in sorted(shard.iterdir()):
                if _SHA.fullmatch(path.name) and path.name[:2] == shard.name:
                    yield org.name, path.name, path


def stale_temporaries(root: Path, older_than_s: float) -> Iterator[Path]:
    """Temporary files left by a writer that died mid-write (older than the grace period)."""
    root = Path(root).absolute()
    if not root.is_dir():
        return
    cutoff = time.time() - older_than_s
    for path in root.glob(f"*/*/{TMP_PREFIX}*"):
        try:
            if path.stat().st_mtime < cutoff:
                yield path
        except FileNotFoundError:
            continue
