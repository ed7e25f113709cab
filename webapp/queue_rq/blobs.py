"""Audio files in Redis: the upload travels to the GPU host and the stem comes back this way.

Why Redis and not a shared folder or an object store: the hosts are promised nothing in common
but Redis (the gary backend already runs one beside the gpu-queue-service), and the files are
small and short-lived: a 240 s source decoded to float32 WAV is 92 MB and lives only until its
job ends; a stem lives `RESULT_TTL_S`. Redis keeps them with the same TTL as the job record, and
its append-only file keeps them across a restart. docs/SCALE_OUT.md weighs the choice.

A blob is a Redis list of chunks of 768 KiB (a multiple of 3, so each chunk base64-encodes on
its own and the JSON status can be streamed): no command carries more than a few MB, so Redis
never stalls on one large value, no process holds a whole file in memory, and a list has no
512 MB value limit. A blob is written under a temporary key and renamed when complete, so a
reader sees all of it or nothing; a writer that dies leaves only a temporary key that expires.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator

import redis

CHUNK_BYTES = 3 * 256 * 1024
BATCH = 8  # chunks per round trip (6 MB)
STAGING_TTL_S = 3600  # a temporary key left by a writer that died


class BlobMissing(Exception):
    """The blob is gone (expired or deleted) or shorter than recorded."""


def put_file(conn: redis.Redis, key: str, path: Path, ttl_s: int | None) -> int:
    """Store the file under `key` (replacing it), expiring after ttl_s (None: no expiry); its size."""
    staging = f"{key}:staging:{secrets.token_hex(6)}"
    size = 0
    try:
        with open(path, "rb") as fh:
            while True:
                pipe = conn.pipeline(transaction=False)
                pushed = 0
                for _ in range(BATCH):
                    chunk = fh.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    pipe.rpush(staging, chunk)
                    pushed += 1
                    size += len(chunk)
                if not pushed:
                    break
                pipe.expire(staging, STAGING_TTL_S)
                pipe.execute()
        if size == 0:
            raise ValueError(f"{path.name} is empty; an empty blob is never stored")
        with conn.pipeline(transaction=True) as pipe:
            pipe.rename(staging, key)
            if ttl_s is None:
                pipe.persist(key)
            else:
                pipe.expire(key, max(1, int(ttl_s)))
            pipe.execute()
    except BaseException:
        try:
            conn.delete(staging)
        except redis.exceptions.RedisError:
            pass  # it expires on its own
        raise
    return size


def iter_chunks(conn: redis.Redis, key: str, size: int) -> Iterator[bytes]:
    """The blob's bytes in order, a few chunks per round trip; BlobMissing if it is not all there."""
    count = -(-size // CHUNK_BYTES)
    seen = 0
    for start in range(0, count, BATCH):
        chunks = conn.lrange(key, start, min(count, start + BATCH) - 1)
        if not chunks:
            raise BlobMissing(key)
        for chunk in chunks:
            seen += len(chunk)
            yield chunk
    if seen != size:
        raise BlobMissing(f"{key}: {seen} bytes of {size}")


def read_all(conn: redis.Redis, key: str, size: int) -> bytes:
    return b"".join(iter_chunks(conn, key, size))


def get_file(conn: redis.Redis, key: str, size: int, dest: Path) -> None:
    """Write the blob to dest, atomically (a temporary name, then a rename)."""
    part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "wb") as out:
            for chunk in iter_chunks(conn, key, size):
                out.write(chunk)
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
