"""MQTT publishing with paho-mqtt 2.x (callback API v2).

Topics, under `<prefix>/<store_id>/`:
    <daemon_id>/status      retained, QoS 1; last will {"state": "offline"}
    <camera_id>/estimate    one per track: updates, then a final one
    <camera_id>/alert       QoS 1: the customer needs an ID check
    (reply topics)          answers to the POS's age checks (edge/pos.py)
Payloads are JSON with "schema": 1 and never any image data. MQTT 5 by
default (request/response with Response Topic and Correlation Data);
`mqtt.protocol = "3.1.1"` for an old broker.

paho keeps QoS>0 messages queued while the broker is away and re-sends them
on reconnect, so a broker restart loses nothing as long as the queue
(`max_queued_messages`) does not overflow; overflow is counted and logged.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import __version__
from edge.config import MqttConfig
from edge.types import TrackEstimate

log = logging.getLogger(__name__)
SCHEMA = 1


def utc_iso(timestamp: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class Publisher:
    def __init__(self, cfg: MqttConfig, store_id: str, daemon_id: str):
        self.cfg = cfg
        self.store_id = store_id
        self.daemon_id = daemon_id
        self.base = f"{cfg.topic_prefix}/{store_id}"
        self.status_topic = f"{self.base}/{daemon_id}/status"
        self.connected = threading.Event()
        self.dropped = 0
        self._pending: set[int] = set()  # mids of QoS>0 messages the broker has not acknowledged
        self._acked_early: set[int] = set()  # acks that raced ahead of publish() returning
        self._lock = threading.Lock()
        self._status: dict = {"state": "online"}
        self.subscriptions: list[tuple[str, int]] = []  # set before start(); renewed on every connect
        self.on_message = None  # (topic, payload, properties) -> None, for the subscriptions
        self.client_id = self.cfg.client_id or f"tillsight-{self.daemon_id}"
        self.client = self._make_client(self.client_id)
        self.client.will_set(self.status_topic, json.dumps(self._status_body("offline")), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        # What the POS sends arrives on a connection of its own: a flood there (tested: 25 MB of 256 KB
        # payloads) queues in front of nothing the daemon publishes, so alerts and their acks keep moving.
        self.listener: mqtt.Client | None = None

    def _make_client(self, client_id: str) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311)
        client.max_queued_messages_set(cfg.max_queued_messages)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if cfg.username is not None:
            password = cfg.password_file.read_text().strip() if cfg.password_file else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            client.tls_set(ca_certs=_s(cfg.tls.ca_file), certfile=_s(cfg.tls.cert_file),
                           keyfile=_s(cfg.tls.key_file), cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(cfg.tls.insecure)
        return client

    def start(self) -> None:
        # connect_async + loop_start: the daemon runs (and queues) while the broker is down.
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        if self.subscriptions:
            self.listener = self._make_client(f"{self.client_id}-pos")
            self.listener.on_connect = self._on_listener_connect
            self.listener.on_message = lambda c, u, msg: self.on_message and self.on_message(
                msg.topic, msg.payload, getattr(msg, "properties", None))
            self.listener.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            self.listener.loop_start()

    def _on_listener_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return  # the main connection logs the broker's refusal
        client.subscribe(self.subscriptions)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused connection", extra={"reason": str(reason_code)})
            return
        log.info("MQTT connected", extra={"host": self.cfg.host, "port": self.cfg.port})
        no_delay(client)
        self.connected.set()
        # The will may have fired while we were away: say we are back.
        self.publish_status(self._status)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("MQTT connection lost, reconnecting", extra={"reason": str(reason_code)})

    def _status_body(self, state: str, **fields) -> dict:
        return {"schema": SCHEMA, "store": self.store_id, "daemon": self.daemon_id, "state": state,
                "version": __version__, **fields}

    def publish_status(self, status: dict) -> None:
        """Publish now if connected; otherwise on_connect publishes the latest status."""
        self._status = status
        if not self.connected.is_set():
            return
        body = self._status_body(status.get("state", "online"), **{k: v for k, v in status.items() if k != "state"})
        body["time"] = utc_iso()
        self._publish(self.status_topic, body, qos=1, retain=True)

    def publish_estimate(self, est: TrackEstimate, final: bool, frame_time: float,
                         transaction: str | None = None) -> None:
        self._publish(f"{self.base}/{est.camera_id}/estimate",
                      estimate_payload(self.store_id, est, final, frame_time, transaction), self.cfg.qos)

    def publish_alert(self, est: TrackEstimate, policy, frame_time: float, transaction: str | None = None) -> None:
        self._publish(f"{self.base}/{est.camera_id}/alert",
                      alert_payload(self.store_id, est, policy, frame_time, transaction), qos=1)

    def publish_analytics(self, counts: dict) -> None:
        """One camera's age-band counts for one interval (edge/analytics.py)."""
        body = {"schema": SCHEMA, "store": self.store_id, **counts,
                "interval_start": utc_iso(counts["interval_start"]), "interval_end": utc_iso(counts["interval_end"])}
        self._publish(f"{self.base}/{counts['camera']}/analytics", body, qos=1)

    def publish_transaction_band(self, camera_id: str, transaction: str, band: str) -> None:
        """Opt-in: the age band of a finished transaction's customer, for purchases by age group."""
        body = {"schema": SCHEMA, "store": self.store_id, "camera": camera_id, "transaction": transaction,
                "age_band": band, "time": utc_iso()}
        self._publish(f"{self.base}/{camera_id}/analytics/transaction", body, qos=1)

    def publish_reply(self, topic: str, body: dict, correlation: bytes | None) -> None:
        """An answer to the POS, with the request's MQTT 5 Correlation Data when it had one."""
        properties = None
        if correlation is not None and self.cfg.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        body = {"schema": SCHEMA, "store": self.store_id, **body, "time": utc_iso()}
        self._publish(topic, body, qos=1, properties=properties)

    def _publish(self, topic: str, body: dict, qos: int, retain: bool = False, properties=None) -> None:
        info = self.client.publish(topic, json.dumps(body, separators=(",", ":")), qos=qos, retain=retain,
                                   properties=properties)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            log.error("MQTT queue full, message dropped", extra={"topic": topic, "dropped": self.dropped})
            return
        if qos > 0:  # queued even while disconnected (rc NO_CONN): paho sends it on reconnect
            with self._lock:
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                else:
                    self._pending.add(info.mid)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._acked_early.add(mid)

    def unacknowledged(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_for_delivery(self, timeout_s: float) -> bool:
        """Wait until the broker has acknowledged every QoS>0 message."""
        deadline = time.monotonic() + timeout_s
        while self.unacknowledged():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, final_status: dict, timeout_s: float = 10.0) -> bool:
        """Clean shutdown: retained 'offline' status, wait for acks, disconnect."""
        self.publish_status({**final_status, "state": "offline"})
        delivered = self.wait_for_delivery(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        if self.listener is not None:
            self.listener.disconnect()
            self.listener.loop_stop()
        return delivered


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
