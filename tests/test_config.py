from pathlib import Path

import pytest

from edge.config import ConfigError, load_config, parse_config
from test_cli import one_line_error
from tskit import tillsight, write_config


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path):
    video = tmp_path / "till.mp4"
    video.write_bytes(b"")
    config = load_config(write_config(tmp_path / "c.toml", store_id="store-7",
                                      cameras=[{"id": "till-1", "source": "till.mp4"}]))
    assert config.cameras[0].source == str(tmp_path / "till.mp4")  # relative to the config file
    assert config.policy.challenge_age == 25
    assert config.mqtt.qos == 1 and config.mqtt.topic_prefix == "tillsight" and config.mqtt.port == 1883
    assert config.models.providers == ["cuda", "cpu"]
    assert config.cameras[0].fps_limit == 5


def test_sources_device_index_and_urls_are_accepted():
    config = parse_config({"store_id": "s", "cameras": [
        {"id": "usb", "source": 0}, {"id": "ip", "source": "rtsp://cam.local:554/stream1"},
        {"id": "web", "source": "http://10.0.0.5/video.mjpg"}]})
    assert [c.source for c in config.cameras] == [0, "rtsp://cam.local:554/stream1", "http://10.0.0.5/video.mjpg"]


def test_every_problem_is_reported_with_its_path():
    assert problems({
        "store_id": "s/1",
        "cameras": [{"id": "a", "source": "nope.mp4"}, {"id": "b", "source": "ftp://x/y"},
                    {"id": "c", "source": "rtsp://"}, {"id": "d", "source": -1, "fps_limit": 0}],
        "mqtt": {"host": 5, "port": "x", "qos": 3, "colour": "red"},  # (host: once lost beside the others)
        "policy": {"challenge_age": "old"},
    }) == [
        "store_id: must be 1 to 64 letters, digits, '_' or '-' (it becomes an MQTT topic level)",
        "cameras.0.source: video file 'nope.mp4' not found (a device is an integer index, a stream an rtsp:// or http:// URL)",
        "cameras.1.source: URL scheme 'ftp' not supported (use rtsp, rtsps, http, https)",
        "cameras.2.source: URL 'rtsp://' has no host",
        "cameras.3.source: input should be greater than or equal to 0",
        "cameras.3.fps_limit: input should be greater than 0",
        "mqtt.host: input should be a valid string",
        "mqtt.port: input should be a number, not the string 'x' (write it without quotes)",
        "mqtt.qos: input should be 0, 1 or 2",
        "mqtt.colour: unknown key",
        "policy.challenge_age: input should be a number, not the string 'old' (write it without quotes)",
    ]


def test_a_password_file_others_can_read_is_a_warning_at_check_and_at_start(tmp_path, broker, hamilton_clip):
    """Like mosquitto with its own password file: the daemon runs, and says so where the operator looks."""
    import json
    import os
    password = tmp_path / "mqtt-password"
    password.write_text("secret\n")
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "c", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port, "username": "till",
                                "password_file": str(password)})
    warning = (f"mqtt.password_file: {password} can be read by every user of this machine (mode 0644): "
               "chmod 600 it (deploy/README: install -o tillsight -m 400)")
    os.chmod(password, 0o644)
    checked = tillsight("config", "check", str(config))
    assert (checked.returncode, checked.stderr.strip()) == (0, f"warning: {warning}")
    replayed = tillsight("replay", str(hamilton_clip), "--config", str(config))  # the open test broker lets it in
    assert replayed.returncode == 0, replayed.stderr
    assert [json.loads(line)["msg"] for line in replayed.stderr.splitlines() if '"warning"' in line] == [warning]
    for sound in (0o600, 0o640):  # group-readable: the operator's choice of group
        os.chmod(password, sound)
        checked = tillsight("config", "check", str(config))
        assert (checked.returncode, checked.stderr) == (0, "")


def test_a_camera_source_that_is_no_video_file_says_what_it_is(tmp_path):
    """A folder or a device node is a file path that exists: "not found" sent people looking for a typo."""
    def source_problem(source):
        return problems({"store_id": "s", "cameras": [{"id": "a", "source": source}]})
    assert source_problem("/dev/video2") == ["cameras.0.source: '/dev/video2' is a device path: give its index "
                                             "instead (source = 2)"]
    assert source_problem(str(tmp_path)) == [f"cameras.0.source: {str(tmp_path)!r} is a folder, not a video file"]
    assert source_problem("/dev/null") == ["cameras.0.source: '/dev/null' is not a regular file (a device is an "
                                           "integer index, a stream an rtsp:// or http:// URL)"]


