"""Stored contexts: safetensors files written atomically, an index in SQLite, and the hot ones kept in memory.

Layout of a store folder:

    index.sqlite3                 one row per context: owner, model, method, sizes, digest, created, expiry
    contexts/ctx-<32 hex>.safetensors
    corrupt/                      files that failed a check, moved aside for inspection

A file is written under a temporary name, flushed to disk, renamed into place, and only then given a row in
the index. A crash at any moment therefore leaves either a complete context with its row, or a file with no row
(a temporary or an orphan), which the next start removes: no half-written context is ever listed. File names
come from ids the store made itself (random, 128 bits), never from a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from ..memory import release_freed_memory

log = logging.getLogger("kvsqueeze.serve")

ID = re.compile(r"ctx-[0-9a-f]{32}")
SUFFIX = ".safetensors"
PARTIAL = ".partial"

SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    ratio REAL,
    quantizer TEXT,
    tokens INTEGER NOT NULL,
    bytes_held INTEGER NOT NULL,
    bytes_full INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS contexts_owner ON contexts (owner, model);
"""


def new_id() -> str:
    return "ctx-" + secrets.token_hex(16)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None


class ContextUnreadable(Exception):
    """A stored context failed its checks when read back; it was moved aside and its row removed."""


@dataclass(frozen=True)
class Record:
    id: str
    owner: str
    model: str
    method: str
    ratio: float | None
    quantizer: str | None
    tokens: int
    bytes_held: int
    bytes_full: int
    file_bytes: int
    sha256: str
    created_at: float
    expires_at: float | None


