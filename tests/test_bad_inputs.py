"""Files that are not what the daemon needs, given where it needs a video or an age model: one line and a
non-zero exit through the real command line, never a traceback. (A video of random bytes:
test_integration.test_corrupt_video_is_one_line; a corrupt face detector: test_cli.)"""

from __future__ import annotations

import json
import os
import random
import zipfile

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge.contract import build_constant_age_model, contract_metadata
from test_cli import one_line_error
from test_infer import model_answering
from test_integration import replay_config
from tskit import tillsight, write_config


@pytest.fixture(scope="module")
def avi_bytes(carphone_clip, tmp_path_factory) -> bytes:
    """The carphone clip as MJPEG in an AVI: unlike that MP4 (its index at the end), it plays until it is cut."""
    import cv2
    capture, path = cv2.VideoCapture(str(carphone_clip)), tmp_path_factory.mktemp("avi") / "clip.avi"
    writer = None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if writer is None:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, frame.shape[1::-1])
        writer.write(frame)
    writer.release()
    return path.read_bytes()


VIDEOS = {
    "mp4 cut after 20 kB": lambda mp4, avi: mp4[:20_000],
    "mp4 without its first 30 kB": lambda mp4, avi: mp4[30_000:],
    "avi cut in its header": lambda mp4, avi: avi[:5_000],
    "avi cut half way": lambda mp4, avi: avi[: len(avi) // 2],
    "text": lambda mp4, avi: b"hello, this is not a video\n",
    "empty": lambda mp4, avi: b"",
}


@pytest.mark.parametrize("kind", VIDEOS)
def test_a_truncated_or_non_video_camera_is_one_line(kind, tmp_path, broker, age_models, carphone_clip, avi_bytes):
    video = tmp_path / ("clip.avi" if "avi" in kind else "clip.mp4")
    video.write_bytes(VIDEOS[kind](carphone_clip.read_bytes(), avi_bytes))
    config = replay_config(tmp_path, broker.port, age_models[40])
    line = one_line_error(tillsight("replay", str(video), "--config", str(config), timeout=60))
    assert line.startswith("tillsight: error: camera replay: "), line


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".mp4"])
def test_a_photo_given_as_the_video_is_one_line_not_a_one_frame_replay(suffix, tmp_path, broker, age_models,
                                                                      two_people_photo):
    import cv2
    photo = tmp_path / f"till{suffix}"  # .mp4: a JPEG under a video's name is found out all the same
    photo.write_bytes(cv2.imencode(".png" if suffix == ".png" else ".jpg", cv2.imread(str(two_people_photo)))[1].tobytes())
    config = replay_config(tmp_path, broker.port, age_models[40])
    line = one_line_error(tillsight("replay", str(photo), "--config", str(config), timeout=60), code=2)
    assert line == (f"VIDEO: '{photo}' is a still image, not a video (`tillsight predict` ages the faces in a photo)")
    # a config naming it as a camera: refused by config check (--live opened it as a one-frame video and said OK)
    camera = write_config(tmp_path / "photo.toml", store_id="s", cameras=[{"id": "till-1", "source": str(photo)}])
    assert one_line_error(tillsight("config", "check", str(camera)), code=2) == (
        f"cameras.0.source: '{photo}' is a still image, not a video (`tillsight predict` ages the faces in a photo)")


def test_a_raw_mjpeg_recording_is_a_video_not_a_photo(tmp_path):
    """JPEGs one after another (an IP camera's MJPEG stream copied to a file) start like a photo, and are a video."""
    import cv2
    recording = tmp_path / "till.mjpeg"
    recording.write_bytes(b"".join(cv2.imencode(".jpg", np.full((48, 64, 3), 20 * i, np.uint8))[1].tobytes()
                                   for i in range(10)))
    camera = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "till-1", "source": str(recording)}])
    result = tillsight("config", "check", str(camera))
    assert result.returncode == 0, result.stderr


def test_a_folder_as_the_video_is_a_config_problem(tmp_path, broker, age_models):
    config = replay_config(tmp_path, broker.port, age_models[40])
    line = one_line_error(tillsight("replay", str(tmp_path), "--config", str(config), timeout=60), code=2)
    assert line == f"VIDEO: '{tmp_path}' is a folder, not a video file"  # the command line's, not a config key


