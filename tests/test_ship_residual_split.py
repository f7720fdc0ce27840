"""`tillsight ship`: the risk policy's table the model serves is measured on validation, and the risk mode's
operating points the model card reports score the held-out test faces with that very table.

Fast on purpose: no Keras. A stand-in run folder and the export a previous `ship` of its checkpoint would have
left (ship reuses it, by checksum), holding a tiny ONNX age model whose answer depends on the face (a tenth of the
mean pixel plus 15 years: residuals differ face by face and split by split). The oracle rebuilds the faces from
the data rules (training/data.py) and scores them with the daemon's `AgeModel`.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edge.contract import contract_metadata
from edge.infer import AgeModel
from edge.risk import KEY_RESIDUALS, ResidualTable
from training.data import (Label, copies_of_training, iter_image_bytes, load_face_sets, read_labels, select,
                           split_of)

pytestmark = pytest.mark.timeout(600)
LIMIT = 60
VAL_FRACTION = 0.1


def _mean_pixel_age_model(input_size: int = 64) -> bytes:
    """A contract-following ONNX model answering 15 + mean pixel / 10 years."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["crops"], ["mean"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
         helper.make_node("Add", ["scaled", "offset"], ["age"])],
        "mean_pixel_age",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", input_size, input_size, 3])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
         helper.make_tensor("offset", TensorProto.FLOAT, [], [15.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tillsight-test")
    model.ir_version = 8
    for key, value in contract_metadata(input_size, 0.0, head="regression").items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _stand_in_run(root: Path, data: Path, test_fraction: float) -> tuple[Path, Path]:
    """(checkpoint, work): a run folder as `tillsight train` leaves it, and the export of its checkpoint."""
    from export.age import file_sha256
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best.keras"
    checkpoint.write_bytes(b"stand-in: ship reuses the export of this file's sha256")
    options = {"data": str(data), "input_size": 64, "crop_margin": 0.0, "head": "regression", "weights": "none",
               "epochs": 1, "batch_size": 8, "val_fraction": VAL_FRACTION, "test_fraction": test_fraction,
               "limit": 400, "seed": 0}
    split = {"val_fraction": VAL_FRACTION, "test_fraction": test_fraction, "train": 320, "val": 40,
             "test": 40 if test_fraction else 0}
    (run / "run.json").write_text(json.dumps({"options": options, "data": {"labelled": 400, "faces": 400},
                                              "split": split, "device": {}}))
    work = root / "work"
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True)
    model = _mean_pixel_age_model()
    rows = {}
    for kind, name in (("fp32", "age.onnx"), ("fp16", "age_fp16.onnx"), ("int8", "age_int8.onnx")):
        (onnx_dir / name).write_bytes(model)
        rows[kind] = {"path": str(onnx_dir / name), "size_bytes": len(model)}
    rows["int8"]["calibration_crops"] = 0
    (onnx_dir / "export.json").write_text(json.dumps({"checkpoint": str(checkpoint),
                                                      "checkpoint_sha256": file_sha256(checkpoint),
                                                      "calibration": str(data), **rows,
                                                      # as an export records what it wrote, for ship to reuse
                                                      "files": {name: file_sha256(onnx_dir / name) for name in
                                                                ("age.onnx", "age_fp16.onnx", "age_int8.onnx")}}))
    return checkpoint, work


def _ship(tmp_path: Path, data: Path, test_fraction: float, labels: Path | None = None) -> tuple[dict, Path]:
    from export.ship import ShipOptions, ship
    checkpoint, work = _stand_in_run(tmp_path, data, test_fraction)
    into = tmp_path / "models"
    into.mkdir()
    opts = ShipOptions(checkpoint=checkpoint, data=data, work=work, into=into, readme=None, labels=labels,
                       limit=LIMIT, max_mae=100, max_int8_mae_change=50, max_int8_shift=100, speed_seconds=0.1)
    return ship(opts), into


def _scored(model: AgeModel, data: Path, labels: list[Label]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, true ages, estimates) of the faces found, through the daemon's detector, crop and AgeModel."""
    (faces,) = load_face_sets(data, labels, [model.info.crop], progress=False)
    return ([l.file_name for l in faces.labels], faces.ages.astype(np.float64),
            np.array([e.age for e in model.predict(faces.crops)], np.float64))


def _split(pool: list[Label], split: str, test_fraction: float, leave_out: set[str]) -> list[Label]:
    return [l for l in pool if split_of(l.file_name, VAL_FRACTION, test_fraction) == split
            and l.file_name not in leave_out]


def _pct(share) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def test_ship_serves_a_validation_table_and_reports_the_risk_mode_on_test_faces_with_it(tmp_path, utkface):
    from training.evaluate import cross_fitted_risks, operating_points
    figures, into = _ship(tmp_path, utkface, 0.1)
    assert figures["shipped"] is True and figures["eval"]["split"] == "test"
    shipped = AgeModel.load(into / "age_int8.onnx", ["cpu"])
    served = ResidualTable.from_metadata(shipped.info.metadata)

    # the oracle: validation and test as the data rules make them, without copies of training photos, and
    # validation without the pictures that are a test photo's too (the table would hold that face's own error)
    pool = read_labels(utkface / "labels.csv")
    copies = copies_of_training(utkface, pool, VAL_FRACTION, 0.1)
    val, test = _split(pool, "val", 0.1, copies), _split(pool, "test", 0.1, copies)
    digests = {name: hashlib.sha1(data).digest()
               for name, data in iter_image_bytes(utkface, {l.file_name for l in val + test})}
    in_test = {digests[l.file_name] for l in test}
    val = [l for l in val if digests[l.file_name] not in in_test]
    _, val_ages, val_predicted = _scored(shipped, utkface, select(val, LIMIT))
    test_names, test_ages, test_predicted = _scored(shipped, utkface, select(test, LIMIT))
    from_val = ResidualTable.measure(val_predicted, val_ages)
    from_test = ResidualTable.measure(test_predicted, test_ages)
    assert from_val != from_test  # the check below can tell them apart
    assert served == from_val and served != from_test
    assert shipped.info.metadata[KEY_RESIDUALS] == from_val.to_metadata()

    report = figures["eval"]
    assert report["n_scored"] == len(test_ages) and report["mae"] == pytest.approx(
        np.mean(np.abs(test_predicted - test_ages)), abs=1e-3)  # the reported figures: the test faces
    table = report["residual_table"]
    assert table["split"] == "val" and table["n_scored"] == len(val_ages) and table["n"] == LIMIT
    risks = [from_val.probability_under(p, 18.0) for p in test_predicted]
    expected = operating_points(test_ages, test_predicted, risks)
    points = report["operating_points"]
    assert points["risk"] == expected["risk"] and points["challenge_age"] == expected["challenge_age"]
    crossed = operating_points(test_ages, test_predicted, cross_fitted_risks(test_ages, test_predicted, test_names))
    assert points["risk"] != crossed["risk"]  # not what cross-fitting on the test faces (the old way) reports
    assert points["risk_table"] == f"the table of {len(val_ages)} validation faces"
    eval_json = json.loads((Path(figures["eval_dir"]) / "eval.json").read_text())
    assert eval_json["operating_points"] == points  # what the plot in the card was drawn from

    card = (into / "AGE.md").read_text()
    assert f"its errors measured on {len(val_ages)} validation faces are in the metadata" in card
    assert f"the table in the file was measured on {len(val_ages)} validation faces" in card
    assert "score the held-out test faces with that very table, as the daemon serves it, so they are out of " \
           "sample" in card
    low, high = [p for p in expected["risk"] if p["setting"] in (0.0173, 0.0224)]  # around the default 2 %
    assert (f"13–17-year-olds flagged and adults 25+ challenged at a maximum risk of 1.7 %: "
            f"{_pct(low['minors_flagged'])} and {_pct(low['adults_challenged'])}; at 2.2 %: "
            f"{_pct(high['minors_flagged'])} and {_pct(high['adults_challenged'])}.") in card


def test_ship_without_a_test_split_measures_and_cross_fits_on_validation_and_says_so(tmp_path, utkface):
    figures, into = _ship(tmp_path, utkface, 0.0)
    assert figures["shipped"] is True and figures["eval"]["split"] == "val"
    shipped = AgeModel.load(into / "age_int8.onnx", ["cpu"])
    pool = read_labels(utkface / "labels.csv")
    val = _split(pool, "val", 0.0, copies_of_training(utkface, pool, VAL_FRACTION, 0.0))
    _, ages, predicted = _scored(shipped, utkface, select(val, LIMIT))
    assert ResidualTable.from_metadata(shipped.info.metadata) == ResidualTable.measure(predicted, ages)
    report = figures["eval"]
    assert "residual_table" not in report and report["n_scored"] == len(ages)
    assert report["operating_points"]["risk_table"] == "cross-fitted: each half of the faces scored with the other's"
    card = (into / "AGE.md").read_text()
    assert f"the table in the file was measured on these {len(ages)} validation faces: the run holds no test " \
           "split" in card
    assert "So the operating points (plot) are cross-fitted" in card


def test_ship_refuses_when_no_validation_face_can_measure_the_table(tmp_path, utkface):
    """Labels without a validation photo (a hand-made labels file): the table would be empty, and risk mode would
    refuse the shipped model; ship refuses it first, in one line."""
    from export.ship import ShipError
    pool = read_labels(utkface / "labels.csv")
    test = [l for l in pool if split_of(l.file_name, VAL_FRACTION, 0.1) == "test"][:8]
    labels = tmp_path / "labels.csv"
    labels.write_text("file_name,real_age\n" + "".join(f"{l.file_name},{l.age:g}\n" for l in test))
    with pytest.raises(ShipError, match=r"^not shipped: no face found in the 0 validation photos: the risk "
                                        r"policy's table cannot be measured$"):
        _ship(tmp_path, utkface, 0.1, labels=labels)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []


def test_validation_photos_that_are_a_test_photos_copy_are_found(tmp_path):
    from training.evaluate import copies_among
    for name, data in (("v1.jpg", b"one"), ("v2.jpg", b"two"), ("t1.jpg", b"one"), ("t2.jpg", b"three")):
        (tmp_path / name).write_bytes(data)
    assert copies_among(tmp_path, ["v1.jpg", "v2.jpg", "gone.jpg"], ["t1.jpg", "t2.jpg"]) == {"v1.jpg"}
