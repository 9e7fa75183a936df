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
    return Path(root).absolute() / relative_path(org_id, sha256)


def relative_path(org_id: str, sha256: str) -> Path:
    """`<org dir>/<sha[:2]>/<sha>`: where a document lives under the attachments root."""
    if not _SHA.fullmatch(sha256):
        raise ValueError("not a SHA-256 hex digest")
    return Path(org_dir(org_id)) / sha256[:2] / sha256


def stored_path(root: Path | None, storage_path: str) -> Path:
    """The file a row's `storage_path` names: an absolute path as is (rows written so), a
    relative one under the configured root (`ValueError` without a root)."""
    path = Path(storage_path)
    if path.is_absolute():
        return path
    if root is None:
        raise ValueError("a relative storage path needs AUTHSVC_ATTACHMENTS_DIR")
    return Path(root).absolute() / path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dirs(path: Path) -> None:
    """Create `path` and every missing ancestor with mode 0700 (`mkdir(parents=True)` gives
    the ancestors the umask's mode, 0755 by default: other local users could list them)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            if not p.is_dir():
                raise


def _holds(path: Path, sha256: str) -> bool:
    """True when `path` is a file whose content hashes to `sha256`."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return False
    except OSError:
        return False  # unreadable: written again below
    return digest.hexdigest() == sha256


def put(root: Path, org_id: str, data: bytes) -> Path:
    """Store `data` (atomically, once per content) and return its absolute path.

    An existing file is reused only when its bytes hash to the content's SHA-256 (a damaged
    copy is replaced), and its modification time is refreshed, so an age-based judgement
    never sees an old file an upload is about to refer to. Call it while holding the
    content's lock (`case_actions`), so a concurrent cleanup of the same content cannot
    delete the file between this write and the caller's commit.
    """
    sha256 = hashlib.sha256(data).hexdigest()
    final = path_for(root, org_id, sha256)
    if len(str(final)) > MAX_PATH:
        raise ValueError("AUTHSVC_ATTACHMENTS_DIR is too long a path")
    if _holds(final, sha256):
        try:
            os.utime(final)
            return final  # already stored: content-addressed
        except FileNotFoundError:
            pass  # removed meanwhile (not under the lock): write it again
    _private_dirs(final.parent)
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
