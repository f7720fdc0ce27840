"""`tillsight pos`: a terminal point of sale, for people trying the system and for tests.

    tillsight pos watch                              alerts, estimates and answers as they come
    tillsight pos check --camera till-1 --item alcohol
    tillsight pos transaction start --camera till-1 --id T-1001

An age check is an MQTT 5 request: Response Topic `<prefix>/<store>/pos/<terminal>/reply` (logged in as
U, `<prefix>/<store>/pos/U/<terminal>/reply`: deploy/mosquitto-store.acl's per-till logins) and a random
Correlation Data, matched on the way back.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.logs import printable
from edge.peers import DAEMON_LEVEL, NOT_RUNNING, UNREADABLE, iso_seconds, stale
from edge.pos import MAX_REPLY_TOPIC


def describe(topic: str, payload: bytes) -> str:
    """One printable line per message; a payload that is not JSON is reported, not trusted."""
    return printable(_describe(topic, payload))


def _describe(topic: str, payload: bytes) -> str:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # deep nesting too
        return f"{topic}  (not JSON, {len(payload)} bytes)"
    if not isinstance(body, dict):
        return f"{topic}  (unexpected JSON {type(body).__name__})"
    if "decision" in body:
        facts = f"age {body.get('age')} ± {body.get('spread')}, {body.get('samples')} samples, track {body.get('track')}"
        reason = {"error": body.get("error"), "camera_fault": body.get("camera_fault")}.get(body.get("decision"))
        extra = f" ({reason})" if reason is not None else f" ({facts}, {body.get('waited_ms')} ms)"
        return f"{topic}  ANSWER for {body.get('camera')}: {str(body.get('decision')).upper()}{extra}"
    if topic.endswith("/alert"):
        return f"{topic}  ASK FOR ID: track {body.get('track')} looks {body.get('age')} (challenge {body.get('challenge_age')})"
    if topic.endswith("/estimate"):
        kind = "final" if body.get("final") else "update"
        return f"{topic}  track {body.get('track')} age {body.get('age')} ± {body.get('spread')} ({body.get('samples')} samples, {kind})"
    if topic.endswith("/status"):
        return f"{topic}  STATUS {_describe_status(body, time.time())}"
    if topic.endswith("/analytics") and isinstance(body.get("bands"), dict):
        return f"{topic}  ANALYTICS {_describe_analytics(body)}"
    return f"{topic}  {json.dumps(body, separators=(',', ':'))}"


def _describe_analytics(body: dict) -> str:
    """An interval's counts by age band; a band under k customers is withheld by the daemon (null): `<k`."""
    def clock(iso) -> str:
        return iso[11:19] if isinstance(iso, str) and len(iso) >= 19 else "?"
    withheld = f"<{body.get('k')}"
    bands = ", ".join(f"{band} {withheld if count is None else count}" for band, count in body["bands"].items())
    partial = " (partial)" if body.get("partial") else ""
    return (f"{clock(body.get('interval_start'))}-{clock(body.get('interval_end'))} UTC{partial}: {bands}; "
            f"camera fault {body.get('camera_fault_s')} s"
            + (f", store closed {body['store_closed_s']} s" if body.get("store_closed_s") else ""))


def describe_status(body: dict, now: float) -> str:
    """One line per daemon for `tillsight status`: state, cameras, the age model, how old the status is, problems."""
    return printable(_describe_status(body, now))


def _describe_status(body: dict, now: float) -> str:
    cameras = body.get("cameras") if isinstance(body.get("cameras"), dict) else {}
    live = sum(1 for c in cameras.values() if isinstance(c, dict) and c.get("state") == "online"
               and c.get("picture") in (None, "live"))
    model = body.get("age_model") if isinstance(body.get("age_model"), dict) else {}
    served = " ".join(str(model[k]) for k in ("tier", "variant", "provider") if model.get(k)) or "-"
    said_at = iso_seconds(body["time"]) if isinstance(body.get("time"), str) else None
    age = "-" if said_at is None else f"{now - said_at:.0f} s ago" if now - said_at > -1 else \
        f"{said_at - now:.0f} s ahead"  # its clock, or this one, is wrong
    problems = body.get("problems") if isinstance(body.get("problems"), list) else []
    old = stale(body, now)
    state, problems = ("stale", [old] + problems) if old is not None else (body.get("state"), problems)
    if body.get("store_open") is False and old is None and body.get("state") not in NOT_RUNNING:  # said then
        problems = ["store closed"] + problems
    if body.get("state") == "offline" and problems:  # its last words, not what is wrong now
        problems = [f"when it stopped: {problems[0]}"] + problems[1:]
    return (f"{str(body.get('daemon')):<16} {str(state):<9} "
            f"{f'{live}/{len(cameras)} cameras' if cameras else '-':<11} {served:<32} {age:>10}  "
            + ("; ".join(str(p) for p in problems) or "-"))


