"""Store analytics: how many customers of each age band a till served, per interval. Nothing per person.

Each customer's final age (when their track ends) is counted in its band;
at the end of every interval (aligned to the store's local clock: 08:00,
08:15, ...; a daily interval runs from local midnight, not UTC's) one
message per camera gives the counts. A band with fewer than `k` customers is
suppressed (null): a count of one or two at a small till could point at a
person; a band nobody fell in is 0, which points at nobody. No total is
sent, so a suppressed band cannot be worked out by subtraction. Every
interval is sent, one without customers too, with the seconds in it during
which the camera could not see (`camera_fault_s`): so "nobody came" and "the
camera was covered" are told apart.

Only an open store's customers are counted: with `opening_hours`, the faces
seen while it is closed are staff (cleaning, restocking), and the interval
says how many of its seconds the store was closed (`store_closed_s`); a dark
picture then is not a camera fault.

An interval is exact about the time it covers: one that counting joined part
way (the daemon started or was reloaded at 08:07, or the wall clock stepped
back) starts then and is `partial`, like the one a stopping daemon sends. A
restart inside 08:00-08:15 thus gives two partial messages, 08:00-08:07 and
08:07-08:15, that add up, rather than a second one that claims all of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def local_utc_offset_s(t: float) -> float:
    """Seconds east of UTC on this machine's clock at time t (its time zone, summer time included)."""
    return float(time.localtime(t).tm_gmtoff)


def slot_at(t: float, interval_s: float, utc_offset_s: Callable[[float], float]) -> tuple[float, float]:
    """The clock-aligned interval slot time t falls in, (start, end) in UTC seconds: from one multiple of
    `interval_s` on the local clock (counted from local midnight for one that divides a day) to the next.

    A slot ends where the local clock first reads the next multiple, not `interval_s` after its start: the slot a
    summer-time change falls in is that much longer or shorter, and each slot ends where the next one begins.
    (Its end as start + interval_s overlapped the next daily slot, by 22 hours in the autumn and one in the
    spring.) Where the clock goes back, a slot whose end the first pass already read runs on to the
    end of the second: with 15-minute slots in London, 01:45 BST to 02:00 GMT, 75 minutes. Where it jumps ahead,
    the local times skipped have no slot, and one ending in them ends at the jump."""
    wall = t + utc_offset_s(t)
    mark = math.floor(wall / interval_s) * interval_s
    while _first_instant_reading(mark + interval_s, utc_offset_s) <= t:  # the clock went back: read on the first pass
        mark += interval_s
    return _first_instant_reading(mark, utc_offset_s), _first_instant_reading(mark + interval_s, utc_offset_s)


def _first_instant_reading(wall: float, utc_offset_s: Callable[[float], float]) -> float:
    """The first time (UTC seconds) at which the local clock reads `wall` (local seconds) or later: of a local
    time read twice (the clock went back), the first; of one skipped (it jumped ahead), the jump itself."""
    # a clock changes at most once within a day of any time: the offsets before and after such a change
    before, after = utc_offset_s(wall - 86_400), utc_offset_s(wall + 86_400)
    readings = [wall - offset for offset in {before, after} if utc_offset_s(wall - offset) == offset]
    if readings:
        return min(readings)
    # skipped: the jump lies between the readings by the offset after it and before it; found to the second
    low, high = math.floor(wall - after), math.ceil(wall - before)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if middle + utc_offset_s(middle) >= wall else (middle, high)
    return float(high)


def band_names(edges: list[int]) -> list[str]:
    """[18, 25, 35] -> ['0-17', '18-24', '25-34', '35+']."""
    bounds = [0] + list(edges)
    names = [f"{low}-{high - 1}" for low, high in zip(bounds, bounds[1:])]
    return names + [f"{bounds[-1]}+"]


def band_of(age: float, edges: list[int]) -> str:
    names = band_names(edges)
    return names[sum(age >= edge for edge in edges)]


