"""The daemon's configuration: one TOML file validated into one typed schema.

`load_config` raises ConfigError carrying every problem as a line
`path.to.key: what is wrong`, which `tillsight config check` prints.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from edge.catalog import DEFAULT_VARIANT, TIERS, VARIANTS
URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # ids become MQTT topic levels: no '/', '+', '#'
# <prefix>/<store>/pos/... is where POS clients take their answers: a camera or daemon named pos would have its
# alert, estimate or status topics there, where any POS's check may name a reply topic
RESERVED_ID = "pos"
MIN_PICTURE_FACE_S = 10.0  # tracking.picture_face_s: shorter, and a customer standing still is taken for a poster


def not_reserved(value: str | None) -> str | None:
    if value == RESERVED_ID:
        raise ValueError(f"{RESERVED_ID!r} is reserved: <prefix>/<store>/{RESERVED_ID}/ holds the POS clients' "
                         "reply topics")
    return value
TOPIC_PREFIX = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"  # levels of NAME's characters: no wildcard, no empty level
MAX_FILE_BYTES = 1 << 20  # a config file is a few KiB; a larger one is refused unread
MAX_KEY_DEPTH = 32  # dotted keys: tomllib's cost grows with the square of a key's parts
MAX_PATH, MAX_PATH_NAME = 4096, 255  # Linux PATH_MAX and NAME_MAX, in bytes
MAX_LINE = 1000  # a problem line longer than this is cut
CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]")  # control characters and line breaks


class ConfigError(Exception):
    """Every problem as one line `path.to.key: what is wrong` (control characters escaped, long lines cut)."""

    def __init__(self, problems: list[str]):
        problems = [_one_line(p) for p in problems] or ["(top level): invalid configuration"]
        super().__init__("\n".join(problems))
        self.problems = problems


def _one_line(text: str) -> str:
    text = CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 1] + "…"


def _kind(annotation) -> str:
    """'number' where a field takes an int or float (also inside Optional, Union, list, Literal[0, 1]),
    'bool' for a plain bool field, else ''."""
    if annotation is bool:
        return "bool"
    if annotation in (int, float):
        return "number"
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return "number" if any(type(a) in (int, float) for a in args) else ""
    return "number" if any(_kind(a) == "number" for a in args) else ""


def _takes_text(annotation) -> bool:
    """Whether a field also takes a string (a camera source: an index or a path)."""
    if annotation in (str, Path):
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, str) for a in get_args(annotation))
    return any(_takes_text(a) for a in get_args(annotation) if get_origin(annotation) is not list)


def _is_file(text: str | Path, what: str = "file") -> bool:
    return _path_test(Path.is_file, text, what)


def _is_dir(text: str | Path, what: str = "folder") -> bool:
    return _path_test(Path.is_dir, text, what)


# A USB camera by its V4L2 node, or by the stable links udev makes for it: by-id (model and serial number) and
# by-path (the USB port). Indices follow the order cameras were found in, which a reboot or a replug can swap.
V4L_DEVICE = re.compile(r"/dev/(video\d{1,3}|v4l/by-(id|path)/[A-Za-z0-9._:+@=-]{1,200})")


def is_v4l_device(source: int | str) -> bool:
    return isinstance(source, str) and V4L_DEVICE.fullmatch(source) is not None and \
        source.rsplit("/", 1)[1] not in (".", "..")


def _not_a_video_file(text: str) -> str:
    """Why a camera source that names no regular file is refused: a device node is easily written as its path."""
    path = Path(text)
    if path.is_dir():
        return f"{text!r} is a folder, not a video file"
    if path.exists():
        return f"{text!r} is not a regular file (a USB camera is an index or its /dev/v4l/by-id/ path, a stream an rtsp:// or http:// URL)"
    return f"video file {text!r} not found (a USB camera is an index or its /dev/v4l/by-id/ path, a stream an rtsp:// or http:// URL)"


def not_utf8_name(path: str | Path) -> str | None:
    """Why OpenCV must not be given this path, else None: a name that is not UTF-8 (Latin-1 bytes, as an old Windows
    machine or a camera's SD card writes them) reaches Python with surrogates, on which OpenCV's bindings crash the
    process (a segfault, exit 139: `config check`, `replay` and `bench` died so, the bench leaving its broker)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"{str(path)!r}: the name is not UTF-8 (OpenCV cannot open it): rename it"
    return None


def _is_still_image(path: str) -> bool:
    """A JPEG or PNG (by its first bytes, whatever its name): FFmpeg opens one as a one-frame video, which the daemon
    then refuses at every reconnect (edge/capture.py); `config check --live` passed it."""
    import cv2
    try:
        if not cv2.haveImageReader(path):
            return False
    except cv2.error:
        return False
    # a raw MJPEG recording (JPEGs one after another, as an IP camera's stream copied to a file) starts like a
    # photo too, and is a video: a still image is a file with no second frame
    capture = cv2.VideoCapture(path)
    try:
        return not (capture.read()[0] and capture.read()[0])
    finally:
        capture.release()


def _not_a_file(path: str | Path, what: str = "file") -> str:
    """Why a path that is no regular file is refused: "not found" for a folder or a FIFO sent people looking for
    a file that is there."""
    if _is_dir(path, what):
        return f"{str(path)!r} is a folder, not a {what}"
    if _exists(str(path)):
        return f"{str(path)!r} is a FIFO, device or socket, not a {what}"
    return f"{what} {str(path)!r} not found"


def _path_test(test, text: str | Path, what: str) -> bool:
    """Path.is_file()/is_dir() of a path from the config: ValueError (a problem line), never OSError/RuntimeError."""
    text = str(text)
    if "\0" in text:
        raise ValueError(f"{what} path contains a NUL byte")
    if len(os.fsencode(text)) > MAX_PATH:
        raise ValueError(f"{what} path {_clip(text)} is {len(os.fsencode(text)):,} bytes long (at most {MAX_PATH:,})")
    name = next((n for n in Path(text).parts if len(os.fsencode(n)) > MAX_PATH_NAME), None)
    if name is not None:
        raise ValueError(f"{what} path has a name of {len(os.fsencode(name)):,} bytes, {_clip(name)} "
                         f"(at most {MAX_PATH_NAME} bytes a name)")
    if text.startswith("~"):
        try:
            Path(text).expanduser()
        except RuntimeError:
            raise ValueError(f"{what} path {_clip(text)}: there is no user {text[1:].split('/')[0]!r} "
                             f"to expand {text.split('/')[0]!r}") from None
    try:
        return test(Path(text))
    except OSError as exc:
        raise ValueError(f"{what} {_clip(text)} cannot be checked ({exc.strerror or exc})") from None


# Query parameters that carry a camera's credentials (MJPEG cameras: ...video.cgi?user=admin&pwd=...)
# what names a secret in a stream URL's query, or in its path as IP cameras put it (rtsp://h/user=admin&password=…
# XMEye, ?loginuse=&loginpas= Foscam, ?u=&p=, ?pw=, ?psw=): its value is never shown
SECRET_PARAM = re.compile(r"pass|pas$|pwd|psw|secret|token|api_?key|^key$|auth|^sig$|signature|cred|^pw$|^p$",
                          re.IGNORECASE)  # long ones anywhere in a name, short ones whole (signal=, keyframe= are not)


def _not_the_stream(name: str) -> bool:
    """A parameter that says who logs in, not which stream: a secret or a login. `p` is shown as *** but stays in
    the stream's identity: as often a stream selector (?p=1, ?p=2) as a password, and two streams taken for one
    would make both tills degraded."""
    return (bool(SECRET_PARAM.search(name)) and name.lower() != "p") or bool(LOGIN_PARAM.fullmatch(name))
# name=value pairs in a path segment, as IP cameras take them: joined by &, ; or _ (XMEye:
# /user=admin_password=…_channel=1_stream=0.sdp); a value runs to the next pair
PATH_PAIR = re.compile(r"(^|[&;_])([A-Za-z][A-Za-z0-9]*)=(.*?)(?=[&;_][A-Za-z][A-Za-z0-9]*=|$)")


DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}
LOGIN_PARAM = re.compile(r"(?i)user(name)?|login|loginuse|account|usr|u")  # who logs in (fullmatch): not which stream


