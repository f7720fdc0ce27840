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
        "cameras.0.source: video file 'nope.mp4' not found (a USB camera is an index or its /dev/v4l/by-id/ path, a stream an rtsp:// or http:// URL)",
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
    for device in ("/dev/video2", "/dev/v4l/by-id/usb-Logitech_C920_A1B2C3-video-index0",
                   "/dev/v4l/by-path/pci-0000:00:14.0-usb-0:2:1.0-video-index0"):  # USB cameras: present or not
        assert parse_config({"store_id": "s", "cameras": [{"id": "a", "source": device}]}).cameras[0].is_device
    assert source_problem(str(tmp_path)) == [f"cameras.0.source: {str(tmp_path)!r} is a folder, not a video file"]
    assert source_problem("/dev/null") == ["cameras.0.source: '/dev/null' is not a regular file (a USB camera is an "
                                           "index or its /dev/v4l/by-id/ path, a stream an rtsp:// or http:// URL)"]
    assert source_problem("/dev/v4l/by-id/..")[0].startswith("cameras.0.source: video file '/dev/v4l/by-id/..' not")
    assert source_problem("/dev/v4l/by-id/a/b")[0].startswith("cameras.0.source: video file '/dev/v4l/by-id/a/b' not")


def test_a_usb_camera_may_be_asked_for_a_size_and_pixel_format_a_stream_or_file_not(tmp_path, carphone_clip):
    def camera_problems(**camera) -> list[str]:
        return problems({"store_id": "s", "cameras": [{"id": "a", "source": 0, **camera}]})
    usb = parse_config({"store_id": "s", "cameras": [{"id": "a", "source": "/dev/video0", "size": [1280, 720],
                                                      "pixel_format": "MJPG"}]}).cameras[0]
    assert (usb.size, usb.pixel_format) == ((1280, 720), "MJPG")
    assert camera_problems(size=[1280]) == [
        "cameras.0.size: '[1280]' is no size: give [width, height] in pixels, e.g. [1280, 720]"]
    assert camera_problems(size="1280x720") == [
        "cameras.0.size: '1280x720' is no size: give [width, height] in pixels, e.g. [1280, 720]"]
    assert camera_problems(size=[True, 720]) == ["cameras.0.size: item 0 should be a number, not true"]
    assert camera_problems(size=[8, 100000]) == ["cameras.0.size.0: input should be greater than or equal to 16",
                                                 "cameras.0.size.1: input should be less than or equal to 8192"]
    assert camera_problems(pixel_format="mjpeg") == ["cameras.0.pixel_format: input should be 'MJPG' or 'YUYV'"]
    for source in ("rtsp://10.0.0.5/live", str(carphone_clip)):
        assert camera_problems(source=source, size=[1280, 720]) == [
            "cameras.0: size and pixel_format are for a USB camera: a stream's picture is set in the camera's own "
            "settings, and a file's is what it holds"]


def test_ignore_regions_are_boxes_of_shares_of_the_picture():
    def camera_problems(regions) -> list[str]:
        return problems({"store_id": "s", "cameras": [{"id": "a", "source": 0, "ignore_regions": regions}]})
    camera = parse_config({"store_id": "s", "cameras": [{"id": "a", "source": 0,
                                                         "ignore_regions": [[0.7, 0, 1, 0.45]]}]}).cameras[0]
    assert camera.ignore_regions == [(0.7, 0.0, 1.0, 0.45)]
    assert camera_problems([[0.7, 0, 1]]) == [
        "cameras.0.ignore_regions: item 0: '[0.7, 0, 1]' is no box: give [x0, y0, x1, y1], as shares of the picture's "
        "width and height, e.g. [0.7, 0, 1, 0.5] for the upper right"]
    assert camera_problems("upper right") == [
        "cameras.0.ignore_regions: give a list of [x0, y0, x1, y1] boxes, as shares of the picture (0 to 1)"]
    assert camera_problems([[0.7, 0, 0.5, 0.5]]) == [
        "cameras.0.ignore_regions: item 0: [0.7, 0, 0.5, 0.5] is empty: x0 < x1 and y0 < y1"]
    assert camera_problems([[0, 0, 1280, 720]]) == ["cameras.0.ignore_regions.0.2: input should be less than or equal "
                                                    "to 1", "cameras.0.ignore_regions.0.3: input should be less than "
                                                    "or equal to 1"]  # pixels, not shares
    assert camera_problems([[True, 0, 1, 1]]) == [
        "cameras.0.ignore_regions: item 0: a corner should be a number, not true or false"]
    assert camera_problems([[0.1, 0.1, 0.2, "0.3"]]) == [
        "cameras.0.ignore_regions: item 0: '0.3' should be a number (write it without quotes)"]
    assert camera_problems([[0, 0, 1, 1]] * 17)[0].startswith("cameras.0.ignore_regions: list should have at most 16")


