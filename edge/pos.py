"""Requests from the point of sale (POS): transactions and age checks, over MQTT.

Topics under `<prefix>/<store>/` (README, "The POS conversation"):
    <camera>/transaction  POS -> daemon   {"event": "start"|"end", "transaction": "T-1001"}
    <camera>/check        POS -> daemon   {"item": "alcohol"} with MQTT 5 Response Topic and
                                          Correlation Data, or {"request_id": ..., "reply_to": ...}
                                          in the payload for MQTT 3.1.1 clients
    the reply topic       daemon -> POS   {"decision": "challenge" | "no_challenge" | "no_face" |
                                          "not_aged" | "several_faces" | "camera_fault" | "error", ...}

Everything on these topics comes from the network and is treated as hostile:
payloads over `MAX_PAYLOAD` bytes are refused unread, JSON is parsed and
validated by pydantic's Rust parser (no recursion limits to hit), unknown
fields are ignored, and the network thread only checks and queues: a bounded
inbox, a worker thread that answers, and rate-limited warnings. A bad request
that names a valid reply topic gets an error reply. Reply topics must lie under
`<prefix>/<store>/pos/`, so a request cannot make the daemon publish into its
own alert or status topics.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.logs import RateLimitedLog
from edge.policy import Policy, decide
from edge.types import Decision, TillView

log = logging.getLogger(__name__)
MAX_PAYLOAD = 16 * 1024
STALE_VIEW_S = 2.0
TEXT = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces: ids travel on into logs and messages


class Incoming(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class TransactionEvent(Incoming):
    event: Literal["start", "end"]
    transaction: Annotated[str, Field(pattern=TEXT)]


class CheckRequest(Incoming):
    item: Annotated[str, Field(pattern=TEXT)] | None = None
    request_id: Annotated[str, Field(pattern=TEXT)] | None = None
    reply_to: Annotated[str, Field(max_length=256)] | None = None
    deadline_s: Annotated[float, Field(gt=0, le=10)] | None = None


@dataclass
class PendingCheck:
    camera_id: str
    request: CheckRequest
    reply_to: str
    correlation: bytes | None
    received: float  # monotonic
    deadline: float  # monotonic


@dataclass
class DeskStats:
    requests: int = 0
    answered: int = 0
    transactions: int = 0
    rejected: int = 0  # malformed, oversized, unknown camera, bad reply topic
    dropped: int = 0  # inbox full


class PosDesk(threading.Thread):
    """Takes the POS's messages from the MQTT network thread and answers them on its own thread."""

    def __init__(self, base: str, cameras: dict, reply: Callable[[str, dict, bytes | None], None],
                 policy: Policy, deadline_s: float, inbox_size: int = 1000,
                 camera_fault: Callable[[str], str | None] = lambda camera_id: None):
        super().__init__(name="pos-desk", daemon=True)
        self.base = base  # <prefix>/<store>
        self.cameras = cameras  # camera id -> its pipeline (view, mark_transaction)
        self.reply = reply
        self.camera_fault = camera_fault  # camera id -> why its picture cannot be trusted now, or None
        self.policy, self.deadline_s = policy, deadline_s
        self.stats = DeskStats()
        self.inbox: queue.Queue = queue.Queue(maxsize=inbox_size)
        self.stop_event = threading.Event()
        self.warn = RateLimitedLog(log)
        self._pending: list[PendingCheck] = []

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f"{self.base}/+/transaction", 1), (f"{self.base}/+/check", 1)]

    # ------------------------------------------------------------ on the network thread: check, queue

    def receive(self, topic: str, payload: bytes, properties=None) -> None:
        """Called by paho for every message; never raises, never blocks."""
        try:
            self._receive(topic, payload, properties)
        except Exception as exc:  # noqa: BLE001  the network thread must survive anything
            self.stats.rejected += 1
            self.warn.warning("internal", "POS message failed", topic=topic[:200], error=repr(exc)[:200])

    def _receive(self, topic: str, payload: bytes, properties) -> None:
        camera_id, _, kind = topic[len(self.base) + 1:].partition("/")
        response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        if len(payload) > MAX_PAYLOAD:
            return self._reject(kind, f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}", response_topic,
                                correlation)
        model = CheckRequest if kind == "check" else TransactionEvent
        try:
            message = model.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            return self._reject(kind, f"{where}: {first['msg']}", response_topic or _reply_to_in(payload),
                                correlation)
        if camera_id not in self.cameras:
            reply_to = response_topic or (message.reply_to if isinstance(message, CheckRequest) else None)
            return self._reject(kind, f"unknown camera {camera_id[:64]!r}", reply_to, correlation)
        self._queue((camera_id, message, response_topic, correlation, time.monotonic()), topic)

    def _queue(self, item: tuple, topic: str) -> None:
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.stats.dropped += 1
            self.warn.warning("flood", "POS inbox full, message dropped", topic=topic[:200])

    def _reject(self, kind: str, why: str, reply_to: str | None, correlation: bytes | None) -> None:
        self.stats.rejected += 1
        self.warn.warning("rejected", "POS message rejected", kind=kind[:32], error=why[:200])
        if kind == "check" and reply_to and self.valid_reply_topic(reply_to):
            # answered from the desk's thread: the MQTT thread only checks and queues
            self._queue((None, {"decision": "error", "error": why[:200]}, reply_to, correlation, time.monotonic()),
                        reply_to)

    def valid_reply_topic(self, topic: str) -> bool:
        return (topic.startswith(f"{self.base}/pos/") and len(topic) <= 256 and not any(c in topic for c in "+#\0")
                and topic.isprintable())

    # ------------------------------------------------------------ on the desk's own thread

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._take(self.inbox.get(timeout=0.02))
                while True:  # drain what queued meanwhile before looking at pending checks
                    self._take(self.inbox.get_nowait())
            except queue.Empty:
                pass
            self._answer_pending()

    def close(self) -> None:
        """Stop; checks still waiting are answered now with what there is, not left hanging."""
        self.stop_event.set()
        self.join(timeout=5)
        self._answer_pending(closing=True)

    def _take(self, item) -> None:
        camera_id, message, response_topic, correlation, received = item
        if camera_id is None:  # an error reply to a refused request
            self.reply(response_topic, message, correlation)
            return
        pipeline = self.cameras[camera_id]
        if isinstance(message, TransactionEvent):
            self.stats.transactions += 1
            pipeline.mark_transaction(message.event, message.transaction)
            return
        self.stats.requests += 1
        reply_to = response_topic or message.reply_to
        if not reply_to or not self.valid_reply_topic(reply_to):
            self.stats.rejected += 1
            self.warn.warning("reply_topic", "age check without a usable reply topic",
                              reply_to=(reply_to or "")[:200], allowed=f"{self.base}/pos/...")
            return
        deadline = received + (message.deadline_s or self.deadline_s)
        self._pending.append(PendingCheck(camera_id, message, reply_to, correlation, received, deadline))

    def _answer_pending(self, closing: bool = False) -> None:
        now, still = time.monotonic(), []
        for check in self._pending:
            view: TillView | None = self.cameras[check.camera_id].view
            if view is not None and time.time() - view.frame_time > STALE_VIEW_S:
                view = None  # the camera has shown nothing for a while: nobody is known to be there
            fault = self.camera_fault(check.camera_id)
            if fault is not None:  # a frozen, blank or lost picture: what it shows says nothing of who is there
                decision = Decision("camera_fault", (), True, None)
            else:
                decision = decide(view, self.policy, at_deadline=closing or now >= check.deadline)
            if decision is None:
                still.append(check)
                continue
            self.stats.answered += 1
            self.reply(check.reply_to, answer_payload(check, decision, view, self.policy, now, fault),
                       check.correlation)
        self._pending = still


