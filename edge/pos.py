"""Requests from the point of sale (POS): transactions and age checks, over MQTT.

Topics under `<prefix>/<store>/` (README, "The POS conversation"):
    <camera>/transaction  POS -> daemon   {"event": "start"|"end", "transaction": "T-1001"}
    <camera>/check        POS -> daemon   {"item": "alcohol"} with MQTT 5 Response Topic and
                                          Correlation Data, or {"request_id": ..., "reply_to": ...}
                                          in the payload (any daemon, any client)
    the reply topic       daemon -> POS   {"decision": "challenge" | "no_challenge" | "no_face" |
                                          "not_aged" | "several_faces" | "camera_fault" | "error", ...}

Everything on these topics comes from the network and is treated as hostile:
payloads over `MAX_PAYLOAD` bytes are refused unread, and so is Correlation Data
over `MAX_CORRELATION` bytes (it is kept while a check waits, and echoed); JSON
is parsed and validated by pydantic's Rust parser (no recursion limits to hit),
unknown fields are ignored, and the network thread only checks and queues: a
bounded inbox, at most `MAX_PENDING` checks waiting per camera, a worker thread
that answers, and rate-limited warnings. A retained message is ignored (it would
be acted on again at every start of the daemon). A bad request that names a
valid reply topic gets an error reply, with the request's own ids where they are
valid. Reply topics must lie under `<prefix>/<store>/pos/`, two levels deep at
least, so a request cannot make the daemon publish into its own alert or status
topics (nor `…/pos/alert`, a camera called pos's to a `+/alert` subscriber), and
may not end in a level the daemons read (check, transaction, status).

An answer is made only from a frame captured at most `FRESH_FRAME_S` (plus one
frame interval: the camera's `fps_limit`'s, or the gap its frames come at) ago: while
the camera gives none (a hung stream that has not failed yet, a pipeline far
behind) a check waits for one until its deadline, then is answered
`camera_fault` ("no frame for N s"), never from an older picture.
"""

from __future__ import annotations

import logging
import queue
import re
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
# MQTT 5 Correlation Data may be 65,535 bytes; it is kept while a check waits and echoed in the answer. A POS
# needs a few bytes to match its answers: over this the check is refused (an error reply, without it).
MAX_CORRELATION = 1024
# Checks waiting at one camera (each for a face, up to its deadline); beyond, refused at once with an error
# reply: a flood on one till's topic cannot grow memory, nor delay the other tills' answers.
MAX_PENDING = 256
# Error replies a camera's topics may cost (refused messages, checks over MAX_PENDING): a token bucket of this many
# a second, up to ERROR_REPLY_BURST at once. Every error reply goes out at QoS 1 on the daemon's one connection,
# in line with the alerts and estimates: a flood of refused checks answered one by one (23,000 in 5 s) delayed
# every till's alerts by seconds, growing, and their answers past their deadlines (2026-11-27 review). A POS that
# makes a mistake gets its error; a flood gets a few, and the rest is counted (`errors_unsent`).
ERROR_REPLIES_PER_S = 5.0
ERROR_REPLY_BURST = 20
OTHER_TOPICS = ""  # the budget of refusals about cameras this daemon does not serve
# The oldest frame an answer may come from, in seconds since its capture. A till camera runs at 5 frames/s
# (`fps_limit`) and the pipeline is well under a frame behind, so a live camera's latest frame is 0.2-0.4 s old;
# a customer steps up to or away from the till in about a second. Older, the picture may show someone who has
# gone (or nobody where someone stands now): the check waits for a newer frame until its deadline.
FRESH_FRAME_S = 1.0  # plus the camera's own frame interval (1 / fps_limit, or the gap its frames come at): at 1
# frame/s a live camera's latest frame is up to 1 s old plus the pipeline's time, and such a camera was answered
# camera_fault now and then
MAX_FRAME_INTERVAL_S = 5.0  # a camera sending fewer than a frame in 5 s is broken, not slow: no older frame counts
STOPPING = "daemon stopping"
TEXT = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces: ids travel on into logs and messages
MAX_REPLY_TOPIC = 256
# last topic levels the daemons subscribe to under <prefix>/<store>/+/: a reply there would be read as a request
# (or a daemon's status) by the daemons themselves
READ_LEVELS = ("check", "transaction", "status")