def test_usb_cameras_by_index_or_absent_are_warned_of_at_check(tmp_path):
    """USB cameras by index swap at a reboot or a replug, and then each till is answered about the other's
    customer: config check says so, and so does a device path that is not there (a typo, or unplugged), and one
    device named twice."""
    import os
    absent = "/dev/v4l/by-id/usb-Nothing_Here_0000-video-index0"
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[
        {"id": "till-1", "source": 0}, {"id": "till-2", "source": "/dev/video63"}, {"id": "till-3", "source": absent},
        {"id": "till-4", "source": "/dev/video0"}])
    result = tillsight("config", "check", str(config))
    assert result.returncode == 0 and result.stdout == f"{config}: OK\n", result
    expected = [
        "warning: cameras.0.source, cameras.1.source, cameras.3.source: USB cameras by index (0, /dev/video63, "
        "/dev/video0) beside other USB cameras can swap at a reboot or a replug, and each till would be answered "
        "about the other's customer: name each by its /dev/v4l/by-id/... link (ls -l /dev/v4l/by-id), or by-path "
        "(the USB port) for cameras of one model without serial numbers",
        "warning: cameras.0.source, cameras.3.source: the same device (/dev/video0) twice: a device has one reader, "
        "so the second camera would never open"]
    expected += [f"warning: cameras.{index}.source: {path} is not there now (a typo, or the camera is unplugged; "
                 "ls -l /dev/v4l/by-id)" for index, path in ((1, "/dev/video63"), (2, absent), (3, "/dev/video0"))
                 if not os.path.exists(path)]  # (none of them is on the machines the tests run on)
    assert result.stderr.splitlines() == expected
    # one camera by index beside one by its link: the index may become that camera's node after a reboot
    mixed = write_config(tmp_path / "mixed.toml", store_id="s", cameras=[{"id": "till-1", "source": 0},
                                                                         {"id": "till-2", "source": absent}])
    assert "cameras.0.source: USB cameras by index (0) beside other USB cameras" in \
        tillsight("config", "check", str(mixed)).stderr
    one = write_config(tmp_path / "one.toml", store_id="s", cameras=[{"id": "till-1", "source": 0},
                                                                     {"id": "till-2", "source": "rtsp://10.0.0.5/"}])
    assert tillsight("config", "check", str(one)).stderr == ""  # one USB camera by index cannot swap


def test_missing_keys_and_files():
    assert problems({}) == ["store_id: required key is missing", "cameras: required key is missing"]
    assert problems({"store_id": "s", "cameras": [{"id": "a", "source": 0}],
                     "models": {"age_model": "/no/such/model.onnx"},
                     "mqtt": {"password_file": "/no/secret"}}) == [
        "mqtt.password_file: file '/no/secret' not found",
        "models.age_model: '/no/such/model.onnx' is neither a tier (auto, resnet50, light) nor an existing model file",
    ]


def test_an_unknown_key_near_a_known_one_names_it(tmp_path):
    """A typo (fps_limt), a table in the singular ([[camera]], [model]): the key it was most likely meant to be."""
    text = ('store_id = "s"\n[model]\nage_model = "light"\n[[cameras]]\nid = "a"\nsource = 0\nfps_limt = 5\n'
            '[mqtt]\nhots = "x"\n[mqtt.tls]\nca_fil = "x"\n[tracking]\nbanana = 1\n')
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.toml")
    assert sorted(caught.value.problems) == [
        "cameras.0.fps_limt: unknown key (did you mean fps_limit?)", "model: unknown key (did you mean models?)",
        "mqtt.hots: unknown key (did you mean host?)", "mqtt.tls.ca_fil: unknown key (did you mean ca_file?)",
        "tracking.banana: unknown key"]


def test_an_empty_password_file_is_a_problem(tmp_path):
    """It passed the check; the broker then said only "Not authorized", at every connection."""
    for text in ("", "\n  \n"):
        (tmp_path / "password").write_text(text)
        assert problems(base(mqtt={"username": "tillsight", "password_file": str(tmp_path / "password")})) == [
            f"mqtt.password_file: '{tmp_path / 'password'}' is empty: it must hold the broker user's password"]


