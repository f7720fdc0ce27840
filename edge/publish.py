"""MQTT publishing with paho-mqtt 2.x (callback API v2).

Topics, under `<prefix>/<store_id>/`:
    <daemon_id>/status      retained, QoS 1; last will {"state": "offline"}; "failed" when refused at start
    <camera_id>/estimate    one per track: updates, then a final one
    <camera_id>/alert       QoS 1: the customer needs an ID check
    (reply topics)          answers to the POS's age checks (edge/pos.py)
Payloads are JSON with "schema": 1 and never any image data. MQTT 5 by
default (request/response with Response Topic and Correlation Data);
`mqtt.protocol = "3.1.1"` for an old broker.

Every event message (estimate, alert, answer, analytics) carries a unique "id"
and goes through the durable outbox (edge/outbox.py) first: it is on disk
before paho sends it and leaves the disk when the broker acknowledges it, so a
broker outage loses nothing, nor does a daemon restart during one (delivery is
at least once: a consumer drops repeated ids). paho keeps the in-flight copy
and re-sends on reconnect; reconnection is tried every 1-2 s.

In order, across outages: from the start of each connection attempt until the
broker has acknowledged a message on the new connection, new event messages
wait in the outbox (the held-back queue) and go to paho only after that. paho
2.2 sends a publish() as soon as its socket exists, before CONNACK, while it
re-sends what it already held only once it has handled the CONNACK: a message
made in between would reach the broker ahead of older ones (measured: with a
camera publishing every millisecond, 1 to 5 of 5 reconnects did). The first
PUBACK on a connection is read after that re-send, so it is the sign to go on.

Delivery problems are never silent: a refused connection (wrong password, bad
certificate) is one log line per distinct reason and shows in `problem()`; a
publish the broker refuses (an ACL denial: MQTT 5 PUBACK reason code >= 0x80)
is counted in `denied`, logged (a topic once while it is among the last
DENIED_TOPICS_KEPT refused, and at most a line a minute), and never counted as
delivered.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import contextmanager

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import __version__
from edge.config import PASSWORD_FILE_READ, MqttConfig, password_problem
from edge.errors import UserError
from edge.logs import SummarizedLog, utc_iso
from edge.outbox import Outbox
from edge.peers import MAX_STATUS_BYTES, new_instance
from edge.types import TrackEstimate

log = logging.getLogger(__name__)
# analytics ids: uuid5 of the store, camera and interval in this namespace (fixed: ids must not change)
ANALYTICS_IDS = uuid.UUID("6b0c1c7e-6f1e-4d0e-9a57-7a1f3c2b8d41")
# A connection the broker drops this soon after accepting it, this many times in a row, is being taken
# over by another client under the same client id (a cloned config with mqtt.client_id set).
SHORT_SESSION_S = 5.0
SHORT_SESSIONS = 3
SCHEMA = 1
EARLY_ACKS_KEPT = 1024  # acks of QoS 0 messages pile up here (nothing claims them): the bound
# the topics whose refusal by the broker was said, the latest: a POS's reply topics may all differ (one a check),
# and a set of each one refused grew by an entry and a log line at every check an ACL refused
DENIED_TOPICS_KEPT = 256
# The largest packet each listening connection takes (MQTT 5; the broker drops a larger one for it): a status
# (MAX_STATUS_BYTES) with its topic and properties; the POS's checks and transactions are refused over 16 KB
# (edge/pos.py MAX_PAYLOAD), and up to four times that still arrive, to be refused unread with an error reply.
STATUS_MAX_PACKET = MAX_STATUS_BYTES + 16 * 1024
POS_MAX_PACKET = 64 * 1024
# The listeners subscribe at QoS 0. At QoS 1 mosquitto (2.0.11) lost an in-flight slot of the subscriber at each
# message it dropped as too large for it (*_MAX_PACKET): 20 of them (its max_inflight_messages) and the
# daemon heard no check, transaction or status again while it said online (2026-11-27 review). QoS 0 holds nothing
# in flight, and loses nothing QoS 1 kept: the listener's session ends with its connection either way, and a POS's
# QoS 1 publish is still acknowledged by the broker.
LISTENER_QOS = 0


def estimate_payload(store_id: str, est: TrackEstimate, final: bool, frame_time: float,
                     transaction: str | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "store": store_id,
        "camera": est.camera_id,
        "track": est.track_id,
        "age": round(est.age, 1),
        "spread": round(est.spread, 1),
        "samples": est.samples,
        "final": final,
        "first_seen": utc_iso(est.first_seen),
        "last_seen": utc_iso(est.last_seen),
        "face": {"box": [round(v) for v in est.box], "score": round(est.face_score, 3)},
        "frame_time": utc_iso(frame_time),
        "transaction": transaction,
    }


def alert_payload(store_id: str, est: TrackEstimate, policy, frame_time: float,
                  transaction: str | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "store": store_id,
        "camera": est.camera_id,
        "track": est.track_id,
        "alert": "age_check",
        "mode": policy.mode,
        "challenge_age": policy.challenge_age,
        "risk": None if policy.risk(est.age) is None else round(policy.risk(est.age), 4),
        "age": round(est.age, 1),
        "spread": round(est.spread, 1),
        "samples": est.samples,
        "time": utc_iso(est.last_seen),
        "frame_time": utc_iso(frame_time),
        "transaction": transaction,
    }


def connect_failure(exc: BaseException | None) -> str:
    """A failed connection attempt (TCP, TLS) in a few words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = {18: "mqtt.tls.ca_file is not the CA that signed the broker's certificate",
                19: "mqtt.tls.ca_file is not the CA that signed the broker's certificate",
                20: "mqtt.tls.ca_file is not the CA that signed the broker's certificate",
                62: "the broker's certificate is not for mqtt.host"}.get(exc.verify_code)
        return f"TLS certificate not accepted: {exc.verify_message}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running, on this port?)"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "connection timed out"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "connection failed"