def redact_url(url: str) -> str:
    """A stream URL fit for logs, the status topic and error lines: its password (rtsp://user:pass@host/...,
    as IP cameras take them) and secret-looking query values replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{host}"
        query = parts.query
        if query and any(SECRET_PARAM.search(name) for name, _ in parse_qsl(query, keep_blank_values=True)):
            query = urlencode([(name, "***" if SECRET_PARAM.search(name) else value)
                               for name, value in parse_qsl(query, keep_blank_values=True)], safe="*")
        path = "/".join(_secrets_hidden(segment) for segment in parts.path.split("/"))
        return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))
    except ValueError:  # not even a URL's shape: nothing of it is shown
        return "<stream URL>"


def _secrets_hidden(segment: str) -> str:
    """A path segment of name=value pairs with each secret's value as ***."""
    if "=" not in segment:
        return segment
    return PATH_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}=***" if SECRET_PARAM.search(m.group(2)) else m.group(0),
                         segment)


def _logins_left_out(segment: str) -> str:
    """A path segment without its secret and login pairs: one camera under two logins is one stream."""
    pairs = list(PATH_PAIR.finditer(segment))
    if not pairs:
        return segment
    kept = [f"{m.group(2)}={m.group(3)}" for m in pairs if not _not_the_stream(m.group(2))]
    return segment[:pairs[0].start()] + "&".join(kept)


def has_secret(url: str) -> bool:
    return redact_url(url) != url


def _clip(text: str, most: int = 60) -> str:
    return repr(text) if len(text) <= most else repr(text[:most]) + "…"


class Strict(BaseModel):
    # Floats must be finite; ints are fine for floats; the validator below keeps booleans and numbers apart.
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def numbers_are_not_booleans(cls, value, info: ValidationInfo):
        # lax pydantic takes true for 1 (`challenge_age = true` would switch alerts off), "25" for 25, and 1 or
        # "yes" for true
        kind = _kind(cls.model_fields[info.field_name].annotation)
        if kind == "number" and isinstance(value, list):
            index = next((i for i, v in enumerate(value) if isinstance(v, bool)), None)
            if index is not None:
                raise ValueError(f"item {index} should be a number, not {str(value[index]).lower()}")
        elif kind == "number" and isinstance(value, bool):
            raise ValueError(f"input should be a number, not {str(value).lower()}")
        elif kind == "number" and isinstance(value, str) and not _takes_text(cls.model_fields[info.field_name].annotation):
            # "1883" for 1883: pydantic would parse it, so a quoted number elsewhere would pass unnoticed
            raise ValueError(f"input should be a number, not the string {_clip(value)} (write it without quotes)")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError("input should be true or false")
        return value


