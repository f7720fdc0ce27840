"""Prometheus metrics: the real endpoint scraped during a replay; the dashboard asks only for what is served."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from edge.broker import free_port
from tskit import REPO, write_config

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families, name, sample=None, **labels) -> float:
    return next(s.value for s in families[name] if (sample is None or s.name == sample)
                and all(s.labels.get(k) == v for k, v in labels.items()))


def test_the_endpoint_serves_camera_model_mqtt_and_outbox_figures_during_a_replay(
        tmp_path, broker, age_models, hamilton_clip):
    port = free_port()
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "x", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[16])}, metrics={"enabled": True, "port": port},
                          logging={"level": "warning"})
    replay = subprocess.Popen([sys.executable, "-m", "edge", "replay", str(hamilton_clip), "--config", str(config),
                               "--realtime"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scrapes = []
    try:
        while replay.poll() is None:
            try:
                scrapes.append(scrape(port))
            except OSError:
                pass  # not listening yet, or already closed
            time.sleep(0.5)
        out, err = replay.communicate(timeout=60)
    finally:
        replay.kill()
    assert replay.returncode == 0, err
    summary = json.loads(out)
    assert len(scrapes) >= 5
    last = scrapes[-1]
    frames = value(last, "tillsight_camera_frames", "tillsight_camera_frames_total", camera="replay")
    assert 0 < frames <= summary["frames"]
    first_frames = value(scrapes[0], "tillsight_camera_frames", "tillsight_camera_frames_total", camera="replay")
    assert frames > first_frames  # it moves while the replay runs
    assert value(last, "tillsight_camera_alerts", "tillsight_camera_alerts_total", camera="replay") >= 1
    assert value(last, "tillsight_mqtt_connected") == 1
    assert value(last, "tillsight_outbox_depth") >= 0 and value(last, "tillsight_degraded") == 0
    assert value(last, "tillsight_store_open") == 1  # no opening hours: always open
    assert value(last, "tillsight_camera_picture_faces", camera="replay") == 0
    calls = value(last, "tillsight_age_network_seconds", "tillsight_age_network_seconds_count")
    assert calls >= 1
    assert value(last, "tillsight_age_batch_faces", "tillsight_age_batch_faces_sum") >= calls
    assert value(last, "tillsight_mqtt_delivered", "tillsight_mqtt_delivered_total") >= 1
    assert value(last, "tillsight_mqtt_dropped", "tillsight_mqtt_dropped_total") == 0
    assert value(last, "tillsight_mqtt_unacknowledged") >= 0
    stage_frames = {stage: value(last, "tillsight_frame_stage_seconds", "tillsight_frame_stage_seconds_count",
                                 stage=stage) for stage in ("detect", "track", "age", "judge")}
    # every frame (read a moment apart from the frame counter in one scrape: a frame may come in between)
    assert all(abs(stage_frames[stage] - frames) <= 2 for stage in ("detect", "track", "judge")), (stage_frames, frames)
    assert 1 <= stage_frames["age"] <= frames  # the frames that asked for ages
    # a replay's frame times are the video's: no queueing measured, nor a frame's whole time since its capture
    assert value(last, "tillsight_frame_stage_seconds", "tillsight_frame_stage_seconds_count", stage="queued") == 0
    assert value(last, "tillsight_frame_stage_seconds", "tillsight_frame_stage_seconds_count", stage="total") == 0
    # every QoS 1 message the broker acknowledged was timed (the estimates are QoS 1 by default)
    acks = value(last, "tillsight_mqtt_ack_seconds", "tillsight_mqtt_ack_seconds_count")
    assert 1 <= acks <= value(last, "tillsight_mqtt_delivered", "tillsight_mqtt_delivered_total") + 2
    detect_s = value(last, "tillsight_frame_stage_seconds", "tillsight_frame_stage_seconds_sum", stage="detect")
    assert 0 < detect_s / frames < 1  # seconds a frame: the detector runs on every one


def test_a_metrics_port_in_use_is_one_line_and_a_status_problem(tmp_path, broker, subscriber, age_models,
                                                                hamilton_clip):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.toml", store_id="s", daemon_id="pc",
                              cameras=[{"id": "x", "source": str(hamilton_clip)}],
                              mqtt={"host": "127.0.0.1", "port": broker.port},
                              models={"age_model": str(age_models[40])}, metrics={"enabled": True, "port": port},
                              logging={"level": "warning"})
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert subscriber.wait_for(lambda s: s.json("pc/status"), 60)
            status = subscriber.json("pc/status")[0]
            daemon.terminate()
            _, err = daemon.communicate(timeout=30)
        finally:
            daemon.kill()
    assert status["state"] == "degraded"
    assert f"metrics endpoint 127.0.0.1:{port} cannot be served: Address already in use (check metrics.port)" in \
        status["problems"], status["problems"]
    assert len([line for line in err.splitlines() if "metrics endpoint" in line and "\"error\"" in line]) == 1
    assert daemon.returncode == 0, err


def test_the_dashboard_asks_only_for_metrics_the_daemon_serves():
    from edge.metrics import CAMERA_SERIES, DAEMON_SERIES
    served = {f"tillsight_camera_{name}" + ("_total" if counter else "") for name, _, counter in CAMERA_SERIES}
    served |= {f"tillsight_{name}" + ("_total" if counter else "") for name, _, counter in DAEMON_SERIES}
    served |= {f"tillsight_{h}_{part}" for h in ("age_network_seconds", "age_batch_faces", "frame_stage_seconds",
                                                 "mqtt_ack_seconds", "outbox_commit_seconds", "gc_pause_seconds") for part in ("bucket", "sum", "count")}
    dashboard = json.loads(DASHBOARD.read_text())
    asked = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
             for name in re.findall(r"tillsight_[a-z_]+", target["expr"])}
    assert asked and asked <= served, asked - served
    assert len(dashboard["panels"]) >= 6
    # a daemon that is not running serves nothing: only Prometheus's own `up` shows it, by the scrape job's name
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert 'count(up{job="$job"} == 0) or vector(0)' in exprs
    assert {"name": "job", "type": "textbox", "label": "Prometheus job of the daemons", "query": "tillsight",
            "current": {"text": "tillsight", "value": "tillsight"}} in dashboard["templating"]["list"]
