"""The shipped store -> HQ bridge (deploy/mosquitto-bridge.conf) between two real mosquitto
processes: nothing lost and nothing out of order across an HQ outage."""

from __future__ import annotations

import json
import re
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge.broker import LocalBroker, find_mosquitto
from tskit import REPO, Subscriber

pytestmark = pytest.mark.broker

BRIDGE_CONF = REPO / "deploy" / "mosquitto-bridge.conf"
OUTAGE_S = 30.0  # how long HQ is down (the figure)
DURING_OUTAGE = 60  # messages published while HQ is down, spread over the outage
BEFORE_OUTAGE = 20
DELIVERY_S = 15.0  # after HQ is back: the bridge retries at most 10 s apart (restart_timeout 2 10)
TOPIC = "tillsight/store-0042/till-1/alert"


def store_bridge_config(hq_port: int) -> str:
    """The shipped bridge file, pointed at the test's HQ broker (no TLS: its lines are comments)."""
    text = BRIDGE_CONF.read_text()
    text, replaced = re.subn(r"^address .*$", f"address 127.0.0.1:{hq_port}", text, flags=re.M)
    assert replaced == 1, "the bridge file should have exactly one address line"
    return text


def hq_consumer(port: int) -> Subscriber:
    """An HQ application: a persistent session, so HQ keeps what the bridge delivers before
    this client is back from the outage."""
    return Subscriber(port, "tillsight/#", persistent_id="hq-consumer")


def seqs(consumer: Subscriber) -> list[int]:
    return [body["seq"] for body in consumer.json(TOPIC)]


def wait_for_bridge(store_port: int, timeout: float = 10) -> None:
    """The bridge's notification (retained, on the store broker) says 1 once it is connected."""
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bridge-watch")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("$SYS/broker/connection/+/state")
    client.on_message = lambda c, u, msg: msg.payload == b"1" and connected.set()
    client.connect("127.0.0.1", store_port)
    client.loop_start()
    try:
        assert connected.wait(timeout), "the bridge did not connect to HQ"
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.fixture
def brokers():
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (make test installs the Debian package)")
    hq = LocalBroker(persistence=True)
    with hq:
        with LocalBroker(extra_config=store_bridge_config(hq.port), persistence=True) as store:
            yield store, hq


def test_bridge_delivers_everything_in_order_across_an_hq_outage(brokers):
    store, hq = brokers
    wait_for_bridge(store.port)
    consumer = hq_consumer(hq.port)
    daemon = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="daemon")
    daemon.connect("127.0.0.1", store.port)
    daemon.loop_start()

    def publish(seq: int) -> None:
        info = daemon.publish(TOPIC, json.dumps({"seq": seq}), qos=1)
        info.wait_for_publish(5)
        assert info.is_published(), f"the store broker did not acknowledge message {seq}"

    try:
        for seq in range(BEFORE_OUTAGE):
            publish(seq)
        assert consumer.wait_for(lambda c: len(seqs(c)) >= BEFORE_OUTAGE, 10), f"HQ got {seqs(consumer)} while up"

        hq.stop()
        down = time.monotonic()
        sent = BEFORE_OUTAGE
        for i in range(DURING_OUTAGE):
            publish(sent)
            sent += 1
            time.sleep(max(0.0, down + (i + 1) * OUTAGE_S / DURING_OUTAGE - time.monotonic()))
        assert len(seqs(consumer)) == BEFORE_OUTAGE  # HQ was really down

        hq.start()  # same port, same persistence: the consumer's session is still there
        back = time.monotonic()
        arrived = consumer.wait_for(lambda c: len(seqs(c)) >= sent, DELIVERY_S)
        took = time.monotonic() - back
        received = seqs(consumer)
        assert arrived, f"{len(received)} of {sent} at HQ {DELIVERY_S} s after it came back"
        assert received == list(range(sent)), "lost, duplicated or reordered messages"
        print(f"{sent} messages, {DURING_OUTAGE} during a {OUTAGE_S:.0f} s outage; all at HQ {took:.1f} s after it was back")
    finally:
        daemon.loop_stop()
        daemon.disconnect()
        consumer.close()
