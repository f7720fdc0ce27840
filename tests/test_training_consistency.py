"""A run, its export and its evaluation stay with the data and the model they came from: a moved data folder, a
fixed labels.csv, an export folder used before or a split of minors alone must not change them silently.

Tiny on purpose: a handful of UTKFace faces, written at test time into a temporary loose folder (nothing from
../shared is kept), 32 px, one epoch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.data import iter_image_bytes, read_labels

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def utkface_photos(utkface) -> dict[str, tuple[float, bytes]]:
    """Ten minors (13-17) and fourteen adults (25+) from the UTKFace pool: name -> (age, JPEG bytes)."""
    labels = read_labels(utkface / "labels.csv")
    minors = [l for l in labels if 13 <= l.age <= 17][:10]
    adults = [l for l in labels if 25 <= l.age <= 60][::500][:14]
    ages = {l.file_name: l.age for l in minors + adults}
    return {name: (ages[name], data) for name, data in iter_image_bytes(utkface, set(ages))}


def write_folder(folder: Path, photos: dict[str, tuple[float, bytes]], names=None) -> Path:
    """A loose data folder: the photos under images/ and their labels.csv."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(photos) if names is None else names
    with (folder / "labels.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file_name", "real_age"])
        for name in names:
            age, data = photos[name]
            writer.writerow([name, f"{age:g}"])
            (folder / "images" / name).write_bytes(data)
    return folder


def test_eval_of_minors_alone_writes_its_report_and_plots(tmp_path, utkface_photos, age_models):
    """No adult 25+ in the split: the Challenge 25 point has no share of adults to plot (a TypeError before
    eval.json and predictions.csv were written; `ship` evaluates so too)."""
    from training.evaluate import evaluate
    minors = [name for name, (age, _) in utkface_photos.items() if age < 18][:4]
    data = write_folder(tmp_path / "minors", utkface_photos, minors)
    out = tmp_path / "eval"
    report = evaluate(age_models[16], data, None, limit=4, out=out, progress=False)
    assert report["n_scored"] >= 1 and report["challenge25"]["adults_25plus_challenged"] is None
    for name in ("eval.json", "predictions.csv", "operating_points.png"):
        assert (out / name).is_file(), name


