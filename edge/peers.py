"""The store's other daemons, as their status messages tell them: a copy of this daemon (a till PC
cloned from another keeps its host name, so its `daemon_id`, and often its config) or another
daemon serving one of this daemon's cameras.

Two daemons on one camera id publish each other's customers to that till's POS, and both answer
its age checks, perhaps differently. Every daemon subscribes to `<prefix>/<store>/+/status`; each
status carries the daemon's `instance` (random per process) and its cameras. A conflict makes the
daemon `degraded`, and checks at a shared camera are answered `camera_fault` by both daemons, so the
cashier decides, until one of them goes (its `offline` status or will) or falls silent for three of
its status intervals (a retained status: counted from its own time, so that one left by a daemon that died
while the broker was down does not make a conflict with the daemon that replaced it).

A status message is network input like any other: size-capped, parsed by pydantic, never trusted
beyond these fields. Anyone allowed to publish on the status topics could fake a conflict (the
store broker's ACL lets only daemons write there: deploy/README.md).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.logs import RateLimitedLog

log = logging.getLogger(__name__)
MAX_STATUS_BYTES = 256 * 1024  # a status lists every camera: kilobytes, never this
SILENT_INTERVALS = 3  # a peer not heard for this many of its status intervals is gone
DEFAULT_INTERVAL_S = 30.0  # a peer that does not say its interval (an older version)
GRACE_S = 5.0  # on top of the silent intervals: a status in flight, a broker busy for a moment
MAX_PEERS = 10_000  # daemons remembered at once: a store has tens; anyone who may write status topics could add more
# The states of a daemon that is not running: stopped ("offline", also its will), or refused at start ("failed",
# with the reason). Neither renews its status, so neither goes stale, and neither serves a camera.
NOT_RUNNING = ("offline", "failed")
MISSING = "missing"  # `tillsight status --expect`: an expected daemon that never published a status
UNREADABLE = "unreadable"  # `tillsight status`: a daemon's retained status is no JSON object
# A retained status is stamped by its daemon's clock and read by this machine's: a store's machines keep time
# by NTP, but one that lost it drifts, so a status is called stale only when it is this much later than its
# daemon's silent intervals allow.
CLOCK_SLACK_S = 60.0


def new_instance() -> str:
    return secrets.token_hex(8)


def iso_seconds(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _interval(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 86400
    return value if ok else DEFAULT_INTERVAL_S


def belief_left(body: dict, now: float) -> float | None:
    """For how many more seconds a retained status of a running daemon can be believed (negative: it is stale),
    from its own time; None where it says no time, or its daemon is not running."""
    said_at = iso_seconds(body["time"]) if isinstance(body.get("time"), str) else None
    if body.get("state") in NOT_RUNNING or said_at is None:
        return None
    # a time ahead of ours is taken as now: a till PC's clock an hour ahead must not have it believed an hour on
    return SILENT_INTERVALS * _interval(body.get("status_interval_s")) + CLOCK_SLACK_S - (now - min(said_at, now))


def stale(body: dict, now: float) -> str | None:
    """Why a retained status of a running daemon (not `offline`, not `failed`) can no longer be believed, or
    None. A daemon that died without its will (the broker was down, or restarted from its store, when it went)
    or hung leaves its last `online` retained for ever; a live one renews it every `status_interval_s`. A status
    stamped ahead of this clock, or with no readable time, cannot tell how long its daemon has been silent: one
    from a daemon that died with its clock an hour ahead said online for that hour (a year 9999 one for ever)."""
    if body.get("state") in NOT_RUNNING or body.get("state") in (MISSING, UNREADABLE):
        return None
    said_at = iso_seconds(body["time"]) if isinstance(body.get("time"), str) else None
    if said_at is None:
        return "its status has no readable time: how long the daemon has been silent cannot be told"
    if said_at - now > CLOCK_SLACK_S:
        return (f"stamped {said_at - now:.0f} s ahead of this machine's clock: a clock is wrong, and how long the "
                "daemon has been silent cannot be told")
    left = belief_left(body, now)
    if left is None or left >= 0:
        return None
    silent = now - iso_seconds(body["time"])
    return (f"silent for {silent:.0f} s where it sends a status every {_interval(body.get('status_interval_s')):g} "
            "s: the daemon hung, or went while the broker was down, or a clock is wrong")


DAEMON_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")  # edge.config.NAME, a daemon_id's rule
NAMED_AT_MOST = 3  # peers named in one problem line: a flood of made-up ones must not bloat the status


def _some(names: list[str]) -> str:
    return ", ".join(names[:NAMED_AT_MOST]) + (f" and {len(names) - NAMED_AT_MOST} more" if len(names) > NAMED_AT_MOST
                                               else "")


class PeerStatus(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    state: Annotated[str, Field(max_length=32)]
    instance: Annotated[str, Field(max_length=64)] | None = None
    status_interval_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    cameras: dict[Annotated[str, Field(max_length=128)], object] | None = None
    time: Annotated[str, Field(max_length=64)] | None = None


@dataclass(frozen=True)
class Peer:
    daemon_id: str
    cameras: frozenset[str]
    expires: float  # monotonic
    streams: dict[str, str] = field(default_factory=dict)  # stream fingerprint -> its camera id there


class Peers:
    """What the other daemons of the store say; fed by the MQTT network thread, read by the service."""

    def __init__(self, daemon_id: str, instance: str, status_base: str, cameras: list[str],
                 streams: dict[str, str] | None = None):
        self.daemon_id, self.instance = daemon_id, instance
        self.status_base = status_base  # <prefix>/<store>
        self.cameras = set(cameras)
        # camera id -> the fingerprint of its network stream (edge.config.stream_fingerprint), as statuses carry it:
        # another daemon's camera on one of our streams, under another id, is the same till twice
        self.streams = dict(streams or {})
        # () -> None: a copy said offline on our topic (the service notices conflicts by polling problems())
        self.on_change = None
        self.warn = RateLimitedLog(log)
        self._peers: dict[str, Peer] = {}  # instance (or topic, for a peer without one) -> what it said
        self._lock = threading.Lock()

    @property
    def subscription(self) -> str:
        return f"{self.status_base}/+/status"

    def see(self, topic: str, payload: bytes, retained: bool) -> None:
        """One status message from the broker; never raises (it runs on paho's network thread)."""
        try:
            self._see(topic, payload, retained)
        except Exception as exc:  # noqa: BLE001  the network thread must survive anything
            self.warn.warning("peer_status", "status message of another daemon not understood",
                              topic=topic[:200], error=repr(exc)[:200])

    def _see(self, topic: str, payload: bytes, retained: bool) -> None:
        daemon_id = topic[len(self.status_base) + 1:].rpartition("/")[0]
        # a daemon id by the config's own rule: a made-up status under a 60,000-character level went into this
        # daemon's problems and status, over the broker's packet limit, and the broker dropped its every connection
        if not DAEMON_LEVEL.fullmatch(daemon_id):
            raise ValueError(f"{daemon_id[:64]!r}… is no daemon id" if len(daemon_id) > 64 else
                             f"{daemon_id!r} is no daemon id")
        if len(payload) > MAX_STATUS_BYTES:
            raise ValueError(f"{len(payload)} bytes")
        if not payload:
            return  # a retained status being cleared
        try:
            status = PeerStatus.model_validate_json(payload)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None
        if status.instance == self.instance:
            return
        if daemon_id == self.daemon_id and retained:
            return  # on our own topic a retained status can be this daemon's previous run: only live ones count
        key = status.instance or topic
        # of what it lists, only our own cameras and streams are kept, all a conflict is about: a made-up status of
        # our till-1 and 1,200 other cameras held ~475 KB a peer, and MAX_PEERS of them gigabytes, far past the
        # unit's MemoryMax (2026-11-27 review)
        ours = set(self.streams.values())
        cameras = frozenset(camera for camera in status.cameras or () if camera in self.cameras)
        streams = {info["stream"]: str(camera)[:128] for camera, info in (status.cameras or {}).items()
                   if isinstance(info, dict) and isinstance(info.get("stream"), str) and info["stream"] in ours}
        with self._lock:
            if status.state in NOT_RUNNING:
                self._peers.pop(key, None)
                copy_went = daemon_id == self.daemon_id
            elif daemon_id != self.daemon_id and not cameras and not streams:
                # only a copy of us or a daemon with one of our cameras is a problem: the others are not remembered,
                # so made-up statuses of a long interval can never crowd a real conflict out of the bound below
                self._peers.pop(key, None)
                copy_went = False
            else:
                believed = SILENT_INTERVALS * (status.status_interval_s or DEFAULT_INTERVAL_S) + GRACE_S
                if retained:  # said before we subscribed, perhaps long ago by a daemon that died without its will
                    left = belief_left(status.model_dump(), time.time())
                    believed = believed if left is None else min(believed, left)
                if believed > 0:
                    self._peers[key] = Peer(daemon_id, cameras, time.monotonic() + believed, streams)
                    if len(self._peers) > MAX_PEERS:  # a flood of made-up conflicts: the soonest to expire go
                        for gone in sorted(self._peers, key=lambda k: self._peers[k].expires)[: MAX_PEERS // 10]:
                            del self._peers[gone]
                else:
                    self._peers.pop(key, None)
                copy_went = False
        if copy_went and self.on_change is not None:
            self.on_change()  # its offline is now the retained status of our topic: say we are here

    def _current(self) -> list[Peer]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, p in self._peers.items() if p.expires < now]:
                del self._peers[key]
            return list(self._peers.values())

    def camera_conflict(self, camera_id: str) -> str | None:
        """Why this camera's customers may be another daemon's too, or None."""
        peers = self._current()
        others = sorted({p.daemon_id + (" (another instance)" if p.daemon_id == self.daemon_id else "")
                         for p in peers if camera_id in p.cameras})
        if others:
            return f"also served by daemon {_some(others)}: each camera id belongs to one daemon"
        stream = self.streams.get(camera_id)
        shared = sorted({f"{p.daemon_id}'s {p.streams[stream][:64]}" for p in peers if stream in p.streams})
        if stream is None or not shared:
            return None
        return (f"shows the same stream as daemon {_some(shared)}: two tills would be answered about one "
                "till's customer")

    def problems(self) -> list[str]:
        peers = self._current()
        found = []
        if any(p.daemon_id == self.daemon_id for p in peers):
            found.append(f"another daemon publishes as daemon_id {self.daemon_id}: give each till PC its own "
                         "daemon_id (a cloned till image keeps the host name)")
        found += [f"camera {c} {self.camera_conflict(c)}" for c in sorted(self.cameras)
                  if self.camera_conflict(c) is not None]
        return found