TOO_LONG = "mqtt.password_file: {path!r} holds more than 65,535 bytes, MQTT's limit for a password (a certificate " \
           "bundle?): name the file that holds the password alone"


def test_a_password_file_too_long_for_mqtt_or_of_several_lines_is_a_problem(tmp_path):
    """Over 65,535 bytes (a certificate bundle named by mistake) it passed the check, and paho's network thread then
    died on it (struct.error) in run, replay, status and config check --live; a second line was sent as part of the
    password, which the broker refused with only "Not authorized"."""
    password = tmp_path / "password"
    for held, problem in ((b"x" * 65_536, TOO_LONG.format(path=str(password))),
                          (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                           f"mqtt.password_file: {str(password)!r} holds 3 lines: a password file holds the password "
                           "alone, on one line")):
        password.write_bytes(held)
        assert problems(base(mqtt={"username": "tillsight", "password_file": str(password)})) == [problem]
    for held in (b"x" * 65_535, b"\n  secret \r\n\n"):  # the longest MQTT takes; one line among blank ones
        password.write_bytes(held)
        parse_config(base(mqtt={"username": "tillsight", "password_file": str(password)}))
    password.write_bytes(b"x" * 100_000)
    line = one_line_error(tillsight("status", "--store", "s", "--username", "pos", "--password-file", str(password)), 2)
    assert line == "tillsight: error: " + TOO_LONG.format(path=str(password)).replace("mqtt.password_file", "--password-file")


def test_a_password_file_grown_too_long_since_the_check_is_refused_when_read(tmp_path):
    """Read again at each connection: paho must never be handed a password it fails on in its own thread."""
    from edge.errors import UserError
    from edge.publish import mqtt_client
    password = tmp_path / "password"
    password.write_text("secret\n")
    config = parse_config(base(mqtt={"username": "tillsight", "password_file": str(password)}))
    assert mqtt_client(config.mqtt, "c")._password == b"secret"
    password.write_bytes(b"x" * 70_000)
    with pytest.raises(UserError) as caught:
        mqtt_client(config.mqtt, "c")
    assert str(caught.value) == TOO_LONG.format(path=str(password)).replace(f"password_file: {str(password)!r}",
                                                                             f"password_file {password}")


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


def test_a_track_must_keep_as_many_ages_as_the_policy_and_the_budget_want():
    camera = [{"id": "a", "source": 0}]
    assert problems({"store_id": "s", "cameras": camera, "tracking": {"max_samples": 2}}) == [
        "tracking.max_samples: 2 is below policy.min_samples (3) and budget.settle_samples (12): a track keeps that "
        "many ages at most, so raise it or lower those"]
    assert problems({"store_id": "s", "cameras": camera, "tracking": {"max_samples": 5},
                     "budget": {"enabled": False}, "policy": {"min_samples": 6}}) == [
        "tracking.max_samples: 5 is below policy.min_samples (6): a track keeps that many ages at most, so raise it "
        "or lower those"]
    parse_config({"store_id": "s", "cameras": camera, "tracking": {"max_samples": 5}, "budget": {"enabled": False}})


def test_pos_is_no_camera_or_daemon_id_since_the_pos_clients_replies_live_there(monkeypatch):
    """A camera or daemon named pos would put its alert, estimate or status topics under <prefix>/<store>/pos/,
    where a POS's check may name the reply topic."""
    from edge.service import daemon_id
    reserved = "'pos' is reserved: <prefix>/<store>/pos/ holds the POS clients' reply topics"
    assert problems({"store_id": "s", "daemon_id": "pos", "cameras": [{"id": "pos", "source": 0}]}) == [
        f"daemon_id: {reserved}", f"cameras.0.id: {reserved}"]
    config = parse_config({"store_id": "s", "cameras": [{"id": "POS-1", "source": 0}]})
    monkeypatch.setattr("socket.gethostname", lambda: "pos")
    monkeypatch.delenv("TILLSIGHT_INSTANCE", raising=False)
    assert daemon_id(config) == "tillsight-pos"


