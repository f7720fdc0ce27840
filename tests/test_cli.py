"""User mistakes get one line and a non-zero exit, never a traceback."""

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

from edge.errors import ModelError
from edge.runtime import check_single_onnxruntime
from tskit import REPO, run_error, tillsight, write_config


def one_line_error(result, code=1) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_predict_prints_faces_and_ages_as_json_lines(two_people_photo, age_models):
    result = tillsight("predict", str(two_people_photo), "--age-model", str(age_models[40]))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    body = json.loads(line)
    assert body["image"] == str(two_people_photo) and len(body["faces"]) == 2
    for face in body["faces"]:
        assert face["age"] == 40.0 and 0.5 < face["score"] <= 1 and len(face["box"]) == 4


def test_predict_reports_an_unreadable_image_and_goes_on(tmp_path, two_people_photo, age_models):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    result = tillsight("predict", str(bad), str(two_people_photo), "--age-model", str(age_models[40]))
    assert one_line_error(result) == f"tillsight: error: cannot read image {bad}"
    assert len(result.stdout.splitlines()) == 1  # the good image was still done


def test_predict_takes_an_image_over_opencvs_pixel_limit_for_unreadable(tmp_path, two_people_photo, age_models):
    from tskit import oversized_png
    huge = tmp_path / "huge.png"  # its header claims 60000x60000 pixels: imread raised cv2.error, a traceback
    huge.write_bytes(oversized_png())
    result = tillsight("predict", str(huge), str(two_people_photo), "--age-model", str(age_models[40]))
    assert one_line_error(result) == f"tillsight: error: cannot read image {huge}"
    assert len(result.stdout.splitlines()) == 1  # the good image was still done


def test_missing_age_model(tmp_path, two_people_photo):
    result = tillsight("predict", str(two_people_photo), "--age-model", str(tmp_path / "none.onnx"))
    assert one_line_error(result) == f"tillsight: error: age model not found: {tmp_path / 'none.onnx'}"
    result = tillsight("predict", str(two_people_photo), "--age-model", "heavy")  # a tier mistyped, not a file
    assert one_line_error(result) == ("tillsight: error: age model not found: heavy (a tier is one of auto, resnet50, "
                                      "light; anything else is a file)")


def test_light_tier_not_fetched_says_what_to_do(tmp_path, two_people_photo):
    env = {**os.environ, "TILLSIGHT_MODEL_DIR": str(tmp_path / "empty-cache")}
    result = tillsight("predict", str(two_people_photo), "--age-model", "light", env=env)
    assert one_line_error(result) == (
        f"tillsight: error: the light age model is not in {tmp_path / 'empty-cache'}: run `tillsight models fetch "
        "light` (or set models.age_model to a contract-following ONNX model)")
    result = tillsight("predict", str(two_people_photo), env=env)  # auto: the shipped ResNet50 needs no cache
    assert result.returncode == 0, result.stderr
    ages = sorted(face["age"] for face in json.loads(result.stdout)["faces"])
    assert len(ages) == 2 and 35 < ages[0] < ages[1] < 80  # two adults (about 49 and 68 when photographed)


def test_corrupt_detector_in_config(tmp_path, age_models, carphone_clip):
    detector = tmp_path / "detector.onnx"
    detector.write_bytes(b"\x00" * 1000)
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                          models={"detector": str(detector), "age_model": str(age_models[40])})
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config)))
    assert line.startswith(f"tillsight: error: face detector model {detector} cannot be loaded: ")


def test_run_with_a_bad_config_exits_2(tmp_path):
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": "rtsp//x"}])
    [line] = run_error(tillsight("run", "--config", str(config)), 2)["problems"]
    # relative paths are taken from the config file's folder, and the message says where it looked
    assert line.startswith(f"cameras.0.source: video file '{tmp_path / 'rtsp/x'}' not found")


