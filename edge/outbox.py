"""The durable outbox: every event message is on disk before it is published, until the broker has it.

A missed age check is the failure that matters. paho keeps unacknowledged QoS 1 messages in memory
only, so a daemon restart during a broker outage (a power cut at the till, an OOM kill, a systemd
restart) would lose them. The outbox is an SQLite database in WAL mode (the standard library's
`sqlite3`; `synchronous=FULL`, so a committed message survives a power cut, not only a crash): a row
is committed before the message goes to paho and deleted once the broker acknowledges it. Rows added
while a commit runs go into the next one together (group commit: one fsync for all the cameras'
messages of the moment, and a camera's frame publishes its messages as one batch), and the deletes go
with the next commit or the service's next tick (0.1 s), never with an fsync of their own: a power cut or
a kill may bring back a delivered message, never lose one. On start, the rows left by the previous run
are published again, oldest first, before anything new.

At-least-once: a message the broker received just before a crash, but whose acknowledgement did
not reach us, is sent again after the restart. Every message carries a unique `id` for a consumer
to drop such duplicates.

Bounded: at most `max_messages` rows (the oldest are dropped beyond that, one at a time from the front: an
outbox at its bound pays it at every add) and no row older than `max_age_s` (an age check from yesterday helps
nobody, and the rows are per-person records): such rows are dropped at start, by the service's tick at most
every EXPIRED_SWEEP_EVERY_S while the daemon runs (a weeks-long run through a days-long outage), and a row found
too old when it is about to be sent is dropped then. Drops are counted and published in the status; they are
logged at once the first time, then in one line a minute at most with the count since (a daemon at its bound
drops a message at every add, for days).

Failure is never fatal. A corrupt queue file (the disk or a crash damaged it) is set aside under a
`.corrupt-<time>` name for a person to look at, every message that can still be read from it is
copied into a fresh file, and the outbox goes on on disk: one error line says where the file went
and how many messages were recovered (also in the status, `outbox.set_aside`). A queue file that
cannot be opened or written (permissions, a full disk) gives one error line, and the outbox carries
on in memory (`state = "memory"`, with the reason in the status) so the daemon keeps serving the
tills. After a failed write (a disk that filled up) the file is tried again every `retry_after_s`:
once it takes writes, it is rewritten with exactly the pending messages and the outbox is back on
disk.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edge.logs import SummarizedLog

log = logging.getLogger(__name__)

CORRUPT_KEPT_S = 7 * 86_400  # a corrupt file set aside is kept this long for a person to look at, then removed
EXPIRED_SWEEP_EVERY_S = 60.0  # at most this often the service's tick drops the rows older than max_age_s
WAL_TRUNCATE_EVERY_S = 30.0  # at most this often an empty outbox's write-ahead log is cut to nothing (an fsync)
SCHEMA = """CREATE TABLE IF NOT EXISTS outbox (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
)"""


class OutboxInUse(Exception):
    """Another process has this queue file: two daemons would send and delete each other's messages. `holder`:
    what that process wrote into the lock file, its daemon id and then its camera ids a line each (None: unknown)."""

    def __init__(self, message: str, holder: list[str] | None = None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Queued:
    key: int
    created: float  # wall clock, seconds
    topic: str
    payload: bytes
    qos: int
    retain: bool
    # monotonic, for a row this run added: its age by the clock no one sets. A wall clock set forward (a till PC
    # without a clock battery, booted at an old time, then NTP) would make every row just queued look days old,
    # and the running daemon dropped them all, its alerts too; a previous run's rows have their wall time alone
    added: float | None = None


class Outbox:
    """Messages not yet acknowledged by the broker, oldest first. Thread-safe."""

    def __init__(self, path: Path | None, max_messages: int = 100_000, max_age_s: float = 86_400.0,
                 owner: str | None = None):
        self.path = path
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self.dropped = 0  # rows removed unsent: over the count bound, or too old
        self._full_log = SummarizedLog(log, "outbox full, oldest messages dropped")
        self._expired_log = SummarizedLog(log, "outbox: messages too old to send dropped")
        self._swept_at = time.monotonic()  # the last sweep for rows older than max_age_s (at start: in _open)
        self.state = "memory"  # "disk" while every row is written to `path`
        self.reason: str | None = None if path is None else "not opened"
        self._rows: OrderedDict[int, Queued] = OrderedDict()  # the pending rows, also when on disk
        self._next_key = 1
        # Group commit: the cameras' threads add under `_lock` (memory only, microseconds), then one of them
        # writes every row added meanwhile in one transaction, one fsync for all, under `_disk_lock`, while the
        # others wait there for theirs. One fsync a message, under the lock every thread added under, put every
        # camera behind the disk: 6 cameras on a disk whose fsync takes 5 ms (an SD card, a busy server's disk:
        # 20 ms and more) had frame->alert p99 58 ms against 31 (issue 10). Acknowledgements never wait for the
        # disk: their rows go with the next commit, or the service's next tick deletes them (tidy(), every 0.1 s).
        # Whoever touches `_db` holds `_disk_lock`; `_disk_lock` is always taken before `_lock`, never after.
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        self._unwritten: OrderedDict[int, Queued] = OrderedDict()  # added, not yet committed to the file
        self._undeleted: list[int] = []  # acknowledged or dropped, still in the file
        self._written_upto = 0  # every row added with a key up to this one is committed (or gone)
        self._db: sqlite3.Connection | None = None
        self.retry_after_s = 30.0
        self._retry_at: float | None = None  # monotonic time of the next try after a failed write; None: no retry
        self.set_aside: dict | None = None  # a corrupt file moved away at start: {"file", "recovered"}
        self._lock_fd: int | None = None
        self._closed = False
        self._truncated_at = float("-inf")  # monotonic time of the last write-ahead log truncation
        self._wal_holds_done = False  # acknowledged messages may be in the write-ahead log (tidy())
        # (kind, seconds) -> None, after each commit that wrote: "messages" (rows added, an fsync: what an alert
        # waits for before it is published) or "deletes" (acknowledged rows out, no fsync). The metrics: a till
        # PC's slow disk is in every alert's path, and this is where it shows.
        self.on_commit = None
        if path is not None:
            self._claim(path, owner)
            _forget_old_corrupt(path)
            self._open(path)

    def _claim(self, path: Path, owner: str | None) -> None:
        """One process per queue file, held by an flock on `<path>.lock` until close() or exit (not on the
        database itself: closing any other descriptor of an SQLite file drops SQLite's own locks). The lock file
        names its holder (`owner`: its daemon id, then its camera ids, a line each), so a second daemon refused can
        say whose it is."""
        try:
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # the directory is unusable: _open says so and the outbox stays in memory
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 16384, 0).decode("utf-8", "replace").split() or None
            except OSError:
                holder = None
            os.close(fd)
            raise OutboxInUse(f"outbox.path {path} is in use by another tillsight process"
                              + (f" (daemon {holder[0][:64]})" if holder else "")
                              + ": each daemon needs its own outbox file", holder) from None
        self._lock_fd = fd
        try:  # a previous holder's name goes either way: never said of this process
            os.ftruncate(fd, 0)
            if owner:
                os.pwrite(fd, owner.encode(), 0)
        except OSError:
            pass  # only the refusal's wording needs it

    def _open(self, path: Path, salvaged: list[tuple] | None = None) -> None:
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
            try:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(f"integrity check failed: {check}")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA secure_delete=ON")  # a message acknowledged is overwritten, not left in free pages
                db.execute(SCHEMA)
                rows = db.execute("SELECT key, created, topic, payload, qos, retain FROM outbox ORDER BY key").fetchall()
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            if _corrupt(exc) and salvaged is None:
                self._replace_corrupt(path, exc)
            else:
                self._to_memory(f"cannot use {path}: {exc}{_not_writable(path)}")
            return
        self._db = db
        self.state, self.reason = "disk", None
        if salvaged:
            db.execute("BEGIN")
            db.executemany("INSERT INTO outbox (created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)", salvaged)
            db.execute("COMMIT")
            rows = db.execute("SELECT key, created, topic, payload, qos, retain FROM outbox ORDER BY key").fetchall()
        for key, created, topic, payload, qos, retain in rows:
            self._rows[key] = Queued(key, created, topic, bytes(payload), qos, bool(retain))
        try:  # AUTOINCREMENT's high-water mark: a key is never used twice in a file, even after its row went
            used = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        except sqlite3.Error:
            used = None
        self._next_key = max((rows[-1][0] + 1) if rows else 1, (used[0] + 1) if used else 1)
        self._written_upto = self._next_key - 1
        self._drop_expired()
        self._commit([], self._take_undeleted())

    def _replace_corrupt(self, path: Path, error: BaseException) -> None:
        """Set the damaged file aside, keep what can be read from it, and go on in a fresh file."""
        salvaged = _salvage(path)
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.rename(f"{aside}{suffix}")
                    os.utime(f"{aside}{suffix}")  # its week (CORRUPT_KEPT_S) runs from now, not its last write
        except OSError as exc:
            self._to_memory(f"cannot use {path}: {error}; and cannot move it aside: {exc}")
            return
        self.set_aside = {"file": str(aside), "recovered": len(salvaged)}
        log.error("outbox file corrupt: set aside, readable messages recovered into a new file",
                  extra={"reason": str(error), "moved_to": str(aside), "recovered": len(salvaged)})
        self._open(path, salvaged)

    def _to_memory(self, reason: str) -> None:
        """A disk problem: one line, then carry on without the file."""
        log.error("outbox on disk unusable, keeping messages in memory only", extra={"reason": reason})
        self.state, self.reason = "memory", reason
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _retry_disk(self) -> None:
        """After a failed write: the file again, holding exactly what is pending now."""
        self._retry_at = time.monotonic() + self.retry_after_s
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA secure_delete=ON")
                db.execute(SCHEMA)
                db.execute("BEGIN")
                db.execute("DELETE FROM outbox")  # rows acknowledged meanwhile could not be deleted then
                db.executemany("INSERT INTO outbox (key, created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?, ?)",
                               [(r.key, r.created, r.topic, r.payload, r.qos, int(r.retain)) for r in self._rows.values()])
                db.execute("COMMIT")
            except BaseException:
                db.close()
                raise
        except sqlite3.Error:
            return  # still failing: already said, stay in memory
        self._db, self._retry_at = db, None
        self._unwritten.clear()
        self._undeleted.clear()
        self._written_upto = self._next_key - 1
        self.state, self.reason = "disk", None
        log.warning("outbox back on disk", extra={"path": str(self.path), "messages": len(self._rows)})

    def _drop_expired(self) -> None:
        """At start: every row older than max_age_s, wherever it is (a wall clock that stepped back leaves a
        younger row before an older one)."""
        limit = time.time() - self.max_age_s
        self._expire([key for key, row in self._rows.items() if row.created < limit])

    def _sweep_expired(self) -> None:
        """While running, under `_lock`: the rows older than max_age_s from the front, where the oldest are,
        up to the first younger one: a sweep costs the rows that expired since the last, where a scan of a
        100,000-row outbox took 32 ms under the lock the cameras add under. A row left behind a younger one by a
        clock step goes when that one does, and is never sent meanwhile (get())."""
        old = []
        for key, row in self._rows.items():
            if not self._too_old(row):
                break
            old.append(key)
        self._expire(old)

    def _too_old(self, row: Queued) -> bool:
        if row.added is not None:
            return time.monotonic() - row.added > self.max_age_s
        return row.created < time.time() - self.max_age_s

    def _expire(self, keys: list[int]) -> None:
        """Under `_lock` (or alone, at the start): rows too old to send, dropped."""
        if keys:
            self._remove(keys)
            self.dropped += len(keys)
            self._expired_log.count(logging.WARNING, len(keys), dropped=self.dropped, max_age_s=self.max_age_s)

    def _drop_oldest(self, count: int) -> None:
        """Under `_lock`: over the bound, the `count` oldest rows, taken from the front one by one. A copy of every
        key to find them, at each add of an outbox at its bound, cost 3.4 ms under the lock the cameras and the
        broker's acks share (100,000 rows)."""
        for _ in range(count):
            key, _row = self._rows.popitem(last=False)
            self._off_disk(key)
        self.dropped += count
        self._full_log.count(logging.ERROR, count, dropped=self.dropped, max_messages=self.max_messages)

    def _remove(self, keys: list[int]) -> None:
        """Under `_lock`: rows gone from memory now, from the file with the next commit."""
        for key in keys:
            self._rows.pop(key, None)
            self._off_disk(key)

    def _off_disk(self, key: int) -> None:
        """Under `_lock`: a row gone from memory leaves the file with the next commit (never written: nothing to do)."""
        if self._unwritten.pop(key, None) is None and self._db is not None:
            self._undeleted.append(key)

    def _take_undeleted(self) -> list[int]:
        with self._lock:
            keys, self._undeleted = self._undeleted, []
            return keys

    def _commit(self, rows: list[Queued], deletes: list[int]) -> None:
        """Under `_disk_lock` (or alone, at the start): `rows` into the file and `deletes` out of it, in one
        transaction. With rows, synchronous=FULL: on disk across a power cut before any of them is published.
        Deletes alone are committed without an fsync (synchronous=NORMAL in WAL mode: durable across a crash,
        and across a power cut from the next add's fsync): a power cut can only bring back a message the broker
        already has, which at-least-once allows (every message carries an id)."""
        db = self._db
        if db is None or not (rows or deletes):
            return
        started = time.perf_counter()
        try:
            if len(rows) == 1 and not deletes:  # a till's usual message alone: one statement, as few hand-overs
                row = rows[0]                   # of the interpreter lock as a camera's thread can make
                db.execute("INSERT INTO outbox (key, created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?, ?)",
                           (row.key, row.created, row.topic, row.payload, row.qos, int(row.retain)))
                self._committed("messages", started)
                return
            if not rows:
                db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute("BEGIN")
                db.executemany("INSERT INTO outbox (key, created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?, ?)",
                               [(r.key, r.created, r.topic, r.payload, r.qos, int(r.retain)) for r in rows])
                for start in range(0, len(deletes), 500):
                    chunk = deletes[start : start + 500]
                    db.execute(f"DELETE FROM outbox WHERE key IN ({','.join('?' * len(chunk))})", tuple(chunk))
                db.execute("COMMIT")
            finally:
                if not rows:
                    db.execute("PRAGMA synchronous=FULL")  # every add: on disk before it is published
        except sqlite3.Error as exc:
            try:
                db.rollback()
            except sqlite3.Error:
                pass
            with self._lock:  # the rows stay in memory; a retry rewrites the file with exactly what is pending
                self._to_memory(f"cannot write {self.path}: {exc}")
                self._retry_at = time.monotonic() + self.retry_after_s
            return
        if deletes:
            self._wal_holds_done = True
        self._committed("messages" if rows else "deletes", started)

    def _committed(self, kind: str, started: float) -> None:
        if self.on_commit is not None:
            self.on_commit(kind, time.perf_counter() - started)

    def _sync(self, key: int) -> None:
        """Wait until row `key` is committed: by this thread, with every row added meanwhile, or by the thread
        whose commit took it."""
        with self._disk_lock:
            with self._lock:
                if self._db is None:
                    if self._retry_at is None or time.monotonic() < self._retry_at:
                        return  # in memory until the next retry
                    self._retry_disk()  # the file again, with every pending row
                    return
                if self._written_upto >= key:
                    return  # a commit that took this row
                rows = list(self._unwritten.values())
                self._unwritten.clear()
                # the acknowledged rows too, in the same transaction: on a busy disk the tick rarely finds it free
                deletes, self._undeleted = self._undeleted, []
                upto = self._next_key - 1
            self._commit(rows, deletes)
            if self._db is not None:
                self._written_upto = upto

    def tidy(self) -> None:
        """Called every tick by the service (its own thread, not paho's). The write-ahead log keeps every message
        written since its last reset, acknowledged or not (197 estimates with their transaction ids after a kill -9,
        2026-11-27 privacy review): once nothing waits, it is folded into the file (whose deleted rows
        secure_delete zeroed) and cut to nothing, at most every WAL_TRUNCATE_EVERY_S, so an acknowledged message
        is gone from the disk within that. A reader holding the file (a backup tool) is not waited for: the next
        tick tries again; a failure is no reason to leave the disk (the messages are safe either way). Also: the
        rows older than max_age_s go, at most every EXPIRED_SWEEP_EVERY_S, and the drops counted since the last
        line about them are said once its minute has passed."""
        self._sweep_expired_if_due()
        self._full_log.flush()
        self._expired_log.flush()
        if not self._disk_lock.acquire(blocking=False):
            return  # a commit is under way: it takes the acknowledged rows too
        try:
            self._commit([], self._take_undeleted())
            self._truncate_wal()
        finally:
            self._disk_lock.release()

    def _sweep_expired_if_due(self) -> None:
        with self._lock:
            if time.monotonic() - self._swept_at >= EXPIRED_SWEEP_EVERY_S:
                self._swept_at = time.monotonic()
                self._sweep_expired()

    def _truncate_wal(self) -> None:
        if not self._wal_holds_done or time.monotonic() - self._truncated_at < WAL_TRUNCATE_EVERY_S:
            return
        with self._lock:
            if self._db is None or self._rows:
                return
            self._truncated_at = time.monotonic()
            try:
                self._db.execute("PRAGMA busy_timeout=0")
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                self._wal_holds_done = bool(busy)
            except sqlite3.Error as exc:
                log.debug("outbox write-ahead log not truncated", extra={"reason": str(exc)})
            finally:
                try:
                    self._db.execute("PRAGMA busy_timeout=5000")
                except sqlite3.Error:
                    pass

    def add(self, topic: str, payload: bytes, qos: int, retain: bool = False, sync: bool = True) -> int:
        """Keep a message until `done(key)`; returns its key once it is on disk (sync=False: at once, and
        sync(key) before it is published)."""
        created = time.time()
        with self._lock:
            if self._closed:  # a pipeline that outlived the stop's wait for it: nothing will send or keep this
                log.error("a message came after the outbox closed: lost", extra={"topic": topic[:200]})
            key = self._next_key
            self._next_key = key + 1
            self._rows[key] = row = Queued(key, created, topic, payload, qos, retain, time.monotonic())
            if self._db is not None and not self._closed:
                self._unwritten[key] = row
            if len(self._rows) > self.max_messages:
                self._drop_oldest(len(self._rows) - self.max_messages)
        if sync:
            self._sync(key)
        return key

    def sync(self, key: int) -> None:
        """Every row added up to `key` is on disk (or the outbox is in memory) when this returns."""
        self._sync(key)

    def done(self, key: int) -> None:
        """The broker has the message (or refused it for good): forget it."""
        with self._lock:
            if key in self._rows:
                self._remove([key])

    def get(self, key: int) -> Queued | None:
        """A message still kept, or None once done or dropped: over the bound, or too old, also now (a message
        held back through an outage longer than max_age_s is dropped here, never sent)."""
        with self._lock:
            row = self._rows.get(key)
            if row is not None and self._too_old(row):
                self._expire([key])
                return None
            return row

    def backlog(self) -> list[Queued]:
        """What the previous run left unsent (and anything not yet acknowledged), oldest first."""
        with self._lock:
            return list(self._rows.values())

    def depth(self) -> int:
        with self._lock:
            return len(self._rows)

    def status(self) -> dict:
        with self._lock:
            return {"state": self.state, "path": None if self.path is None else str(self.path),
                    "depth": len(self._rows), "dropped": self.dropped, "reason": self.reason,
                    "set_aside": self.set_aside}

    def close(self) -> None:
        with self._disk_lock:
            with self._lock:
                self._closed = True  # an add from now on is said lost, not left waiting for a commit that never comes
                rows = list(self._unwritten.values())  # an add that came before: kept for the next start
                self._unwritten.clear()
                deletes, self._undeleted = self._undeleted, []
            self._commit(rows, deletes)
            self._close_file()

    def _close_file(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._db.close()
                except sqlite3.Error:
                    pass
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def _not_writable(path: Path) -> str:
    """Why SQLite's "unable to open database file" (or "attempt to write a readonly database"), if it is this
    process's permissions: said with the setting to change, where the line named neither."""
    for target, what in ((path, "the file"), (path.parent, "its folder")):
        if target.exists() and not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
            return f" ({what} {target} is not writable by uid {os.geteuid()}: change its owner or mode, or " \
                   "outbox.path)"
    return ""


def _forget_old_corrupt(path: Path) -> None:
    """The corrupt files set aside more than CORRUPT_KEPT_S ago: their messages (per-person records) are long past
    delivering (outbox.max_age_s), and a file kept for ever is a record kept for ever."""
    for aside in path.parent.glob(f"{glob.escape(path.name)}.corrupt-*"):
        try:
            if time.time() - aside.stat().st_mtime > CORRUPT_KEPT_S:
                aside.unlink()
                log.info("an outbox file set aside as corrupt long ago removed", extra={"file": str(aside)})
        except OSError:
            pass


def _corrupt(error: BaseException) -> bool:
    """SQLite's "not a database" and "malformed" (and our failed integrity check), as against a file
    that cannot be opened, is locked or cannot be written (OperationalError) or an OS error."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError)


def _salvage(path: Path) -> list[tuple]:
    """(created, topic, payload, qos, retain) of every row still readable, oldest first: forwards from
    the start and backwards from the end, each until the damage stops it."""
    found: dict[int, tuple] = {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        for order in ("ASC", "DESC"):
            try:
                for key, *row in db.execute("SELECT key, created, topic, payload, qos, retain FROM outbox "
                                            f"ORDER BY key {order}"):
                    if key in found:
                        break
                    found[key] = tuple(row)
            except sqlite3.Error:
                continue
    finally:
        db.close()
    return [found[key] for key in sorted(found)]