def test_settings_that_would_let_minors_pass_unasked_are_refused():
    """A challenge age below the legal age; a poster rule that takes a customer standing still for a picture;
    a camera URL whose port no camera has (it would reconnect for ever)."""
    camera = [{"id": "a", "source": 0}]
    assert problems({"store_id": "s", "cameras": camera, "policy": {"challenge_age": 16}}) == [
        "policy: challenge_age (16) is below legal_age (18): customers who look older than challenge_age but are "
        "under age would never be asked"]
    parse_config({"store_id": "s", "cameras": camera, "policy": {"mode": "risk", "challenge_age": 16}})  # unused there
    assert problems({"store_id": "s", "cameras": camera, "tracking": {"picture_face_s": 2}}) == [
        "tracking.picture_face_s: 2 s would take customers standing at the till for pictures: 0 (never) or at least "
        "10 s"]
    assert problems({"store_id": "s", "cameras": [{"id": "a", "source": "rtsp://user:pw@cam:99999/stream"}]}) == [
        "cameras.0.source: URL 'rtsp://user:***@cam:99999/stream' has no valid port (1 to 65535)"]


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
    # as IP cameras take them in the path (XMEye, Dahua) and under other names (Foscam, and short ones): the
    # status reached HQ with "cannot open source 'rtsp://10.0.0.5:554/user=admin&password=XmEyE-S3cret…'"
    assert redact_url("rtsp://10.0.0.5:554/user=admin&password=XmEyE-S3cret&channel=1&stream=0.sdp") == \
        "rtsp://10.0.0.5:554/user=admin&password=***&channel=1&stream=0.sdp"
    assert redact_url("http://cam/videostream.cgi?loginuse=admin&loginpas=S3cret") == \
        "http://cam/videostream.cgi?loginuse=admin&loginpas=***"
    assert redact_url("rtsp://h/x?pw=a&psw=b&u=c&p=d&credentials=e") == "rtsp://h/x?pw=***&psw=***&u=c&p=***&credentials=***"
    assert redact_url("rtsp://10.0.0.5:554/user=admin_password=hunter2_channel=1_stream=0.sdp") == \
        "rtsp://10.0.0.5:554/user=admin_password=***_channel=1_stream=0.sdp"  # XMEye's own form, joined by _
    assert redact_url("http://h/v.mjpg?camera=1&signal=5&keyframe=2&api_key=z") == \
        "http://h/v.mjpg?camera=1&signal=5&keyframe=2&api_key=***"  # short names whole: signal is no sig
    # the stream's fingerprint (in every status, bridged to HQ) holds no login: its hash would give the password
    from edge.config import stream_key
    assert "hunter2" not in stream_key("rtsp://10.0.0.5:554/user=admin_password=hunter2_channel=1_stream=0.sdp")
    assert stream_key("rtsp://h/user=admin&password=a&channel=1") == stream_key("rtsp://h/user=viewer&password=b&channel=1")
    assert stream_key("http://h/v?p=1") != stream_key("http://h/v?p=2")  # p: as often a stream selector
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


# ---------------------------------------------------------------- opening hours


def at(iso: str) -> float:
    """A Unix time from an ISO time with its offset."""
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


def test_opening_hours_by_day_past_midnight_and_in_the_stores_time_zone():
    base = {"store_id": "s", "cameras": [{"id": "a", "source": 0}]}
    hours = parse_config({**base, "opening_hours": {
        "timezone": "Europe/London", "default": "07:00-22:00", "sat": "08:00-12:00, 13:00-20:00",
        "sun": "closed", "fri": "07:00-02:30"}}).opening_hours
    # 2026-11-26 is a Thursday; London is on UTC in winter and UTC+1 from 2027-03-28
    assert [hours.is_open(at(t)) for t in ("2026-11-26T06:59:59+00:00", "2026-11-26T07:00:00+00:00",
                                           "2026-11-26T21:59:59+00:00", "2026-11-26T22:00:00+00:00")] == \
        [False, True, True, False]
    # Friday's hours run into Saturday; Saturday's own first span starts at 08:00, with a lunch break
    assert [hours.is_open(at(t)) for t in ("2026-11-28T02:29:00+00:00", "2026-11-28T02:30:00+00:00",
                                           "2026-11-28T07:59:00+00:00", "2026-11-28T12:30:00+00:00",
                                           "2026-11-28T13:00:00+00:00")] == [True, False, False, False, True]
    assert not hours.is_open(at("2026-11-29T12:00:00+00:00"))  # Sunday: closed all day
    assert hours.is_open(at("2026-11-30T07:00:00+00:00"))  # Monday: the default
    # summer time: 06:30 UTC is 07:30 in London
    assert hours.is_open(at("2027-06-03T06:30:00+00:00")) and not hours.is_open(at("2026-12-03T06:30:00+00:00"))
    # a 24-hour store, and one whose night span wraps from Sunday into Monday
    always = parse_config({**base, "opening_hours": {"timezone": "UTC", "default": "00:00-24:00"}}).opening_hours
    assert all(always.is_open(at(f"2026-11-{day}T{hour:02d}:30:00+00:00")) for day in (26, 29) for hour in range(24))
    nights = parse_config({**base, "opening_hours": {"timezone": "Asia/Tokyo", "default": "closed",
                                                     "sun": "22:00-06:00"}}).opening_hours
    assert nights.is_open(at("2026-11-30T05:59:00+09:00")) and not nights.is_open(at("2026-11-30T06:00:00+09:00"))
    assert not nights.is_open(at("2026-11-29T05:00:00+09:00"))  # Sunday's early hours are Saturday's: closed