def test_run_says_why_it_stopped_in_its_log_format(tmp_path):
    """deploy/README: under `[logging] format = "json"` every journal line is JSON; `run`'s last line, why it
    stopped, was plain text, the one line a log pipeline most needs and could not parse (2026-11-28 review).
    It is a JSON log line now, shaped as the others; `format = "text"` and the other commands stay plain."""
    refused = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0, "fps_limit": -1}])
    record = run_error(tillsight("run", "--config", str(refused)), 2)
    assert (record["msg"], len(record["problems"])) == ("config refused", 1), record
    assert record["problems"][0].startswith("cameras.0.fps_limit: "), record
    missing = tmp_path / "nowhere.toml"  # no config to read a format from: the default's
    assert run_error(tillsight("run", "--config", str(missing)), 2)["problems"] == [
        f"{missing}: config file not found"]
    model = write_config(tmp_path / "m.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                         models={"age_model": str(tmp_path / "gone.onnx")}, mqtt={"host": "127.0.0.1", "port": 9})
    assert run_error(tillsight("run", "--config", str(model)), 1)["msg"] == (
        f"age model not found: {tmp_path / 'gone.onnx'}")
    as_text = write_config(tmp_path / "t.toml", store_id="s", cameras=[{"id": "a", "source": 0, "fps_limit": -1}],
                           logging={"format": "text"})
    assert one_line_error(tillsight("run", "--config", str(as_text)), 2).startswith("cameras.0.fps_limit: ")
    assert one_line_error(tillsight("config", "check", str(refused)), 2).startswith("cameras.0.fps_limit: ")


def test_log_times_are_utc_to_the_millisecond_as_the_payloads_times(tmp_path):
    """Log lines said local time to the second with no offset ("2026-11-28T05:50:07" under TZ=Asia/Kolkata)
    where the MQTT payloads say UTC to the millisecond with Z: a log line could not be matched to its message."""
    import logging
    import time
    from datetime import datetime

    from edge.logs import JsonFormatter
    from edge.publish import utc_iso
    record = logging.LogRecord("edge.x", logging.INFO, "", 0, "hello", (), None)
    record.created = 1795844407.4129  # 2026-11-28T05:40:07.412 UTC
    assert json.loads(JsonFormatter().format(record))["time"] == "2026-11-28T05:40:07.412Z" == utc_iso(record.created)
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0, "fps_limit": -1}])
    before = time.time()
    said = run_error(tillsight("run", "--config", str(config), env={**os.environ, "TZ": "Asia/Kolkata"}), 2)["time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", said), said
    assert before - 1 <= datetime.fromisoformat(said.replace("Z", "+00:00")).timestamp() <= time.time() + 1, said


def test_replay_of_a_missing_video(tmp_path, carphone_clip):
    line = one_line_error(tillsight("replay", str(tmp_path / "nope.mp4")), code=2)
    assert line == f"VIDEO: video file '{tmp_path / 'nope.mp4'}' not found"  # the command line's, not a config key
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "till-1", "source": 0},
                                                                      {"id": "till-2", "source": 1}])
    # usage errors, exit 2 (were 1)
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config), "--camera", "till-9"), code=2)
    assert line == f"tillsight: error: --camera 'till-9': {config} has no such camera (it has till-1, till-2)"
    line = one_line_error(tillsight("replay", str(carphone_clip), "--camera", "till-1"), code=2)
    assert line == "tillsight: error: --camera takes a camera of --config: give --config too"
    line = one_line_error(tillsight("replay", "/dev/v4l/by-id/usb-Some_Camera-video-index0"), code=2)
    assert line == ("tillsight: error: /dev/v4l/by-id/usb-Some_Camera-video-index0 is a camera: replay reads a "
                    "recorded video file (`tillsight run` serves cameras)")


def test_edge_install_needs_no_tensorflow():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    edge_requirements = project["dependencies"] + project["optional-dependencies"]["cpu"] + \
        project["optional-dependencies"]["gpu"]
    assert not [r for r in edge_requirements if "tensorflow" in r or "tf2onnx" in r]
    code = ("import sys, edge.cli, edge.service, edge.demo, edge.publish; "
            "edge.cli.build_parser(); print('tensorflow' in sys.modules or 'keras' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout.strip() == "False"


def test_both_onnxruntime_builds_installed_is_refused(monkeypatch):
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "1.31.1" if name in ("onnxruntime", "onnxruntime-gpu") else real_version(name))
    with pytest.raises(ModelError, match="both onnxruntime 1.31.1 and onnxruntime-gpu 1.31.1 are installed"):
        check_single_onnxruntime()