@dataclass
class AgeBandCounter:
    """Counts of one camera's customers by age band, for the interval in progress."""

    camera_id: str
    edges: list[int]
    interval_s: float
    k: int
    started: float | None = None  # when the interval in progress began to be counted
    slot: float | None = None  # the clock-aligned start of the interval in progress (08:00, 08:15, ...)
    slot_end: float | None = None  # where the local clock reads its next multiple of interval_s (slot_at)
    joined: bool = True  # the next interval opened begins where counting (re)started, not at its slot
    counts: dict[str, int] = field(default_factory=dict)
    fault_s: float = 0.0  # seconds of the interval in progress during which the camera could not see
    closed_s: float = 0.0  # seconds of it during which the store was closed (nobody counted, no camera fault)
    # a random id of the interval in progress, made when it opens and kept with it on disk: the message's id is
    # made from it (edge/publish.py), so a re-send after a crash repeats the id, while the same clock slot counted
    # again over other customers (the wall clock stepped back) is another interval, with another id
    opening: str | None = None
    # The end of the last whole interval sent, None once counting stopped (partial). A customer is counted when the
    # till finds them gone, lost_after_s after their last face: on the frame that sent 08:00-08:15, or later, one
    # last seen at 08:14:59 reopened 08:00-08:15, and it was sent a second time, over that customer alone. Now
    # they are counted in the interval in progress (08:15-08:30), and no slot is sent twice.
    sent_until: float | None = None
    # Slots are aligned in local time: an hourly interval in a UTC+5:30 store runs 09:00-10:00 there, a daily
    # one from local midnight. A summer-time change makes the slot it falls in an hour longer or shorter.
    utc_offset_s: Callable[[float], float] = local_utc_offset_s

    def open(self, now: float) -> None:
        """Make sure an interval is in progress (one without customers is sent too)."""
        self._open(now)

    def add(self, age: float, now: float) -> None:
        self._open(now)
        band = band_of(age, self.edges)
        self.counts[band] = self.counts.get(band, 0) + 1

    def due(self, now: float) -> bool:
        return self.slot_end is not None and now >= self.slot_end

    def flush(self, now: float, partial: bool = False) -> dict | None:
        """The interval's message (None if none is open), and a fresh interval. `partial`: counting stops
        here (the daemon stops, the clock stepped back), and the next interval begins where it starts again."""
        if self.started is None:
            return None
        end = now if partial else self.slot_end
        bands = {name: _published(self.counts.get(name, 0), self.k) for name in band_names(self.edges)}
        message = {"camera": self.camera_id, "interval_start": self.started, "interval_end": end,
                   "bands": bands, "k": self.k, "partial": partial or self.started > self.slot,
                   "camera_fault_s": round(self.fault_s, 1), "store_closed_s": round(self.closed_s, 1),
                   "opening": self.opening}
        self.started, self.slot, self.slot_end, self.counts = None, None, None, {}
        self.fault_s, self.closed_s, self.opening = 0.0, 0.0, None
        self.joined = partial
        self.sent_until = None if partial else end  # counting that starts again (a clock step back) starts afresh
        return message

    def state(self, now: float) -> dict | None:
        """The interval in progress, raw counts included, as OpenIntervals keeps it on disk; None if none is open."""
        if self.started is None:
            return None
        return {"camera": self.camera_id, "edges": list(self.edges), "interval_s": self.interval_s, "k": self.k,
                "started": self.started, "slot": self.slot, "counts": dict(self.counts),
                "fault_s": round(self.fault_s, 1), "closed_s": round(self.closed_s, 1), "saved_at": now,
                "opening": self.opening}

    @classmethod
    def left_message(cls, state: dict) -> dict:
        """The message for an interval a previous run left open: partial, ending when it was last saved."""
        counter = cls(state["camera"], state["edges"], state["interval_s"], state["k"], started=state["started"],
                      slot=state["slot"], counts=dict(state["counts"]), fault_s=state["fault_s"],
                      closed_s=state.get("closed_s", 0.0),  # a file saved before closed_s existed
                      opening=state.get("opening"))  # (or before opening did: its id is its times' alone)
        return counter.flush(state["saved_at"], partial=True)

    def _open(self, now: float) -> None:
        if self.started is None:
            if self.sent_until is not None:  # a customer found gone after their interval was sent
                now = max(now, self.sent_until)
            self.slot, self.slot_end = slot_at(now, self.interval_s, self.utc_offset_s)
            self.started = now if self.joined else self.slot
            self.joined = False
            self.opening = uuid.uuid4().hex


def _published(count: int, k: int) -> int | None:
    """0 and counts of k or more as they are; 1 to k-1 suppressed."""
    return count if count == 0 or count >= k else None