def not_utf8(folder, name: bytes):
    """A path whose last name is Latin-1 bytes (as an old Windows machine writes 'caisse\xe9'), as Python gives it."""
    return folder / os.fsdecode(name)


def test_a_video_name_that_is_not_utf8_is_one_line_where_opencv_crashed(tmp_path, carphone_clip):
    """OpenCV's bindings segfault (exit 139) on such a name: in config check, replay, and bench (which left its
    broker and temporary folder behind)."""
    folder = not_utf8(tmp_path, b"caisse\xe9")  # a config's relative source is its folder's: a config check's path
    folder.mkdir()
    video = folder / "till.mp4"
    video.write_bytes(carphone_clip.read_bytes())
    why = f"{str(video)!r}: the name is not UTF-8 (OpenCV cannot open it): rename it"
    config = write_config(folder / "c.toml", store_id="s", cameras=[{"id": "till-1", "source": "till.mp4"}])
    assert one_line_error(tillsight("config", "check", str(config)), code=2) == f"cameras.0.source: {why}"
    assert one_line_error(tillsight("replay", str(video)), code=2) == f"VIDEO: {why}"
    result = tillsight("bench", "--video", str(video), "--skip-model-speed", "--out", str(tmp_path / "out"))
    assert one_line_error(result, code=2) == f"tillsight: error: --video {why}"


def test_predict_reads_a_photo_whose_name_is_not_utf8(tmp_path, two_people_photo, age_models):
    """Read by Python, not by OpenCV (which segfaulted on the name): the photo is answered as any other."""
    photo = not_utf8(tmp_path, b"client\xe9.jpg")
    photo.write_bytes(two_people_photo.read_bytes())
    result = tillsight("predict", str(photo), "--age-model", str(age_models[40]))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["image"] == str(photo) and len(body["faces"]) == 2


@pytest.mark.parametrize("options, line", [
    (["--port", "0"], "--port: input should be greater than or equal to 1"),  # was paho's ValueError traceback
    (["--store", "store-1/#"], "--store: must be 1 to 64 letters, digits, '_' or '-' (it becomes an MQTT topic level)"),
    (["--store", "+"], "--store: must be 1 to 64 letters, digits, '_' or '-' (it becomes an MQTT topic level)"),
    (["--prefix", "a//b"], "--prefix: must be topic levels of letters, digits, '_' or '-' joined by '/', "
                           "e.g. tillsight or acme/tillsight"),
])
def test_broker_options_of_status_and_pos_follow_the_configs_rules(options, line):
    """A wildcard in --store would have read every store's topics; checked before any connection is tried."""
    for command in (["status"], ["pos"]):
        arguments = [*command, "--store", "store-1", *options, *(["check", "--camera", "c"] if command == ["pos"] else [])]
        assert one_line_error(tillsight(*arguments), code=2) == f"tillsight: error: {line}"