def test_demo_runs_with_a_local_broker():
    result = tillsight("demo", timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "age model: resnet50 tier, age_int8.onnx, ResNet50" in out  # says which model answered
    assert "measured: MAE" in out and "PLACEHOLDER" not in out
    estimates = re.findall(r"till-1/estimate  track [0-9]+ age ([0-9.]+) ± ([0-9.]+) \(([0-9]+) samples, (\w+)\)", out)
    final = [float(age) for age, _, _, kind in estimates if kind == "final"]
    # the carphone clip's young man (early twenties to the eye; the ResNet50 reads 17, the light tier 29):
    # a real estimate of a young face, fused from several frames that did not all agree (not a constant)
    assert len(final) == 1 and 12 < final[0] < 40
    assert any(float(spread) > 0.5 for _, spread, _, _ in estimates)
    assert "1 customer(s)" in out
    assert "POS: alcohol scanned at till-1, asking for an age check" in out
    assert re.search(r"tillsight/demo-store/pos/demo-till/reply  ANSWER for till-1: (NO_)?CHALLENGE \(age", out)


@pytest.mark.parametrize("payload, expected", [
    (b"\xff\xfe\x00garbage", "t/x/alert  (not JSON, 10 bytes)"),
    (b"[1, 2, 3]", "t/x/alert  (unexpected JSON list)"),
    (b'{"track": 3, "age": 16.2, "challenge_age": 25}', "t/x/alert  ASK FOR ID: track 3 looks 16.2 (challenge 25)"),
    (b"{" * 100_000, "t/x/alert  (not JSON, 100000 bytes)"),
    (b"[" * 100_000, "t/x/alert  (not JSON, 100000 bytes)"),
])
def test_demo_pos_survives_hostile_payloads(payload, expected):
    from edge.pos_terminal import describe
    assert describe("t/x/alert", payload) == expected


@pytest.mark.parametrize("topic, payload, expected", [
    ("t/s/till-1/analytics", {"interval_start": "2026-11-26T08:00:00.000Z", "interval_end": "2026-11-26T08:15:00.000Z",
                              "bands": {"0-17": 0, "18-24": None, "25+": 7}, "k": 5, "partial": False,
                              "camera_fault_s": 0.0},
     "t/s/till-1/analytics  ANALYTICS 08:00:00-08:15:00 UTC: 0-17 0, 18-24 <5, 25+ 7; camera fault 0.0 s"),
    ("t/s/till-1/analytics", {"interval_start": "2026-11-26T06:45:00.000Z", "interval_end": "2026-11-26T07:00:00.000Z",
                              "bands": {"0-17": 0}, "k": 5, "partial": False, "camera_fault_s": 0.0,
                              "store_closed_s": 900.0},
     "t/s/till-1/analytics  ANALYTICS 06:45:00-07:00:00 UTC: 0-17 0; camera fault 0.0 s, store closed 900.0 s"),
    ("t/s/till-1/analytics", {"bands": {}, "store_closed_s": {"\n": 1}},
     "t/s/till-1/analytics  ANALYTICS ?-? UTC: ; camera fault None s, store closed {'\\n': 1} s"),
    ("t/s/till-1/analytics", {"interval_start": 3, "bands": {"x": None}, "partial": True},
     "t/s/till-1/analytics  ANALYTICS ?-? UTC (partial): x <None; camera fault None s"),
    ("t/s/till-1/analytics", {"bands": [1, 2]}, 't/s/till-1/analytics  {"bands":[1,2]}'),
    ("t/s/pc/status", {"daemon": "pc", "state": "offline", "cameras": "many", "problems": "none"},
     "t/s/pc/status  STATUS pc               offline   -           -                                         -  -"),
    ("t/s/pc/status", {"daemon": "pc", "state": "online", "store_open": False, "problems": [],
                       "cameras": {"till-1": {"state": "online", "picture": "blank"}}},
     "t/s/pc/status  STATUS pc               stale     0/1 cameras -                                         -  "
     "its status has no readable time: how long the daemon has been silent cannot be told"),
    ("t/s/pc/status", {"daemon": "pc", "state": "offline", "store_open": False, "problems": []},  # said then
     "t/s/pc/status  STATUS pc               offline   -           -                                         -  -"),
])
def test_pos_watch_says_statuses_and_analytics_in_a_line(topic, payload, expected):
    """`tillsight pos watch` and the demo: a status or an interval's counts as one readable line, whatever it holds."""
    import json

    from edge.pos_terminal import describe
    assert describe(topic, json.dumps(payload).encode()) == expected


def test_an_offline_daemons_problems_are_its_last_words():
    from edge.pos_terminal import describe_status
    body = {"daemon": "pc", "state": "offline", "problems": ["camera till-1 reconnecting", "outbox in memory only"]}
    assert describe_status(body, 0.0).endswith("-  when it stopped: camera till-1 reconnecting; outbox in memory only")


def test_a_status_stamped_ahead_says_so():
    from edge.pos_terminal import describe_status
    body = {"daemon": "pc", "state": "online", "time": "2026-11-27T09:00:00Z"}
    assert "  3595 s ahead  stamped 3595 s ahead of this machine's clock" in describe_status(body, 1795766405.0)


def test_a_closed_stores_status_says_so():
    from edge.pos_terminal import describe_status
    body = {"daemon": "pc", "state": "online", "store_open": False, "problems": [], "time": "2026-11-27T08:00:00Z",
            "cameras": {"till-1": {"state": "online", "picture": "blank"}}}
    assert describe_status(body, 1795766405.0) == (
        "pc               online    0/1 cameras -                                   5 s ago  store closed")


class _RunningService:
    """What the reload check touches of the running daemon: its status line."""

    def __init__(self):
        self.said = []
        self.notifier = type("Notifier", (), {"status": lambda _, text: self.said.append(text)})()

    def summary(self) -> str:
        return "running"


def test_a_reload_onto_a_detector_of_another_variant_keeps_the_daemon_running(tmp_path, age_models, caplog):
    """The model check's ValueError (detector_variant not the file's) ended the running daemon on SIGHUP."""
    from edge.daemon import config_reloadable
    from edge.detect import VARIANTS
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                          models={"detector": str(VARIANTS["full_range"].onnx_path), "detector_variant": "short_range",
                                  "age_model": str(age_models[40])})
    service = _RunningService()
    assert config_reloadable(config, service) is False
    assert service.said[0].startswith("config not reloaded: face detector: FAILED: face detector ")
    assert "config not reloaded: its models would not load" in caplog.text
    line = one_line_error(tillsight("config", "check", "--models", str(config), timeout=120))
    assert line == "tillsight: error: 1 of 2 model checks failed, first the face detector"


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_replay_ack_timeout_is_range_checked(value, carphone_clip):
    line = one_line_error(tillsight("replay", str(carphone_clip), f"--ack-timeout={value}"), code=2)
    assert line == f"tillsight: error: --ack-timeout {value} out of range [0, 86400]"


