"""Hostile config files: `tillsight config check` answers exit 0, or exit 2 with one `key: message` line
per problem; never a traceback.

The fuzz is a seeded generator, not hypothesis: it mutates a valid config the ways that broke the parser
before (booleans and inf/nan for numbers, huge and NUL strings, deep nesting, long and ~user paths, files
that are not certificates, random bytes, truncated TOML), makes the same files on every run
(TILLSIGHT_FUZZ_SEED picks others) and needs no new dependency. Then one test per finding it made.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from edge.cli import main
from edge.config import Config, ConfigError, parse_config
from tskit import absent, tillsight

SEED = int(os.environ.get("TILLSIGHT_FUZZ_SEED", "1189"))
COUNT = 1200
PROBLEM = re.compile(r"^\S.*?: \S.*$")  # `path.to.key: what is wrong` (or `FILE: what is wrong`)


def check(path: Path) -> tuple[int, list[str], str]:
    """`tillsight config check PATH` in this process: exit code, stderr lines, stdout."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["config", "check", str(path)])
    return code, err.getvalue().split("\n")[:-1], out.getvalue()


def bad_lines(code: int, lines: list[str]) -> list[str]:
    """What is wrong with an answer: the exit code, or lines that are not one `key: message` each."""
    if code not in (0, 2):
        return [f"exit {code}"]
    if code == 2 and not lines:
        return ["exit 2 without a message"]
    return [line for line in lines if not PROBLEM.match(line) or len(line.splitlines()) != 1 or "Traceback" in line]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate and its key (also the CA), another key, and an expired certificate."""
    if shutil.which("openssl") is None:
        absent("the openssl command is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("certs")
    for name in ("self", "other"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder)
    # expired in 2001: `openssl req` cannot back-date, `openssl ca` can
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n"
                                   "serial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=old", "-keyout", "old.key", "-out", "old.csr",
            cwd=folder)
    openssl("ca", "-batch", "-selfsign", "-config", "ca.cnf", "-keyfile", "old.key", "-in", "old.csr",
            "-startdate", "20000101000000Z", "-enddate", "20010101000000Z", "-out", "old.pem", cwd=folder)
    return {name: folder / name for name in ("self.pem", "self.key", "other.key", "old.pem", "old.key")}


# ---- the TOML writer: whatever the mutations put in, including values JSON and tomllib cannot make ----

class Raw(str):
    """TOML text written as it is: deep nesting, dates."""


def toml_key(key: str) -> str:
    return toml_value(str(key))


def toml_value(value) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):  # JSON's escapes are TOML's, but for DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(config: dict) -> str:
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in config.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in config.items() if k not in tables and k not in arrays]
    for name, table in tables.items():
        lines += [f"[{toml_key(name)}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    for name, items in arrays.items():
        for item in items:
            lines += [f"[[{toml_key(name)}]]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def base_config(folder: Path, certs: dict[str, Path]) -> dict:
    """A valid config that sets (nearly) every key, relative paths included."""
    (folder / "till.mp4").write_bytes(b"")
    (folder / "secret").write_text("password\n")
    (folder / "secret").chmod(0o600)  # 0644 is a warning line (edge.config.exposed_secrets)
    config = {
        "store_id": "store-1", "daemon_id": "till-pc", "status_interval_s": 30,
        "cameras": [{"id": "till-1", "source": 0, "fps_limit": 5, "size": [1280, 720], "pixel_format": "MJPG",
                     "ignore_regions": [[0.7, 0, 1, 0.45], [0, 0.8, 0.2, 1]]},
                    {"id": "till-2", "source": "till.mp4"},
                    {"id": "till-3", "source": "rtsp://10.0.0.5:554/stream1", "fps_limit": 2.5, "picture_check_s": 3,
                     "still_scene_s": 120}],  # (a /dev/v4l/by-id/ path: a warning line here, where none is there)
        "mqtt": {"host": "broker.local", "port": 8883, "username": "till", "password_file": "secret",
                 "client_id": "till-pc-1", "qos": 1, "protocol": "5", "topic_prefix": "tillsight/eu",
                 "keepalive_s": 30, "max_queued_messages": 1000,
                 "tls": {"ca_file": str(certs["self.pem"]), "cert_file": str(certs["self.pem"]),
                         "key_file": str(certs["self.key"]), "insecure": False}},
        "models": {"age_model": "auto", "age_variant": "auto", "providers": ["cuda", "cpu"], "max_batch": 32,
                   "max_wait_ms": 10, "detector_score": 0.5, "min_face_px": 24, "detector_threads": 1,
                   "age_threads": 0, "spinning": False,
                   "cuda": {"conv_algo_search": "heuristic", "prefer_nhwc": True}},
        "policy": {"mode": "challenge25", "challenge_age": 25, "legal_age": 18, "max_risk": 0.02, "min_samples": 3},
        "tracking": {"iou_threshold": 0.2, "lost_after_s": 1.5, "max_samples": 100, "estimate_interval_s": 1.0,
                     "min_similarity": 0.23, "picture_face_s": 60},
        "opening_hours": {"timezone": "Europe/London", "default": "07:00-22:00", "sat": "08:00-12:00, 13:00-20:00",
                          "sun": "closed"},
        "budget": {"enabled": True, "settle_rate_hz": 5, "settle_samples": 12, "min_score": 0.6},
        "pos": {"enabled": True, "deadline_s": 2},
        "analytics": {"enabled": True, "interval_s": 900, "bands": [18, 25, 35], "k": 5},
        "logging": {"level": "info", "format": "json"},
    }
    if "outbox" in Config.model_fields:  # the durable outbox's file, where this version has one
        config["outbox"] = {"path": "outbox.sqlite3"}
    return config


# ---- the mutations ----

def deep_array(depth: int) -> Raw:
    return Raw("[" * depth + "1" + "]" * depth)


def deep_table(depth: int) -> Raw:
    return Raw("{a = " * depth + "1" + "}" * depth)


def long_text(rng: random.Random) -> str:
    return rng.choice("ab/_-.") * rng.choice([254, 256, 4097, 70_000, 200_000])


def hostile_values(folder: Path) -> list[tuple[str, object]]:
    """(label, value or a function of the generator) to put in place of any value."""
    return [
        ("true", True), ("false", False), ("inf", math.inf), ("-inf", -math.inf), ("nan", math.nan),
        ("big int", lambda r: r.choice([2**63 - 1, -2**63, 10**18])), ("huge float", lambda r: r.choice([1e308, -1e308, 5e-324])),
        ("negative", lambda r: -r.randint(1, 10**6)), ("zero", 0), ("fraction", lambda r: r.random()),
        ("number string", lambda r: str(r.randint(0, 100))), ("inf string", "inf"), ("empty string", ""),
        ("long string", long_text), ("NUL", "a\0b"), ("controls", "a\nb\tc\x1b[31m\x7f\x85d"),
        ("unicode", "ŝtöre-😀/+#\u2028x"), ("spaces", " a b "),
        ("long path", lambda r: "/tmp/" + "a" * r.choice([4097, 200_000])), ("long name", "dir/" + "n" * 256 + ".onnx"),
        ("many names", "/a" * 3000), ("~nosuchuser", "~nosuchuser/x.pem"), ("~", "~/no-such-file.onnx"),
        ("not a certificate", str(folder / "secret")), ("folder", str(folder)), ("/dev/null", "/dev/null"),
        ("URL", "rtsp://[::1"), ("ftp URL", "ftp://x/y"),
        ("deep array", lambda r: deep_array(r.choice([40, 300, 3000]))),
        ("deep table", lambda r: deep_table(r.choice([40, 300, 3000]))),
        ("empty list", []), ("mixed list", [1, "a", True, 2.5]), ("table", {"a": 1}), ("date", Raw("1979-05-27")),
        ("datetime", Raw("1979-05-27T07:32:00Z")),
    ]


def places(node, where=()):
    """(container, key) of every value in the config, tables and lists too."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        yield node, key, where + (key,)
        if isinstance(value, (dict, list)) and not isinstance(value, Raw):
            yield from places(value, where + (key,))