@dataclass
class Usage:
    contexts: int
    bytes_in_memory: int
    bytes_on_disk: int
    bytes_held: int  # the contexts' caches, compressed
    bytes_full: int  # the same caches uncompressed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: Path, sync: bool = False) -> tuple[str, int]:
    """(sha256, size) of a file; `sync` also flushes it to disk."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb+" if sync else "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            size += len(block)
        if sync:
            os.fsync(f.fileno())
    return sha.hexdigest(), size


def file_problem(path: Path, expected_size: int) -> str | None:
    """What is wrong with a stored file, cheaply (size and safetensors header); None when it looks whole."""
    try:
        size = path.stat().st_size
        if size != expected_size:
            return f"{size} bytes on disk, {expected_size} written (truncated or replaced)"
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if 8 + header_size > size:
                return "its header runs past the end of the file"
            header = json.loads(f.read(header_size))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if max(ends, default=0) != size - 8 - header_size:
            return "its tensors do not fill the file"
    except FileNotFoundError:
        return "the file is missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"unreadable header ({error})"
    return None


class Store:
    """Contexts of one model, on disk and, up to `memory_budget` bytes, in memory (least recently used dropped first).

    `load(path)` reads a context file back (CompressedContext.load with the served model); it is called by whoever
    calls `open`, so a server calls `open` only from the thread that owns the model. Every other method may be
    called from any thread.
    """

    def __init__(self, root: str | Path, model: str, load: Callable[[Path], object], memory_budget: int,
                 clock: Callable[[], float] = time.time):
        self.root, self.model, self._load = Path(root), model, load
        self.memory_budget, self.clock = memory_budget, clock
        self.files, self.corrupt = self.root / "contexts", self.root / "corrupt"
        self.files.mkdir(parents=True, exist_ok=True)
        self.corrupt.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._memory: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.problems: deque[str] = deque(maxlen=100)  # the latest files found wrong (all are in the log)
        self.skipped = 0  # how many files were found wrong and moved aside since start
        self.recover()

    # -- start-up -------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Make the folder and the index agree after any stop: temporaries and orphans removed, expired contexts
        removed, files that are missing, truncated or unreadable reported and moved aside."""
        with self._lock:
            self.purge_expired()
            known = {row[0] for row in self._db.execute("SELECT id FROM contexts")}
            for path in self.files.iterdir():
                stem = path.name.removesuffix(SUFFIX)
                if path.name.endswith(PARTIAL) or not (path.name.endswith(SUFFIX) and stem in known):
                    log.info("store: removing %s (an interrupted write)", path.name)
                    path.unlink(missing_ok=True)
            for record in self._select("model = ?", (self.model,)):
                if problem := file_problem(self._path(record.id), record.file_bytes):
                    self._set_aside(record, problem)

    # -- writing --------------------------------------------------------------------------------------------

    def add(self, owner: str, context, *, method: str, ratio: float | None, quantizer: str | None,
            ttl_seconds: float | None,
            write: Callable[[Path], None], max_per_owner: int | None = None) -> Record:
        """Store `context` for `owner`: `write(path)` writes its file (CompressedContext.save), then the file is
        flushed, renamed into place and indexed. Raises LimitError when the owner already holds `max_per_owner`."""
        self.check_room(owner, max_per_owner)
        id = new_id()
        partial, final = self.files / (id + PARTIAL), self._path(id)
        try:
            write(partial)
            sha256, size = digest(partial, sync=True)
            now = self.clock()
            stats = context.stats
            record = Record(id=id, owner=owner, model=self.model, method=method, ratio=ratio, quantizer=quantizer,
                            tokens=stats.context_tokens, bytes_held=stats.bytes_held,
                            bytes_full=stats.bytes_uncompressed, file_bytes=size, sha256=sha256, created_at=now,
                            expires_at=None if ttl_seconds is None else now + ttl_seconds)
            with self._lock:
                self.check_room(owner, max_per_owner)  # again: others may have stored meanwhile
                os.replace(partial, final)
                fsync_dir(self.files)
                self._db.execute(f"INSERT INTO contexts VALUES ({', '.join('?' * len(fields(Record)))})", tuple(asdict(record).values()))
                self._remember(id, context)
            return record
        finally:
            partial.unlink(missing_ok=True)

    def check_room(self, owner: str, max_per_owner: int | None) -> None:
        if max_per_owner is not None and self.count(owner) >= max_per_owner:
            raise LimitError(f"this key already holds {max_per_owner} contexts, the most allowed; delete one first")

    def delete(self, id: str, owner: str) -> bool:
        with self._lock:
            if self.get(id, owner) is None:
                return False
            self._remove(id)
            return True

    def purge_expired(self) -> int:
        """Remove every expired context (of any model); returns how many."""
        with self._lock:
            expired = [row[0] for row in self._db.execute(
                "SELECT id FROM contexts WHERE expires_at IS NOT NULL AND expires_at <= ?", (self.clock(),))]
            for id in expired:
                self._remove(id)
            if expired:
                log.info("store: removed %d expired context(s)", len(expired))
            return len(expired)

    # -- reading --------------------------------------------------------------------------------------------

    def get(self, id: str, owner: str) -> Record | None:
        """The record of a live context of this model owned by `owner`, or None (unknown, another's, expired)."""
        if not valid_id(id):
            return None
        rows = self._select("id = ? AND owner = ? AND model = ?", (id, owner, self.model), live=True)
        return rows[0] if rows else None

    def list(self, owner: str) -> list[Record]:
        return self._select("owner = ? AND model = ?", (owner, self.model), live=True, order="created_at")

    def count(self, owner: str) -> int:
        with self._lock:
            now = self.clock()
            return self._db.execute("SELECT COUNT(*) FROM contexts WHERE owner = ? AND (expires_at IS NULL OR "
                                    "expires_at > ?)", (owner, now)).fetchone()[0]

    def open(self, record: Record):
        """The context of `record`: from memory, or read back from its file (digest checked) and kept in memory.
        Raises ContextUnreadable when the file fails its checks (it is moved aside), KeyError when the context was
        deleted meanwhile."""
        with self._lock:
            if record.id in self._memory:
                self._memory.move_to_end(record.id)
                return self._memory[record.id][0]
        path = self._path(record.id)
        try:
            problem = file_problem(path, record.file_bytes)
            if problem is None and digest(path)[0] != record.sha256:
                problem = "its content changed since it was written (digest differs)"
            if problem is None:
                context = self._load(path)
        except FileNotFoundError:
            problem = "the file is missing"
        except Exception as error:  # noqa: BLE001  a damaged file may fail in any way; the server must keep going
            problem = f"it cannot be loaded ({type(error).__name__}: {error})"
        with self._lock:
            if self._db.execute("SELECT 1 FROM contexts WHERE id = ?", (record.id,)).fetchone() is None:
                raise KeyError(record.id)  # deleted while it was being read
            if problem is not None:
                self._set_aside(record, problem)
                raise ContextUnreadable(f"context {record.id} could not be read back: {problem}; it was removed")
            self._remember(record.id, context)
        return context

    def usage(self) -> Usage:
        with self._lock:
            now = self.clock()
            count, disk, held, full = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(file_bytes), 0), COALESCE(SUM(bytes_held), 0), "
                "COALESCE(SUM(bytes_full), 0) FROM contexts WHERE model = ? AND (expires_at IS NULL OR expires_at > ?)",
                (self.model, now)).fetchone()
            memory = sum(size for _, size in self._memory.values())
        return Usage(count, memory, disk, held, full)

    def in_memory(self) -> list[str]:
        with self._lock:
            return list(self._memory)

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
            self._db.close()

    # -- inside ---------------------------------------------------------------------------------------------

    def _path(self, id: str) -> Path:
        assert valid_id(id), id  # ids come from new_id through the index, never from a request
        return self.files / (id + SUFFIX)

    def _select(self, where: str, args: tuple, live: bool = False, order: str | None = None) -> list[Record]:
        query = f"SELECT * FROM contexts WHERE {where}"
        if live:
            query += " AND (expires_at IS NULL OR expires_at > ?)"
            args = args + (self.clock(),)
        if order:
            query += f" ORDER BY {order}"
        with self._lock:
            return [Record(*row) for row in self._db.execute(query, args)]

    def _remember(self, id: str, context) -> None:
        self._memory[id] = (context, context.nbytes())
        self._memory.move_to_end(id)
        total = sum(size for _, size in self._memory.values())
        while self._memory and total > self.memory_budget:
            _, (_, size) = self._memory.popitem(last=False)
            total -= size
            release_freed_memory()

    def _remove(self, id: str) -> None:
        self._memory.pop(id, None)
        release_freed_memory()
        self._db.execute("DELETE FROM contexts WHERE id = ?", (id,))
        self._path(id).unlink(missing_ok=True)

    def _set_aside(self, record: Record, problem: str) -> None:
        message = f"context {record.id} (owner {record.owner}) skipped: {problem}"
        log.warning("store: %s; moved to %s", message, self.corrupt)
        self.problems.append(message)
        self.skipped += 1
        self._memory.pop(record.id, None)
        self._db.execute("DELETE FROM contexts WHERE id = ?", (record.id,))
        path = self._path(record.id)
        if path.exists():
            os.replace(path, self.corrupt / path.name)


class LimitError(Exception):
    """An owner holds as many contexts as allowed."""