def answer_payload(check: PendingCheck, decision: Decision, view: TillView | None, policy: Policy,
                   now: float, camera_fault: str | None = None) -> dict:
    from edge.publish import utc_iso
    faces = [{"track": c.track_id, "age": round(c.age, 1), "spread": round(c.spread or 0.0, 1), "samples": c.samples,
              "risk": _rounded(policy.risk(c.age))} for c in decision.customers]
    main = faces[0] if len(faces) == 1 else {}
    return {
        "request_id": check.request.request_id,
        "camera": check.camera_id,
        "item": check.request.item,
        "decision": decision.decision,
        **({"camera_fault": camera_fault} if camera_fault is not None else {}),
        "age": main.get("age"), "spread": main.get("spread"), "samples": main.get("samples", 0),
        "track": main.get("track"), "risk": main.get("risk"),
        "faces": faces,
        "complete": decision.complete,
        "mode": policy.mode,
        "challenge_age": policy.challenge_age,
        "transaction": view.transaction if view else None,
        "waited_ms": round(1000 * (now - check.received), 1),
        "frame_time": utc_iso(decision.frame_time) if decision.frame_time else None,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _reply_to_in(payload: bytes) -> str | None:
    """A 3.1.1 client's reply topic from a payload that failed validation, if it can be read safely."""
    import json
    try:
        body = json.loads(payload) if len(payload) <= MAX_PAYLOAD else None
    except (ValueError, RecursionError):
        return None
    value = body.get("reply_to") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None