class Publisher:
    def __init__(self, cfg: MqttConfig, store_id: str, daemon_id: str, outbox: Outbox | None = None):
        self.cfg = cfg
        self.store_id = store_id
        self.daemon_id = daemon_id
        self.instance = new_instance()  # this process, in every status: tells a copy of this daemon from itself
        self.base = f"{cfg.topic_prefix}/{store_id}"
        self.status_topic = f"{self.base}/{daemon_id}/status"
        self.connected = threading.Event()
        self.outbox = outbox if outbox is not None else Outbox(None, cfg.max_queued_messages)
        self._frame = threading.local()  # a camera thread's messages of one frame (frame_batch)
        self.dropped = 0  # paho's queue full
        self.denied = 0  # publishes the broker refused (ACL): never delivered
        self.delivered = 0
        self.kept_on_disk = 0  # set by stop(): messages not acknowledged, left in the outbox file for the next start
        self.connection_error: str | None = None  # why the broker cannot be reached now; None when connected
        self.on_change = None  # () -> None: the connection's state changed (the service re-publishes status)
        self.problem_level = logging.ERROR  # a replay says it in its one closing line instead
        # mid -> (outbox key, topic, monotonic ns when handed to paho), not yet acknowledged
        # mid -> (outbox key, topic, when handed to paho, the connection it was sent on: None while disconnected)
        self._pending: dict[int, tuple[int | None, str, int, int | None]] = {}
        self._connection = 0  # counts the connections made: an ack on another than the send's is no latency
        self.on_ack = None  # (seconds from handing a QoS 1 message to paho to its PUBACK) -> None: the metrics
        self._denied_topics: OrderedDict[str, None] = OrderedDict()  # the latest refused, oldest first: said once each
        self._denied_log = SummarizedLog(log, "MQTT broker refused a message (ACL?)")
        # acks that raced ahead of publish() returning its mid: mid -> (reason code, monotonic ns when it came)
        self._acked_early: dict[int, tuple[object, int]] = {}
        self._lock = threading.Lock()
        # outbox keys (and MQTT 5 properties) of event messages paho would not take (its queue full, or all
        # 65,535 message ids in flight) or that came during a (re)connect (see _resent): they wait in the outbox,
        # in order, and go as soon as paho takes them
        self._held: deque[tuple[int | None, object, tuple | None]] = deque()
        self._held_lock = threading.Lock()  # taken around paho's publish(): never from a paho callback under its locks
        # False from the start of each connection attempt until a PUBACK on the new connection: paho has re-sent
        # what it held (it does that while handling CONNACK), so new messages may follow; until then they are held
        self._resent = False
        self._full_said = False  # "MQTT queue full" was logged: "has room again" follows once it is over
        self._status_refused = False  # the latest status found paho full: sent again by send_held()
        self._status: dict = {"state": "online"}
        self.subscriptions: list[str] = []  # the POS's topics, set before start(); subscribed again on every connect
        self.on_message = None  # (topic, payload, properties, retained) -> None, for the subscriptions
        self.status_subscription: str | None = None  # the store's daemons' statuses, set before start()
        self.on_status = None  # (topic, payload, retained) -> None, for them
        # one per process unless configured: two daemons under one client id would have the broker drop each
        # in turn as the other reconnects (a cloned till PC), and neither would hear the other's status
        self.client_id = self.cfg.client_id or f"tillsight-{self.daemon_id}-{self.instance[:8]}"
        self.client = self._make_client(self.client_id)
        self.client.will_set(self.status_topic, json.dumps(self._status_body("offline")), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_log = self._on_log
        self._socket_error: str | None = None
        self._connected_at: float | None = None  # monotonic time of the last CONNACK
        self._short_sessions = 0  # connections in a row the broker dropped soon after accepting them
        self.taken_over: str | None = None  # why the connection seems taken over by another client, while it is
        # What the POS sends arrives on a connection of its own: a flood there (tested: 25 MB of 256 KB
        # payloads) queues in front of nothing the daemon publishes, so alerts and their acks keep moving. The
        # statuses of the store's daemons on another: each is parsed whole (up to 256 KB) on its connection's
        # thread, and a flood of them (anyone who may write a status topic) delayed every check queued behind it
        # by seconds (2026-11-27 review).
        self.listeners: list[mqtt.Client] = []

    def _make_client(self, client_id: str) -> mqtt.Client:
        client = mqtt_client(self.cfg, client_id)
        client.max_queued_messages_set(self.cfg.max_queued_messages)
        # a till broker is near: retry often, so a queue reaches the POS within ~2 s of the broker's return
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        return client

    def start(self) -> None:
        # What the previous run left in the outbox goes first, in order, before anything new.
        backlog = self.outbox.backlog()
        if backlog:
            log.warning("outbox: sending messages left by the previous run", extra={"messages": len(backlog)})
        for row in backlog:
            self._submit(row.key, row.topic, row.payload, row.qos, row.retain, None)
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_pre_connect = self._on_pre_connect
        # connect_async + loop_start: the daemon runs (and queues) while the broker is down.
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        if self.subscriptions and self.on_message is not None:
            self._listen("pos", self.subscriptions, POS_MAX_PACKET, lambda client, userdata, msg: self.on_message(
                msg.topic, msg.payload, getattr(msg, "properties", None), bool(msg.retain)))
        if self.status_subscription is not None and self.on_status is not None:
            self._listen("peers", [self.status_subscription], STATUS_MAX_PACKET,
                         lambda client, userdata, msg: self.on_status(msg.topic, msg.payload, bool(msg.retain)))

    def _listen(self, role: str, topics: list[str], max_packet: int, on_message) -> None:
        """A connection that only subscribes (client id `<ours>-<role>`), its messages to `on_message` on its own
        network thread."""
        listener = self._make_client(f"{self.client_id}-{role}")

        def subscribe(client, userdata, flags, reason_code, properties) -> None:
            if not reason_code.is_failure:  # the main connection logs the broker's refusal
                client.subscribe([(topic, LISTENER_QOS) for topic in topics])
        listener.on_connect = subscribe
        listener.on_message = on_message
        listener.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                               properties=self._listener_limits(max_packet))
        listener.loop_start()
        self.listeners.append(listener)

    def _listener_limits(self, max_packet: int) -> Properties | None:
        """MQTT 5: the broker is told the largest packet the listener takes, and drops a larger one for it, so a
        hostile 100 MB payload on a POS topic never reaches the daemon's memory (paho reads a packet whole before
        anyone can look at its size). MQTT 3.1.1 has no such field: the broker's own `max_packet_size` is all."""
        if self.cfg.protocol != "5":
            return None
        limits = Properties(PacketTypes.CONNECT)
        limits.MaximumPacketSize = max_packet
        return limits

    def _problem(self, reason: str | None) -> None:
        """Log each new connection problem once (retries every 2 s would flood the journal)."""
        if reason != self.connection_error:
            if reason is not None:
                # a login or client id refused is no network fault: the headline says which it is
                headline = "MQTT broker refused the connection, retrying" if reason.startswith("broker refused") \
                    else "MQTT broker unreachable, retrying"
                log.log(self.problem_level, headline, extra={"host": self.cfg.host, "port": self.cfg.port,
                                                                      "reason": reason})
            self.connection_error = reason
            if self.on_change is not None:
                self.on_change()

    def _on_connect_fail(self, client, userdata) -> None:
        # the broker was away: drops before it are its restarts, not another client under our id (a broker
        # restarted every few seconds was said to be a takeover), which the broker takes over from at once
        self._short_sessions = 0
        # paho calls this inside its `except OSError:`, so the exception is still at hand
        failure = sys.exc_info()[1]
        self._problem(connect_failure(failure) + (" (check mqtt.host)" if isinstance(failure, socket.gaierror) else ""))

    def _on_pre_connect(self, client, userdata) -> None:
        """Before paho opens a socket (each attempt): from here until a PUBACK on the new connection, event messages
        are held, since paho would send them at once, ahead of the ones it re-sends after CONNACK. Under the lock,
        so that a publish() already under way lands in paho's queue before the socket exists (paho holds none of
        its locks here)."""
        with self._held_lock:
            self._resent = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            credentials = str(reason_code) in ("Not authorized", "Bad user name or password")
            self._problem(f"broker refused the connection: {reason_code}"
                          + (" (check mqtt.username and mqtt.password_file)" if credentials else ""))
            return
        if self.taken_over is None:  # during a takeover fight, not a line every 2 s
            log.info("MQTT connected", extra={"host": self.cfg.host, "port": self.cfg.port})
        self._connected_at = time.monotonic()
        no_delay(client)
        self._connection += 1
        self.connected.set()
        self._socket_error = None
        self._problem(None)
        # The will may have fired while we were away: say we are back.
        self.publish_status(self._status)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if reason_code != 0 and was_connected:
            if not self._short_session():
                self._problem(f"connection lost: {reason_code}")
        elif reason_code != 0 and not (self.connection_error or "").startswith("broker refused"):
            # closed before CONNACK: e.g. TLS 1.3 refusing our (missing) client certificate; after a refusal
            # (a wrong password) the close that follows says less than the refusal itself
            self._problem(f"broker closed the connection: {self._socket_error or reason_code}")

    def _short_session(self) -> bool:
        """A dropped connection: True when it is one of a run of short ones, said once as a takeover.
        mosquitto 2.0 closes the older of two connections under one client id without a reason code
        (MQTT 5's 0x8E), so the pattern is what tells: dropped again and again within seconds of CONNACK."""
        short = self._connected_at is not None and time.monotonic() - self._connected_at < SHORT_SESSION_S
        self._short_sessions = self._short_sessions + 1 if short else 0
        if self._short_sessions < SHORT_SESSIONS:
            return False
        if self.taken_over is None:
            self.taken_over = (f"the broker dropped this connection {SHORT_SESSIONS} times in a row within "
                               f"{SHORT_SESSION_S:g} s of accepting it: another client with client id "
                               f"{self.client_id}? (mqtt.client_id must be unique per daemon)")
            log.log(self.problem_level, "MQTT connection taken over", extra={"reason": self.taken_over})
            if self.on_change is not None:
                self.on_change()
        return True

    def takeover(self) -> str | None:
        """The takeover problem while it lasts: it ends once a connection has held for twice the short time."""
        if self.taken_over is not None and self.connected.is_set() and \
                time.monotonic() - self._connected_at >= 2 * SHORT_SESSION_S:
            self.taken_over, self._short_sessions = None, 0
            log.info("MQTT connection stable again", extra={"host": self.cfg.host, "port": self.cfg.port})
        return self.taken_over

    def _on_log(self, client, userdata, level, message: str) -> None:
        # paho reports a socket or TLS error on read only here; keep its reason for _on_disconnect
        if message.startswith("failed to receive on socket"):
            found = re.search(r"\] (.+?) \(_ssl", message)
            self._socket_error = found.group(1) if found else message.partition(": ")[2]

    def _status_body(self, state: str, **fields) -> dict:
        return {"schema": SCHEMA, "store": self.store_id, "daemon": self.daemon_id, "instance": self.instance,
                "state": state, "version": __version__, **fields}

    def publish_status(self, status: dict) -> None:
        """Publish now if connected; otherwise on_connect publishes the latest status."""
        self._status = status
        if not self.connected.is_set():
            return
        body = self._status_body(status.get("state", "online"), **{k: v for k, v in status.items() if k != "state"})
        body["time"] = utc_iso()
        # a state, not an event: no id, no outbox (the next status replaces it; the will covers a crash)
        self._send(self.status_topic, json.dumps(body, separators=(",", ":")).encode(), 1, True, None, None)

    def publish_estimate(self, est: TrackEstimate, final: bool, frame_time: float,
                         transaction: str | None = None) -> None:
        self._publish(f"{self.base}/{est.camera_id}/estimate",
                      estimate_payload(self.store_id, est, final, frame_time, transaction), self.cfg.qos)

    def publish_alert(self, est: TrackEstimate, policy, frame_time: float, transaction: str | None = None) -> None:
        self._publish(f"{self.base}/{est.camera_id}/alert",
                      alert_payload(self.store_id, est, policy, frame_time, transaction), qos=1)

    def publish_analytics(self, counts: dict) -> None:
        """One camera's age-band counts for one interval (edge/analytics.py)."""
        # the id is the interval's own: a crash between the outbox taking the intervals a killed run left and their
        # file's removal sends them again at the next start, and a consumer drops the repeat by its id
        # (and its opening's random id: the same slot counted again after the wall clock stepped back is another)
        counts = dict(counts)
        opening = counts.pop("opening", None)
        interval = f"{self.store_id}/{counts['camera']}/{counts['interval_start']!r}/{counts['interval_end']!r}" \
            + (f"/{opening}" if opening else "")
        body = {"id": uuid.uuid5(ANALYTICS_IDS, interval).hex, "schema": SCHEMA, "store": self.store_id, **counts,
                "interval_start": utc_iso(counts["interval_start"]), "interval_end": utc_iso(counts["interval_end"])}
        self._publish(f"{self.base}/{counts['camera']}/analytics", body, qos=1)

    def publish_transaction_band(self, camera_id: str, transaction: str, band: str) -> None:
        """Opt-in: the age band of a finished transaction's customer, for purchases by age group."""
        body = {"schema": SCHEMA, "store": self.store_id, "camera": camera_id, "transaction": transaction,
                "age_band": band, "time": utc_iso()}
        self._publish(f"{self.base}/{camera_id}/analytics/transaction", body, qos=1)

    def publish_reply(self, topic: str, body: dict, correlation: bytes | None) -> None:
        """An answer to the POS, with the request's MQTT 5 Correlation Data when it had one. Not kept in the
        outbox: it matters for the seconds the POS waits for it (paho re-sends it over a reconnect), and after a
        restart it would come minutes late, without its Correlation Data, to a POS that has moved on. During a
        reconnect it waits in memory behind what is held back, so answers keep their order like events."""
        properties = None
        if correlation is not None and self.cfg.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        body = {"schema": SCHEMA, "store": self.store_id, **body, "time": utc_iso()}
        self._publish(topic, body, qos=1, properties=properties, durable=False)

    def _publish(self, topic: str, body: dict, qos: int, retain: bool = False, properties=None,
                 durable: bool = True) -> None:
        """An event message: a unique id (unless `body` has its own), into the outbox (QoS>0), then to paho, after
        any it holds back."""
        payload = json.dumps({"id": uuid.uuid4().hex, **body}, separators=(",", ":")).encode()
        batch = getattr(self._frame, "messages", None)
        if batch is not None and durable:  # inside frame_batch: synced together at its end, sent in order
            key = self.outbox.add(topic, payload, qos, retain, sync=False) if qos > 0 else None
            batch.append((key, topic, payload, qos, retain, properties))
        elif qos == 0:  # not kept, so never held back either: paho takes it or it is dropped
            self._send(topic, payload, qos, retain, properties, None)
        elif not durable:  # an answer: not kept on disk, but behind what is held (a reconnect's re-send) like events
            with self._held_lock:
                if self._send_held():
                    self._send(topic, payload, qos, retain, properties, None)
                else:
                    self._held.append((None, properties, (topic, payload, qos, retain)))
        else:
            self._submit(self.outbox.add(topic, payload, qos, retain), topic, payload, qos, retain, properties)

    @contextmanager
    def frame_batch(self):
        """The event messages a camera thread publishes in the block (one frame's alerts and estimates) go on
        disk in one commit at its end, then to paho in order: each waits one fsync, not one per message before
        it (a frame with two customers had four in a row: 20 ms and more on a slow disk, issue 10). An alert waits
        for the rest of its frame's messages (a millisecond), not for a commit of its own: sending it first cost
        its frame a second fsync, and 6 cameras' p99 on a 20 ms-fsync disk went from 51-55 to 79 ms."""
        if getattr(self._frame, "messages", None) is not None:  # inside another: its end sends these too, in order
            yield
            return
        self._frame.messages = messages = []
        try:
            yield
        finally:
            self._frame.messages = None
            self._hand_on(messages)

    def _hand_on(self, messages: list) -> None:
        """A frame batch's messages: on disk, then to paho in order (QoS 0 ones too, kept nowhere, in their place)."""
        kept = [key for key, *_ in messages if key is not None]
        if kept:
            self.outbox.sync(kept[-1])
        for key, topic, payload, qos, retain, properties in messages:
            if key is None:
                self._send(topic, payload, qos, retain, properties, None)
            else:
                self._submit(key, topic, payload, qos, retain, properties)

    def _submit(self, key: int, topic: str, payload: bytes, qos: int, retain: bool, properties) -> None:
        """A message kept in the outbox: to paho, after any it holds back; held back itself if paho is full or
        its re-send after a (re)connect may still be ahead."""
        with self._held_lock:
            if not self._send_held():  # paho still full, or its re-send is still ahead: this one waits behind them
                self._held.append((key, properties, None))
            elif not self._send(topic, payload, qos, retain, properties, key):
                log.error("MQTT queue full: messages wait in the outbox until the broker takes more",
                          extra={"unacknowledged": self.unacknowledged(),
                                 "max_queued_messages": self.cfg.max_queued_messages})
                self._full_said = True
                self._held.append((key, properties, None))

    def _refused(self, topic: str) -> None:
        """A message paho would not take and the outbox does not keep (an answer): dropped."""
        self.dropped += 1
        log.error("MQTT queue full, message dropped", extra={"topic": topic, "dropped": self.dropped})

    def _send_held(self) -> bool:
        """Hand paho what it held back, oldest first, as far as it takes them; True when none is left. Nothing
        while paho's re-send after a (re)connect may still be ahead. Called with _held_lock held."""
        if not self._resent:
            self._forget_dropped_held()
            return False
        while self._held:
            key, properties, answer = self._held[0]
            if answer is not None:  # an answer held over a reconnect: paho takes it now, or it is dropped (counted)
                self._send(*answer, properties, None)
            else:
                row = self.outbox.get(key)
                if row is not None and not self._send(row.topic, row.payload, row.qos, row.retain, properties, key):
                    return False
            self._held.popleft()  # sent, or dropped from the outbox meanwhile (over its bound)
        if self._full_said:
            self._full_said = False
            log.info("MQTT queue has room again: the messages held in the outbox were handed on")
        return True

    def _forget_dropped_held(self) -> None:
        """Under _held_lock: the held-back messages at the front whose outbox rows are gone (dropped over its
        bound, or too old) leave the queue now, not at the reconnect: through a long outage the queue otherwise
        kept an entry for every message made (200,000 of them at an outbox bound of 1,000: 21 MB), and
        unacknowledged() counted them as still to be delivered. The outbox drops its oldest rows first, so the
        ones gone are at the front; answers held there (no row: they go at the reconnect) stay, in their order."""
        answers = []
        while self._held:
            key, _properties, answer = self._held[0]
            if answer is None and self.outbox.get(key) is not None:
                break
            entry = self._held.popleft()
            if answer is not None:
                answers.append(entry)
        self._held.extendleft(reversed(answers))

    def send_held(self) -> None:
        """Called every tick by the service (and while stopping): what paho held back goes once it has room (after
        a reconnect, once paho has re-sent what it had), and a status it refused (the one that says we are back
        after an outage, say) is tried again."""
        if self._held:
            with self._held_lock:
                self._send_held()
        self._denied_log.flush()
        if self._status_refused:
            self._status_refused = False
            self.publish_status(self._status)

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, properties, key: int | None) -> bool:
        """Hand one message to paho; False if it would not take it (its queue full, or every id in flight)."""
        asked_at = time.monotonic_ns()
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            if topic == self.status_topic:
                self._status_refused = True  # send_held() tries again, once paho has room
            elif key is None:  # an answer: dropped
                self._refused(topic)
            return False
        with self._lock:
            early = self._acked_early.pop(info.mid, None)
            # paho numbers QoS 0 messages from the same 65,535 ids: an ack from before this publish was one of
            # theirs, and taking it for this message's would delete it from the outbox unsent
            if early is not None and early[1] < asked_at:
                early = None
            if qos > 0 and early is None:  # queued even while disconnected (rc NO_CONN): sent on reconnect
                self._pending[info.mid] = (key, topic, asked_at,
                                           self._connection if self.connected.is_set() else None)
        if qos > 0 and early is not None:
            self._resent = True  # a PUBACK read before publish() returned: paho's re-send is behind it too
            if self.on_ack is not None:
                self.on_ack((early[1] - asked_at) / 1e9)
            self._acknowledged(topic, key, early[0])
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid not in self._pending:
                self._acked_early[mid] = (reason_code, time.monotonic_ns())
                if len(self._acked_early) > EARLY_ACKS_KEPT:  # a QoS 0 message's, sent after its publish()
                    # returned: an early ack lives microseconds, so the oldest half can go
                    for old in sorted(self._acked_early, key=lambda m: self._acked_early[m][1])[
                            : EARLY_ACKS_KEPT // 2]:
                        del self._acked_early[old]
                return
            key, topic, asked_at, connection = self._pending.pop(mid)
            # a PUBACK (a QoS 0 message's call comes when it is written, in paho's re-send too), which paho reads
            # only once it has handled CONNACK, re-send included: what is held back may follow (send_held())
            self._resent = True
        # the broker's time to acknowledge, not an outage's: a message queued while disconnected, or re-sent on a
        # new connection, is left out of the histogram
        if self.on_ack is not None and connection is not None and connection == self._connection:
            self.on_ack((time.monotonic_ns() - asked_at) / 1e9)
        self._acknowledged(topic, key, reason_code)

    def _acknowledged(self, topic: str, key: int | None, reason_code) -> None:
        if getattr(reason_code, "is_failure", False):  # MQTT 5: e.g. 0x87 Not authorized (an ACL)
            self.denied += 1
            self._refusal_said(topic, reason_code)
        else:
            self.delivered += 1
        if key is not None:  # delivered, or refused for good: resending would not help
            self.outbox.done(key)

    def _refusal_said(self, topic: str, reason_code) -> None:
        """A topic refused for the first time (among the latest DENIED_TOPICS_KEPT) is counted into a line said
        at most once a minute; `denied` counts every refusal."""
        with self._lock:  # paho's thread, and a camera's for an ack that came before publish() returned
            if topic in self._denied_topics:
                self._denied_topics.move_to_end(topic)
                return
            self._denied_topics[topic] = None
            if len(self._denied_topics) > DENIED_TOPICS_KEPT:
                self._denied_topics.popitem(last=False)
        self._denied_log.count(self.problem_level, topic=topic, reason=str(reason_code), denied=self.denied)

    def unacknowledged(self) -> int:
        """QoS>0 messages the broker has not acknowledged: with paho, or held back in the outbox."""
        with self._lock:
            return len(self._pending) + len(self._held)

    def wait_for_delivery(self, timeout_s: float) -> bool:
        """Wait until the broker has acknowledged every QoS>0 message."""
        deadline = time.monotonic() + timeout_s
        while self.unacknowledged():
            if time.monotonic() > deadline:
                return False
            self.send_held()
            time.sleep(0.02)
        return True

    def stop(self, final_status: dict, timeout_s: float = 10.0, disk_is_delivery: bool = True) -> bool:
        """Clean shutdown: retained 'offline' status, wait for acks, disconnect. True if nothing is lost: all
        acknowledged, or what is not waits in the outbox on disk for the next start (the daemon's view); with
        `disk_is_delivery` False (a replay, which promises every message acknowledged), only if all were
        acknowledged, after waiting `timeout_s` for them. `kept_on_disk` then counts what waits on disk."""
        # its cameras are no longer watched: "stopped", not the "online" of the moment before (the status stays
        # retained until the next start, and `tillsight status` counted them live); an ended replay stays "ended"
        cameras = final_status.get("cameras")
        stopped = {camera: {**info, "state": "stopped"} if isinstance(info, dict) and info.get("state") == "online"
                   else info for camera, info in cameras.items()} if isinstance(cameras, dict) else cameras
        self.publish_status({**final_status, "state": "offline",
                             **({"cameras": stopped} if stopped is not None else {})})
        # With the broker away and the messages safe on disk, waiting would only delay the daemon's stop.
        safe_on_disk = disk_is_delivery and not self.connected.is_set() and self.outbox.state == "disk"
        delivered = self.wait_for_delivery(0.5 if safe_on_disk else timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        for listener in self.listeners:
            listener.disconnect()
            listener.loop_stop()
        self.kept_on_disk = self.outbox.depth() if self.outbox.state == "disk" else 0
        self.outbox.close()
        if not delivered and self.kept_on_disk and disk_is_delivery:
            log.warning("messages kept in the outbox for the next start", extra={"messages": self.kept_on_disk,
                                                                              "path": str(self.outbox.path)})
            return True
        return delivered


def publish_start_failure(cfg: MqttConfig, store_id: str, daemon_id: str, problem: str, cameras: list[str],
                          timeout_s: float = 3.0) -> bool:
    """A daemon refused at start (a missing or corrupt model) says why in its retained status, `failed` with the
    one-line reason, so the store's monitoring (`tillsight status`) sees why a till is not watched, where it
    saw only the `offline` of its last stop, and a POS's check to one of its `cameras` is told why it got no
    answer. True once the broker has it; a broker that does not answer costs up to `timeout_s`."""
    try:
        publisher = Publisher(cfg, store_id, daemon_id)
    except (OSError, ValueError, UserError) as exc:  # a password file or TLS key it cannot read now (ssl.SSLError too)
        log.debug("start failure not reported over MQTT", extra={"reason": str(exc)})
        return False  # the start's own error line still says what matters
    publisher.problem_level = logging.DEBUG  # a broker away: the start's own error line is all that is said
    publisher.publish_status({"state": "failed", "problems": [problem],  # sent once connected
                              "cameras": {camera: {"state": "not_started"} for camera in cameras}})
    publisher.start()
    deadline = time.monotonic() + timeout_s
    # a broker away (refused, unreachable, or refusing our login) is not waited for: the start's line is said now
    while publisher.delivered + publisher.denied == 0 and publisher.connection_error is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    publisher.client.disconnect()  # a clean disconnect: the will (offline) is not sent
    publisher.client.loop_stop()
    return publisher.delivered > 0


def mqtt_client(cfg: MqttConfig, client_id: str, protocol: str | None = None) -> mqtt.Client:
    """A paho client with the config's protocol (or `protocol`), credentials and TLS: the daemon's, and the
    terminal tools' when they are given the daemon's config."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if (protocol or cfg.protocol) == "5" else mqtt.MQTTv311)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, read_password(cfg.password_file) if cfg.password_file else None)
    if cfg.tls is not None:
        client.tls_set(ca_certs=_s(cfg.tls.ca_file), certfile=_s(cfg.tls.cert_file),
                       keyfile=_s(cfg.tls.key_file), cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(cfg.tls.insecure)
    return client


def read_password(path) -> str:
    """The broker password, from its file now (it may have been replaced since the config was checked): by the
    config's rules (an empty, too long or several-line file is refused), never handed to paho to fail in its thread."""
    try:
        with open(path, "rb") as file:
            held = file.read(PASSWORD_FILE_READ)
        if password_problem(held):
            raise UserError(f"mqtt.password_file {path} {password_problem(held)}")
        return held.decode("utf-8").strip()
    except OSError as exc:
        raise UserError(f"mqtt.password_file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"mqtt.password_file {path} is not UTF-8 text: a password file holds the password "
                        "alone, on one line") from None


def no_delay(client: mqtt.Client) -> None:
    """Alerts and answers are small and urgent: send them at once (Nagle's algorithm with delayed ACKs
    holds a small packet ~40 ms; measured on the age-check round trip)."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _s(path) -> str | None:
    return None if path is None else str(path)