class CameraConfig(Strict):
    id: Annotated[str, Field(pattern=NAME), AfterValidator(not_reserved)]
    source: Union[Annotated[int, Field(ge=0, le=65535, strict=True)], str]
    fps_limit: Annotated[float, Field(gt=0, le=120)] | None = 5.0  # None: every frame
    # a picture frozen or blank this long is a fault (edge.capture.PictureCheck); 0: not checked
    picture_check_s: Annotated[float, Field(ge=0, le=3600)] = 3.0
    # ... but an unchanging picture with no face in it only after this long (never sooner than picture_check_s):
    # an encoder that skips a still scene repeats an empty till to the bit until its next keyframe
    still_scene_s: Annotated[float, Field(ge=0, le=86400)] = 120.0
    # a USB camera's picture: OpenCV opens most at 640x480, coarse for a face a metre off; MJPG lets a USB 2.0
    # camera send 720p or more at full rate (raw YUYV at 1080p fits about 5 frames a second)
    size: tuple[Annotated[int, Field(ge=16, le=8192, strict=True)], Annotated[int, Field(ge=16, le=8192, strict=True)]] \
        | None = None
    pixel_format: Literal["MJPG", "YUYV"] | None = None
    # a video file standing in for a camera (demos, `tillsight bench`) starts this late: several files started
    # together pass their frames in step, a burst at every tick that real cameras, each on its own clock, meet only
    # by chance (2 cores, 6 cameras at 5 fps: frame->alert p99 34-47 ms in step, 30-35 out of step)
    start_offset_s: Annotated[float, Field(ge=0, le=60)] = 0.0
    # powered down with the lanes after closing (a PoE schedule, a lane's power strip): while the store is closed by
    # its opening_hours, the camera not connecting is no problem; at opening time it is one at once
    off_while_closed: bool = False
    # parts of the picture where a face is never a customer (the cashier's seat, the next till, a screen showing
    # ads): [x0, y0, x1, y1] as shares of the picture's width and height; a face whose centre is in one is left out
    ignore_regions: Annotated[list[tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)],
                                         Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]]],
                              Field(max_length=16)] = []

    @field_validator("ignore_regions", mode="before")
    @classmethod
    def regions_are_boxes(cls, value):
        if not isinstance(value, list):
            raise ValueError("give a list of [x0, y0, x1, y1] boxes, as shares of the picture (0 to 1)")
        for index, box in enumerate(value):
            if not (isinstance(box, (list, tuple)) and len(box) == 4):
                raise ValueError(f"item {index}: {_clip(str(box))} is no box: give [x0, y0, x1, y1], as shares of the "
                                 "picture's width and height, e.g. [0.7, 0, 1, 0.5] for the upper right")
            if any(isinstance(v, bool) for v in box):
                raise ValueError(f"item {index}: a corner should be a number, not true or false")
            text = next((v for v in box if not isinstance(v, (int, float))), None)
            if text is not None:
                raise ValueError(f"item {index}: {_clip(str(text))} should be a number (write it without quotes)")
        return value

    @field_validator("ignore_regions")
    @classmethod
    def regions_have_area(cls, value: list) -> list:
        for index, (x0, y0, x1, y1) in enumerate(value):
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"item {index}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty: x0 < x1 and y0 < y1")
        return value

    @field_validator("source", mode="before")
    @classmethod
    def source_type(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be a device index (an integer), a stream URL or a video file path")
        return value

    @field_validator("source")
    @classmethod
    def check_source(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            return value
        if is_v4l_device(value):  # not checked for presence: a camera unplugged at start is reconnecting, not wrong
            return value
        if "://" in value:
            if len(value) > MAX_PATH or CONTROL.search(value):
                raise ValueError(f"URL {_clip(redact_url(value))} is longer than {MAX_PATH} characters or has "
                                 "control characters")
            url = urlsplit(value)
            if url.scheme.lower() not in URL_SCHEMES:
                raise ValueError(f"URL scheme {url.scheme!r} not supported (use {', '.join(URL_SCHEMES)})")
            if not url.hostname:
                raise ValueError(f"URL {redact_url(value)!r} has no host")
            try:
                url.port  # a port over 65535, or not a number: the camera would reconnect for ever
            except ValueError:
                raise ValueError(f"URL {redact_url(value)!r} has no valid port (1 to 65535)") from None
            return value
        if not value.strip():
            raise ValueError("empty: give a device index, a stream URL or a video file path")
        if not _is_file(value, "video file"):
            raise ValueError(_not_a_video_file(value))
        if not_utf8_name(value):  # before _is_still_image: OpenCV's first look at the file
            raise ValueError(not_utf8_name(value))
        if _is_still_image(value):
            raise ValueError(f"{value!r} is a still image, not a video (`tillsight predict` ages the faces in a photo)")
        return value

    @field_validator("size", mode="before")
    @classmethod
    def size_is_a_pair(cls, value):
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ValueError(f"{_clip(str(value))} is no size: give [width, height] in pixels, e.g. [1280, 720]")
        return value

    @model_validator(mode="after")
    def picture_settings_are_for_usb_cameras(self) -> CameraConfig:
        if (self.size is not None or self.pixel_format is not None) and not self.is_device:
            raise ValueError("size and pixel_format are for a USB camera: a stream's picture is set in the camera's "
                             "own settings, and a file's is what it holds")
        if self.start_offset_s and not self.is_file:
            raise ValueError("start_offset_s is for a video file standing in for a camera: a real camera runs on "
                             "its own clock")
        return self

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, str) and "://" not in self.source and not is_v4l_device(self.source)

    @property
    def is_device(self) -> bool:
        """A USB camera: an index or a V4L2 device path (one reader at a time)."""
        return isinstance(self.source, int) or is_v4l_device(self.source)

    @property
    def shown_source(self) -> str:
        """The source as logs, the status topic and error lines show it: a stream URL without its password."""
        return redact_url(self.source) if isinstance(self.source, str) and "://" in self.source else str(self.source)


class TlsConfig(Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Annotated[Path | None, Field(validate_default=True)] = None  # checked with cert_file, even when unset
    insecure: StrictBool = False  # skip hostname check; for test brokers only
    # An expired or not-yet-valid certificate loads here; the connection reports it at run time.

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def exists(cls, value: Path | None) -> Path | None:
        if value is not None and not _is_file(value):
            raise ValueError(_not_a_file(value))
        return value

    @field_validator("ca_file", "cert_file")
    @classmethod
    def certificate(cls, value: Path | None) -> Path | None:
        if value is not None:
            _load_tls(lambda context: context.load_verify_locations(cafile=value), "not a PEM certificate")
        return value

    @field_validator("key_file")
    @classmethod
    def key_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "cert_file" not in info.data:  # cert_file itself is wrong: already said
            return value
        cert = info.data["cert_file"]
        if cert is None:
            if value is not None:
                raise ValueError("set, but cert_file is not (a client certificate needs both)")
            return value
        if value is None:
            what = "required: cert_file has no private key in it"
        else:
            what = "not the private key of cert_file"
        _load_tls(lambda context: context.load_cert_chain(cert, value, password=_no_passphrase), what)
        return value


class _Passphrase(Exception):
    pass


def _no_passphrase():
    raise _Passphrase  # never prompt on the terminal for a key's passphrase


def _load_tls(load, what: str) -> None:
    """Load a certificate or key into a throwaway SSLContext; a problem becomes one ValueError line."""
    try:
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except _Passphrase:
        raise ValueError("the private key is encrypted with a passphrase, which the daemon cannot give") from None
    except ssl.SSLError as exc:
        reason = (exc.reason or "").lower().replace("_", " ")
        raise ValueError(f"{what} ({reason})" if reason else what) from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None


class MqttConfig(Strict):
    host: Annotated[str, Field(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    tls: TlsConfig | None = None
    username: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    password_file: Path | None = None
    client_id: Annotated[str, Field(pattern=NAME)] | None = None
    qos: Literal[0, 1, 2] = 1
    protocol: Literal["5", "3.1.1"] = "5"  # 5: the POS's age checks can use Response Topic/Correlation Data
    # MQTT topics are at most 65,535 bytes: the prefix leaves room for store, camera and kind
    topic_prefix: Annotated[str, Field(max_length=200, pattern=TOPIC_PREFIX)] = "tillsight"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    max_queued_messages: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000

    @field_validator("host", "username")
    @classmethod
    def printable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (CONTROL.search(value) or info.field_name == "host" and " " in value):
            raise ValueError(f"must not contain {'spaces, ' if info.field_name == 'host' else ''}NUL or other control characters")
        if info.field_name == "host":
            _host_name(value)
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def protocol_as_text(cls, value):
        # `protocol = 5`, a number in TOML, was refused as "input should be '5' or '3.1.1'", which reads as the same
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"{value!r} is a number: write it as text, protocol = \"5\" (or \"3.1.1\")")
        return value

    @field_validator("password_file")
    @classmethod
    def password_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not _is_file(value):
            raise ValueError(_not_a_file(value))
        if value is not None:  # as the TLS files are: `config check` as the daemon's user must catch what `run` would
            try:
                with open(value, "rb") as file:
                    held = file.read(PASSWORD_FILE_READ)
            except OSError as exc:
                raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
            if password_problem(held):
                raise ValueError(f"{str(value)!r} {password_problem(held)}")
        return value

    @model_validator(mode="after")
    def password_needs_user(self) -> "MqttConfig":
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set but username is not")
        return self


MAX_PASSWORD_BYTES = 65_535  # MQTT's limit: paho's network thread died on a longer one (struct.error), MQTT silent
PASSWORD_FILE_READ = 1 << 20  # enough to tell a file too long for a password (a certificate bundle), never all of it


def password_problem(held: bytes) -> str | None:
    """Why a password file's bytes are no password a broker can be sent, else None. The password is the whole file
    stripped: a second line (a certificate, "user" then "password") would be sent as part of it, and the broker
    would say only "Not authorized", at every connection."""
    password = held.strip()
    if not password:
        return "is empty: it must hold the broker user's password"
    if len(password) > MAX_PASSWORD_BYTES:
        return (f"holds more than {MAX_PASSWORD_BYTES:,} bytes, MQTT's limit for a password (a certificate bundle?): "
                "name the file that holds the password alone")
    lines = len([line for line in password.splitlines() if line.strip()])
    if lines > 1:
        return f"holds {lines} lines: a password file holds the password alone, on one line"
    return None


def _host_name(host: str) -> None:
    """A host name the resolver takes: paho and `config check --live` encode it with IDNA, which raised
    UnicodeError (in paho's thread, a traceback) for an empty label ("a..b") or one over 63 characters. A URL
    ("mqtt://broker:1883") or host:port passed, and was then looked up whole, never found, at every connection."""
    try:
        ipaddress.ip_address(host)  # an IPv6 address has colons, and is no host:port
        return
    except ValueError:
        pass
    if "://" in host:
        raise ValueError("a host name or address, not a URL: put the port in mqtt.port")
    if ":" in host:
        raise ValueError("a host name or address, without a port: put the port in mqtt.port")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"{_clip(host)} is not a host name: dot-separated labels of 1 to 63 characters, e.g. "
                         "broker.local, or an IP address") from None


class CudaConfig(Strict):
    """The CUDA provider's options for both sessions ([models.cuda]). cuDNN's exhaustive search, ONNX Runtime's
    default, benchmarks every convolution on the first call of each new input shape: the age batcher forms a
    new batch size on most calls at first, and each such call took about a second on the H100 (issue 10)."""
    conv_algo_search: Literal["heuristic", "exhaustive", "default"] = "heuristic"
    prefer_nhwc: bool = True  # channels-last convolutions: the H100's tensor cores (issue 10)

    def provider_options(self) -> dict[str, str]:
        """As ONNX Runtime's CUDAExecutionProvider takes them."""
        options = {"prefer_nhwc": "1" if self.prefer_nhwc else "0"}
        if self.conv_algo_search != "default":
            options["cudnn_conv_algo_search"] = self.conv_algo_search.upper()
        return options


class ModelsConfig(Strict):
    detector: Path | None = None  # None: the converted BlazeFace that ships in edge/models
    detector_variant: Literal[tuple(VARIANTS)] = DEFAULT_VARIANT  # type: ignore[valid-type]
    detector_score: Annotated[float, Field(gt=0, lt=1)] = 0.5
    min_face_px: Annotated[float, Field(ge=0)] = 24.0
    # a tier (auto: the shipped ResNet50, else the light model; see edge/tiers.py) or a model file
    age_model: str = "auto"
    # precision: auto = int8 on a CPU, fp16 on a GPU, when the tier ships that file (on a GPU, fp16 made at start
    # from the tier's int8 weights-only file where only that ships: edge.infer.fp16_at_load); else fp32
    age_variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # in order; "cuda" falls back to the CPU only if "cpu" is listed (README, "CPU or GPU")
    providers: Annotated[list[Literal["cuda", "tensorrt", "cpu"]], Field(min_length=1)] = ["cuda", "cpu"]
    # the face detector's own, where it should differ (None: `providers`); ["cpu"] keeps the GPU for the age model.
    # A whole store server on the H100 served better with the detector on CUDA (32 cameras in four daemons,
    # frame->alert p99 79 ms against 147 on the CPU; issue 10, README "Measured on the H100"), so None stays
    detector_providers: Annotated[list[Literal["cuda", "tensorrt", "cpu"]], Field(min_length=1)] | None = None
    max_batch: Annotated[int, Field(ge=1, le=256)] = 32
    # how long the first crops of a batch wait for other cameras' (0: none, what queued while the last call ran
    # is the next batch). Waiting bought nothing on a till PC and cost latency (2 cores, the shipped ResNet50,
    # 4 cameras: frame->alert p50 54-57 ms with 10, 36-45 with 0, the same CPU; README "Performance on a till
    # PC"), and a GPU's call is 2-3 ms (issue 10)
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 0.0
    # ONNX Runtime threads per session (0: one per core) and busy-waiting; measured by `tillsight bench`
    detector_threads: Annotated[int, Field(ge=0, le=256)] = 1
    age_threads: Annotated[int, Field(ge=0, le=256)] = 0
    spinning: bool = False
    cuda: CudaConfig = CudaConfig()

    @field_validator("detector")
    @classmethod
    def model_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and not _is_file(value, "model file") and not _missing_at_load(value, info):
            raise ValueError(_not_a_file(value, "model file"))
        return value

    @field_validator("detector_variant")
    @classmethod
    def variant_ships(cls, value: str, info: ValidationInfo) -> str:
        # only full_range ships in edge/models: another variant without its file would fail at the first start
        if info.data.get("detector", False) is None and not VARIANTS[value].onnx_path.is_file():
            raise ValueError(f"{value!r} does not ship with tillsight (only {DEFAULT_VARIANT!r} does): convert it "
                             f"with `tillsight export detector --variant {value} --out FILE.onnx` and set "
                             "models.detector to that file")
        return value

    @field_validator("age_model")
    @classmethod
    def tier_or_file(cls, value: str, info: ValidationInfo) -> str:
        if value not in TIERS and not _is_file(value, "model file") and not _missing_at_load(value, info):
            raise ValueError(f"{value!r} is neither a tier ({', '.join(TIERS)}) nor an existing model file")
        return value


def _missing_at_load(path: str | Path, info: ValidationInfo) -> bool:
    """A model file that is not there (nothing at all at its path), where the daemon's start is told it by loading
    its models (`run`): a missing model is a start failure to retry (a model fetch or a mount still under way),
    said as `failed` with "model not found", not a config error that systemd never restarts. `config check` and a
    reload's check still refuse it."""
    # an .onnx file only: a misspelt tier ("resnet-50") is a config error, not a file still on its way
    return bool(info.context and info.context.get("models_at_load")) and Path(str(path)).suffix.lower() == ".onnx" \
        and not _exists(str(path))


class PolicyConfig(Strict):
    mode: Literal["challenge25", "risk"] = "challenge25"  # edge/policy.py
    challenge_age: Annotated[float, Field(gt=0, le=100)] = 25.0
    legal_age: Annotated[float, Field(gt=0, le=100)] = 18.0  # risk mode: the age the law sets
    max_risk: Annotated[float, Field(gt=0, lt=1)] = 0.02  # risk mode: challenge above this P(under legal_age)
    min_samples: Annotated[int, Field(ge=1, le=1000)] = 3  # per-frame ages before a track is judged

    @model_validator(mode="after")
    def challenge_at_or_over_the_legal_age(self) -> PolicyConfig:
        # the margin for the estimate's error lies above the law's age: below it, minors near it pass unasked
        if self.mode == "challenge25" and self.challenge_age < self.legal_age:
            raise ValueError(f"challenge_age ({self.challenge_age:g}) is below legal_age ({self.legal_age:g}): "
                             "customers who look older than challenge_age but are under age would never be asked")
        return self


class TrackingConfig(Strict):
    iou_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.2
    lost_after_s: Annotated[float, Field(gt=0)] = 1.5  # a track unseen this long has left the till
    max_samples: Annotated[int, Field(ge=1, le=100_000)] = 100
    estimate_interval_s: Annotated[float, Field(ge=0)] = 1.0  # at most one estimate message per track per interval
    # a face that holds its place this long is a picture (a poster, a magazine cover): ignored (edge.track); 0: never
    picture_face_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0

    @field_validator("picture_face_s")
    @classmethod
    def long_enough_for_a_customer(cls, value: float) -> float:
        if 0 < value < MIN_PICTURE_FACE_S:  # a customer paying holds still for tens of seconds: not a poster
            raise ValueError(f"{value:g} s would take customers standing at the till for pictures: 0 (never) or at "
                             f"least {MIN_PICTURE_FACE_S:g} s")
        return value
    # a face joins an overlapping track only if it looks alike (edge/track.py); None: overlap alone
    min_similarity: Annotated[float, Field(ge=-3, le=1)] | None = 0.23


class PosConfig(Strict):
    """The POS conversation (edge/pos.py)."""
    enabled: bool = True  # subscribe to <camera>/transaction and <camera>/check
    deadline_s: Annotated[float, Field(gt=0, le=10)] = 2.0  # an age check waits at most this for a face
    # this many transactions in a row without a face seen at their till: the camera is aimed away (0: never said)
    faceless_transactions: Annotated[int, Field(ge=0, le=1000)] = 5
    # every reply topic under pos/<the camera asked about>/: for a store whose tills' POS have logins of their own
    # (deploy/mosquitto-store.acl's per-till patterns), where the daemon, which may write all of pos/, must not
    # answer till-1's login into till-2's terminal (a till PC's daemon does not know the other tills' ids)
    replies_under_camera: bool = False


class OutboxConfig(Strict):
    """The durable outbox (edge/outbox.py): messages on disk until the broker has them."""
    # an SQLite file in an existing folder; None: $STATE_DIRECTORY/outbox.sqlite3 under systemd (`run`), else
    # memory only (a replay writes no file unless this is set)
    path: Path | None = None
    max_messages: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    max_age_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 86_400.0  # older messages are dropped, never sent

    @field_validator("path")
    @classmethod
    def folder_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not _is_dir(value.parent):
            raise ValueError(f"folder {str(value.parent)!r} not found")
        if value is not None and _is_dir(value, "file"):
            raise ValueError(f"{str(value)!r} is a folder; name the file, e.g. {str(value / 'outbox.sqlite3')!r}")
        if value is not None:
            _not_someone_elses_file(value)
        return value


SQLITE_HEADER = b"SQLite format 3\x00"


def _not_someone_elses_file(path: Path) -> None:
    """The outbox takes an existing file that does not open as SQLite for a corrupt outbox, renames it away and
    deletes it a week later: a path that names another file (the config itself, a log, notes, a photo, a model)
    would lose it. So an existing file must be an SQLite database, or have been an outbox: the outbox's lock file
    `<path>.lock` beside it, which it creates before the database and never removes. Such a file that no longer
    reads as SQLite (zeros after a power cut, a torn write) is a damaged outbox, which the outbox sets aside at
    start with one error line while the daemon serves on: refused here, the till would stop, and stay stopped (a
    config error is exit 2, which systemd does not restart). Until 2026-11-27 only text was refused, and a photo
    named by mistake was set aside and deleted a week later. A device (/dev/null), FIFO or /proc file is never
    one. A file this user cannot read is the service user's outbox (UMask=0077): an operator's `config check` does
    not judge it."""
    try:
        if str(path.resolve()).startswith(("/proc/", "/sys/")):
            raise ValueError(f"{str(path)!r} is in a kernel file system (/proc, /sys): name a file on disk, e.g. "
                             "/var/lib/tillsight/outbox.sqlite3")
        if not path.exists() and not path.is_symlink():
            return
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is not a regular file (a device, FIFO or /proc file): name a new "
                             "file, e.g. /var/lib/tillsight/outbox.sqlite3")
        with path.open("rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except PermissionError:
        return
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (resolve)
        raise ValueError(f"{str(path)!r} cannot be checked ({getattr(exc, 'strerror', None) or exc})") from None
    if not head or head.startswith(SQLITE_HEADER) or Path(f"{path}.lock").exists():
        return
    raise ValueError(f"{str(path)!r} is an existing file, not an SQLite database (nor an outbox: no "
                     f"{path.name}.lock beside it): the outbox would move it away as corrupt; name a new file, e.g. "
                     "outbox.sqlite3")


class MetricsConfig(Strict):
    """Prometheus metrics (edge/metrics.py) on a loopback port; off by default."""
    enabled: bool = False
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"  # loopback only: scrape through a local agent
    port: Annotated[int, Field(ge=1, le=65535)] = 9464


class AnalyticsConfig(Strict):
    """Age-band counts per camera per interval for the store (edge/analytics.py). Nothing per person."""
    enabled: bool = True
    interval_s: Annotated[float, Field(ge=1, le=86_400)] = 900.0
    bands: Annotated[list[Annotated[int, Field(gt=0, lt=130)]], Field(min_length=1, max_length=20)] = \
        [18, 25, 35, 45, 55, 65]  # band edges: 0-17, 18-24, ..., 65+
    k: Annotated[int, Field(ge=1, le=1000)] = 5  # a band with fewer customers is not published
    per_transaction: bool = False  # one message per finished POS transaction: its id and the age band

    @field_validator("bands")
    @classmethod
    def increasing(cls, edges: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("band edges must increase, e.g. [18, 25, 35]")
        return edges


class BudgetConfig(Strict):
    """Which faces go to the age network (edge/budget.py)."""
    enabled: bool = True  # false: every face of every frame is aged
    settle_rate_hz: Annotated[float, Field(gt=0, le=1000)] = 5.0
    settle_samples: Annotated[int, Field(ge=1, le=10_000)] = 12
    recheck_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    fallback_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    min_face_px: Annotated[float, Field(ge=0)] = 40.0
    min_score: Annotated[float, Field(ge=0, le=1)] = 0.6
    max_turn: Annotated[float, Field(ge=0)] = 0.35
    min_sharpness: Annotated[float, Field(ge=0)] = 20.0


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday()'s order
HOURS_SPAN = re.compile(r"([01]\d|2[0-4]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)")
HOURS_EXAMPLES = ('spans like "07:00-22:00", "08:00-12:00, 13:00-20:00", "22:00-06:00" (past midnight), '
                  '"00:00-24:00" (all day) or "closed"')


@lru_cache(maxsize=64)
def opening_spans(text: str) -> tuple[tuple[int, int], ...]:
    """A day's opening hours as (start, end) minutes after its midnight; an end past 1440 runs into the next
    day. ValueError with the line to show for anything else."""
    if text.strip().lower() == "closed":
        return ()
    spans = []
    for part in text.split(","):
        match = HOURS_SPAN.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{_clip(text)} is not opening hours: write {HOURS_EXAMPLES}")
        start, end = int(match[1]) * 60 + int(match[2]), int(match[3]) * 60 + int(match[4])
        if start >= 1440 or end > 1440:
            raise ValueError(f"{_clip(part.strip())}: a time runs from 00:00 to 24:00, and 24:00 only ends a span")
        if start == end:
            raise ValueError(f"{_clip(part.strip())} opens and closes at the same time: write \"00:00-24:00\" for "
                             "all day, or \"closed\"")
        spans.append((start, end if end > start else end + 1440))
    return tuple(sorted(spans))


class OpeningHours(Strict):
    """When the store is open, in its local time. While it is closed, a camera whose picture is blank or frozen
    (the lights are off at night) is no problem: its status still says so, and it becomes one if the store
    opens with it so (edge.service.Service.problems)."""
    timezone: str | None = None  # an IANA name (Europe/London); None: the machine's own time zone
    default: str | None = None  # the days not given their own
    mon: str | None = None
    tue: str | None = None
    wed: str | None = None
    thu: str | None = None
    fri: str | None = None
    sat: str | None = None
    sun: str | None = None

    @field_validator("default", *DAYS)
    @classmethod
    def hours_are_spans(cls, value: str | None) -> str | None:
        if value is not None:
            opening_spans(value)
        return value

    @field_validator("timezone")
    @classmethod
    def known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                if not re.fullmatch(r"[A-Za-z0-9_+-]{1,64}(/[A-Za-z0-9_+-]{1,64}){0,3}", value) or \
                        value in ("localtime", "posixrules", "Factory"):  # files in the tz folder, no zones
                    raise ValueError
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder (Europe)
                raise ValueError(f"unknown time zone {_clip(value)}: an IANA name such as Europe/London "
                                 "(the system's tzdata lists them)") from None
        return value

    @model_validator(mode="after")
    def every_day_has_hours(self) -> OpeningHours:
        missing = [day for day in DAYS if getattr(self, day) is None and self.default is None]
        if missing:
            raise ValueError(f"no hours for {', '.join(missing)}: give each day its hours, or a default for the "
                             "days not listed")
        return self

    def is_open(self, when: float) -> bool:
        """Whether the store is open at this Unix time (a span past midnight belongs to the day it starts)."""
        local = datetime.fromtimestamp(when, ZoneInfo(self.timezone) if self.timezone else None)
        minute = local.hour * 60 + local.minute
        for days_back in (0, 1):
            day = DAYS[(local - timedelta(days=days_back)).weekday()]
            for start, end in opening_spans(getattr(self, day) or self.default):
                if start <= minute + 1440 * days_back < end:
                    return True
        return False


class Config(Strict):
    _file: Path | None = PrivateAttr(default=None)  # the file it was read from (load_config), for exposed_secrets
    store_id: Annotated[str, Field(pattern=NAME)]
    daemon_id: Annotated[str, Field(pattern=NAME), AfterValidator(not_reserved)] | None = None  # default: the host name (-instance under tillsight@)
    cameras: Annotated[list[CameraConfig], Field(min_length=1)]
    mqtt: MqttConfig = MqttConfig()
    models: ModelsConfig = ModelsConfig()
    policy: PolicyConfig = PolicyConfig()
    tracking: TrackingConfig = TrackingConfig()
    budget: BudgetConfig = BudgetConfig()
    pos: PosConfig = PosConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    outbox: OutboxConfig = OutboxConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    opening_hours: OpeningHours | None = None  # None: always open
    # at most a day: peers (edge.peers) refuse a status claiming more, and would take this daemon for silent;
    # at least a second: each status is a retained publish to every peer and POS
    status_interval_s: Annotated[float, Field(ge=1, le=86_400)] = 30.0

    @field_validator("cameras")
    @classmethod
    def unique_ids(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        ids = [c.id for c in cameras]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"camera ids must be unique, repeated: {', '.join(duplicates)}")
        return cameras


_UNION_TAGS = {"int", "str", "constrained-int", "constrained-str"}


def _where(loc: tuple) -> str:
    # Drop pydantic's union-branch names (e.g. 'int', 'str', 'function-after[...]').
    parts = [str(p) if isinstance(p, int) or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", p) else _clip(p, 40)
             for p in loc if not (isinstance(p, str) and p in _UNION_TAGS or str(p).startswith("function-"))]
    return ".".join(parts) or "(top level)"


def _close_key(loc: tuple) -> str | None:
    """The key of the schema at `loc`'s table that an unknown key was most likely meant to be (fps_limt,
    [[camera]], [model]), or None."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    if model is None or not isinstance(loc[-1], str):
        return None
    near = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.75)
    return near[0] if near else None


def _model_in(annotation) -> type[BaseModel] | None:
    """The config table a field holds (itself, or in a list or an Optional), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _message(error: dict) -> str:
    msg = error["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if error["type"] == "extra_forbidden":
        near = _close_key(error["loc"])
        return f"unknown key (did you mean {near}?)" if near else "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] == NAME:
        return "must be 1 to 64 letters, digits, '_' or '-' (it becomes an MQTT topic level)"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] == TOPIC_PREFIX:
        return "must be topic levels of letters, digits, '_' or '-' joined by '/', e.g. tillsight or acme/tillsight"
    if len(msg) > 1 and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    return msg


def problems_from(exc: ValidationError) -> list[str]:
    lines: dict[str, None] = {}
    errors = exc.errors()
    # A union (camera source) reports one error per branch: keep the most specific.
    branch_types = ("int_type", "string_type")
    for error in errors:
        # (only a union's branch: a plain key's type error beside another key's error is its own problem)
        if error["type"] in branch_types and str(error["loc"][-1]) in _UNION_TAGS and any(
            e["loc"][: len(error["loc"]) - 1] == error["loc"][:-1] and e["type"] not in branch_types for e in errors
        ):
            continue
        lines[f"{_where(error['loc'])}: {_message(error)}"] = None
    return list(lines)


def parse_config(data: dict, base_dir: Path | None = None, models_at_load: bool = False) -> Config:
    """Validate a TOML document; relative paths are taken from base_dir."""
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)
    try:
        config = Config.model_validate(data, context={"models_at_load": models_at_load})
    except ValidationError as exc:
        raise ConfigError(problems_from(exc)) from None
    except RecursionError:
        raise ConfigError(["(top level): nested too deeply"]) from None
    problems = [f"cameras.{index}.off_while_closed: without [opening_hours] the store is never closed; give its "
                "hours, or remove off_while_closed" for index, camera in enumerate(config.cameras)
                if camera.off_while_closed and config.opening_hours is None]
    problems += too_few_samples_kept(config)
    if problems:
        raise ConfigError(problems)
    return config


def too_few_samples_kept(config: Config) -> list[str]:
    """A track keeps its last `max_samples` ages: fewer than the policy wants and no track is ever judged (no
    alert, no estimate); fewer than `settle_samples` and an uncertain track is aged on every frame for ever."""
    kept, wanted = config.tracking.max_samples, {"policy.min_samples": config.policy.min_samples}
    if config.budget.enabled:
        wanted["budget.settle_samples"] = config.budget.settle_samples
    short = [f"{key} ({value})" for key, value in wanted.items() if value > kept]
    return [f"tracking.max_samples: {kept} is below {' and '.join(short)}: a track keeps that many ages at most, "
            "so raise it or lower those"] if short else []


def config_warnings(config: Config) -> list[str]:
    """What `config check` and the daemon's start warn of, a line each: the daemon runs, but should not so."""
    return (exposed_secrets(config) + unstable_devices(config) + repeated_streams(config) + absent_devices(config)
            + hours_in_utc(config) + weak_anonymity(config) + cameras_named_as_the_login(config))


def cameras_named_as_the_login(config: Config) -> list[str]:
    """A camera whose id is the daemon's own MQTT login: under the store ACL's per-till logins
    (deploy/mosquitto-store.acl, a login named as its till's camera) the daemons' login could then ask checks
    and send transactions as that till's POS."""
    login = config.mqtt.username
    return [f"cameras.{index}.id: {camera.id!r} is the daemon's MQTT login (mqtt.username): under the store ACL's "
            "per-till logins that login would also be that till's POS; name the camera otherwise"
            for index, camera in enumerate(config.cameras) if login is not None and camera.id == login]


def stream_key(source: str | int) -> str | None:
    """A network stream as one camera: the scheme and host in any case, user and password aside, in the URL's
    user part or its query (the same camera under two logins); None for a USB camera or a file."""
    if not (isinstance(source, str) and "://" in source):
        return None
    try:
        parts = urlsplit(source)
        query = sorted((name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
                       if not _not_the_stream(name))
        scheme = parts.scheme.lower()
        port = parts.port or DEFAULT_PORTS.get(scheme)  # rtsp://h/x and rtsp://h:554/x are one stream
        path = "/".join(_logins_left_out(segment) for segment in (parts.path or "/").split("/"))
        return f"{scheme}://{(parts.hostname or '').lower()}:{port}{path}?{urlencode(query)}"
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """This machine's own address: a loopback one, or 0.0.0.0 (which a connection takes for this machine)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def stream_fingerprint(source: str | int) -> str | None:
    """What a daemon's status says of a camera's network stream, so that another daemon with the same stream under
    another camera id finds it (edge/peers.py): a hash of its stream_key, no address or password in clear. A
    loopback address (a restreamer on the till PC itself) is this machine's own: its host name goes into the hash,
    so that two till PCs each reading rtsp://127.0.0.1:8554/cam are not one stream (a store server's instances
    still are)."""
    key = stream_key(source)
    if key is None:
        return None
    if is_loopback(urlsplit(str(source)).hostname or ""):
        key += "@" + socket.gethostname()
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def repeated_streams(config: Config) -> list[str]:
    """One network stream named by two cameras (a copied [[cameras]] block, the address not changed): both tills
    would be answered, alerted and counted from one till's picture. A file twice is a demo's or a test's."""
    first: dict[str, int] = {}
    found = []
    for index, camera in enumerate(config.cameras):
        key = stream_key(camera.source)
        if key is None:
            continue
        if key in first:
            found.append(f"cameras.{first[key]}.source, cameras.{index}.source: the same stream "
                         f"({camera.shown_source}) twice: both tills would be answered about one till's customer")
        first.setdefault(key, index)
    return found


MIN_ANONYMOUS_K = 5  # analytics.k below it: a published count can single a customer out
MIN_ANONYMOUS_INTERVAL_S = 300  # analytics.interval_s below it: a count per interval is near a customer per message


def weak_anonymity(config: Config) -> list[str]:
    """Analytics settings that make the store's statistics records of people (2026-11-27 privacy review: k = 1,
    1 s intervals and per-transaction messages passed without a word)."""
    analytics = config.analytics
    said = []
    if analytics.per_transaction:  # published whether the interval counts are on or not
        said.append("analytics.per_transaction: each purchase's age band is personal data once joined with the POS's "
                    "records: a lawful basis, a notice at the till and a retention limit (README, privacy note)")
    if not analytics.enabled:
        return said
    if analytics.k < MIN_ANONYMOUS_K:
        said.append(f"analytics.k: {analytics.k}: a band of fewer than {MIN_ANONYMOUS_K} customers can single one "
                    "out (with the till's own records)")
    if analytics.interval_s < MIN_ANONYMOUS_INTERVAL_S:
        said.append(f"analytics.interval_s: {analytics.interval_s:g} s: intervals this short count a customer or "
                    f"two each; {MIN_ANONYMOUS_INTERVAL_S} s or more keeps them statistics")
    return said


def hours_in_utc(config: Config) -> list[str]:
    """Opening hours without a time zone on a machine set to UTC or GMT all year (as servers and containers often
    are): they would be read in UTC, an hour or more off the store's clock. (London's zone has summer time.)"""
    hours = config.opening_hours
    if hours is None or hours.timezone is not None or time.timezone != 0 or time.daylight:
        return []
    return ["opening_hours: no timezone, and this machine's time zone is UTC: the hours are read in UTC; set "
            "opening_hours.timezone to the store's (e.g. \"Europe/London\")"]


def absent_devices(config: Config) -> list[str]:
    """USB cameras named by a device path that is not there now: a typo, or the camera unplugged (the daemon
    waits for it, as for a camera unplugged later)."""
    return [f"cameras.{index}.source: {camera.source} is not there now (a typo, or the camera is unplugged; "
            "ls -l /dev/v4l/by-id)" for index, camera in enumerate(config.cameras)
            if is_v4l_device(camera.source) and not _exists(camera.source)]


def _exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except (OSError, ValueError):
        return False


def unstable_devices(config: Config) -> list[str]:
    """USB cameras by index beside other USB cameras: a reboot or a replug can swap the indices (an index can also
    become the node of a camera named by its link), and then each till's answers and alerts go to the other till.
    And one device named twice: the second camera would never open (a device has one reader)."""
    usb = [(index, camera.source) for index, camera in enumerate(config.cameras) if camera.is_device]
    by_index = [(index, source) for index, source in usb
                if isinstance(source, int) or re.fullmatch(r"/dev/video\d+", source)]
    found = []
    if by_index and len(usb) >= 2:
        found.append(f"{', '.join(f'cameras.{index}.source' for index, _ in by_index)}: USB cameras by index "
                     f"({', '.join(str(source) for _, source in by_index)}) beside other USB cameras can swap at a "
                     "reboot or a replug, and each till would be answered about the other's customer: name each by "
                     "its /dev/v4l/by-id/... link (ls -l /dev/v4l/by-id), or by-path (the USB port) for cameras of "
                     "one model without serial numbers")
    nodes: dict[str, int] = {}
    for index, source in usb:
        node = f"/dev/video{source}" if isinstance(source, int) else _real_path(source)
        if node in nodes:
            found.append(f"cameras.{nodes[node]}.source, cameras.{index}.source: the same device ({node}) twice: a "
                         "device has one reader, so the second camera would never open")
        nodes.setdefault(node, index)
    return found


def _real_path(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path


def exposed_secrets(config: Config) -> list[str]:
    """The MQTT password file and TLS key that every user of the machine can read: one line each (a warning,
    not a problem: the daemon runs, as mosquitto does with its own password file). Group-readable is left
    alone: which group may read them is the operator's choice (deploy/README installs them owned by tillsight,
    mode 0400 or 0600, as the service runs with group video)."""
    files = {"mqtt.password_file": config.mqtt.password_file,
             "mqtt.tls.key_file": config.mqtt.tls.key_file if config.mqtt.tls else None}
    found = []
    for key, path in files.items():
        mode = _mode(path)
        if mode & 0o004:
            found.append(f"{key}: {path} can be read by every user of this machine (mode {mode:04o}): "
                         f"chmod 600 it (deploy/README: install -o tillsight -m 400)")
    # IP cameras take their credentials in the URL: then the config file itself holds a secret
    with_secret = [index for index, camera in enumerate(config.cameras)
                   if isinstance(camera.source, str) and "://" in camera.source and has_secret(camera.source)]
    mode = _mode(config._file)
    if with_secret and mode & 0o004:
        found.append(f"cameras.{with_secret[0]}.source: a camera's password is in {config._file}, which every user "
                     f"of this machine can read (mode {mode:04o}): chmod 600 it, owner tillsight (deploy/README)")
    return found


def _mode(path: Path | None) -> int:
    """A file's permission bits; 0 for none, or one that cannot be read now (using it says so)."""
    try:
        return path.stat().st_mode & 0o777 if path is not None else 0
    except OSError:
        return 0


def load_config(path: Path | str, cameras: list[dict] | None = None, models_at_load: bool = False) -> Config:
    """Read and validate a config file; `cameras` replaces its cameras (replay); `models_at_load`: a model file
    that is not there is left for loading to say (`run`: a start failure, retried; _missing_at_load)."""
    path = Path(path)
    data = read_document(path)
    if cameras is not None:
        data["cameras"] = cameras
    config = parse_config(data, path.parent, models_at_load)
    config._file = path
    return config


def read_document(path: Path) -> dict:
    """A config file's TOML document, not yet validated (ConfigError: not a readable TOML file)."""
    try:
        _regular_file(path)  # before opening: a FIFO blocks open() until a writer comes, for ever
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror or exc})"]) from None
    except ValueError as exc:  # a NUL in the name; UnicodeDecodeError
        raise ConfigError([f"{path}: cannot read config file ({exc})"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([f"{path}: config file is larger than {MAX_FILE_BYTES >> 20} MiB: not a tillsight config"])
    deep = _too_deep(text)
    if deep:
        raise ConfigError([f"{path}: line {deep}: keys nested too deeply (more than {MAX_KEY_DEPTH} levels)"])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except ValueError as exc:  # tomllib lets int()'s digit limit through
        raise ConfigError([f"{path}: not valid TOML: {str(exc).split(':')[0]}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply"]) from None
    return data


def log_format_of(path: Path) -> str:
    """The `[logging] format` a config asks for, read even from a config refused for anything else; the default
    ("json") where it names none or cannot be read: what `run` says its last words in."""
    try:
        logging_section = read_document(Path(path)).get("logging")
    except ConfigError:
        return LoggingConfig().format
    chosen = logging_section.get("format") if isinstance(logging_section, dict) else None
    return chosen if chosen in ("json", "text") else LoggingConfig().format


class _Identity(BaseModel):
    """The part of a config that says who a daemon is and where it publishes."""
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    store_id: Annotated[str, Field(pattern=NAME)]
    daemon_id: Annotated[str, Field(pattern=NAME), AfterValidator(not_reserved)] | None = None
    mqtt: MqttConfig = MqttConfig()


@dataclass(frozen=True)
class Identity:
    """Who a config's daemon is and where it publishes, valid whatever else the config gets wrong: what the
    terminal tools need (`status`, `pos`), and what a daemon refused by its config needs to say so."""
    mqtt: MqttConfig
    store_id: str
    daemon_id: str | None  # None: the default (the host name, -instance under tillsight@)
    cameras: list[str]  # the camera ids it names that are valid


def read_identity(path: Path, drop_password_file: bool = False) -> Identity:
    """A config's store, daemon id and [mqtt] (`drop_password_file`: its password file left out, for another
    user's login); ConfigError with their problems only."""
    data = read_document(Path(path))
    if drop_password_file and isinstance(data.get("mqtt"), dict):
        data["mqtt"] = {key: value for key, value in data["mqtt"].items() if key != "password_file"}
    data = _resolve_paths(data, Path(path).parent)
    try:
        identity = _Identity.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc)) from None
    except RecursionError:
        raise ConfigError(["(top level): nested too deeply"]) from None
    cameras = data.get("cameras") if isinstance(data.get("cameras"), list) else []
    ids = [c["id"] for c in cameras if isinstance(c, dict) and isinstance(c.get("id"), str)
           and re.fullmatch(NAME, c["id"]) and c["id"] != RESERVED_ID]
    return Identity(identity.mqtt, identity.store_id, identity.daemon_id, list(dict.fromkeys(ids)))


def refused_config(path: Path) -> Identity | None:
    """A refused config's identity where it is valid on its own; None where its problem is in it, or it is no
    TOML document (nothing can be told over MQTT then)."""
    try:
        return read_identity(path)
    except ConfigError:
        return None


def _regular_file(path: Path) -> None:
    """ConfigError unless `path` is a regular file (FileNotFoundError and other OSError go to the caller)."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError([f"{path}: is a folder, not a config file"])
    if not stat.S_ISREG(mode):
        raise ConfigError([f"{path}: not a regular file (a FIFO, device or socket): give the config file itself"])


_PATH_KEYS = {("models", "detector"), ("models", "age_model"), ("mqtt", "password_file"),
              ("mqtt", "tls", "ca_file"), ("outbox", "path"), ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file")}


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Relative file paths in a config file are relative to that file, not to the cwd.

    Only the path keys are visited, so a deeply nested document costs no recursion here."""
    for keys in _PATH_KEYS:
        data = _resolve_at(data, keys, base_dir)
    if isinstance(data.get("cameras"), list):
        data = {**data, "cameras": [_resolve_at(c, ("source",), base_dir) if isinstance(c, dict) else c
                                    for c in data["cameras"]]}
    return data


def _resolve_at(node: dict, keys: tuple, base_dir: Path) -> dict:
    value = node.get(keys[0])
    if len(keys) > 1 and isinstance(value, dict):
        return {**node, keys[0]: _resolve_at(value, keys[1:], base_dir)}
    if len(keys) > 1 or not isinstance(value, str) or not value or value in TIERS or "://" in value:
        return node
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~nosuchuser: left as it is, for the path check to say so
        return node
    return {**node, keys[0]: str(path if path.is_absolute() else base_dir / path)}


def _too_deep(text: str) -> int:
    """The first line (1-based) whose dotted keys have more than MAX_KEY_DEPTH parts, else 0.

    Quoted strings (closed or not: linear time) are blanked first; a run of dots between other punctuation
    is a key's parts."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.count(".") > MAX_KEY_DEPTH:
            line = re.sub(r'"(?:[^"\\]|\\.)*"?|\'[^\']*\'?', "q", line)
            if any(run.count(".") > MAX_KEY_DEPTH for run in re.split(r"[^\w\s.-]", line)):
                return number
    return 0