def mutate_values(config: dict, rng: random.Random, folder: Path) -> str:
    container, key, where = rng.choice(list(places(config)))
    kind = rng.random()
    if kind < 0.08 and isinstance(container, dict):
        del container[key]
        return f"delete {'.'.join(map(str, where))}"
    if kind < 0.16:
        target = container[key] if isinstance(container[key], dict) else config
        name = rng.choice(["colour", "", "a\nb", "k" * 70_000, "x.y", "ŝ"])
        target[name] = rng.choice([1, "x", True])
        return "unknown key"
    label, value = rng.choice(hostile_values(folder))
    container[key] = value(rng) if callable(value) else value
    return f"{'.'.join(map(str, where))} = {label}"


def deep_dotted_key(rng: random.Random) -> str:
    return "a" + ".b" * rng.choice([10, 40, 5000]) + " = 1\n"


TEXT_MUTATIONS = [
    ("truncated", lambda text, rng: text[: rng.randrange(len(text))].encode()),
    ("bytes flipped", lambda text, rng: bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.02 else b
                                              for b in text.encode())),
    ("random bytes", lambda text, rng: rng.randbytes(rng.randrange(4096))),
    ("not UTF-8", lambda text, rng: text.encode() + b"\n# caf\xe9\n"),
    ("BOM", lambda text, rng: b"\xef\xbb\xbf" + text.encode()),
    ("dotted key", lambda text, rng: (text + deep_dotted_key(rng)).encode()),
    ("deep table headers", lambda text, rng: (text + "[" + ".".join(["t"] * rng.choice([30, 3000])) + "]\nx = 1\n").encode()),
    ("deep array", lambda text, rng: (f"x = {deep_array(rng.choice([100, 20_000]))}\n" + text).encode()),
    ("duplicate table", lambda text, rng: (text + "[mqtt]\nport = 1\n").encode()),
    ("huge int", lambda text, rng: (f"n = {'9' * 5000}\n" + text).encode()),
    ("empty", lambda text, rng: b""),
]


