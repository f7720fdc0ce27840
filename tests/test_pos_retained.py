"""POS messages left retained on the broker, against a real daemon and a real mosquitto: at every start the broker
hands them to the daemon again (an old transaction reopened, an old check answered); they are ignored."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest

from tskit import Subscriber, start_daemon, stop_daemon, tillsight, write_config

BASE = "tillsight/store-1"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_starting_daemon_ignores_retained_pos_messages_and_its_status_gives_the_deadline(
        tmp_path, broker, age_models, carphone_clip, protocol):
    reply = f"{BASE}/pos/old-pos/reply"
    pos = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="old-pos", protocol=mqtt.MQTTv311)
    pos.connect("127.0.0.1", broker.port)
    pos.loop_start()
    for topic, body in (("transaction", {"event": "start", "transaction": "T-RETAINED"}),
                        ("check", {"item": "alcohol", "request_id": "OLD-1", "reply_to": reply})):
        pos.publish(f"{BASE}/till-1/{topic}", json.dumps(body), qos=1, retain=True).wait_for_publish(5)
    replies = Subscriber(broker.port, reply)
    seen = Subscriber(broker.port, f"{BASE}/#")
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                          cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 10}],
                          mqtt={"host": "127.0.0.1", "port": broker.port, "protocol": protocol},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    log = tmp_path / "daemon.log"
    process = start_daemon(config, log)
    try:
        assert seen.wait_for(lambda s: len(s.json("/till-1/estimate")) >= 2
                             and any(b.get("pos", {}).get("rejected") for b in s.json("/till-pc/status")), 40), \
            log.read_text()
        # a live check is answered: the desk listens
        pos.publish(f"{BASE}/till-1/check", json.dumps({"item": "alcohol", "request_id": "NEW-1", "reply_to": reply}),
                    qos=1).wait_for_publish(5)
        assert replies.wait_for(lambda s: any(b["request_id"] == "NEW-1" for b in s.json("/reply")), 10)
        # the terminal POS is answered by a daemon of either protocol (reply_to and request_id in the payload too:
        # a 3.1.1 daemon never sees a Response Topic), its check and a transaction's refusal alike
        terminal = ["pos", "--port", str(broker.port), "--store", "store-1"]
        asked = tillsight(*terminal, "check", "--camera", "till-1", "--timeout", "10")
        assert asked.returncode == 0 and json.loads(asked.stdout)["camera"] == "till-1", asked.stderr
        refused = tillsight(*terminal, "transaction", "end", "--camera", "till-1", "--id", "T-NOPE")
        assert refused.returncode == 1 and refused.stderr.startswith(
            "tillsight: error: the daemon refused the transaction end: transaction T-NOPE is not the one open"), refused
    finally:
        stop_daemon(process)
        pos.loop_stop()
        replies.close()
        seen.close()
    assert [b["request_id"] for b in replies.json("/reply")] == ["NEW-1"]
    assert all(b["transaction"] is None for b in seen.json("/till-1/estimate"))
    status = [b for b in seen.json("/till-pc/status") if "pos" in b][-1]
    assert status["pos"]["rejected"] == 3 and status["pos"]["transactions"] == 0, status["pos"]  # and T-NOPE
    assert status["pos"]["deadline_s"] == 2.0
    said = [json.loads(line)["msg"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert said.count("POS messages must be published with retain=false") == 2
