"""Data, split and metric rules of training/ (no Keras needed)."""

import json
import shutil

import cv2
import numpy as np
import pytest

from training.data import DataError, Label, load_faces, read_labels, select, split_of
from training.metrics import age_metrics, band_of


def test_labels_parse_optional_columns_and_reject_bad_rows(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file_name,real_age,gender,race\na.jpg,23,1,2\nb.jpg,7.5,,\n")
    assert read_labels(path) == [Label("a.jpg", 23.0, 1, 2), Label("b.jpg", 7.5, None, None)]
    path.write_text("file_name,real_age\na.jpg,23\nb.jpg,old\n")
    with pytest.raises(DataError, match=r"labels.csv:3: real_age 'old' is not a number"):
        read_labels(path)
    path.write_text("name,age\na.jpg,23\n")
    with pytest.raises(DataError, match="missing column"):
        read_labels(path)
    with pytest.raises(DataError, match="labels file not found"):
        read_labels(tmp_path / "absent.csv")


def test_labels_saved_by_excel_as_csv_utf8_are_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark, which was read into the first column's name: "missing
    column(s) file_name"."""
    path = tmp_path / "labels.csv"
    path.write_bytes("file_name,real_age\r\nZoë.jpg,23\r\n".encode("utf-8-sig"))
    assert read_labels(path) == [Label("Zoë.jpg", 23.0, None, None)]


def test_split_is_deterministic_and_near_the_fraction():
    names = [f"{i}_0_0_2017.jpg" for i in range(4000)]
    splits = [split_of(n, 0.2) for n in names]
    assert splits == [split_of(n, 0.2) for n in names]
    assert 0.18 < splits.count("val") / len(names) < 0.22
    # growing the fraction only moves images from train to val, never back
    assert all(split_of(n, 0.3) == "val" for n, s in zip(names, splits) if s == "val")
    # a test split takes faces from training only: validation stays the same faces (runs compare on it)
    with_test = [split_of(n, 0.2, 0.1) for n in names]
    assert [s == "val" for s in with_test] == [s == "val" for s in splits]
    assert 0.08 < with_test.count("test") / len(names) < 0.12
    assert all(s == "train" for s, t in zip(splits, with_test) if t == "test")


def test_ship_scores_the_held_out_test_split_and_runs_without_one_on_validation():
    from export.ship import _split_row, scored_split, train_command
    assert scored_split({"val_fraction": 0.1}) == "val"  # the shipped run predates test splits
    assert "--val-fraction 0.1 --test-fraction 0.0" in train_command({"val_fraction": 0.1})  # and so repeats
    assert scored_split({"val_fraction": 0.1, "test_fraction": 0.1}, {"test": 0}) == "val"  # a tiny --limit
    assert scored_split({"val_fraction": 0.1, "test_fraction": 0.0}) == "val"
    assert scored_split({"val_fraction": 0.1, "test_fraction": 0.1}) == "test"
    assert "→ held-out test (2100; trained nothing, chose nothing" in _split_row(
        {"val_fraction": 0.1, "test_fraction": 0.1, "train": 16000, "val": 2140, "test": 2100})
    assert "the same rule as `tillsight eval --split val`" in _split_row({"val_fraction": 0.1, "train": 1, "val": 1})


def test_select_takes_a_stable_subset_across_ages():
    labels = [Label(f"{age}_{i}.jpg", age) for age in range(1, 91) for i in range(3)]
    subset = select(labels, 30)
    assert subset == select(list(reversed(labels)), 30)
    assert np.std([l.age for l in subset]) > 15  # spread over ages, not the first rows


def test_metrics_of_a_constant_model_are_the_mean_absolute_deviation():
    true = np.array([5, 15, 16, 20, 27, 35, 50, 70], float)
    report = age_metrics(true, np.full(true.shape, 30.0))
    assert report["mae"] == pytest.approx(np.mean(np.abs(true - 30)), abs=1e-3)
    assert report["mae_by_band"] == {"0-12": 25.0, "13-17": 14.5, "18-24": 10.0, "25-29": 3.0, "30-44": 5.0,
                                     "45-59": 20.0, "60+": 40.0}
    assert report["challenge25"] == {"minors_13_17_flagged": 0.0, "adults_25plus_challenged": 0.0,
                                     "adults_30plus_challenged": 0.0}


def test_challenge25_shares():
    true = np.array([14, 16, 17, 26, 31, 40, 45])
    predicted = np.array([20, 26, 22, 24, 24, 35, 50])
    c25 = age_metrics(true, predicted)["challenge25"]
    assert c25 == {"minors_13_17_flagged": pytest.approx(2 / 3, abs=1e-4),
                   "adults_25plus_challenged": pytest.approx(2 / 4), "adults_30plus_challenged": pytest.approx(1 / 3, abs=1e-4)}
    assert age_metrics(np.array([40.0]), np.array([41.0]))["challenge25"]["minors_13_17_flagged"] is None


def test_groups_and_bands():
    report = age_metrics([10, 20], [12, 30], genders=[0, 1], races=[2, None], gender_names={0: "male", 1: "female"})
    assert report["mae_by_gender"] == {"male": 2.0, "female": 10.0} and report["mae_by_race"] == {"2": 2.0}
    assert report["n_by_gender"] == {"male": 1, "female": 1} and report["n_by_race"] == {"2": 1}
    assert report["n_by_band"] == {"0-12": 1, "13-17": 0, "18-24": 1, "25-29": 0, "30-44": 0, "45-59": 0, "60+": 0}
    assert [band_of(a) for a in (0, 12.9, 13, 17, 18, 24, 25, 29, 30, 44, 45, 59, 60, 116)] == [
        "0-12", "0-12", "13-17", "13-17", "18-24", "18-24", "25-29", "25-29", "30-44", "30-44", "45-59", "45-59",
        "60+", "60+"]


def test_loose_image_folder_lists_missing_unreadable_and_faceless(tmp_path, two_people_photo):
    # APPA-REAL layout: images beside labels.csv
    shutil.copy(two_people_photo, tmp_path / "people.jpg")
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((200, 200, 3), 90, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    labels = [Label("people.jpg", 40), Label("wall.png", 30), Label("broken.jpg", 20), Label("gone.jpg", 10)]
    faces = load_faces(tmp_path, labels, 48, 0.3, progress=False)
    assert [l.file_name for l in faces.labels] == ["people.jpg"] and faces.crops.shape == (1, 48, 48, 3)
    assert (faces.missing, faces.unreadable, faces.no_face) == (["gone.jpg"], ["broken.jpg"], ["wall.png"])


def test_an_image_over_opencvs_pixel_limit_is_unreadable_not_a_traceback(tmp_path):
    """A PNG header claiming 60000x60000 pixels: cv2.imdecode raised cv2.error through data inspect, train, eval
    and ship."""
    from tskit import oversized_png, tillsight
    (tmp_path / "huge.png").write_bytes(oversized_png())
    faces = load_faces(tmp_path, [Label("huge.png", 30)], 48, 0.3, progress=False)
    assert (faces.labels, faces.unreadable) == ([], ["huge.png"])
    (tmp_path / "labels.csv").write_text("file_name,real_age\nhuge.png,30\n")
    result = tillsight("data", "inspect", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"tillsight: error: no face to train on in {tmp_path}: 0 missing, 1 unreadable, " \
                                    "0 with no face found"


def test_out_of_range_training_options_are_one_line(tmp_path):
    from tskit import tillsight
    result = tillsight("train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--val-fraction", "2")
    assert (result.returncode, result.stderr.strip()) == (2, "tillsight: error: --val-fraction 2 out of range [0.001, 0.999]")
    result = tillsight("train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--oversample-minors", "0")
    assert (result.returncode, result.stderr.strip()) == (2, "tillsight: error: --oversample-minors 0 out of range [1, 20]")
    # `data inspect` took any: --limit 0 was a traceback from the histogram, -4 inspected every photo
    for option, value, expected in (("--limit", "0", "[1, 1e+09]"), ("--limit", "-4", "[1, 1e+09]"),
                                    ("--val-fraction", "2", "[0.001, 0.999]")):
        result = tillsight("data", "inspect", str(tmp_path), option, value, "--out", str(tmp_path / "i"))
        assert (result.returncode, result.stderr.strip()) == (2, f"tillsight: error: {option} {value} out of range {expected}")


def test_ship_gates_each_give_their_figure_and_reason():
    from pathlib import Path

    from export.ship import ShipOptions, gates
    opts = ShipOptions(checkpoint=Path("c"), data=Path("d"), work=Path("w"))
    report = {"n": 10, "mae": 5.0, "compared_with": {"mae": 4.95},
              "agreement": {"n": 10, "max_abs_diff": 1.2, "mean_abs_diff": 0.3, "max_abs_diff_file": "a.jpg"}}
    assert [(g["gate"], g["passed"]) for g in gates(report, opts)] == [
        ("mae", True), ("int8_mae_change", True), ("int8_shift", True)]
    worse = {**report, "mae": 6.2, "agreement": {**report["agreement"], "max_abs_diff": 3.5}}
    failed = {g["gate"]: g for g in gates(worse, opts) if not g["passed"]}
    assert set(failed) == {"mae", "int8_mae_change", "int8_shift"}
    assert failed["int8_shift"]["why"] == "int8 moves a.jpg by 3.50 years from fp32 (at most 3.0)"
    assert failed["int8_mae_change"]["value"] == pytest.approx(1.25)
    unpaired = gates({**report, "agreement": None}, opts)
    assert [g["passed"] for g in unpaired if g["gate"] == "int8_shift"] == [False]  # not measured is not passed
    assert gates({**report, "mae": None}, opts)[0]["gate"] == "faces"


def test_ship_size_budget_counts_the_tracked_tree_with_the_new_model_card_and_plots(tmp_path, monkeypatch):
    import subprocess
    from pathlib import Path

    from export import ship
    repo = tmp_path / "repo"
    into = repo / "edge" / "models"
    into.mkdir(parents=True)
    (repo / "code.py").write_bytes(b"x" * 1000)
    (into / "age_int8.onnx").write_bytes(b"o" * 5000)  # an older model: replaced, not added to
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    candidate, plot = tmp_path / "age_int8.onnx", tmp_path / "curves.png"
    candidate.write_bytes(b"n" * 3000)
    plot.write_bytes(b"p" * 700)
    after = ship._check_budget(into, candidate, {"curves.png": plot, "missing.png": tmp_path / "none.png"})
    assert after == 1000 + 3000 + ship.CARD_BYTES + 700
    monkeypatch.setattr(ship, "TRACKED_BUDGET_BYTES", after - 1)
    with pytest.raises(ship.ShipError, match=r"^not shipped: the tracked tree would hold .* over the"):
        ship._check_budget(into, candidate, {"curves.png": plot})
    assert ship._check_budget(Path("/"), candidate, {}) is None  # outside a git checkout: said, not checked


@pytest.mark.timeout(120)
def test_a_worker_whose_detector_cannot_start_ends_the_load_in_one_line(tmp_path, monkeypatch, utkface):
    """A package missing in the worker processes (the GPU job's rehearsal: `onnx`) stopped nothing: the pool
    started a new worker for each one that failed, for ever. Now the first task says why, and the load ends."""
    import onnx  # noqa: F401 - this process keeps the real one; the spawned workers find the broken one first
    shadow = tmp_path / "shadow" / "onnx"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'onnx'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))  # spawned workers start from this sys.path
    labels = read_labels(utkface / "labels.csv")[:500]
    with pytest.raises(DataError) as caught:
        load_faces(utkface, labels, 32, 0.2, progress=False, workers=2)
    assert str(caught.value) == ("the face detector could not start in a worker process: "
                                 "ImportError: No module named 'onnx'")


def test_labels_that_are_not_utf8_or_name_no_file_are_one_line(tmp_path):
    """A UTF-16 or binary labels file raised UnicodeDecodeError; a NUL in a name a ValueError in the workers."""
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"file_name,real_age\n\xff\xfe.jpg,20\n")
    with pytest.raises(DataError, match=r"labels.csv: not UTF-8 text \(byte 19: b'\\xff'\): save it as CSV UTF-8"):
        read_labels(labels)
    labels.write_bytes(b"file_name,real_age\na\x00.jpg,20\n")
    with pytest.raises(DataError, match=r"labels.csv:2: bad row"):
        read_labels(labels)