def age_model_graph(input_shape, output_shape, axes=(1, 2, 3), input_type=TensorProto.FLOAT, input_size=64) -> bytes:
    """A valid ONNX model, contract metadata and all, whose input and output are the given shapes."""
    nodes, mean_of = [], "crops"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["crops"], ["float_crops"], to=TensorProto.FLOAT))
        mean_of = "float_crops"
    nodes.append(helper.make_node("ReduceMean", [mean_of], ["age"], axes=list(axes), keepdims=int(len(output_shape) == 4)))
    graph = helper.make_graph(nodes, "wrong_shape", [helper.make_tensor_value_info("crops", input_type, input_shape)],
                              [helper.make_tensor_value_info("age", TensorProto.FLOAT, output_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in contract_metadata(input_size, 0.4).items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


GOOD = build_constant_age_model(40, input_size=64)
CANNOT_LOAD, BREAKS = "cannot be loaded: ", "breaks the model contract: "
MODELS = {
    "truncated": (GOOD[: len(GOOD) // 2], CANNOT_LOAD),
    "last bytes missing": (GOOD[:-5], CANNOT_LOAD),
    "random bytes": (random.Random(0).randbytes(4096), CANNOT_LOAD),
    "empty": (b"", CANNOT_LOAD),
    "NCHW input": (age_model_graph(["N", 3, 64, 64], ["N"]),
                   "input shape ['N', 3, 64, 64] does not match [N, 64, 64, 3]"),
    "input size not the metadata's": (age_model_graph(["N", 32, 32, 3], ["N"]),
                                      "input shape ['N', 32, 32, 3] does not match [N, 64, 64, 3]"),
    "int32 input": (age_model_graph(["N", 64, 64, 3], ["N"], input_type=TensorProto.INT32),
                    "expected one float32 (or uint8) input of shape [N, S, S, 3]"),
    "output of rank 4": (age_model_graph(["N", 64, 64, 3], ["N", 1, 1, 1]),
                         "first output must be the age, shape [N] or [N, 1]"),
}


@pytest.fixture(scope="module")
def blank_photo(tmp_path_factory):
    """An image without faces: enough for a model that cannot even load."""
    import cv2
    path = tmp_path_factory.mktemp("photo") / "blank.jpg"
    cv2.imwrite(str(path), np.full((120, 160, 3), 128, np.uint8))
    return path


@pytest.mark.parametrize("kind", MODELS)
def test_a_broken_or_wrong_shape_age_model_is_one_line(kind, tmp_path, blank_photo):
    content, expected = MODELS[kind]
    model = tmp_path / "age.onnx"
    model.write_bytes(content)
    line = one_line_error(tillsight("predict", str(blank_photo), "--age-model", str(model), timeout=60))
    reason = expected if expected == CANNOT_LOAD else BREAKS + expected
    assert line.startswith(f"tillsight: error: age model {model} {reason}"), line


def test_a_wrong_shape_age_model_in_the_config_is_one_line(tmp_path, broker, carphone_clip):
    model = tmp_path / "age.onnx"
    model.write_bytes(MODELS["NCHW input"][0])
    config = replay_config(tmp_path, broker.port, model)
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config), timeout=60))
    assert line == f"tillsight: error: age model {model} {BREAKS}{MODELS['NCHW input'][1]}"


# Models the contract check once let through.
def test_a_model_with_a_batch_dimension_of_0_is_one_line(tmp_path, two_people_photo):
    model = tmp_path / "age.onnx"
    model.write_bytes(age_model_graph([0, 64, 64, 3], [0]))
    line = one_line_error(tillsight("predict", str(two_people_photo), "--age-model", str(model), timeout=60))
    assert line.startswith(f"tillsight: error: age model {model} ")


def test_a_model_with_three_ages_a_face_is_refused(tmp_path, two_people_photo):
    model = tmp_path / "age.onnx"
    model.write_bytes(age_model_graph(["N", 64, 64, 3], ["N", 3], axes=(1, 2)))
    line = one_line_error(tillsight("predict", str(two_people_photo), "--age-model", str(model), timeout=60))
    assert line.startswith(f"tillsight: error: age model {model} {BREAKS}")


def nan_age_model() -> bytes:
    """Follows the contract, loads, runs, and answers NaN: 0 * mean / 0."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["crops"], ["mean"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
         helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
         helper.make_node("Div", ["nothing", "zero"], ["age"])],
        "nan_age", [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", 64, 64, 3])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in contract_metadata(64, 0.4).items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def test_a_model_that_answers_nan_is_loud_not_a_room_of_adults(tmp_path, broker, two_people_photo, carphone_clip):
    model = tmp_path / "age.onnx"
    model.write_bytes(nan_age_model())
    line = one_line_error(tillsight("predict", str(two_people_photo), "--age-model", str(model), timeout=60))
    assert line == f"tillsight: error: age model {model} answered NaN or infinity for an age"
    config = replay_config(tmp_path, broker.port, model)
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config), timeout=60))
    assert line.startswith("tillsight: error: age model failed on ") and "answered NaN or infinity" in line


BROKEN_ANSWERS = {  # model_answering's arguments, and the end of the line predict says
    "one age for two faces": ((30, None, ("age",)),
                              "answered an age output of length 1 for 2 faces, not one age per face"),
    "1e30 years": ((1e30,), "answered 1e+30 years for an age, outside the [-50, 250] of any working age model"),
    "-1e30 years": ((-1e30,), "answered -1e+30 years for an age, outside the [-50, 250] of any working age model"),
    "a NaN spread": ((30, float("nan")), "answered NaN or infinity for an age_spread"),  # was "spread": NaN, no JSON
}


@pytest.mark.parametrize("broken", BROKEN_ANSWERS)
def test_a_model_that_answers_what_no_age_model_does_is_one_line_in_predict(broken, tmp_path, two_people_photo):
    arguments, said = BROKEN_ANSWERS[broken]
    model = model_answering(tmp_path / "age.onnx", *arguments)
    line = one_line_error(tillsight("predict", str(two_people_photo), "--age-model", str(model), timeout=60))
    assert line == f"tillsight: error: age model {model} {said}"


def test_a_model_that_answers_1e30_years_fails_the_model_check_and_the_replay_as_nan_does(tmp_path, broker,
                                                                                         carphone_clip):
    """It passed `config check --models`, and a replay published `"age": 1e+30`: an adult to every policy."""
    model = model_answering(tmp_path / "age.onnx", 1e30)
    config = replay_config(tmp_path, broker.port, model)
    result = tillsight("config", "check", "--models", str(config), timeout=120)
    assert one_line_error(result) == "tillsight: error: 1 of 2 model checks failed, first the age model"
    assert f"age model: FAILED: age model {model} answered 1e+30 years for an age" in result.stdout
    line = one_line_error(tillsight("replay", str(carphone_clip), "--config", str(config), timeout=60))
    assert line.startswith("tillsight: error: age model failed on ") and "answered 1e+30 years" in line


@pytest.mark.parametrize("arguments, line", [
    (["check", "--camera", "#"], "--camera '#': a camera id is 1 to 64 letters, digits, '_' or '-'"),  # a traceback
    (["check", "--camera", "till-1/x"], "--camera 'till-1/x': a camera id is 1 to 64 letters, digits, '_' or '-'"),
    (["check", "--camera", "till-1", "--item", "red wine"],
     "--item: 1 to 128 printable ASCII characters without spaces (as the daemon accepts them)"),
    (["check", "--camera", "till-1", "--timeout", "-1"], "--timeout -1 out of range [0.1, 3600]"),
    (["check", "--camera", "till-1", "--deadline", "30"], "--deadline 30 out of range [0.01, 10]"),
    (["transaction", "start", "--camera", "till-1", "--id", ""],  # was "sent", and dropped by the daemon
     "--id: 1 to 128 printable ASCII characters without spaces (as the daemon accepts them)"),
    (["watch", "--seconds", "-1"], "--seconds -1 out of range [0.1, 1e+07]"),
])
def test_pos_options_the_daemon_would_refuse_are_said_before_sending(arguments, line):
    result = tillsight("pos", "--port", "9", "--store", "store-1", *arguments)  # nothing listens on 9: never reached
    assert one_line_error(result, code=2) == f"tillsight: error: {line}"


@pytest.mark.parametrize("command", [["train", "--data", "."], ["data", "inspect", "."], ["eval", "--data", "."],
                                     ["bench", "--model-only"], ["export", "detector"], ["export", "x.keras"]])
def test_an_out_folder_that_is_a_file_is_one_line_before_any_work(command, tmp_path):
    """Each failed at its first write with a traceback (NotADirectoryError, FileExistsError)."""
    taken = tmp_path / "taken"
    taken.write_text("someone's file")
    out = taken / "x.onnx" if command == ["export", "detector"] else taken
    assert one_line_error(tillsight(*command, "--out", str(out)), code=2) == \
        f"tillsight: error: --out {out}: {taken} is a file, not a folder"
    assert taken.read_text() == "someone's file"


@pytest.mark.parametrize("command, option", [(["export", "detector"], "--out"),
                                             (["eval", "--data", "."], "--residuals-into")])
def test_a_folder_named_as_the_file_to_write_is_one_line_before_any_work(command, option, tmp_path):
    """`export detector --out DIR` converted, then raised IsADirectoryError; `eval --residuals-into DIR` only
    failed after the whole evaluation."""
    line = one_line_error(tillsight(*command, option, str(tmp_path)), code=2)
    assert line.startswith(f"tillsight: error: {option} {tmp_path}: a folder; name the .onnx file to write")


def test_ship_with_a_work_file_or_a_corrupt_run_json_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best.keras"
    checkpoint.write_bytes(b"")
    taken = tmp_path / "taken"
    taken.write_text("someone's file")
    line = one_line_error(tillsight("ship", str(checkpoint), "--data", str(tmp_path), "--work", str(taken)), code=2)
    assert line == f"tillsight: error: --work {taken}: {taken} is a file, not a folder"
    (run / "run.json").write_text('{"options": ')  # cut short
    line = one_line_error(tillsight("ship", str(checkpoint), "--data", str(tmp_path), timeout=120))
    assert line.startswith(f"tillsight: error: {run / 'run.json'}: cannot be read as the training run's JSON (")
    assert taken.read_text() == "someone's file"


@pytest.mark.filterwarnings("ignore:You are saving a model that has not yet been built")
def test_a_checkpoint_that_is_no_age_model_is_one_line_before_anything_is_written(tmp_path):
    """A Sequential saved before it was built had no `input` (AttributeError, a traceback); one with two outputs,
    or ten numbers a face, was exported into an ONNX file that every daemon then refused (the contract's age is
    [N] or [N, 1]). A built Sequential is exported as the same layers."""
    from export.age import ExportError, load_checkpoint
    from training import quiet_import
    keras = quiet_import("keras")
    face = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(face)
    foreign = {"unbuilt": (keras.Sequential([keras.layers.Dense(1)]), "no defined inputs"),
               "two_outputs": (keras.Model(face, [keras.layers.Dense(1)(pooled), keras.layers.Dense(1)(pooled)]),
                               "2 outputs"),
               "ten_numbers": (keras.Model(face, keras.layers.Dense(10)(pooled)), r"output shape \(10,\)")}
    for name, (model, found) in foreign.items():
        model.save(tmp_path / f"{name}.keras")
        with pytest.raises(ExportError, match=f"{name}.keras is not an age model: {found}, expected"):
            load_checkpoint(tmp_path / f"{name}.keras")
    built = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    built.save(tmp_path / "sequential.keras")
    loaded = load_checkpoint(tmp_path / "sequential.keras")
    assert tuple(loaded.input.shape) == (None, 32, 32, 3) and tuple(loaded.output.shape) == (None, 1)
    line = one_line_error(tillsight("export", str(tmp_path / "ten_numbers.keras"), "--crop-margin", "0.2",
                                    "--out", str(tmp_path / "out"), timeout=120))
    assert line.startswith("tillsight: error: checkpoint ") and "output shape (10,)" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_keras_checkpoint_that_is_no_zip_archive_is_said_damaged_not_missing(tmp_path):
    """Keras said "File not found: filepath=..." of a text file or a truncated download named .keras."""
    from export.age import ExportError, load_checkpoint
    text, truncated = tmp_path / "notes.keras", tmp_path / "truncated.keras"
    text.write_text("not a model\n")
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as archive:
        archive.writestr("config.json", "{}" * 4000)
    truncated.write_bytes((tmp_path / "whole.zip").read_bytes()[:3000])
    for checkpoint in (text, truncated):
        with pytest.raises(ExportError) as caught:
            load_checkpoint(checkpoint)
        assert str(caught.value) == f"checkpoint {checkpoint} is damaged or no Keras checkpoint: a .keras file is a " \
                                    f"zip archive, this is not one"


def test_ship_refuses_a_work_file_itself():
    """ship() unlinked <work>/ship.json first: NotADirectoryError."""
    from pathlib import Path

    from export.ship import ShipError, ShipOptions, ship
    with pytest.raises(ShipError, match="--work .*pyproject.toml: a file, not a folder"):
        ship(ShipOptions(checkpoint=Path("x.keras"), data=Path("."), work=Path("pyproject.toml")))


@pytest.mark.parametrize("table", ['{"bin_years":5,"residuals":[[NaN]]}', '{"bin_years":5,"residuals":[[1.0, Infinity]]}',
                                   '{"bin_years":5,"residuals":[]}', '{"bin_years":5,"residuals":[[1.0],[]]}'])
def test_a_residual_table_that_cannot_answer_is_no_table(table):
    """NaN said "never under age" (alerts silently off in risk mode), no rows an IndexError in the pipeline: risk
    mode now refuses such a model in one line, as one without a table."""
    from edge.config import PolicyConfig
    from edge.errors import ModelError
    from edge.policy import build_policy
    from edge.risk import KEY_RESIDUALS, ResidualTable
    assert ResidualTable.from_metadata({KEY_RESIDUALS: table}) is None
    with pytest.raises(ModelError, match=r'needs an age model that carries its measured errors \(its table cannot be used'):
        build_policy(PolicyConfig(mode="risk"), {KEY_RESIDUALS: table})
    assert ResidualTable.from_metadata({KEY_RESIDUALS: '{"bin_years":5,"residuals":[[1.0],[-2.5]]}'}) is not None