class OpenIntervals:
    """Every camera's interval in progress, in a small file beside the outbox, so that a daemon killed outright
    (a power cut, an OOM kill: no clean stop to send the partial interval) loses no counts: the next start sends
    each as a partial interval ending at its last save. Saved at once when a count changes or an interval closes,
    else every SAVE_EVERY_S for the fault seconds; written whole (a temporary file renamed over the old one,
    fsync'd), so a cut mid-write leaves the previous save. At-least-once, like the outbox: a cut between a clean
    stop's message and its save can send that interval twice."""

    SAVE_EVERY_S = 10.0

    def __init__(self, path: Path, write_on_save: bool = True):
        self.path = path
        # False: save() keeps the change in memory and flush() writes it (the daemon's tick, every 0.1 s, and its
        # stop), so that a camera's thread never waits for the file's two fsyncs (issue 10: on a disk whose fsync
        # took 20 ms, a customer leaving held that camera's next frame 40 ms and more)
        self.write_on_save = write_on_save
        self._intervals: dict[str, dict] = {}  # camera -> AgeBandCounter.state()
        self._written: dict[str, tuple] = {}  # camera -> (started, counts) last written
        self._written_at = 0.0  # monotonic
        self._failing = False
        self._dirty = False  # changed since the last write began
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()  # the one writer

    def take_left(self, max_age_s: float, now: float | None = None, send=None) -> list[dict]:
        """The messages of the intervals the previous run left open, each given to `send` (into the outbox) before
        the file is removed: a crash in between sends them twice, never loses them. Those saved more than
        `max_age_s` ago are dropped, as the outbox drops its old messages."""
        now = time.time() if now is None else now
        try:
            states = json.loads(self.path.read_text())
            messages = [AgeBandCounter.left_message(state) for state in states.values()]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("analytics intervals left by the previous run are unreadable: not sent",
                        extra={"file": str(self.path), "error": repr(exc)[:200]})
            messages = []
        fresh = [m for m in messages if now - m["interval_end"] <= max_age_s]
        if len(fresh) < len(messages):
            log.warning("analytics intervals left by the previous run are too old: not sent",
                        extra={"dropped": len(messages) - len(fresh), "max_age_s": max_age_s})
        for message in fresh if send is not None else ():
            send(message)
        self.path.unlink(missing_ok=True)
        return fresh

    def save(self, camera_id: str, state: dict | None) -> None:
        """A camera's interval now (None: none open). Written when its counts or start changed, else at most every
        SAVE_EVERY_S."""
        with self._lock:
            if state is None:
                changed = self._intervals.pop(camera_id, None) is not None
                self._written.pop(camera_id, None)
            else:
                self._intervals[camera_id] = state
                changed = self._written.get(camera_id) != (state["started"], state["counts"])
            if not (changed or (self._intervals and time.monotonic() - self._written_at >= self.SAVE_EVERY_S)):
                return
            self._dirty = True
        if self.write_on_save:
            self.flush()

    def flush(self) -> None:
        """Write the intervals while they changed since the last write. One thread writes (two fsyncs), outside
        the lock every camera's frame takes: a camera that finds a write under way goes on, and the writer writes
        again for it (the lock is released under `_lock` only with nothing left to write). Written under the
        cameras' lock, a slow disk's fsyncs held every camera up (issue 10)."""
        while self._file_lock.acquire(blocking=False):
            with self._lock:
                if not self._dirty:
                    self._file_lock.release()
                    return
                self._dirty = False
                text = json.dumps(self._intervals)
                written = {camera: (state["started"], dict(state["counts"])) for camera, state in self._intervals.items()}
            try:
                if self._write(text):
                    with self._lock:
                        self._written, self._written_at = written, time.monotonic()
            finally:
                self._file_lock.release()

    def _write(self, text: str) -> bool:
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with open(partial, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)  # the rename itself must survive a power cut
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            if not self._failing:  # once per failing streak: a full disk must not flood the journal
                log.warning("analytics intervals in progress cannot be saved: a crash now would lose their counts",
                            extra={"file": str(self.path), "error": exc.strerror or str(exc)})
            self._failing = True
            return False
        if self._failing:
            log.info("analytics intervals in progress saved again", extra={"file": str(self.path)})
        self._failing = False
        return True