def test_a_resumed_run_with_a_missing_or_edited_run_json_or_state_is_one_line(tmp_path):
    """KeyError, TypeError and JSONDecodeError tracebacks, some only after the faces were prepared."""
    import json

    from training.train import TrainError, read_state, saved_options
    with pytest.raises(TrainError, match="run.json is missing"):
        saved_options(tmp_path)
    for body, problem in [("{bad", "not valid JSON"), ("[]", 'no "options" object'),
                          ('{"options": {"data": "d", "colour": 1}}', "unknown option\\(s\\) 'colour'"),
                          ('{"options": {"epochs": 3}}', "options.data is missing"),
                          ('{"options": {"data": "d", "epochs": "3"}}', "options.epochs = \"3\" should be of type int"),
                          ('{"options": {"data": "d", "batch_size": true}}', "options.batch_size = true")]:
        (tmp_path / "run.json").write_text(body)
        with pytest.raises(TrainError, match=problem):
            saved_options(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"options": {"data": "d", "limit": None, "minutes": 2.5}}))
    assert saved_options(tmp_path) == {"test_fraction": 0.0, "data": "d", "limit": None, "minutes": 2.5}
    state = tmp_path / "state.json"
    for body in ("{bad", "[1]", '{"epoch": 1}', '{"epoch": -1, "best_val_mae": null, "best_epoch": null}'):
        state.write_text(body)
        with pytest.raises(TrainError, match="state.json"):
            read_state(state)
    state.write_text('{"epoch": 2, "best_val_mae": 5.5, "best_epoch": 1, "epoch_seconds": [3.0, 2.5]}')
    assert read_state(state)["epoch"] == 2