def test_a_camera_off_while_closed_needs_opening_hours():
    cameras = [{"id": "a", "source": 0}, {"id": "b", "source": 1, "off_while_closed": True}]
    with pytest.raises(ConfigError) as caught:
        parse_config({"store_id": "s", "cameras": cameras})
    assert caught.value.problems == ["cameras.1.off_while_closed: without [opening_hours] the store is never closed; "
                                     "give its hours, or remove off_while_closed"]
    config = parse_config({"store_id": "s", "cameras": cameras, "opening_hours": {"default": "07:00-22:00"}})
    assert [c.off_while_closed for c in config.cameras] == [False, True]


def test_opening_hours_mistakes_are_one_line_each():
    base = {"store_id": "s", "cameras": [{"id": "a", "source": 0}]}

    def problems(hours: dict) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, "opening_hours": hours})
        return caught.value.problems

    examples = ('spans like "07:00-22:00", "08:00-12:00, 13:00-20:00", "22:00-06:00" (past midnight), '
                '"00:00-24:00" (all day) or "closed"')
    assert problems({"default": "7-22", "mon": "07:00-24:30", "tue": "24:00-01:00", "wed": "09:00-09:00",
                     "thu": 9, "timezone": "Europe"}) == [
        "opening_hours.timezone: unknown time zone 'Europe': an IANA name such as Europe/London (the system's "
        "tzdata lists them)",
        f"opening_hours.default: '7-22' is not opening hours: write {examples}",
        "opening_hours.mon: '07:00-24:30': a time runs from 00:00 to 24:00, and 24:00 only ends a span",
        "opening_hours.tue: '24:00-01:00': a time runs from 00:00 to 24:00, and 24:00 only ends a span",
        "opening_hours.wed: '09:00-09:00' opens and closes at the same time: write \"00:00-24:00\" for all day, "
        "or \"closed\"",
        "opening_hours.thu: input should be a valid string"]
    assert problems({"mon": "07:00-22:00", "sun": "closed"}) == [
        "opening_hours: no hours for tue, wed, thu, fri, sat: give each day its hours, or a default for the days "
        "not listed"]
    assert problems({"default": "closed", "timezone": "../../etc/passwd"})[0].startswith(
        "opening_hours.timezone: unknown time zone '../../etc/passwd'")
    for pseudo in ("localtime", "posixrules", "Factory"):  # files in the zone folder, not a store's zone
        assert problems({"default": "closed", "timezone": pseudo})[0].startswith(
            f"opening_hours.timezone: unknown time zone '{pseudo}'")
    assert problems({"default": "closed", "holidays": "25 Dec"}) == ["opening_hours.holidays: unknown key"]


def test_opening_hours_without_a_time_zone_on_a_machine_set_to_utc_are_warned_of(tmp_path):
    import os
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                          opening_hours={"default": "07:00-22:00"})
    in_utc = tillsight("config", "check", str(config), env={**os.environ, "TZ": "UTC"})
    assert in_utc.returncode == 0 and in_utc.stderr == (
        "warning: opening_hours: no timezone, and this machine's time zone is UTC: the hours are read in UTC; set "
        "opening_hours.timezone to the store's (e.g. \"Europe/London\")\n")
    in_london = tillsight("config", "check", str(config), env={**os.environ, "TZ": "Europe/London"})
    assert in_london.returncode == 0 and in_london.stderr == ""  # GMT in winter, but summer time: set
    in_gmt = tillsight("config", "check", str(config), env={**os.environ, "TZ": "Etc/GMT"})
    assert in_gmt.stderr == in_utc.stderr