def test_missing_keys_and_files():
    assert problems({}) == ["store_id: required key is missing", "cameras: required key is missing"]
    assert problems({"store_id": "s", "cameras": [{"id": "a", "source": 0}],
                     "models": {"age_model": "/no/such/model.onnx"},
                     "mqtt": {"password_file": "/no/secret"}}) == [
        "mqtt.password_file: file '/no/secret' not found",
        "models.age_model: '/no/such/model.onnx' is neither a tier (auto, resnet50, light) nor an existing model file",
    ]


def test_age_model_is_a_tier_or_a_file_relative_to_the_config(tmp_path):
    (tmp_path / "mine.onnx").write_bytes(b"")
    cameras = [{"id": "a", "source": 0}]
    assert parse_config({"store_id": "s", "cameras": cameras}).models.age_model == "auto"
    for tier in ("auto", "light", "resnet50"):
        config = load_config(write_config(tmp_path / "c.toml", store_id="s", cameras=cameras, models={"age_model": tier}))
        assert config.models.age_model == tier  # a tier name is not taken for a relative path
    config = load_config(write_config(tmp_path / "c.toml", store_id="s", cameras=cameras, models={"age_model": "mine.onnx"}))
    assert config.models.age_model == str(tmp_path / "mine.onnx")


def test_duplicate_camera_ids_and_empty_camera_list():
    assert problems({"store_id": "s", "cameras": [{"id": "a", "source": 0}, {"id": "a", "source": 1}]}) == [
        "cameras: camera ids must be unique, repeated: a"]
    assert problems({"store_id": "s", "cameras": []}) == [
        "cameras: list should have at least 1 item after validation, not 0"]


def test_config_check_cli_prints_each_problem_and_exits_2(tmp_path):
    path = write_config(tmp_path / "bad.toml", store_id="s", mqtt={"port": 70000},
                        cameras=[{"id": "a", "source": 0, "fps": 5}])
    result = tillsight("config", "check", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["cameras.0.fps: unknown key",
                                          "mqtt.port: input should be less than or equal to 65535"]
    assert "Traceback" not in result.stderr


def test_config_check_ok(tmp_path):
    path = write_config(tmp_path / "ok.toml", store_id="s", cameras=[{"id": "a", "source": 0}])
    result = tillsight("config", "check", str(path))
    assert (result.returncode, result.stdout.strip()) == (0, f"{path}: OK")


def test_invalid_toml_and_missing_file_are_one_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("store_id = \n")
    result = tillsight("config", "check", str(path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{path}: not valid TOML: ")
    result = tillsight("config", "check", str(tmp_path / "absent.toml"))
    assert (result.returncode, result.stderr.strip()) == (2, f"{tmp_path / 'absent.toml'}: config file not found")


def test_example_config_in_the_repository_is_valid():
    example = Path(__file__).resolve().parents[1] / "deploy" / "tillsight.example.toml"
    config = load_config(example)
    assert config.cameras and config.policy.challenge_age == 25


def test_a_camera_password_is_shown_as_stars_and_a_config_holding_one_must_not_be_world_readable(tmp_path):
    import os

    from edge.config import redact_url
    assert redact_url("rtsp://admin:s3cr%40t@10.0.0.5:554/Streaming/Channels/101") == \
        "rtsp://admin:***@10.0.0.5:554/Streaming/Channels/101"
    assert redact_url("http://cam/videostream.cgi?user=admin&pwd=p@ss&rate=0") == \
        "http://cam/videostream.cgi?user=admin&pwd=***&rate=0"
    assert redact_url("rtsps://u:p@[::1]:322/a?token=abc") == "rtsps://u:***@[::1]:322/a?token=***"
    assert redact_url("rtsp://a:b@c@host/x") == "rtsp://a:***@host/x"  # an @ in the password
    for plain in ("rtsp://admin@cam/x", "http://cam/video.mjpg", "rtsp://10.0.0.5/live?channel=1"):
        assert redact_url(plain) == plain
    line = one_line_error(tillsight("config", "check", str(write_config(
        tmp_path / "bad.toml", store_id="s", cameras=[{"id": "c", "source": "rtsp://admin:hunter2@"}]))), code=2)
    assert line == "cameras.0.source: URL 'rtsp://admin:***@' has no host"
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[
        {"id": "a", "source": "rtsp://10.0.0.4/live"}, {"id": "b", "source": "rtsp://admin:hunter2@10.0.0.5/live"}])
    os.chmod(config, 0o644)
    checked = tillsight("config", "check", str(config))
    assert (checked.returncode, checked.stderr.strip()) == (0, (
        f"warning: cameras.1.source: a camera's password is in {config}, which every user of this machine can "
        "read (mode 0644): chmod 600 it, owner tillsight (deploy/README)"))
    os.chmod(config, 0o600)
    assert tillsight("config", "check", str(config)).stderr == ""