def test_inspect_of_a_folder_without_a_usable_face_reports_and_fails(tmp_path):
    """The report (and its plots) still tell what is wrong; the exit says it to a script: nothing to train on."""
    from tskit import tillsight
    (tmp_path / "labels.csv").write_text("file_name,real_age\na.jpg,20\nb.jpg,30\n")
    result = tillsight("data", "inspect", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "2 missing" in result.stdout, result.stderr
    assert result.stderr.strip() == f"tillsight: error: no face to train on in {tmp_path}: 2 missing, 0 unreadable, " \
                                    "0 with no face found"
    result = tillsight("data", "inspect", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert (result.returncode, result.stderr.strip()) == (2, f"tillsight: error: data folder not found: "
                                                             f"{tmp_path / 'nowhere'}")


def test_eval_that_scored_no_face_reports_and_fails_and_writes_no_residual_model(tmp_path, age_models):
    """A wrong --data folder, labels for other files or an empty split exited 0, and --residuals-into silently
    wrote nothing."""
    from tskit import tillsight
    (tmp_path / "labels.csv").write_text("file_name,real_age\na.jpg,20\nb.jpg,30\n")
    risky = tmp_path / "risky.onnx"
    common = ("eval", "--model", str(age_models[40]), "--data", str(tmp_path), "--residuals-into", str(risky))
    result = tillsight(*common, "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["n_scored"] == 0, result.stderr
    assert result.stderr.strip() == f"tillsight: error: no face to evaluate in {tmp_path} (--split all: 2 labelled " \
                                    "images): 2 missing, 0 unreadable, 0 with no face found"
    result = tillsight(*common, "--split", "test", "--test-fraction", "0")
    assert result.returncode == 1 and "0 scored" in result.stdout, result.stderr
    assert result.stderr.strip() == f"tillsight: error: no face to evaluate in {tmp_path} (--split test: 0 labelled " \
                                    "images): 0 missing, 0 unreadable, 0 with no face found"
    assert not risky.exists()


def test_the_validation_mae_is_per_face_when_the_last_batch_is_short():
    """It picks best.keras and goes into the model card: a short last batch counts for its faces, not as a full
    batch. 64 faces exact and 6 off by 40 years: 40 * 6 / 70 years, where a mean of batch means said 20."""
    from training import quiet_import
    keras = quiet_import("keras")
    from training.augment import CropBatches
    from training.model import MAX_AGE, DistributionLoss, expected_age_mae
    crops = keras.Input((4, 4, 3))
    thirty = keras.layers.Lambda(lambda x: keras.ops.one_hot(keras.ops.full((keras.ops.shape(x)[0],), 30, "int32"),
                                                            MAX_AGE + 1))(crops)
    model = keras.Model(crops, thirty)
    model.compile(loss=DistributionLoss(), metrics=[expected_age_mae])
    ages = np.array([30.0] * 64 + [70.0] * 6, np.float32)
    result = model.evaluate(CropBatches(np.zeros((70, 4, 4, 3), np.uint8), ages, 64, train=False), verbose=0,
                            return_dict=True)
    assert result["expected_age_mae"] == pytest.approx(40 * 6 / 70, rel=1e-5)


def test_a_validation_or_test_image_that_is_a_training_images_copy_is_left_out(tmp_path):
    """The split goes by file name; UTKFace holds some pictures under several names. A copy in validation or
    test would score a face the network was trained on."""
    from training.data import copies_of_training
    names = [f"face{i}.jpg" for i in range(200)]
    by_split = {s: [n for n in names if split_of(n, 0.2, 0.2) == s] for s in ("train", "val", "test")}
    picture, other = b"\xff\xd8 one picture", b"\xff\xd8 another"
    copies = {by_split["train"][0]: picture, by_split["val"][0]: picture, by_split["test"][0]: picture,
              by_split["val"][1]: other, by_split["test"][1]: other}  # `other` is in no training image
    for name, data in copies.items():
        (tmp_path / name).write_bytes(data)
    labels = [Label(name, 30.0) for name in copies]
    assert copies_of_training(tmp_path, labels, 0.2, 0.2) == {by_split["val"][0], by_split["test"][0]}


def test_the_risk_modes_operating_points_score_each_face_with_a_table_it_was_not_measured_on():
    """A minor whose own error is the only one that would flag them: in-sample their own residual puts them at
    risk; measured on the other faces (all estimated right), nothing does."""
    from training.evaluate import cross_fitted_risks, operating_points
    names = [f"f{i}.jpg" for i in range(400)]
    true = np.full(400, 30.0)
    predicted = true.copy()
    true[0] = 15.0  # a minor who looks 30
    risks = cross_fitted_risks(true, predicted, names)
    assert risks[0] == 0.0 and risks[1:].max() < 0.01
    points = operating_points(true, predicted, risks)["risk"]
    assert all(p["minors_flagged"] == 0.0 for p in points)


def test_a_resumed_run_shuffles_and_logs_as_the_uninterrupted_one(tmp_path):
    """Resumed at epoch 2: epoch 2's order (it had epoch 0's), and history.csv without the epochs that ran after
    the saved state (they run again)."""
    from training.augment import CropBatches
    from training.train import keep_history
    crops, ages = np.zeros((40, 4, 4, 3), np.uint8), np.arange(40, dtype=np.float32)
    uninterrupted = CropBatches(crops, ages, 8, train=True, seed=3)
    orders = []
    for _ in range(3):
        orders.append(uninterrupted.order.copy())
        uninterrupted.on_epoch_end()
    resumed = CropBatches(crops, ages, 8, train=True, seed=3)
    resumed.resume_at(2)
    assert np.array_equal(resumed.order, orders[2]) and not np.array_equal(orders[2], orders[0])
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,9.0\n1,8.0\n2,7.0\n3,6.5\n")
    keep_history(history, 2)
    assert history.read_text() == "epoch,loss\n0,9.0\n1,8.0\n"


def test_an_fp16_file_that_disagrees_with_fp32_is_no_export():
    from export.age import ExportError, check_fp16
    assert check_fp16({"path": "a.onnx", "max_abs_diff_vs_fp32": 0.11})["max_abs_diff_vs_fp32"] == 0.11
    with pytest.raises(ExportError, match=r"fp16 differs from fp32 by up to 4.200 years \(tolerance 1.0\); "
                                          r"a.onnx is not trustworthy"):
        check_fp16({"path": "a.onnx", "max_abs_diff_vs_fp32": 4.2})
    with pytest.raises(ExportError, match=r"up to nan years"):  # a face's estimate overflowed: NaN compares false
        check_fp16({"path": "a.onnx", "max_abs_diff_vs_fp32": float("nan")})


def test_an_onnx_file_that_disagrees_with_keras_is_no_export():
    from export.age import ExportError, check_parity
    check_parity(0.01, "a.onnx")
    with pytest.raises(ExportError, match=r"ONNX output differs from Keras by up to 0.300 years"):
        check_parity(0.3, "a.onnx")
    with pytest.raises(ExportError, match=r"up to nan years"):  # NaN passed the > check before
        check_parity(float("nan"), "a.onnx")