def test_the_live_check_says_the_stores_local_time_and_whether_it_is_open():
    """`config check --live` at the install: a wrong time zone shows as the wrong local time."""
    from edge.checkup import check_clock
    from edge.config import OpeningHours
    hours = OpeningHours(timezone="America/New_York", default="07:00-22:00")
    thursday_23_utc = at("2026-11-26T23:00:00+00:00")
    assert check_clock(thursday_23_utc, hours).line() == \
        "clock: 2026-11-26T23:00:00.000Z (UTC), Thu 18:00 EST there: the store is open"
    assert check_clock(thursday_23_utc + 4 * 3600, hours).line() == \
        "clock: 2026-11-27T03:00:00.000Z (UTC), Thu 22:00 EST there: the store is closed"
    assert check_clock(thursday_23_utc).line() == "clock: 2026-11-26T23:00:00.000Z (UTC)"  # no hours: not said


def test_the_cuda_providers_options_are_validated_and_default_to_what_the_h100_measured(tmp_path):
    from edge.runtime import DEFAULT_CUDA_OPTIONS
    base = {"store_id": "s", "cameras": [{"id": "a", "source": 0}], "mqtt": {"host": "localhost"}}
    assert parse_config(base).models.cuda.provider_options() == DEFAULT_CUDA_OPTIONS  # one default, two places
    chosen = parse_config({**base, "models": {"cuda": {"conv_algo_search": "exhaustive", "prefer_nhwc": False}}})
    assert chosen.models.cuda.provider_options() == {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "0"}
    ort_default = parse_config({**base, "models": {"cuda": {"conv_algo_search": "default"}}})
    assert "cudnn_conv_algo_search" not in ort_default.models.cuda.provider_options()
    for bad in ({"conv_algo_search": "fastest"}, {"prefer_nhwc": "yes"}, {"nhwc": True}):
        with pytest.raises(ConfigError) as raised:
            parse_config({**base, "models": {"cuda": bad}})
        assert "models.cuda." in str(raised.value) and "\n" not in str(raised.value).strip()


def base(**sections) -> dict:
    return {"store_id": "s", "cameras": [{"id": "a", "source": 0}], **sections}


def test_a_detector_variant_that_does_not_ship_needs_its_file():
    """short_range without models.detector passed `config check`, then the daemon found no such file at start."""
    assert problems(base(models={"detector_variant": "short_range"})) == [
        "models.detector_variant: 'short_range' does not ship with tillsight (only 'full_range' does): convert it "
        "with `tillsight export detector --variant short_range --out FILE.onnx` and set models.detector to that file"]
    from edge.detect import VARIANTS
    assert parse_config(base(models={"detector_variant": "short_range",
                                     "detector": str(VARIANTS["full_range"].onnx_path)})).models.detector


