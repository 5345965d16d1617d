"""engine.hashing: file checksums read in chunks equal those of the whole bytes."""
from __future__ import annotations

import hashlib

from engine.hashing import CHUNK, file_hashes, file_sha256, hash_file


def test_checksums_span_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * ((2 * CHUNK + 1000) // 256)  # three reads, the last a partial one
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_hashes(path) == {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    sha, blake = hashlib.sha256(b"prefix"), hashlib.blake2b()
    hash_file(path, sha, blake)
    assert sha.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()
    assert blake.hexdigest() == hashlib.blake2b(data).hexdigest()


def test_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
