"""The daemon's configuration: one TOML file validated into one typed schema.

`load_config` raises ConfigError carrying every problem as a line
`path.to.key: what is wrong`, which `tillsight config check` prints.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.detect import DEFAULT_VARIANT, VARIANTS
from edge.tiers import TIERS
URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # ids become MQTT topic levels: no '/', '+', '#'


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class CameraConfig(Strict):
    id: Annotated[str, Field(pattern=NAME)]
    source: Union[Annotated[int, Field(ge=0, strict=True)], str]
    fps_limit: Annotated[float, Field(gt=0, le=120)] | None = 5.0  # None: every frame

    @field_validator("source")
    @classmethod
    def check_source(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            return value
        if "://" in value:
            url = urlsplit(value)
            if url.scheme.lower() not in URL_SCHEMES:
                raise ValueError(f"URL scheme {url.scheme!r} not supported (use {', '.join(URL_SCHEMES)})")
            if not url.hostname:
                raise ValueError(f"URL {value!r} has no host")
            return value
        if not Path(value).is_file():
            raise ValueError(f"video file {value!r} not found (a device is an integer index, a stream an rtsp:// or http:// URL)")
        return value

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, str) and "://" not in self.source


class TlsConfig(Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip hostname check; for test brokers only

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} not found")
        return value


class MqttConfig(Strict):
    host: Annotated[str, Field(min_length=1)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Path | None = None
    client_id: Annotated[str, Field(pattern=NAME)] | None = None
    qos: Literal[0, 1, 2] = 1
    protocol: Literal["5", "3.1.1"] = "5"  # 5: the POS's age checks can use Response Topic/Correlation Data
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = "tillsight"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    max_queued_messages: Annotated[int, Field(ge=100)] = 100_000

    @field_validator("password_file")
    @classmethod
    def password_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} not found")
        return value

    @model_validator(mode="after")
    def password_needs_user(self) -> "MqttConfig":
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set but username is not")
        return self


class ModelsConfig(Strict):
    detector: Path | None = None  # None: the converted BlazeFace that ships in edge/models
    detector_variant: Literal[tuple(VARIANTS)] = DEFAULT_VARIANT  # type: ignore[valid-type]
    detector_score: Annotated[float, Field(gt=0, lt=1)] = 0.5
    min_face_px: Annotated[float, Field(ge=0)] = 24.0
    # a tier (auto: the shipped ResNet50, else the light model; see edge/tiers.py) or a model file
    age_model: str = "auto"
    # precision: auto = int8 on a CPU, fp16 on a GPU, when the tier ships that file; else fp32
    age_variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    providers: list[Literal["cuda", "tensorrt", "cpu"]] = ["cuda", "cpu"]
    max_batch: Annotated[int, Field(ge=1, le=256)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 10.0
    # ONNX Runtime threads per session (0: one per core) and busy-waiting; measured by `tillsight bench`
    detector_threads: Annotated[int, Field(ge=0, le=256)] = 1
    age_threads: Annotated[int, Field(ge=0, le=256)] = 0
    spinning: bool = False

    @field_validator("detector")
    @classmethod
    def model_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"model file {str(value)!r} not found")
        return value

    @field_validator("age_model")
    @classmethod
    def tier_or_file(cls, value: str) -> str:
        if value not in TIERS and not Path(value).is_file():
            raise ValueError(f"{value!r} is neither a tier ({', '.join(TIERS)}) nor an existing model file")
        return value


class PolicyConfig(Strict):
    mode: Literal["challenge25", "risk"] = "challenge25"  # edge/policy.py
    challenge_age: Annotated[float, Field(gt=0, le=100)] = 25.0
    legal_age: Annotated[float, Field(gt=0, le=100)] = 18.0  # risk mode: the age the law sets
    max_risk: Annotated[float, Field(gt=0, lt=1)] = 0.02  # risk mode: challenge above this P(under legal_age)
    min_samples: Annotated[int, Field(ge=1, le=1000)] = 3  # per-frame ages before a track is judged


class TrackingConfig(Strict):
    iou_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.2
    lost_after_s: Annotated[float, Field(gt=0)] = 1.5  # a track unseen this long has left the till
    max_samples: Annotated[int, Field(ge=1)] = 100
    estimate_interval_s: Annotated[float, Field(ge=0)] = 1.0  # at most one estimate message per track per interval
    # a face joins an overlapping track only if it looks alike (edge/track.py); None: overlap alone
    min_similarity: Annotated[float, Field(ge=-3, le=1)] | None = 0.23


class PosConfig(Strict):
    """The POS conversation (edge/pos.py)."""
    enabled: bool = True  # subscribe to <camera>/transaction and <camera>/check
    deadline_s: Annotated[float, Field(gt=0, le=10)] = 2.0  # an age check waits at most this for a face


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


class Config(Strict):
    store_id: Annotated[str, Field(pattern=NAME)]
    daemon_id: Annotated[str, Field(pattern=NAME)] | None = None  # default: the host name
    cameras: Annotated[list[CameraConfig], Field(min_length=1)]
    mqtt: MqttConfig = MqttConfig()
    models: ModelsConfig = ModelsConfig()
    policy: PolicyConfig = PolicyConfig()
    tracking: TrackingConfig = TrackingConfig()
    budget: BudgetConfig = BudgetConfig()
    pos: PosConfig = PosConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    logging: LoggingConfig = LoggingConfig()
    status_interval_s: Annotated[float, Field(gt=0)] = 30.0

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
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _UNION_TAGS or str(p).startswith("function-"))]
    return ".".join(parts) or "(top level)"


def _message(error: dict) -> str:
    msg = error["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] == NAME:
        return "must be 1 to 64 letters, digits, '_' or '-' (it becomes an MQTT topic level)"
    if len(msg) > 1 and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    return msg


def problems_from(exc: ValidationError) -> list[str]:
    lines: dict[str, None] = {}
    errors = exc.errors()
    # A union (camera source) reports one error per branch: keep the most specific.
    for error in errors:
        if error["type"] in ("int_type", "string_type") and any(
            e["loc"][: len(error["loc"]) - 1] == error["loc"][:-1] and e is not error for e in errors
        ):
            continue
        lines[f"{_where(error['loc'])}: {_message(error)}"] = None
    return list(lines)


def parse_config(data: dict, base_dir: Path | None = None) -> Config:
    """Validate a TOML document; relative paths are taken from base_dir."""
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc)) from None


def load_config(path: Path | str, cameras: list[dict] | None = None) -> Config:
    """Read and validate a config file; `cameras` replaces its cameras (replay)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    if cameras is not None:
        data["cameras"] = cameras
    return parse_config(data, path.parent)


_PATH_KEYS = {("models", "detector"), ("models", "age_model"), ("mqtt", "password_file"),
              ("mqtt", "tls", "ca_file"), ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file")}


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Relative file paths in a config file are relative to that file, not to the cwd."""
    return _resolve(data, base_dir, ())


def _resolve(node, base_dir: Path, where: tuple):
    if isinstance(node, dict):
        return {k: _resolve(v, base_dir, where + (k,)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, base_dir, where + (str(i),)) for i, v in enumerate(node)]
    if isinstance(node, str) and node and node not in TIERS and (where in _PATH_KEYS or _is_camera_file(where, node)):
        path = Path(node).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    return node


def _is_camera_file(where: tuple, value: str) -> bool:
    return len(where) == 3 and where[0] == "cameras" and where[2] == "source" and "://" not in value