def name_in(split: str, stem: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """A file name that falls in `split` by the run's hash rule."""
    from training.data import split_of
    return next(f"{stem}-{i}.jpg" for i in range(1000) if split_of(f"{stem}-{i}.jpg", val_fraction, test_fraction) == split)


def tiny_run_options(data: Path, out: Path, **changes):
    from training.train import TrainOptions
    return TrainOptions(**{**dict(data=str(data), out=str(out), input_size=32, batch_size=4, epochs=1, val_fraction=0.3,
                                  test_fraction=0.0, workers=1, mixed_precision="off"), **changes})


def test_a_resumed_run_keeps_its_validation_set_when_the_data_folder_has_moved(tmp_path, utkface_photos, capsys):
    """The copies of training images left out of validation are found in the folder's bytes; on resume the faces
    come from faces.npz, and a moved folder gave no copies: validation grew under the checkpoint choice. The
    options the resume is given and ignores (the folder where it is now, another batch size) are said."""
    pytest.importorskip("keras", reason="the train extra is not installed")
    from training.data import split_of
    from training.train import train
    photos = dict(utkface_photos)
    trained = [name for name in sorted(photos) if split_of(name, 0.3) == "train"][:3]
    for i, name in enumerate(trained):  # the same picture again under a validation name
        photos[name_in("val", f"copy{i}", 0.3)] = photos[name]
    data, run = write_folder(tmp_path / "data", photos), tmp_path / "run"
    first = train(tiny_run_options(data, run))
    assert first["split"]["copies_of_training_left_out"] == 3
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    resumed = train(tiny_run_options(tmp_path / "moved", run, epochs=2, batch_size=8), resume=True)
    assert resumed["epochs_done"] == 2 and resumed["split"] == first["split"]
    assert resumed["options"]["batch_size"] == 4 and resumed["options"]["data"] == str(data)
    assert f"warning: resuming with the run's own options; ignored: --data {tmp_path / 'moved'} (the run's: {data}), " \
           "--batch-size 8 (the run's: 4)\n" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["split"] == first["split"]


def test_the_face_cache_is_made_anew_when_the_labels_or_photos_change(tmp_path, utkface_photos):
    """A run that failed early leaves faces.npz; the same command after labels.csv was fixed (or a photo
    replaced) trained on the old ages and crops."""
    from training.train import prepare_faces
    names = sorted(utkface_photos)[:6]
    photos = {name: utkface_photos[name] for name in names}
    wrong = {**photos, names[0]: (99.0, photos[names[0]][1])}
    data, run = write_folder(tmp_path / "data", wrong), tmp_path / "run"
    run.mkdir()
    opts = tiny_run_options(data, run)
    first, _ = prepare_faces(opts, run)
    assert dict(zip([l.file_name for l in first.labels], first.ages))[names[0]] == 99.0
    write_folder(data, photos)  # the age put right
    fixed, _ = prepare_faces(opts, run)
    ages = dict(zip([l.file_name for l in fixed.labels], fixed.ages))
    assert ages[names[0]] == photos[names[0]][0]
    other = names[1]
    (data / "images" / other).write_bytes(utkface_photos[sorted(utkface_photos)[-1]][1])  # another photo, same name
    replaced, _ = prepare_faces(opts, run)
    index = [l.file_name for l in replaced.labels].index(other)
    assert not np.array_equal(replaced.crops[index], fixed.crops[index])
    again, _ = prepare_faces(opts, run)  # nothing changed: the cache
    assert np.array_equal(again.crops, replaced.crops)


def test_a_file_name_labelled_with_two_ages_is_refused_and_a_repeated_row_read_once(tmp_path, utkface_photos):
    """The last row of a name won silently: a face trained at whichever age came last."""
    from tskit import tillsight
    names = sorted(utkface_photos)[:3]
    data = write_folder(tmp_path / "data", utkface_photos, names)
    rows = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join(rows + [rows[1], f"{names[1]},71"]) + "\n")
    result = tillsight("data", "inspect", str(data), "--out", str(tmp_path / "inspect"))
    age = f"{utkface_photos[names[1]][0]:g}"
    assert (result.returncode, result.stderr.strip()) == (
        1, f"tillsight: error: {data / 'labels.csv'}: 1 file name(s) labelled differently on several rows: "
           f"{names[1]} (lines 3, 6: ages {', '.join(sorted([age, '71'], key=float))}); keep one row each")
    (data / "labels.csv").write_text("\n".join(rows + [rows[1]]) + "\n")  # the same row twice: no conflict
    result = tillsight("data", "inspect", str(data), "--out", str(tmp_path / "inspect"))
    assert result.returncode == 0, result.stderr
    assert "1 row(s) of the labels file repeat an earlier row as it was: read once" in result.stdout
    report = json.loads((tmp_path / "inspect" / "report.json").read_text())
    assert report["labelled"] == 3 and report["repeated_rows_read_once"] == 1


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A distribution-head age model of a few thousand weights, 32 px: exports in seconds."""
    keras = pytest.importorskip("keras", reason="the train extra is not installed")
    pytest.importorskip("tf2onnx", reason="the train extra is not installed")
    crops = keras.Input((32, 32, 3))
    bins = keras.layers.Dense(101, activation="softmax")(keras.layers.GlobalAveragePooling2D()(crops))
    path = tmp_path / "tiny.keras"
    keras.Model(crops, bins).save(path)
    return path


def test_an_export_into_an_earlier_exports_folder_leaves_none_of_its_variants(tmp_path, tiny_checkpoint,
                                                                             utkface_photos):
    """Exported again without --fp16, the first export's age_fp16.onnx stayed beside the new age.onnx, in no
    export.json, and was served (edge/tiers.py picks it by name), scored and shipped as the new model's."""
    from tskit import tillsight
    calibration, out = write_folder(tmp_path / "faces", utkface_photos), tmp_path / "onnx"
    common = ("export", str(tiny_checkpoint), "--out", str(out), "--crop-margin", "0", "--calibration", str(calibration))
    first = tillsight(*common, "--fp16", timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert set(json.loads((out / "export.json").read_text())["files"]) == {"age.onnx", "age_fp16.onnx"}
    again = tillsight(*common, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{out}: removed age_fp16.onnx of an earlier export (this one does not write it)" in again.stdout
    assert sorted(p.name for p in out.iterdir()) == ["age.onnx", "export.json"]
    from export.age import file_sha256
    assert json.loads((out / "export.json").read_text())["files"] == {"age.onnx": file_sha256(out / "age.onnx")}


def test_ship_reuses_an_earlier_export_only_with_each_file_it_recorded(tmp_path):
    from export.age import file_sha256
    from export.ship import ShipOptions, _earlier_export
    checkpoint, onnx_dir = tmp_path / "best.keras", tmp_path / "onnx"
    checkpoint.write_bytes(b"a checkpoint")
    onnx_dir.mkdir()
    names = ("age.onnx", "age_fp16.onnx", "age_int8.onnx")
    for name in names:
        (onnx_dir / name).write_bytes(name.encode())
    opts = ShipOptions(checkpoint=checkpoint, data=tmp_path / "data", work=tmp_path)
    report = {"calibration": str(opts.data), "checkpoint_sha256": file_sha256(checkpoint),
              "files": {name: file_sha256(onnx_dir / name) for name in names}}
    (onnx_dir / "export.json").write_text(json.dumps(report))
    assert _earlier_export(opts, onnx_dir) == report
    (onnx_dir / "age_int8.onnx").write_bytes(b"another export's int8")
    assert _earlier_export(opts, onnx_dir) is None
    (onnx_dir / "export.json").write_text(json.dumps({**report, "files": None}))  # an export.json of before
    (onnx_dir / "age_int8.onnx").write_bytes(b"age_int8.onnx")
    assert _earlier_export(opts, onnx_dir) is None


def test_export_refuses_a_crop_margin_other_than_the_runs(tmp_path, tiny_checkpoint, utkface_photos):
    """--crop-margin overrode run.json's margin: the daemon then cut faces at a margin the model never saw."""
    from tskit import tillsight
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best.keras"
    tiny_checkpoint.rename(checkpoint)
    (run / "run.json").write_text(json.dumps({"options": {"crop_margin": 0.1, "data": "faces"}}))
    calibration, out = write_folder(tmp_path / "faces", utkface_photos), tmp_path / "onnx"
    common = ("export", str(checkpoint), "--out", str(out), "--calibration", str(calibration))
    result = tillsight(*common, "--crop-margin", "0.3", timeout=600)
    assert (result.returncode, result.stderr.strip()) == (
        2, f"tillsight: error: --crop-margin 0.3 differs from {run / 'run.json'}'s 0.1, the margin the model was "
           "trained at: leave --crop-margin out")
    assert not out.exists()
    for given in (["--crop-margin", "0.1"], []):  # the run's own margin, given or not
        result = tillsight(*common, *given, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((out / "export.json").read_text())["crop_margin"] == 0.1


def test_a_resume_names_only_the_options_given_that_differ_from_the_runs():
    from training.train import TrainOptions, ignored_options
    saved = {**TrainOptions(data="/data/utk", learning_rate=0.01, epochs=5).__dict__}
    same = TrainOptions(data="/data/utk", epochs=9, minutes=3.0, workers=2)  # what a resume takes, and defaults
    assert ignored_options(same, saved) == []
    given = TrainOptions(data="/data/other", learning_rate=0.02, head="regression")
    assert ignored_options(given, saved) == ["--data /data/other (the run's: /data/utk)",
                                             "--head regression (the run's: distribution)",
                                             "--learning-rate 0.02 (the run's: 0.01)"]