def test_an_outbox_path_that_is_someone_elses_file_is_refused(tmp_path):
    """The outbox moves a file it cannot open as SQLite away as "corrupt", and deletes it a week later: a path
    naming the config itself, notes, or a photo lost it (until 2026-11-27 only text was refused). A device, FIFO
    or /proc file is no database either."""
    import os
    import sqlite3
    mine = tmp_path / "notes.txt"
    mine.write_text("the store's own notes")
    refusal = "is an existing file, not an SQLite database (nor an outbox: no {}.lock beside it): the outbox " \
              "would move it away as corrupt; name a new file, e.g. outbox.sqlite3"
    assert problems(base(outbox={"path": str(mine)})) == [f"outbox.path: {str(mine)!r} {refusal.format('notes.txt')}"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/null", str(fifo)):
        assert problems(base(outbox={"path": path})) == [
            f"outbox.path: {path!r} is not a regular file (a device, FIFO or /proc file): name a new file, e.g. "
            "/var/lib/tillsight/outbox.sqlite3"]
    assert problems(base(outbox={"path": "/proc/self/outbox"}))[0].startswith(
        "outbox.path: '/proc/self/outbox' is in a kernel file system (/proc, /sys)")
    assert mine.read_text() == "the store's own notes"
    # someone's files of any kind: notes in other encodings, a photo, a model, an archive, random bytes
    russian = "Касса 3: холодильник сломан, проверить размер.\r\n\tЗаказ для Миллера: молоко, хлеб.\n"
    foreign = {"notizen.txt": "Kasse 3: Kühlschrank defekt\r\n".encode("latin-1"), "cp1251.txt": russian.encode("cp1251"),
               "utf16.txt": russian.encode("utf-16"), "photo.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(4000),
               "age.onnx": b"\x08\x08\x12\x07tf2onnx" + os.urandom(4000), "backup.zip": b"PK\x03\x04" + os.urandom(4000),
               "random.bin": os.urandom(8192), "zeros.bin": bytes(8192)}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
        assert problems(base(outbox={"path": str(tmp_path / name)})) == [
            f"outbox.path: {str(tmp_path / name)!r} {refusal.format(name)}"], name
        assert (tmp_path / name).read_bytes() == data
    empty, database = tmp_path / "empty.sqlite3", tmp_path / "db.sqlite3"
    empty.write_bytes(b"")
    sqlite3.connect(database).execute("create table t (x)").connection.close()
    # a damaged outbox (zeros after a power cut, random damage), its lock file beside it as the outbox leaves it,
    # is the outbox's to set aside at start, serving on: refused here, the till stopped for good (exit 2 is not
    # restarted)
    zeros, damaged, erased = tmp_path / "zeros.sqlite3", tmp_path / "damaged.sqlite3", tmp_path / "erased.sqlite3"
    zeros.write_bytes(bytes(8192))
    damaged.write_bytes(os.urandom(8192))
    erased.write_bytes(b"\xff" * 8192)  # erased flash, a torn write on an SD card
    for path in (zeros, damaged, erased):
        Path(f"{path}.lock").write_bytes(b"till-pc\ntill-1\n")
    for path in (empty, database, tmp_path / "new.sqlite3", zeros, damaged, erased):
        assert parse_config(base(outbox={"path": str(path)})).outbox.path == path


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example", ".broker", "a." + "b" * 70])
def test_a_host_name_the_resolver_refuses_is_a_config_problem(host):
    """Labels empty or over 63 characters passed, then raised UnicodeError in paho's thread (a traceback)."""
    assert problems(base(mqtt={"host": host}))[0].startswith(f"mqtt.host: {host[:60]!r}")
    assert "is not a host name: dot-separated labels of 1 to 63 characters" in problems(base(mqtt={"host": host}))[0]


@pytest.mark.parametrize("host, problem", [
    ("mqtt://broker.local:1883", "not a URL"), ("mqtts://10.0.0.5", "not a URL"),
    ("broker.local:1883", "without a port"), ("10.0.0.5:8883", "without a port")])
def test_a_host_given_as_a_url_or_with_its_port_is_a_config_problem(host, problem):
    """It passed the check, and the daemon then looked the whole text up as a name at every connection."""
    assert problems(base(mqtt={"host": host})) == [f"mqtt.host: a host name or address, {problem}: put the port in "
                                                   "mqtt.port"]
    line = one_line_error(tillsight("status", "--host", host, "--store", "s", "--wait", "0"), code=2)
    assert line == f"tillsight: error: --host: a host name or address, {problem}: put the port in --port"


@pytest.mark.parametrize("host", ["localhost", "broker.local.", "10.0.0.5", "::1", "fe80::1", "fe80::1%eth0",
                                  "bücher.example"])
def test_host_names_and_addresses_pass(host):
    assert parse_config(base(mqtt={"host": host})).mqtt.host == host


def test_status_interval_is_bounded():
    """Peers refuse a status that claims more than a day between statuses, and took the daemon for silent."""
    assert problems(base(status_interval_s=86_401)) == ["status_interval_s: input should be less than or equal to 86400"]
    assert problems(base(status_interval_s=0.5)) == ["status_interval_s: input should be greater than or equal to 1"]
    assert parse_config(base(status_interval_s=86_400)).status_interval_s == 86_400


def test_a_config_path_that_is_a_fifo_or_folder_is_one_line_not_a_hang(tmp_path):
    import os
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    result = tillsight("config", "check", str(fifo), timeout=60)  # open() waited for a writer for ever
    assert (result.returncode, result.stderr.strip()) == (
        2, f"{fifo}: not a regular file (a FIFO, device or socket): give the config file itself")
    result = tillsight("config", "check", str(tmp_path), timeout=60)
    assert (result.returncode, result.stderr.strip()) == (2, f"{tmp_path}: is a folder, not a config file")


def test_a_folder_or_fifo_named_as_a_file_says_what_it_is(tmp_path):
    """"not found" sent people looking for a typo in a path that is there."""
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert problems(base(cameras=[{"id": "a", "source": ""}])) == [
        "cameras.0.source: empty: give a device index, a stream URL or a video file path"]
    for path, what in ((tmp_path, "is a folder, not a"), (fifo, "is a FIFO, device or socket, not a")):
        assert problems(base(models={"detector": str(path)})) == [f"models.detector: {str(path)!r} {what} model file"]
        assert problems(base(mqtt={"username": "u", "password_file": str(path)})) == [
            f"mqtt.password_file: {str(path)!r} {what} file"]
        assert problems(base(mqtt={"tls": {"ca_file": str(path)}})) == [f"mqtt.tls.ca_file: {str(path)!r} {what} file"]


def test_a_password_file_the_daemons_user_cannot_read_fails_the_check(tmp_path):
    """`config check` as the daemon's user (deploy/README) said OK for a password file that user could not read;
    `run` then failed at every start (restarted 10 times, then `failed`) with no status said. Run here as root
    without its power to read any file (setpriv drops CAP_DAC_OVERRIDE), on a mode 000 file."""
    import os
    import shutil
    import sys
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to read as a user without the file's permission")
    password = tmp_path / "mqtt-password"
    password.write_text("secret\n")
    password.chmod(0o000)
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                          mqtt={"username": "tillsight", "password_file": str(password)})
    import subprocess
    from tskit import REPO
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", sys.executable, "-m",
                             "edge", "config", "check", str(config)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert one_line_error(result, 2) == "mqtt.password_file: cannot be read (Permission denied)"