class PosError(Exception):
    """The broker or the daemon did not answer: one line for the user."""


class RecentIds:
    """The `id`s of the last messages seen, to drop the duplicates that at-least-once delivery allows."""

    def __init__(self, size: int = 10_000):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.size = size

    def repeated(self, payload: bytes) -> bool:
        try:
            message_id = json.loads(payload).get("id")
        except (ValueError, AttributeError, RecursionError):  # deep nesting: its own exception, not ValueError
            return False
        if not isinstance(message_id, str):
            return False
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker's host and login came from (a config's keys, or command-line options): what a
    connection problem names to fix."""
    host: str = "mqtt.host"
    login: str = "mqtt.username and mqtt.password_file"


def connection_problem(host: str, port: int, exc: OSError, settings: BrokerSettings) -> str:
    """A connection attempt that failed, in `run`'s words (edge.publish.connect_failure), naming the setting."""
    from edge.publish import connect_failure
    hint = f" (check {settings.host})" if isinstance(exc, socket.gaierror) else ""
    return f"MQTT broker at {host}:{port}: {connect_failure(exc)}{hint}"


def refusal_problem(host: str, port: int, reason, settings: BrokerSettings) -> str:
    """A CONNACK refusal in `run`'s words (edge.publish, on_connect), naming the login's settings."""
    login = str(reason) in ("Not authorized", "Bad user name or password")
    return (f"MQTT broker at {host}:{port}: broker refused the connection: {reason}"
            + (f" (check {settings.login})" if login else ""))