class Incoming(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


Id = Annotated[str, Field(pattern=TEXT)]


class TransactionEvent(Incoming):
    event: Literal["start", "end"]
    transaction: Id


class CheckRequest(Incoming):
    item: Id | None = None
    request_id: Id | None = None
    reply_to: Annotated[str, Field(max_length=MAX_REPLY_TOPIC)] | None = None
    deadline_s: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None


class _Lenient(BaseModel):
    """A message's fields as any JSON values, to find what a reply may repeat of a message that is refused."""
    model_config = ConfigDict(extra="ignore")
    request_id: object = None
    item: object = None
    transaction: object = None
    reply_to: object = None


@dataclass(frozen=True)
class Echo:
    """What a reply repeats of the message it answers: its ids where they are valid, and where it asked for the
    reply in its payload (`reply_to`)."""
    request_id: str | None = None
    item: str | None = None
    transaction: str | None = None
    reply_to: str | None = None

    @classmethod
    def of(cls, payload: bytes) -> Echo:
        """Read from a payload that failed validation (or from a transaction's, which has no such fields)."""
        try:
            body = _Lenient.model_validate_json(payload) if len(payload) <= MAX_PAYLOAD else None
        except ValidationError:  # not JSON, or not an object
            body = None
        if body is None:
            return cls()
        return cls(_id(body.request_id), _id(body.item), _id(body.transaction),
                   body.reply_to if isinstance(body.reply_to, str) else None)


@dataclass(frozen=True)
class Inbound:
    """A valid message for a known camera, queued for the desk's thread."""
    camera_id: str
    message: CheckRequest | TransactionEvent
    reply_to: str | None  # the MQTT 5 Response Topic, else the payload's reply_to
    correlation: bytes | None
    received: float  # monotonic
    request_id: str | None = None


@dataclass(frozen=True)
class Refusal:
    """An error reply to a refused message, queued for the desk's thread (the MQTT thread only checks and queues)."""
    reply_to: str
    body: dict
    correlation: bytes | None
    camera_id: str  # whose error-reply budget it costs: a camera of this daemon, else OTHER_TOPICS


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
    # malformed, oversized, retained, unknown camera, bad reply topic, Correlation Data too long, an end that is not
    # the open transaction's
    rejected: int = 0
    dropped: int = 0  # inbox full
    overloaded: int = 0  # checks refused: MAX_PENDING already waiting at their camera
    errors_unsent: int = 0  # error replies not sent: over their camera's ERROR_REPLIES_PER_S (a flood)


class ReplyBudget:
    """A token bucket per camera: whether one more error reply may go out now (ERROR_REPLIES_PER_S)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # camera -> (tokens, when counted); its cameras, and ""

    def spend(self, camera_id: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(camera_id, (ERROR_REPLY_BURST, now))
        tokens = min(ERROR_REPLY_BURST, tokens + (now - then) * ERROR_REPLIES_PER_S)
        self._buckets[camera_id] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
        return tokens >= 1


def fresh_s(pipeline) -> float:
    """The oldest a camera's frame may be for an answer: FRESH_FRAME_S plus its frame interval: 1 / fps_limit, or
    the gap its reader passes frames on at (a camera sending 1 frame/s by itself, fps_limit unset), the larger,
    at most MAX_FRAME_INTERVAL_S."""
    fps_limit = getattr(getattr(pipeline, "camera", None), "fps_limit", None)
    observed = getattr(pipeline, "frame_interval_s", None) or 0.0
    return FRESH_FRAME_S + min(max(1.0 / fps_limit if fps_limit else 0.0, observed), MAX_FRAME_INTERVAL_S)


class PosDesk(threading.Thread):
    """Takes the POS's messages from the MQTT network thread and answers them on its own thread.

    `cameras`: camera id -> its pipeline: `view` (a TillView, replaced after every frame), `mark_transaction`, and
    `stop_event` (set when the daemon stops: waiting checks are answered at once)."""

    def __init__(self, base: str, cameras: dict, reply: Callable[[str, dict, bytes | None], None],
                 policy: Policy, deadline_s: float, inbox_size: int = 1000,
                 camera_fault: Callable[[str], str | None] = lambda camera_id: None,
                 replies_under_camera: bool = False):
        super().__init__(name="pos-desk", daemon=True)
        self.base = base  # <prefix>/<store>
        self.cameras = cameras
        self.reply = reply
        self.camera_fault = camera_fault  # camera id -> why its picture cannot be trusted now, or None
        self.policy, self.deadline_s = policy, deadline_s
        self.replies_under_camera = replies_under_camera  # [pos] replies_under_camera
        self.stats = DeskStats()
        self.error_budget = ReplyBudget()  # used on the desk's thread only
        self.inbox: queue.Queue = queue.Queue(maxsize=inbox_size)
        self.stop_event = threading.Event()
        self.warn = RateLimitedLog(log)
        self._pending: dict[str, list[PendingCheck]] = {}
        self.open_transactions: dict[str, str | None] = {}  # camera id -> the POS's open transaction there

    @property
    def subscriptions(self) -> list[str]:
        # its own cameras' topics only: with a wildcard, every other daemon of the store (the instances of a store
        # server, the next till's PC) answered each check for a camera it does not serve, "unknown camera", ahead
        # of the real answer (2026-11-27 review); a check for a camera nobody serves gets no answer, and
        # `tillsight pos check` says why from the statuses
        return [f"{self.base}/{camera}/{kind}" for camera in self.cameras for kind in ("transaction", "check")]

    # ------------------------------------------------------------ on the network thread: check, queue

    def receive(self, topic: str, payload: bytes, properties=None, retained: bool = False) -> None:
        """Called by paho for every message (`retained`: the message's retain flag); never raises, never blocks."""
        try:
            self._receive(topic, payload, properties, retained)
        except Exception as exc:  # noqa: BLE001  the network thread must survive anything
            self.stats.rejected += 1
            self.warn.warning("internal", "POS message failed", topic=topic[:200], error=repr(exc)[:200])

    def _receive(self, topic: str, payload: bytes, properties, retained: bool) -> None:
        camera_id, _, kind = topic[len(self.base) + 1:].partition("/")
        if retained:  # left on the broker: it would start an old transaction, or answer an old check, at each start
            self.stats.rejected += 1
            self.warn.warning("retained", "POS messages must be published with retain=false", topic=topic[:200])
            return
        response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        if len(payload) > MAX_PAYLOAD:
            return self._reject(kind, camera_id, f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}",
                                response_topic, correlation, Echo())
        if correlation is not None and len(correlation) > MAX_CORRELATION:
            echo = Echo.of(payload)
            return self._reject(kind, camera_id, f"correlation data of {len(correlation)} bytes is over "
                                f"{MAX_CORRELATION}", response_topic or echo.reply_to, None, echo)
        model = CheckRequest if kind == "check" else TransactionEvent
        try:
            message = model.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            echo = Echo.of(payload)
            return self._reject(kind, camera_id, f"{where}: {first['msg']}", response_topic or echo.reply_to,
                                correlation, echo)
        if isinstance(message, CheckRequest):
            echo = Echo(message.request_id, message.item, None, message.reply_to)
        else:  # a transaction's reply topic and request id serve only its error reply: read, never required
            read = Echo.of(payload)
            echo = Echo(read.request_id, None, message.transaction, read.reply_to)
        reply_to = response_topic or echo.reply_to
        if camera_id not in self.cameras:
            return self._reject(kind, camera_id, f"unknown camera {camera_id[:64]!r}", reply_to, correlation, echo)
        self._queue(Inbound(camera_id, message, reply_to, correlation, time.monotonic(), echo.request_id), topic)

    def _queue(self, item: Inbound | Refusal, topic: str) -> None:
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.stats.dropped += 1
            self.warn.warning("flood", "POS inbox full, message dropped", topic=topic[:200])

    def _reject(self, kind: str, camera_id: str, why: str, reply_to: str | None, correlation: bytes | None,
                echo: Echo) -> None:
        self.stats.rejected += 1
        self.warn.warning("rejected", "POS message rejected", kind=kind[:32], error=why[:200])
        if reply_to and self.valid_reply_topic(reply_to, camera_id):
            # answered from the desk's thread: the MQTT thread only checks and queues
            budget = camera_id if camera_id in self.cameras else OTHER_TOPICS
            self._queue(Refusal(reply_to, error_payload(kind, camera_id, why, echo), correlation, budget), reply_to)

    def valid_reply_topic(self, topic: str, camera_id: str | None = None) -> bool:
        """Under <prefix>/<store>/pos/, two levels deep at least (a terminal's own, then its reply), none empty: one
        level deep, `.../pos/alert` is the alert topic of a camera called pos to every subscriber of `+/alert`
        (the POS; HQ where alerts are bridged: 2026-11-27 privacy review, a check's answer planted there); never
        ending in a level the daemons read. Not under another of this daemon's tills (`pos/till-2/...`, where the
        store ACL's per-till patterns let till-2's own POS login read): till-1's login, which may ask about till-1
        only, had the daemon, which may write all of `pos/`, answer into till-2's terminal (2026-11-27 review).
        With `replies_under_camera`, only under the camera asked about: a till PC's daemon does not know the ids
        of the tills other daemons serve."""
        levels = topic.removeprefix(f"{self.base}/pos/").split("/")
        return (topic.startswith(f"{self.base}/pos/") and len(topic) <= MAX_REPLY_TOPIC
                and not any(c in topic for c in "+#\0") and topic.isprintable()
                and len(levels) >= 2 and all(levels) and levels[-1] not in READ_LEVELS
                and (levels[0] == camera_id if self.replies_under_camera
                     else levels[0] not in self.cameras or levels[0] == camera_id))

    # ------------------------------------------------------------ on the desk's own thread

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._take(self.inbox.get(timeout=0.02))
                while True:  # drain what queued meanwhile before looking at pending checks
                    self._take(self.inbox.get_nowait())
            except queue.Empty:
                pass
            except Exception as exc:  # noqa: BLE001  one bad message must not end the desk
                self.warn.warning("internal", "POS message failed", error=repr(exc)[:200])
            self._answer_pending()

    def close(self) -> None:
        """Stop; checks still waiting, and those queued meanwhile, are answered now (`camera_fault`, "daemon
        stopping"), not left hanging."""
        self.stop_event.set()
        self.join(timeout=5)
        while True:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                break
        self._answer_pending(closing=True)

    def _take(self, item: Inbound | Refusal) -> None:
        if isinstance(item, Refusal):
            self._error_reply(item.camera_id, item.reply_to, item.body, item.correlation)
            return
        if isinstance(item.message, TransactionEvent):
            self._transaction(item)
            return
        self.stats.requests += 1
        if not item.reply_to or not self.valid_reply_topic(item.reply_to, item.camera_id):
            self.stats.rejected += 1
            self.warn.warning("reply_topic", "age check without a usable reply topic",
                              reply_to=(item.reply_to or "")[:200], allowed=f"{self.base}/pos/...")
            return
        waiting = self._pending.setdefault(item.camera_id, [])
        if len(waiting) >= MAX_PENDING:
            self.stats.overloaded += 1
            self.warn.warning("overloaded", "too many pending checks: check refused", camera=item.camera_id,
                              pending=len(waiting))
            echo = Echo(item.request_id, item.message.item)
            self._error_reply(item.camera_id, item.reply_to, error_payload(
                "check", item.camera_id, f"too many pending checks at camera {item.camera_id} ({MAX_PENDING})", echo),
                item.correlation)
            return
        deadline = item.received + (item.message.deadline_s or self.deadline_s)
        waiting.append(PendingCheck(item.camera_id, item.message, item.reply_to, item.correlation, item.received,
                                    deadline))

    def _error_reply(self, camera_id: str, reply_to: str, body: dict, correlation: bytes | None) -> None:
        """An error reply, if the camera's budget allows it (ERROR_REPLIES_PER_S); else counted, and said in the
        rate-limited log."""
        if self.error_budget.spend(camera_id):
            self.reply(reply_to, body, correlation)
            return
        self.stats.errors_unsent += 1
        self.warn.warning("errors_unsent", "error replies over their camera's rate not sent (a flood)",
                          camera=camera_id[:64] or "(not served here)")

    def _transaction(self, item: Inbound) -> None:
        """A transaction event: to the camera's pipeline, unless it is an `end` of a transaction that is not the
        open one (refused: it must not close another), or a repeated `start` of the open one (QoS 1 may deliver
        a message twice: the customer is not split)."""
        event, transaction, camera_id = item.message.event, item.message.transaction, item.camera_id
        open_now = self.open_transactions.get(camera_id)
        if event == "end" and transaction != open_now:
            self.stats.rejected += 1
            self.warn.warning("transaction_end", "transaction end ignored: not the open transaction",
                              camera=camera_id, transaction=transaction, open=open_now)
            if item.reply_to and self.valid_reply_topic(item.reply_to, camera_id):
                why = f"transaction {transaction} is not the one open at camera {camera_id} ({open_now or 'none'})"
                self._error_reply(camera_id, item.reply_to, error_payload(
                    "transaction", camera_id, why, Echo(item.request_id, None, transaction)), item.correlation)
            return
        if event == "start" and open_now is not None:
            if open_now == transaction:
                return
            self.warn.warning("transaction_start", "transaction started while another was open: that one ends here",
                              camera=camera_id, transaction=transaction, open=open_now)
        self.stats.transactions += 1
        self.open_transactions[camera_id] = transaction if event == "start" else None
        self.cameras[camera_id].mark_transaction(event, transaction)

    def _answer_pending(self, closing: bool = False) -> None:
        now = time.monotonic()
        for camera_id, waiting in list(self._pending.items()):
            if not waiting:
                continue
            pipeline = self.cameras[camera_id]
            view: TillView | None = pipeline.view
            stop = getattr(pipeline, "stop_event", None)
            fault = STOPPING if closing or (stop is not None and stop.is_set()) else self.camera_fault(camera_id)
            # a frozen, blank or lost picture: what it shows says nothing of who is there
            transaction = self.open_transactions.get(camera_id)
            unseen = None if fault is not None else why_unseen(view, transaction, now, fresh_s(pipeline))
            decided: dict[bool, Decision | None] = {}
            still = []
            for check in waiting:
                at_deadline = now >= check.deadline
                reason = fault or (unseen if at_deadline else None)
                if reason is not None:
                    decision = Decision("camera_fault", (), False, None)
                elif unseen is not None:
                    decision = None  # wait for a fresh frame
                else:
                    if at_deadline not in decided:
                        decided[at_deadline] = decide(view, self.policy, at_deadline)
                    decision = decided[at_deadline]
                if decision is None:
                    still.append(check)
                    continue
                self.stats.answered += 1
                self.reply(check.reply_to, answer_payload(check, decision, self.policy, now, reason, transaction),
                           check.correlation)
            waiting[:] = still


def why_unseen(view: TillView | None, transaction: str | None, now: float, fresh_s: float) -> str | None:
    """Why the latest frame cannot answer a check (it waits for a newer one, until its deadline), or None. An old
    frame says nothing of who is there now (`now`: monotonic, as the frame's read_at: by the wall clock, one
    stepped back an hour as a stream hung made the hung picture fresh); nor one from before the till's
    transaction began or ended: its customers' tracks end at the boundary, which the pipeline applies before its
    next frame (a check right after a start was answered about the last sale's customer)."""
    if view is None:
        return "no frame from the camera yet"
    if now - view.read_at > fresh_s:
        return f"no frame for {now - view.read_at:.1f} s (a hung camera stream, or the daemon far behind)"
    if view.transaction != transaction:
        boundary = f"transaction {transaction} began" if transaction else f"transaction {view.transaction} ended"
        return f"no frame since {boundary} (a hung camera stream, or the daemon far behind)"
    return None


def answer_payload(check: PendingCheck, decision: Decision, policy: Policy, now: float,
                   camera_fault: str | None = None, transaction: str | None = None) -> dict:
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
        "transaction": transaction,
        "waited_ms": round(1000 * (now - check.received), 1),
        "frame_time": utc_iso(decision.frame_time) if decision.frame_time else None,
    }


def error_payload(kind: str, camera_id: str, why: str, echo: Echo) -> dict:
    """The reply to a refused message: its own request_id and item (a check) or transaction, and the camera of its
    topic, each where valid (else null), so that a POS with several requests in flight can match it."""
    return {"request_id": echo.request_id, "camera": _id(camera_id),
            **({"item": echo.item} if kind == "check" else {"transaction": echo.transaction}),
            "decision": "error", "error": why[:200]}


def _id(value) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(TEXT, value) else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