def test_predict_refuses_a_fifo_image_instead_of_hanging(tmp_path, two_people_photo, age_models):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    result = tillsight("predict", str(fifo), str(two_people_photo), "--age-model", str(age_models[40]), timeout=120)
    assert one_line_error(result) == f"tillsight: error: cannot read image {fifo}: not a regular file"
    assert len(result.stdout.splitlines()) == 1  # the other image is still answered


def test_models_list_names_the_file_that_loads_and_a_bad_model_dir_is_one_line():
    result = tillsight("models", "list")
    assert result.returncode == 0, result.stderr
    from edge.tiers import SHIPPED_AGE_MODEL, resnet50_ships, variant_of
    if resnet50_ships() and variant_of(SHIPPED_AGE_MODEL, "int8").is_file():  # the CPU's pick (no GPU build here)
        import onnxruntime
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            assert f"resnet50  resnet50  {variant_of(SHIPPED_AGE_MODEL, 'int8')}" in result.stdout.splitlines()
    result = tillsight("models", "fetch", "light", env={**os.environ, "TILLSIGHT_MODEL_DIR": "~nosuchuser-ts/m"})
    assert one_line_error(result) == ("tillsight: error: TILLSIGHT_MODEL_DIR='~nosuchuser-ts/m': there is no user "
                                      "'nosuchuser-ts' to expand it")


def test_a_model_dir_whose_name_is_too_long_is_one_line(tmp_path):
    """ENAMETOOLONG: an OSError traceback from `models list` (and every command looking for the light model)."""
    env = {**os.environ, "TILLSIGHT_MODEL_DIR": str(tmp_path / ("m" * 300))}
    shown = repr(env["TILLSIGHT_MODEL_DIR"][:80]) + "…"
    for command in (["models", "list"], ["models", "fetch", "light"]):
        assert one_line_error(tillsight(*command, env=env)) == (f"tillsight: error: TILLSIGHT_MODEL_DIR={shown}: "
                                                                "cannot be used (File name too long)")


@pytest.mark.parametrize("arguments, line", [
    (["--video", "nonexist.mp4"], "--video: video file 'nonexist.mp4' not found"),
    (["--age-model", "heavy"], "--age-model: 'heavy' is neither a tier (auto, resnet50, light) nor an existing model file"),
])
def test_demo_options_are_checked_before_the_broker_starts(arguments, line):
    """They named config keys (cameras.0.source, models.age_model) the user never wrote, after a broker started."""
    result = tillsight("demo", *arguments, timeout=60)
    assert one_line_error(result, code=2).startswith(f"tillsight: error: {line}")
    assert "broker on" not in result.stdout


def test_status_host_the_resolver_refuses_is_a_usage_error():
    line = one_line_error(tillsight("status", "--host", "a..b", "--store", "s", "--wait", "0"), code=2)
    assert line.startswith("tillsight: error: --host: 'a..b' is not a host name")