class Terminal:
    def __init__(self, host: str, port: int, base: str, terminal_id: str | None = None, mqtt_config=None,
                 settings: BrokerSettings = BrokerSettings()):
        """`mqtt_config`: the daemon's [mqtt] (credentials and TLS for a secured broker); always MQTT 5 here,
        for the answers' correlation data. `settings`: what a connection problem names to fix."""
        from edge.publish import mqtt_client
        self.base = base  # <prefix>/<store>
        self.terminal_id = terminal_id or f"terminal-{secrets.token_hex(3)}"
        # under a login that is a topic level (a till's own POS login, named as its camera: deploy/mosquitto-store.acl)
        # the answers come under that login's level, the one place under pos/ the shipped ACL lets it read
        login = getattr(mqtt_config, "username", None)
        own = f"{login}/" if login and DAEMON_LEVEL.fullmatch(login) else ""  # a topic level's rule
        self.reply_topic = f"{base}/pos/{own}{self.terminal_id}/reply"
        if len(self.reply_topic) > MAX_REPLY_TOPIC:  # the daemon would drop every check unanswered
            raise PosError(f"the reply topic {self.reply_topic[:60]}... is longer than the daemon takes "
                           f"({MAX_REPLY_TOPIC} characters): a shorter topic prefix, store id or login")
        client_id = f"tillsight-pos-{self.terminal_id}"
        self.client = mqtt_client(mqtt_config, client_id, protocol="5") if mqtt_config is not None else \
            mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.on_message = None
        self.client.on_message = lambda c, u, msg: self.on_message and self.on_message(msg)
        answered: list = []
        connected = threading.Event()
        self.client.on_connect = lambda c, u, flags, reason, props: (answered.append(reason), connected.set())
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise PosError(connection_problem(host, port, exc, settings)) from None
        from edge.publish import no_delay
        no_delay(self.client)
        self.client.loop_start()
        if not connected.wait(5) or answered[0].is_failure:
            self.close()
            if not answered:
                raise PosError(f"MQTT broker at {host}:{port}: no answer to the connection within 5 s")
            raise PosError(refusal_problem(host, port, answered[0], settings))

    def subscribe(self, topics: list[str]) -> None:
        self._subscribed.clear()
        self.client.subscribe([(t, 1) for t in topics])
        if not self._subscribed.wait(5):
            raise PosError("the MQTT broker did not confirm the subscription")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def send(self, topic: str, body: dict | None, properties: Properties | None = None, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; a refusal in it (MQTT 5: "Not authorized" where
        the ACL does not let these credentials write the topic) is an error, not "sent". `body` None: an empty
        payload (which clears a retained message)."""
        acks: dict[int, object] = {}
        self.client.on_publish = lambda c, u, mid, reason, props: acks.__setitem__(mid, reason)
        payload = b"" if body is None else json.dumps(body)
        info = self.client.publish(topic, payload, qos=1, properties=properties, retain=retain)
        info.wait_for_publish(5)
        if not info.is_published():
            raise PosError(f"the MQTT broker did not acknowledge {topic}")
        reason = acks.get(info.mid)
        if reason is not None and getattr(reason, "is_failure", False):
            raise PosError(f"the MQTT broker refused {topic}: {reason}")

    def forget(self, daemon: str, wait_s: float = 1.0) -> None:
        """Clear the retained status of a daemon that is gone for good (decommissioned, renamed), so `status`
        stops listing it; refused while its last word is not `offline` (or `failed`: refused at start), unless
        that word is stale (a daemon gone without its will) or unreadable: a running daemon would publish it
        again."""
        topic = f"{self.base}/{daemon}/status"
        status = self.statuses(wait_s).get(topic)
        if status is None:
            raise PosError(f"no retained status of daemon {daemon!r} under {self.base}/")
        if status.get("state") not in (*NOT_RUNNING, UNREADABLE) and stale(status, time.time()) is None:
            raise PosError(f"daemon {daemon} says it is {status.get('state')}: stop it first (systemctl stop "
                           "tillsight, or tillsight@NAME on a store server), or it publishes its status again")
        self.send(topic, None, retain=True)

    def transaction(self, camera: str, event: str, transaction: str, refusal_wait_s: float = 0.0) -> None:
        """Send a transaction event; PosError if the daemon refuses it within `refusal_wait_s` (an `end` of a
        transaction that is not the open one: the daemon answers only a refusal, to a Response Topic)."""
        refused = self._ask(f"{self.base}/{camera}/transaction", {"event": event, "transaction": transaction},
                            refusal_wait_s)
        if refused is not None:
            error = refused.get("error") if isinstance(refused, dict) else None
            raise PosError(printable(f"the daemon refused the transaction {event}: {error or 'no reason given'}"))

    def check(self, camera: str, item: str | None, timeout_s: float, deadline_s: float | None = None) -> dict:
        """Ask the daemon whether the customer at `camera` should be challenged; the answer, as a dict."""
        body = {"item": item, **({"deadline_s": deadline_s} if deadline_s else {})}
        sent = time.monotonic()
        answer = self._ask(f"{self.base}/{camera}/check", {k: v for k, v in body.items() if v is not None}, timeout_s)
        if answer is None:
            raise PosError(self.unanswered(camera, timeout_s))
        return {**answer, "round_trip_ms": round(1000 * (time.monotonic() - sent), 1)}

    def _ask(self, topic: str, body: dict, wait_s: float):
        """Send `body` with this terminal's reply topic, both ways (MQTT 5 Response Topic and Correlation Data, and
        `reply_to` and `request_id` in the payload, for a daemon set to MQTT 3.1.1, which never sees properties);
        the reply's JSON (or {} for one that is not JSON) if one comes within `wait_s`, else None."""
        correlation, request_id = secrets.token_bytes(8), secrets.token_hex(8)
        body = {**body, "request_id": request_id, "reply_to": self.reply_topic}
        replies: list = []
        done = threading.Event()

        def on_message(msg) -> None:
            if msg.topic != self.reply_topic:
                return
            try:
                reply = json.loads(msg.payload)
            except (ValueError, RecursionError):
                reply = {}
            if getattr(msg.properties, "CorrelationData", None) == correlation or \
                    isinstance(reply, dict) and reply.get("request_id") == request_id:
                replies.append(reply)
                done.set()

        if wait_s > 0:
            self.on_message = on_message
            self.subscribe([self.reply_topic])
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = correlation
        self.send(topic, body, properties)
        return replies[0] if wait_s > 0 and done.wait(wait_s) else None

    def unanswered(self, camera: str, timeout_s: float) -> str:
        """The line for a check no daemon answered, with why where the daemons' retained statuses tell: the
        camera's daemon stopped, refused at start (its reason), or silent; or no daemon has that camera."""
        said = f"no answer from the daemon for camera {camera} within {timeout_s:g} s"
        # each named by its topic (<prefix>/<store>/<daemon>/status): a body may say no daemon, or another's
        bodies = [{**body, "daemon": topic.split("/")[-2]} for topic, body in self.statuses(0.5).items()]
        now = time.time()
        serving = [body for body in bodies if isinstance(body.get("cameras"), dict) and camera in body["cameras"]]
        if not serving:  # a will says offline without the cameras: name the daemons that are not running
            down = sorted(str(b.get("daemon")) for b in bodies if b.get("state") in NOT_RUNNING or stale(b, now))
            return printable(f"{said}: no daemon under {self.base}/ has camera {camera} in its status (is the "
                             f"camera id right?{' Not running: ' + ', '.join(down) if down else ''})")
        # a camera moved to another daemon stays in the old one's last status: the running one should have answered
        body = min(serving, key=lambda b: (stale(b, now) is not None, b.get("state") in NOT_RUNNING))
        old = stale(body, now)
        daemon, state = body.get("daemon"), body.get("state")
        problems = body.get("problems") if isinstance(body.get("problems"), list) else []
        if old is not None:
            why = f"is stale: {old}"
        elif state == "failed":  # refused at start: its reason
            why = f"is failed{': ' + str(problems[0]) if problems else ''}"
        elif state == "offline":
            why = "is offline (stopped)"
        elif "pos" not in body:  # a daemon without the desk has no "pos" counts
            why = "has the POS conversation off (pos.enabled)"
        else:
            why = f"says {state} (overloaded? or the broker's ACL keeps {self.base}/{camera}/check from it)"
        return printable(f"{said}: its daemon {daemon} {why}")

    def statuses(self, wait_s: float = 1.0) -> dict[str, dict]:
        """The store's daemons' latest statuses (retained on the broker), by daemon topic. One that is no JSON
        object is said as `unreadable` (left out, a daemon's garbled status looked like no daemon at all); an empty
        one is a status cleared (`--forget`)."""
        found: dict[str, dict] = {}

        def on_message(msg) -> None:
            if not msg.payload:
                found.pop(msg.topic, None)
                return
            try:
                body = json.loads(msg.payload)
            except (ValueError, RecursionError):
                body = None
            found[msg.topic] = body if isinstance(body, dict) else {
                "state": UNREADABLE, "problems": [f"its status is no JSON object ({len(msg.payload)} bytes)"]}

        self.on_message = on_message
        self.subscribe([f"{self.base}/+/status"])
        time.sleep(wait_s)  # retained statuses come at once; a daemon starting now a moment later
        return dict(found)

    def watch(self, print_line, seconds: float | None = None) -> None:
        """`print_line` each message until `seconds` have passed; an output that can no longer be written
        (`| head` gone) ends the watch with its error, raised here: in the client's thread it was a traceback,
        and the watch went on for ever printing nothing."""
        seen = RecentIds()
        write_failed: list[OSError] = []

        def on_message(msg) -> None:
            if write_failed or seen.repeated(msg.payload):  # QoS 1 is at least once: a re-sent one is shown once
                return
            try:
                print_line(describe(msg.topic, msg.payload))
            except OSError as exc:
                write_failed.append(exc)

        self.on_message = on_message
        self.subscribe([f"{self.base}/+/alert", f"{self.base}/+/estimate", f"{self.base}/pos/#"])
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            if write_failed:
                raise write_failed[0]
            time.sleep(0.1)
