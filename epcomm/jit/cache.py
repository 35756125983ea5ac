"""On-disk JIT cache.

Layout: ``<EPCOMM_CACHE_DIR>/<family>/<key>.bin`` where one file holds a JSON header and the
cubin.  An entry is published with a temporary file in the same directory, ``fsync`` and
``os.replace``, so readers see a whole entry or none.  A per-key ``flock`` makes concurrent
processes (e.g. 8 ranks starting together) compile a key once: the others wait on the lock and
then read the published entry.  A truncated or corrupt entry (bad magic, bad header, payload
hash mismatch, or a header naming another key: a file copied or renamed into place) is treated
as a miss and overwritten.  A cache directory that cannot be written is no error either: the
compiler then keeps the module in memory (compiler.build warns once); only `epcomm warmup`,
whose purpose is to fill the cache, refuses to run.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from epcomm import envs

SCHEMA_VERSION = 2  # 2: the header names its key
_MAGIC = b"EPCJIT01"


@dataclass
class CacheEntry:
    payload: bytes
    meta: dict


def cache_root() -> Path:
    return Path(envs.CACHE_DIR.get())


def make_key(parts: dict) -> str:
    """sha256 over a canonical JSON of ``parts`` (bytes values are hashed first)."""
    canon = {}
    for k, v in parts.items():
        if isinstance(v, (bytes, bytearray)):
            canon[k] = hashlib.sha256(bytes(v)).hexdigest()
        else:
            canon[k] = v
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def entry_path(family: str, key: str) -> Path:
    return cache_root() / family / f"{key}.bin"


def read_entry(path: Path, key: str | None = None) -> CacheEntry | None:
    """The entry at ``path``, or None if missing, unreadable, truncated, corrupt, or (with
    ``key``) written for another key."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < len(_MAGIC) + 4 or data[: len(_MAGIC)] != _MAGIC:
        return None
    (hlen,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    if len(data) < start + hlen:
        return None
    try:
        meta = json.loads(data[start: start + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    payload = data[start + hlen:]
    if not isinstance(meta, dict) or meta.get("payload_sha256") != hashlib.sha256(payload).hexdigest() \
            or meta.get("payload_len") != len(payload):
        return None
    if key is not None and meta.get("key") != key:
        return None
    return CacheEntry(payload, meta)


def write_entry(path: Path, payload: bytes, meta: dict) -> None:
    """Publish atomically: temp file, fsync, os.replace, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, payload_sha256=hashlib.sha256(payload).hexdigest(), payload_len=len(payload))
    header = json.dumps(meta, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", len(header)) + header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def key_lock(family: str, key: str):
    """Exclusive inter-process lock for one key (released if the holder dies)."""
    lock_dir = cache_root() / family / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def unwritable_reason() -> str | None:
    """Why entries cannot be published under the cache root (the OSError's text), or None if a
    file can be created there."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=root)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return str(e)
    return None


def cache_size_bytes() -> tuple[int, int]:
    """(number of entries, total bytes) under the cache root (files named like entries; not read)."""
    n = total = 0
    for d in _families(cache_root()):
        for p in d.iterdir():
            if _KEY_BIN.match(p.name) and _is_file(p):
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
                    n += 1
    return n, total


_KEY_BIN = re.compile(r"^[0-9a-f]{64}\.bin$")
_KEY_TMP = re.compile(r"^[0-9a-f]{64}\.bin\..+\.tmp$")
_KEY_LOCK = re.compile(r"^[0-9a-f]{64}\.lock$")


def _is_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _families(root: Path):
    # Only epcomm's own layout is touched (<root>/<family>/<64-hex key>.bin, its temp files and
    # locks/<key>.lock): the root may be a directory the user shares with other things.
    if not root.is_dir() or root.is_symlink():
        return
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.is_symlink():
            yield d


def list_entries() -> list[tuple[Path, dict | None, int]]:
    """Every entry file under the cache root (named by its 64-hex key) with its header, or None
    for an unreadable or corrupt one (which a build treats as a miss), and its size."""
    out = []
    for d in _families(cache_root()):
        for p in sorted(d.iterdir()):
            if not (_KEY_BIN.match(p.name) and _is_file(p)):
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue  # removed meanwhile
            ent = read_entry(p, p.stem)
            out.append((p, ent.meta if ent is not None else None, size))
    return out


def clear() -> tuple[int, int]:
    """Remove every entry, every temp file left by an interrupted publish (older than ten
    minutes) and every lock that no process holds.  Returns (files removed, bytes freed).  Only
    files named like epcomm's (a 64-hex key) are touched, never through a symlink, and a
    directory is removed only when it held epcomm's files and is now empty.  Safe while other
    processes build: a build that loses its entry compiles again, and publishing is atomic."""
    n = freed = 0

    def rm(p: Path) -> bool:
        nonlocal n, freed
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            return False
        n += 1
        freed += size
        return True

    now = time.time()
    for d in _families(cache_root()):
        ours = False
        for p in list(d.iterdir()):
            if not _is_file(p):
                continue
            if _KEY_BIN.match(p.name):
                ours |= rm(p)
            elif _KEY_TMP.match(p.name):
                # a fresh one may be a publish in progress in another process
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > 600:
                        ours |= rm(p)
        locks = d / "locks"
        if locks.is_dir() and not locks.is_symlink():
            for p in list(locks.iterdir()):
                if not (_KEY_LOCK.match(p.name) and _is_file(p)):
                    continue
                try:
                    fd = os.open(p, os.O_RDWR)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held by a build in progress
                    os.close(fd)
                    continue
                try:
                    ours |= rm(p)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
            if ours:
                with contextlib.suppress(OSError):
                    locks.rmdir()  # only if empty
        if ours:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
    return n, freed