def fuzz_files(folder: Path, certs: dict[str, Path]) -> list[tuple[Path, str]]:
    rng = random.Random(SEED)
    base = base_config(folder, certs)
    files = []
    for index in range(COUNT):
        config = copy.deepcopy(base)
        labels = [mutate_values(config, rng, folder) for _ in range(rng.choice([1, 1, 2, 3]))]
        text = toml_document(config)
        data = text.encode()
        if rng.random() < 0.25:
            label, change = rng.choice(TEXT_MUTATIONS)
            labels.append(label)
            data = change(text, rng)
        path = folder / f"fuzz-{index:04d}.toml"
        path.write_bytes(data)
        files.append((path, "; ".join(labels)))
    return files


def test_fuzzed_configs_give_exit_2_and_one_line_per_problem_never_a_traceback(tmp_path, certs):
    base = tmp_path / "base.toml"
    base.write_text(toml_document(base_config(tmp_path, certs)))
    assert check(base) == (0, [], f"{base}: OK\n")
    answers, failures = {}, []
    for path, labels in fuzz_files(tmp_path, certs):
        try:
            code, lines, _ = check(path)
        except BaseException as exc:  # noqa: BLE001 - a traceback is what this test looks for
            failures.append(f"{path.name} [{labels}]: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        answers[path] = (code, lines, labels)
        failures += [f"{path.name} [{labels}]: {problem[:200]!r}" for problem in bad_lines(code, lines)]
    assert not failures, f"seed {SEED}: {len(failures)} bad answers:\n" + "\n".join(failures[:20])
    refused = [p for p, (code, _, _) in answers.items() if code == 2]
    assert len(refused) > COUNT // 2, "the mutations hardly ever make a bad config: the generator is broken"

    # the same answers from the real console entry point, one sample per kind of mutation
    sample, kinds = [], set()
    for path in refused:
        kind = re.sub(r"[0-9]", "", answers[path][2].split(";")[-1].split("=")[-1].strip())
        if kind not in kinds and len(sample) < 20:
            kinds.add(kind)
            sample.append(path)
    for path in sample:
        result = tillsight("config", "check", str(path), timeout=60)
        assert "Traceback" not in result.stderr
        assert (result.returncode, result.stderr.split("\n")[:-1]) == (2, answers[path][1]), answers[path][2]


# ---- one test per finding ----

@pytest.fixture
def write(tmp_path):
    """write(toml_text, **valid_overrides) -> path of a config with a valid base and the text appended."""
    def make(text: str = "", name: str = "c.toml") -> Path:
        path = tmp_path / name
        path.write_text('store_id = "s"\n' + text + '\n[[cameras]]\nid = "a"\nsource = 0\n')
        return path
    return make


def refused(path: Path) -> list[str]:
    code, lines, out = check(path)
    assert code == 2 and not bad_lines(code, lines) and out == "", (code, lines)
    return lines


@pytest.mark.parametrize("text, line", [
    ("[policy]\nchallenge_age = true", "policy.challenge_age: input should be a number, not true"),
    ("[mqtt]\nqos = true", "mqtt.qos: input should be a number, not true"),
    ("[analytics]\nbands = [18, false, 30]", "analytics.bands: item 1 should be a number, not false"),
    ("[tracking]\nmin_similarity = false", "tracking.min_similarity: input should be a number, not false"),
    ("[pos]\nenabled = 1", "pos.enabled: input should be true or false"),
    ('[budget]\nenabled = "yes"', "budget.enabled: input should be true or false"),
])
def test_a_boolean_is_not_a_number_nor_a_number_a_boolean(write, text, line):
    assert refused(write(text)) == [line]


def test_integers_still_serve_for_floats(write):
    assert check(write("[policy]\nchallenge_age = 21\n[tracking]\nlost_after_s = 2"))[0] == 0


def test_a_quoted_number_is_not_a_number(write):
    assert refused(write('[mqtt]\nport = "1883"\n[policy]\nchallenge_age = "25"')) == [
        "mqtt.port: input should be a number, not the string '1883' (write it without quotes)",
        "policy.challenge_age: input should be a number, not the string '25' (write it without quotes)"]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_durations_and_numbers_must_be_finite(write, value):
    assert refused(write(f"[tracking]\nlost_after_s = {value}\nmin_similarity = {value}")) == [
        "tracking.lost_after_s: input should be a finite number",
        "tracking.min_similarity: input should be a finite number"]


def test_strings_are_bounded(write):
    assert refused(write(f'[mqtt]\ntopic_prefix = "{"a" * 70_000}"\nhost = "{"h" * 254}"\nusername = "{"u" * 257}"')) == [
        "mqtt.host: string should have at most 253 characters",
        "mqtt.username: string should have at most 256 characters",
        "mqtt.topic_prefix: string should have at most 200 characters"]


def test_nul_and_control_characters_in_host_and_username(write):
    assert refused(write('[mqtt]\nhost = "broker\\u0000.evil"\nusername = "till\\u0000"')) == [
        "mqtt.host: must not contain spaces, NUL or other control characters",
        "mqtt.username: must not contain NUL or other control characters"]
    assert refused(write('[mqtt]\nhost = "a b"\nusername = "line\\nbreak"')) == [
        "mqtt.host: must not contain spaces, NUL or other control characters",
        "mqtt.username: must not contain NUL or other control characters"]


@pytest.mark.parametrize("text, problem", [
    ("x = " + "[" * 20_000 + "]" * 20_000, "nested too deeply"),
    ("x = " + "{a = " * 20_000 + "1" + "}" * 20_000, "nested too deeply"),
    ("a" + ".b" * 100_000 + " = 1", "line 2: keys nested too deeply (more than 32 levels)"),  # tomllib: O(n²) memory
    ('x = {"a"' + '."b"' * 40 + " = 1}", "line 2: keys nested too deeply (more than 32 levels)"),
])
def test_deep_nesting_is_one_line(write, text, problem):
    path = write(text)
    assert refused(path) == [f"{path}: {problem}"]


def test_dots_in_strings_and_numbers_are_not_nesting(write):
    bands = ", ".join(f"{v}.5" for v in range(40))  # 40 dots in one line, none of them a key's
    lines = refused(write(f'daemon_id = "{"a." * 40}"\n[analytics]\nbands = [{bands}]'))
    assert lines[0].startswith("daemon_id: must be") and lines[1].startswith("analytics.bands: ")
    assert not [line for line in lines if "nested" in line]


def test_deeply_nested_data_validates_without_recursion(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(100_000):  # far deeper than the interpreter's recursion limit
        node["a"] = {}
        node = node["a"]
    data = {"store_id": "s", "cameras": [{"id": "a", "source": 0}], "models": deep, "mqtt": {"tls": deep}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path)
    assert caught.value.problems == ["mqtt.tls.a: unknown key", "models.a: unknown key"]


@pytest.mark.parametrize("key", ["models.age_model", "models.detector", "mqtt.password_file", "mqtt.tls.ca_file"])
def test_a_200000_character_path_is_one_line(write, key):
    section, name = key.rsplit(".", 1)
    extra = '\nusername = "u"' if name == "password_file" else ""
    path = write(f'[{section}]\n{name} = "/tmp/{"a" * 200_000}"{extra}')
    [line] = refused(path)
    assert line.startswith(f"{key}: ") and line.endswith(" is 200,005 bytes long (at most 4,096)") and len(line) < 200


def test_a_name_over_255_bytes_and_a_nul_in_a_path(write, tmp_path):
    [line] = refused(write(f'[models]\nage_model = "models/{"n" * 256}.onnx"'))
    assert line == f"models.age_model: model file path has a name of 261 bytes, '{'n' * 60}'… (at most 255 bytes a name)"
    assert refused(write('[[cameras]]\nid = "b"\nsource = "till\\u0000.mp4"')) == [
        "cameras.0.source: video file path contains a NUL byte"]


def test_a_video_path_that_is_too_long_as_a_camera(write):
    [line] = refused(write(f'[[cameras]]\nid = "b"\nsource = "{"v" * 300}.mp4"'))
    assert line.startswith("cameras.0.source: video file path has a name of 304 bytes")


def test_a_path_under_an_unknown_user(write):
    path = write('[models]\nage_model = "~nosuchuser-tillsight/age.onnx"\n[mqtt.tls]\nca_file = "~nosuchuser-tillsight/ca.pem"')
    assert refused(path) == [
        "mqtt.tls.ca_file: file path '~nosuchuser-tillsight/ca.pem': there is no user 'nosuchuser-tillsight' "
        "to expand '~nosuchuser-tillsight'",
        "models.age_model: model file path '~nosuchuser-tillsight/age.onnx': there is no user "
        "'nosuchuser-tillsight' to expand '~nosuchuser-tillsight'"]


def test_a_ca_file_that_is_not_a_certificate(write, certs):
    path = write(f'[mqtt.tls]\nca_file = "{certs["self.key"]}"')  # a PEM key, not a certificate
    assert refused(path) == ["mqtt.tls.ca_file: not a PEM certificate (no certificate or crl found)"]
    assert refused(write('[mqtt.tls]\nca_file = "c.toml"')) == [
        "mqtt.tls.ca_file: not a PEM certificate (no certificate or crl found)"]


def test_a_valid_self_signed_certificate_and_key_pass(write, certs):
    path = write(f'[mqtt.tls]\nca_file = "{certs["self.pem"]}"\ncert_file = "{certs["self.pem"]}"\n'
                 f'key_file = "{certs["self.key"]}"')
    assert check(path) == (0, [], f"{path}: OK\n")


def test_client_certificate_and_key_must_load_together(write, certs):
    assert refused(write(f'[mqtt.tls]\nkey_file = "{certs["self.key"]}"')) == [
        "mqtt.tls.key_file: set, but cert_file is not (a client certificate needs both)"]
    assert refused(write(f'[mqtt.tls]\ncert_file = "{certs["self.pem"]}"')) == [
        "mqtt.tls.key_file: required: cert_file has no private key in it"]
    assert refused(write(f'[mqtt.tls]\ncert_file = "{certs["self.pem"]}"\nkey_file = "{certs["other.key"]}"')) == [
        "mqtt.tls.key_file: not the private key of cert_file (key values mismatch)"]
    assert refused(write(f'[mqtt.tls]\ncert_file = "{certs["self.key"]}"\nkey_file = "{certs["self.key"]}"')) == [
        "mqtt.tls.cert_file: not a PEM certificate (no certificate or crl found)"]


def test_a_passphrase_protected_key_is_refused_without_a_prompt(write, certs, tmp_path):
    openssl("pkey", "-in", str(certs["self.key"]), "-aes256", "-passout", "pass:secret", "-out", "locked.key",
            cwd=tmp_path)
    assert refused(write(f'[mqtt.tls]\ncert_file = "{certs["self.pem"]}"\nkey_file = "locked.key"')) == [
        "mqtt.tls.key_file: the private key is encrypted with a passphrase, which the daemon cannot give"]


def test_an_expired_certificate_is_left_to_run_time(write, certs):
    path = write(f'[mqtt.tls]\nca_file = "{certs["old.pem"]}"\ncert_file = "{certs["old.pem"]}"\n'
                 f'key_file = "{certs["old.key"]}"')
    assert check(path)[0] == 0


def test_files_that_are_not_configs(tmp_path):
    huge = tmp_path / "huge.toml"
    huge.write_text("# padding\n" * 110_000)
    assert refused(huge) == [f"{huge}: config file is larger than 1 MiB: not a tillsight config"]
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'store_id = "caf\xe9"\n')
    assert refused(latin1) == [f"{latin1}: cannot read config file ('utf-8' codec can't decode byte 0xe9 in "
                               "position 15: invalid continuation byte)"]
    digits = tmp_path / "digits.toml"
    digits.write_text(f"status_interval_s = {'9' * 5000}\n")
    assert refused(digits) == [f"{digits}: not valid TOML: Exceeds the limit (4300 digits) for integer string conversion"]
    assert refused(tmp_path) == [f"{tmp_path}: is a folder, not a config file"]
    long = tmp_path / ("c" * 300)
    assert refused(long) == [f"{long}: cannot read config file (File name too long)"]


def test_a_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbfstore_id = "s"\n[[cameras]]\nid = "a"\nsource = 0\n')
    assert check(path)[0] == 0


@pytest.mark.parametrize("source", ["true", "1.5", "[1]", "{a = 1}", "99999999"])
def test_a_camera_source_of_the_wrong_type_says_so(tmp_path, source):
    path = tmp_path / "c.toml"
    path.write_text(f'store_id = "s"\n[[cameras]]\nid = "a"\nsource = {source}\n')
    [line] = refused(path)  # was: exit 2 and not a word (both union branches' errors were dropped)
    assert line in ("cameras.0.source: must be a device index (an integer), a stream URL or a video file path",
                    "cameras.0.source: input should be less than or equal to 65535")


def test_a_key_with_a_line_break_stays_on_one_line(write):
    assert refused(write('[mqtt]\n"a\\nb\\u2028c" = 1')) == ["mqtt.'a\\nb\\u2028c': unknown key"]
