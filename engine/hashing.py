"""Checksums of files, read once in 1 MiB chunks (the one place FineMask reads a file to hash it)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: Bytes read at a time.
CHUNK = 1 << 20


def chunks(f: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """The bytes of an open binary file from its position to the end, ``size`` at a time."""
    while chunk := f.read(size):
        yield chunk


def hash_file(path: str | Path, *digests: Any) -> None:
    """Feed the bytes of the file ``path`` to every ``hashlib`` object in ``digests`` (one read)."""
    with open(path, "rb") as f:
        for chunk in chunks(f):
            for digest in digests:
                digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file."""
    digest = hashlib.sha256()
    hash_file(path, digest)
    return digest.hexdigest()


def file_hashes(path: str | Path) -> dict[str, str]:
    """MD5 and SHA-256 hex digests of a file, read once."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    hash_file(path, md5, sha)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}