def test_one_stream_named_by_two_cameras_is_a_warning(tmp_path):
    """A copied [[cameras]] block with the address left as it was: two tills answered from one till's picture. The
    same camera under another login is the same stream; another path on it (a second channel) is not."""
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[
        {"id": "till-1", "source": "rtsp://admin:hunter2@10.1.2.3:554/stream1"},
        {"id": "till-2", "source": "rtsp://10.1.2.3:554/stream2"},
        {"id": "till-3", "source": "RTSP://10.1.2.3:554/stream1"}])
    config.chmod(0o600)  # (its password readable by all would be a warning of its own)
    checked = tillsight("config", "check", str(config))
    assert (checked.returncode, checked.stderr.strip()) == (0, (
        "warning: cameras.0.source, cameras.2.source: the same stream (rtsp://10.1.2.3:554/stream1) twice: both "
        "tills would be answered about one till's customer")), checked.stderr


def test_a_camera_named_as_the_daemons_mqtt_login_is_a_warning(tmp_path):
    """deploy/mosquitto-store.acl's per-till logins are named as their cameras: a camera called as the daemons'
    own login would make that login its POS too."""
    (tmp_path / "password").write_text("secret\n")
    (tmp_path / "password").chmod(0o600)
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "till-1", "source": "rtsp://10.1.2.3/a"},
                                                                      {"id": "tillsight", "source": "rtsp://10.1.2.4/a"}],
                          mqtt={"username": "tillsight", "password_file": str(tmp_path / "password")})
    checked = tillsight("config", "check", str(config))
    assert (checked.returncode, checked.stderr.strip()) == (0, (
        "warning: cameras.1.id: 'tillsight' is the daemon's MQTT login (mqtt.username): under the store ACL's "
        "per-till logins that login would also be that till's POS; name the camera otherwise")), checked.stderr


def test_analytics_that_single_customers_out_are_warned_of(tmp_path):
    """k = 1, one-second intervals and per-transaction messages passed `config check` without a word (2026-11-27
    privacy review): each is a warning now (the store may have its reasons: a lawful basis, a notice)."""
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                          analytics={"k": 1, "interval_s": 1, "per_transaction": True})
    result = tillsight("config", "check", str(config))
    assert result.returncode == 0 and [line.split(":")[1] for line in result.stderr.splitlines()] == [
        " analytics.per_transaction", " analytics.k", " analytics.interval_s"], result.stderr
    off = write_config(tmp_path / "e.toml", store_id="s", cameras=[{"id": "a", "source": 0}],
                       analytics={"enabled": False, "k": 1, "per_transaction": True})  # the counts off: still sent
    assert [line.split(":")[1] for line in tillsight("config", "check", str(off)).stderr.splitlines()] == [
        " analytics.per_transaction"]
    quiet = write_config(tmp_path / "d.toml", store_id="s", cameras=[{"id": "a", "source": 0}])
    assert tillsight("config", "check", str(quiet)).stderr == ""


def test_an_mqtt_protocol_written_as_a_number_says_to_quote_it():
    """`protocol = 5` was refused as "input should be '5' or '3.1.1'", which reads as what was written."""
    assert problems(base(mqtt={"protocol": 5})) == ['mqtt.protocol: 5 is a number: write it as text, protocol = "5" '
                                                    '(or "3.1.1")']
    assert parse_config(base(mqtt={"protocol": "3.1.1"})).mqtt.protocol == "3.1.1"
