"""inspect -> train -> resume -> export -> eval on a tiny UTKFace subset, on the CPU.

Small on purpose (40 faces, 64 px, batch 8, two epochs): it checks that every
step works and that the numbers are computed, not that the model is good.
"""

import csv
import json
import os
import time

import numpy as np
import onnx
import pytest

from edge.contract import build_constant_age_model
from tskit import tillsight

pytest.importorskip("keras", reason="the train extra is not installed")
pytest.importorskip("tf2onnx", reason="the train extra is not installed")
pytestmark = pytest.mark.timeout(900)

TINY = ["--limit", "40", "--input-size", "64", "--batch-size", "8"]
RECIPE = ["--label-sigma", "3", "--dropout", "0.3", "--oversample-minors", "2", "--augment", "strong"]  # the regularising options


@pytest.fixture(scope="module")
def run(tmp_path_factory, utkface):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    first = tillsight("train", "--data", str(utkface), "--out", str(run_dir), "--epochs", "1", *TINY, *RECIPE,
                      timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = tillsight("train", "--data", str(utkface), "--out", str(run_dir), "--resume", "--epochs", "2",
                        timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return run_dir, json.loads(first.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])


def test_inspect_reports_counts_and_writes_plots(tmp_path, utkface):
    result = tillsight("data", "inspect", str(utkface), "--limit", "60", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labelled"] == 60 and report["faces"] + len(report["no_face"]) == 60
    assert report["faces"] >= 55  # portrait padding: the detector finds nearly every UTKFace face
    assert sum(report["by_band"].values()) == 60 and sum(report["split"][k] for k in ("train", "val", "test")) == report["faces"]
    assert set(report["by_gender"]) <= {"male", "female"}
    for name in ("age_histogram.png", "sample_faces.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "60 labelled" in result.stdout


def test_training_writes_its_run_folder_and_resume_continues(run):
    run_dir, first, resumed = run
    assert first["epochs_done"] == 1 and resumed["epochs_done"] == 2
    split = first["split"]
    assert first["data"]["labelled"] == 40 and split["train"] + split["val"] + split["test"] == first["data"]["faces"]
    assert split["test_fraction"] == 0.1 and split["test"] >= 1  # held out: neither trained on nor choosing
    assert resumed["split"] == split  # resume keeps the split
    assert resumed["options"]["input_size"] == 64  # resume keeps the run's options
    recipe = {key: resumed["options"][key] for key in ("label_sigma", "dropout", "oversample_minors", "augment")}
    assert recipe == {"label_sigma": 3.0, "dropout": 0.3, "oversample_minors": 2, "augment": "strong"}
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["0", "1"]
    for name in ("checkpoints/best.keras", "checkpoints/last.keras", "curves.png", "summary.json", "run.json"):
        assert (run_dir / name).is_file(), name
    best = min(float(r["val_expected_age_mae"]) for r in history)
    assert resumed["best_val_mae"] == pytest.approx(best, rel=1e-5)


def test_a_finished_run_is_not_overwritten(run, utkface):
    run_dir, _, _ = run
    result = tillsight("train", "--data", str(utkface), "--out", str(run_dir), "--epochs", "1", *TINY)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        f"tillsight: error: {run_dir} already holds a run: pass --resume to continue it, or another --out"


def test_export_checks_parity_and_writes_the_variants(run, tmp_path, utkface):
    run_dir, _, _ = run
    out = tmp_path / "export"
    result = tillsight("export", str(run_dir / "checkpoints" / "best.keras"), "--out", str(out), "--fp16", "--int8",
                       "--calibration", str(utkface), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "export.json").read_text())
    assert report["fp32"]["max_abs_diff"] < 0.05 and report["parity_crops"] >= 2
    assert report["fp16"]["max_abs_diff_vs_fp32"] < 1.0 and "mae_change_vs_fp32" in report["int8"]
    model = onnx.load(out / "age.onnx")
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tillsight.contract"] == "1" and meta["tillsight.input_size"] == "64"
    assert meta["tillsight.crop_margin"] == "0.0" and meta["tillsight.head"] == "distribution"
    assert [o.name for o in model.graph.output] == ["age", "age_spread"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    # the channel flip is a Gather, not tf2onnx's ReverseSequence with shape nodes (kept on the CPU: no CUDA graphs)
    ops = {node.op_type for name in ("age.onnx", "age_fp16.onnx", "age_int8.onnx")
           for node in onnx.load(out / name).graph.node}
    assert "Gather" in ops and not ops & {"ReverseSequence", "Shape", "Expand"}, ops
    int8 = onnx.load(out / "age_int8.onnx")
    produced_by = {name: node for node in int8.graph.node for name in node.output}
    softmax = next(node for node in int8.graph.node if node.op_type == "Softmax")
    assert produced_by[softmax.input[0]].op_type != "DequantizeLinear"  # the head computes in float
    assert all(node.op_type not in ("QuantizeLinear", "DequantizeLinear")
               for node in int8.graph.node if softmax.output[0] in node.input)
    convolutions = [node for node in int8.graph.node if node.op_type == "Conv"]
    assert all(produced_by[node.input[0]].op_type == "DequantizeLinear" for node in convolutions)  # int8 backbone
    # the exported model serves: through eval, i.e. the daemon's detector, crop and AgeModel
    result = tillsight("eval", "--model", str(out / "age_int8.onnx"), "--data", str(utkface), "--limit", "12",
                       "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"n", "n_no_face", "mae", "mae_by_band", "challenge25", "mae_by_gender", "mae_by_race"}
    assert report["n"] == 12 and report["mae"] > 0


def test_ship_refuses_a_model_under_the_gates_and_ships_one_over_them_with_its_card(run, tmp_path, utkface):
    """`tillsight ship` on the tiny run: refused by the default gates (MAE ~14 years) without touching the
    model folder or the README, then shipped with loosened gates, reusing the first call's export."""
    import hashlib
    import shutil

    from edge.infer import AgeModel
    from tskit import REPO
    run_dir, _, _ = run
    work, into, readme = tmp_path / "work", tmp_path / "models", tmp_path / "README.md"
    into.mkdir()
    shutil.copy(REPO / "edge" / "models" / "README.md", into / "README.md")
    shutil.copy(REPO / "README.md", readme)
    before = {p: p.read_bytes() for p in (into / "README.md", readme)}
    common = [str(run_dir / "checkpoints" / "best.keras"), "--data", str(utkface), "--work", str(work),
              "--into", str(into), "--readme", str(readme), "--limit", "12", "--speed-seconds", "0.2"]

    refused = tillsight("ship", *common, timeout=600)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("tillsight: error: not shipped: int8 (weights and activations): int8 MAE ")
    assert "is not under 6.04 (the model it would replace)" in line and "; fp32's MAE is " in line
    assert line.endswith(f"(figures: {work / 'ship.json'})")
    assert sorted(p.name for p in into.iterdir()) == ["README.md"]
    assert all(path.read_bytes() == data for path, data in before.items())
    figures = json.loads((work / "ship.json").read_text())
    mae_gate = next(g for g in figures["gates"] if g["gate"] == "mae")
    assert figures["shipped"] is False and mae_gate["passed"] is False and mae_gate["value"] == figures["eval"]["mae"]
    assert [a["recipe"] for a in figures["attempts"]] == ["weights and activations"]  # fp32 itself is short: no more
    full_shift = figures["eval"]["agreement"]["max_abs_diff"]

    # a shift limit full int8 misses: the int8 weights with float maths are tried next, and ship
    loose = ["--max-mae", "100", "--max-int8-mae-change", "50"]
    shipped = tillsight("ship", *common, *loose, "--max-int8-shift", f"{0.9 * full_shift:.4f}", timeout=600)
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert "the export of this checkpoint is there already (export.json): reused" in shipped.stdout
    figures = json.loads((work / "ship.json").read_text())
    first, second = figures["attempts"]
    assert [g["gate"] for g in first["gates"] if not g["passed"]] == ["int8_shift"] and figures["recipe"] == "weights only"
    assert all(g["passed"] for g in second["gates"]) and figures["eval"]["agreement"]["max_abs_diff"] < full_shift
    assert "Full int8 was not good enough (int8 moves " in (into / "AGE.md").read_text()
    from edge.runtime import fold_int8_weights, session_options
    folded = fold_int8_weights(session_options(), into / "age_int8.onnx")  # folded at load: fp32's speed
    assert folded.get_session_config_entry("session.disable_quant_qdq") == "1"
    assert AgeModel.load(into / "age_int8.onnx", ["cpu"]).info.metadata["tillsight.quantization"] == "weights"
    unfolded = fold_int8_weights(session_options(), work / "onnx" / "age_int8.onnx")  # full int8 keeps its kernels
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        unfolded.get_session_config_entry("session.disable_quant_qdq")

    shipped = tillsight("ship", *common, *loose, "--max-int8-shift", "100", timeout=600)
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    figures = json.loads((work / "ship.json").read_text())
    report, mae = figures["eval"], figures["eval"]["mae"]
    assert report["split"] == "test"  # the run held out a test split: the shipped figures are measured on it
    assert figures["shipped"] is True and all(g["passed"] for g in figures["gates"])
    assert figures["recipe"] == "weights and activations" and len(figures["attempts"]) == 1
    assert "tillsight.quantization" not in AgeModel.load(into / "age_int8.onnx", ["cpu"]).info.metadata
    assert report["n"] == 12 and report["agreement"]["n"] == report["n_scored"] > 0
    assert next(g for g in figures["gates"] if g["gate"] == "int8_shift")["value"] == report["agreement"]["max_abs_diff"]
    assert set(figures["speed"]["faces_per_s"]) == {"fp32", "int8"} and min(figures["speed"]["faces_per_s"].values()) > 0
    model_file = into / "age_int8.onnx"
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == figures["file"]["sha256"]
    model = AgeModel.load(model_file, ["cpu"])  # the daemon's loader: the shipped file follows the contract
    meta = model.info.metadata
    assert "tillsight.residuals" in meta and "non-commercial research only" in meta["tillsight.licence"]
    assert meta["tillsight.measured"].startswith(f"MAE {mae:.2f} years on {report['n_scored']} ")
    from edge.demo import describe_model  # what `tillsight demo` prints about the model that answers
    assert f"; measured: MAE {mae:.2f} years" in describe_model(model)
    best = json.loads((run_dir / "summary.json").read_text())["best_val_mae"]
    assert describe_model(AgeModel.load(work / "onnx" / "age.onnx", ["cpu"])).endswith(
        f"; validation MAE {best:.3f} years")
    card = (into / "AGE.md").read_text()
    assert f"| MAE (years) | {report['n_scored']} | **{mae:.2f}** | {report['compared_with']['mae']:.2f} |" in card
    assert "**Licence: non-commercial research only.**" in card and "--input-size 64 --crop-margin 0.0" in card
    assert "--dropout 0.3 --augment strong --label-sigma 3.0 --oversample-minors 2 --val-fraction 0.1" in card
    late = list(csv.DictReader((run_dir / "history.csv").open()))[-20:]  # where training ended, beside the best epoch
    val_mae = next(c for c in late[0] if c.startswith("val_") and c.endswith("mae"))
    late_val = sum(float(r[val_mae]) for r in late) / len(late)
    assert f"over the last {len(late)} epochs the validation MAE averaged {round(late_val, 2):.2f} years" in card
    assert "the figures below are on the held-out test split, which chose nothing" in card
    assert f"on {report['n']} held-out test photos" in card and "--split test --val-fraction 0.1 --test-fraction 0.1" in card
    for name in ("curves.png", "error_by_band.png", "predicted_vs_true.png", "operating_points.png"):
        assert (into / "age-card" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `resnet50` |"))
    assert "`edge/models/age_int8.onnx`" in row and f"MAE {mae:.2f} years" in row
    assert "does not ship yet" not in text and text.count("<!-- /age-model -->") == 1  # the block stays rewritable
    assert f"MAE {mae:.2f} years" in (into / "README.md").read_text()


def test_eval_numbers_come_from_the_predictions(tmp_path, utkface):
    model = tmp_path / "thirty.onnx"
    model.write_bytes(build_constant_age_model(30, input_size=64, crop_margin=0.3))
    out = tmp_path / "eval"
    result = tillsight("eval", "--model", str(model), "--data", str(utkface), "--limit", "30", "--json",
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    from training.data import read_labels, select
    from training.metrics import BANDS
    by_name = {l.file_name: l.age for l in select(read_labels(utkface / "labels.csv"), 30)}
    assert report["n"] == 30 and report["n_scored"] == 30 - report["n_no_face"]
    # the faces it scored, with their true ages from labels.csv and the model's: the MAE is theirs (asserted
    # whether or not the detector missed a face)
    with (out / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == report["n_scored"] >= 25 and {r["file_name"] for r in rows} <= set(by_name)
    assert all(float(r["real_age"]) == by_name[r["file_name"]] and float(r["age"]) == pytest.approx(30) for r in rows)
    assert report["mae"] == pytest.approx(np.mean([abs(by_name[r["file_name"]] - 30) for r in rows]), abs=1e-3)
    assert report["challenge25"]["minors_13_17_flagged"] in (0.0, None)  # 30 is never under 25
    assert list(report["mae_by_band"]) == list(BANDS)
    for name in ("error_by_band.png", "predicted_vs_true.png", "eval.json"):
        assert (out / name).is_file()


def test_bad_inputs_are_one_line_errors(tmp_path, utkface):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = tillsight("export", str(bad), "--out", str(tmp_path / "o"), "--crop-margin", "0.3")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"tillsight: error: checkpoint {bad} is damaged or no Keras checkpoint: a .keras file is a zip archive, this "
        "is not one")
    result = tillsight("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert (result.returncode, result.stderr.strip()) == (2, f"tillsight: error: data folder not found: {tmp_path / 'nowhere'}")
    result = tillsight("train", "--data", str(utkface), "--out", str(tmp_path / "r"), "--val-fraction", "0.5",
                       "--test-fraction", "0.5")
    assert (result.returncode, result.stderr.strip()) == (2, "tillsight: error: --val-fraction 0.5 and --test-fraction "
                                                             "0.5 leave 5 % of the faces or fewer to train on")
    no_models = {**os.environ, "TILLSIGHT_MODEL_DIR": str(tmp_path / "empty-cache")}
    result = tillsight("eval", "--data", str(utkface), "--limit", "3", "--model", "light", env=no_models)
    assert result.returncode == 1 and "run `tillsight models fetch light`" in result.stderr.strip().splitlines()[-1]
    result = tillsight("ship", str(tmp_path / "run" / "best.keras"), "--data", str(utkface), "--into", str(tmp_path))
    assert (result.returncode, result.stderr.strip()) == (1, f"tillsight: error: checkpoint not found: "
                                                             f"{tmp_path / 'run' / 'best.keras'}")
    result = tillsight("ship", str(bad), "--data", str(utkface), "--into", str(tmp_path / "nowhere"))
    assert (result.returncode, result.stderr.strip()) == (1, f"tillsight: error: {tmp_path / 'nowhere'} is not a "
                                                             "folder: run from the repository root or pass --into "
                                                             "edge/models")
    # nothing is downloaded: ImageNet weights only from Keras' cache, and both checked before any work
    started = time.monotonic()
    result = tillsight("train", "--data", str(utkface), "--out", str(tmp_path / "w"), "--weights", "imagenet", *TINY,
                       env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"tillsight: error: ImageNet weights are not in Keras' cache ({tmp_path / 'keras'}/models/")
    result = tillsight("train", "--data", str(utkface), "--out", str(tmp_path / "w"), "--weights",
                       str(tmp_path / "typo.h5"), *TINY)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        1, f"tillsight: error: weights file not found: {tmp_path / 'typo.h5'}")
    assert time.monotonic() - started < 60  # no face was looked for
    assert not (tmp_path / "w").exists()


def test_a_mixed_precision_checkpoint_exports_as_float32(tmp_path, utkface):
    """GPU runs train in mixed_bfloat16; the fp32 export must still compute in float32."""
    import subprocess
    import sys

    from tskit import REPO
    checkpoint = tmp_path / "mixed.keras"
    build = ("import keras; keras.mixed_precision.set_global_policy('mixed_bfloat16'); "
             "from training.model import build_model; "
             f"build_model(64, 'distribution').save({str(checkpoint)!r})")
    subprocess.run([sys.executable, "-c", build], cwd=REPO, check=True, capture_output=True, timeout=300)
    out = tmp_path / "onnx"
    result = tillsight("export", str(checkpoint), "--out", str(out), "--crop-margin", "0.3",
                       "--calibration", str(utkface), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "export.json").read_text())["fp32"]["max_abs_diff"] < 1e-3
    model = onnx.load(out / "age.onnx")
    halves = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    assert not [n for n in model.graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i in halves for a in n.attribute)]
    assert all(t.data_type not in halves for t in model.graph.initializer)


def test_the_face_cache_of_a_run_folder_is_made_anew_for_other_data_or_limit(tmp_path, utkface):
    """A run folder reused (a crashed first run, then another --limit) must not train on the old faces."""
    from training.train import TrainOptions, prepare_faces
    opts = TrainOptions(data=str(utkface), out=str(tmp_path), input_size=64, crop_margin=0.0, limit=6, workers=1)
    first, _ = prepare_faces(opts, tmp_path)
    again, _ = prepare_faces(opts, tmp_path)  # the cache
    assert [l.file_name for l in again.labels] == [l.file_name for l in first.labels]
    more, counts = prepare_faces(TrainOptions(**{**opts.__dict__, "limit": 9}), tmp_path)
    assert counts["labelled"] == 9 and len(more.labels) > len(first.labels)
