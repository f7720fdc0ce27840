import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.contract import build_constant_age_model, contract_metadata
from edge.errors import ModelError
from edge.infer import AgeBatcher, AgeModel


def test_constant_model_answers_its_age_for_every_crop(age_models):
    model = AgeModel(age_models[16])
    assert model.info.input_size == 64 and model.info.fixed_batch is None
    assert [e.age for e in model.predict(np.zeros((5, 64, 64, 3), np.uint8))] == [16.0] * 5
    assert model.providers[-1] == "CPUExecutionProvider"


def test_fixed_batch_model_is_fed_in_padded_chunks(tmp_path):
    path = tmp_path / "fixed.onnx"
    path.write_bytes(build_constant_age_model(33, input_size=32, fixed_batch=4))
    model = AgeModel(path)
    assert model.info.fixed_batch == 4
    assert [e.age for e in model.predict(np.zeros((6, 32, 32, 3), np.uint8))] == [33.0] * 6


def _model_with_spread(path, input_size=32):
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["age"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Mul", ["age", "tenth"], ["age_spread"])],
        "mean_pixel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", input_size, input_size, 3])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("age_spread", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("tenth", TensorProto.FLOAT, [], [0.1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in contract_metadata(input_size, 0.3).items():
        model.metadata_props.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())
    return path


def test_age_depends_on_the_crop_and_spread_output_is_read(tmp_path):
    model = AgeModel(_model_with_spread(tmp_path / "mean.onnx"))
    crops = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (10, 50)])
    estimates = model.predict(crops)
    assert [e.age for e in estimates] == pytest.approx([10, 50])
    assert [e.spread for e in estimates] == pytest.approx([1, 5])


def saved_with_contract(graph, path: Path) -> Path:
    """A graph of 64-px crops saved as a contract-following age model."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in contract_metadata(64, 0.4).items():
        model.metadata_props.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path


def model_answering(path: Path, age: float, spread: float | None = None, one_row: tuple[str, ...] = ()) -> Path:
    """A contract-following model that answers `age` (and `spread` as age_spread) for every crop, as a broken
    model would: any value, NaN included; the outputs named in `one_row` answer one value for the whole batch."""
    nodes = [helper.make_node("ReduceMean", ["crops"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),  # [N]: the answers depend on the crops
             helper.make_node("ReduceMean", ["nothing"], ["one_row"], axes=[0], keepdims=1)]  # [1]
    outputs, constants = [], [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    for name, value in (("age", age), ("age_spread", spread)):
        if value is not None:
            shape = "one_row" if name in one_row else "nothing"
            nodes.append(helper.make_node("Add", [shape, f"{name}_value"], [name]))
            constants.append(helper.make_tensor(f"{name}_value", TensorProto.FLOAT, [], [value]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "answering", [helper.make_tensor_value_info(
        "crops", TensorProto.FLOAT, ["N", 64, 64, 3])], outputs, constants)
    return saved_with_contract(graph, path)


@pytest.mark.parametrize("one_row, output", [(("age",), "age"), (("age_spread",), "age_spread")])
def test_an_output_of_one_row_for_a_batch_is_a_model_error_not_a_reshape_traceback(tmp_path, one_row, output):
    """numpy's `cannot reshape array` reached predict and eval as a traceback (the daemon's batcher caught it)."""
    model = AgeModel(model_answering(tmp_path / "age.onnx", 30, 5, one_row))
    assert [(e.age, e.spread) for e in model.predict(np.zeros((1, 64, 64, 3), np.uint8))] == [(30, 5)]
    with pytest.raises(ModelError, match=rf"^age model \S+ answered an {output} output of length 1 for 2 faces, "
                                         rf"not one {output} per face$"):
        model.predict(np.zeros((2, 64, 64, 3), np.uint8))


@pytest.mark.parametrize("age", [1e30, -1e30, 250.5, -50.5])
def test_an_age_no_working_model_answers_is_a_model_error_as_nan_is(tmp_path, age):
    """1e30 was served as an adult, -1e30 as a minor, without a complaint from predict, replay or the model check."""
    model = AgeModel(model_answering(tmp_path / "age.onnx", age))
    with pytest.raises(ModelError, match=rf"^age model \S+ answered {re.escape(f'{age:g}')} years for an age, "
                                         r"outside the \[-50, 250\] of any working age model$"):
        model.predict(np.zeros((3, 64, 64, 3), np.uint8))


@pytest.mark.parametrize("age", [-3.5, 0, 121, -50, 250])
def test_an_odd_but_possible_age_is_served(tmp_path, age):
    """A regression head is not clamped: a baby a little under 0, an odd crop over 100."""
    model = AgeModel(model_answering(tmp_path / "age.onnx", age))
    assert [e.age for e in model.predict(np.zeros((2, 64, 64, 3), np.uint8))] == [age, age]


def test_missing_corrupt_and_contract_breaking_models_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match=r"^age model not found: "):
        AgeModel(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelError) as caught:
        AgeModel(corrupt)
    assert str(caught.value).startswith(f"age model {corrupt} cannot be loaded: ") and "\n" not in str(caught.value)
    bare = tmp_path / "bare.onnx"
    model = onnx.load_from_string(build_constant_age_model(20))
    del model.metadata_props[:]
    bare.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="breaks the model contract: metadata tillsight.contract=None"):
        AgeModel(bare)


def test_batcher_gathers_crops_from_several_cameras_into_one_call(age_models):
    model = AgeModel(age_models[40])
    batcher = AgeBatcher(model, max_batch=32, max_wait_ms=500, producers=4)
    crops = np.zeros((2, 64, 64, 3), np.uint8)
    barrier = threading.Barrier(4)
    results = [None] * 4

    def camera(i):
        barrier.wait()
        results[i] = batcher.submit(crops).result(timeout=10)

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert all(len(r) == 2 and r[0].age == 40 for r in results)
    # all four cameras waited together: the batch closed when every producer had a request in,
    # well before the 500 ms deadline, in one session call of 8 crops
    assert batcher.stats.calls == 1 and batcher.stats.max_batch_seen == 8


def model_ageing_brightness(path: Path, years_per_level: float) -> Path:
    """A contract-following model whose age is a crop's mean pixel times `years_per_level`: a black crop 0 years,
    a white one whatever is absurd."""
    nodes = [helper.make_node("ReduceMean", ["crops"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Mul", ["mean", "scale"], ["age"])]
    graph = helper.make_graph(nodes, "brightness", [helper.make_tensor_value_info("crops", TensorProto.FLOAT,
                                                                                   ["N", 64, 64, 3])],
                              [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [years_per_level])])
    return saved_with_contract(graph, path)


def test_an_absurd_age_for_one_face_fails_only_its_own_frame_not_the_other_cameras_in_the_batch(tmp_path):
    """The check of ages against HUMAN_AGES failed the whole call: one camera's odd crop took every camera's
    estimates of that batch with it."""
    model = AgeModel(model_ageing_brightness(tmp_path / "brightness.onnx", 10.0))  # white: 2550 years
    batcher = AgeBatcher(model, max_batch=32, max_wait_ms=2000, producers=3)
    black, white = np.zeros((1, 64, 64, 3), np.uint8), np.full((1, 64, 64, 3), 255, np.uint8)
    futures = [batcher.submit(np.concatenate([black, black])), batcher.submit(np.concatenate([black, white])),
               batcher.submit(black)]
    assert [e.age for e in futures[0].result(timeout=10)] == [0.0, 0.0]
    with pytest.raises(ModelError, match=r"answered 2550 years for an age, outside the \[-50, 250\]"):
        futures[1].result(timeout=10)
    assert [e.age for e in futures[2].result(timeout=10)] == [0.0]
    assert batcher.stats.calls == 1 and batcher.stats.errors == 1  # one call for the three, said as a failure
    assert batcher.stats.failing.startswith(f"age model {model.path} answered 2550 years")
    assert [e.age for e in batcher.submit(black).result(timeout=10)] == [0.0]
    batcher.close()
    assert batcher.stats.failing is None  # a clean call: it works again
    with pytest.raises(ModelError, match="answered 2550 years"):  # predict and eval: a model error, as before
        model.predict(white)


def test_by_default_a_lone_face_is_not_kept_waiting_and_what_queues_during_a_call_is_the_next_batch(age_models):
    """max_wait_ms 0 (the default): waiting for other cameras bought nothing on a till PC and cost latency."""
    model = AgeModel(age_models[40])
    batcher = AgeBatcher(model, max_batch=32, producers=4)
    assert batcher.max_wait_s == 0
    inside, release, sizes = threading.Event(), threading.Event(), []
    real = model.predict

    def slow_predict(crops):
        sizes.append(len(crops))
        inside.set()
        release.wait(10)
        return real(crops)

    model.predict = slow_predict
    crops = np.zeros((1, 64, 64, 3), np.uint8)
    first = batcher.submit(crops)  # alone: called at once, though 4 cameras are registered
    assert inside.wait(5) and sizes == [1]
    queued = [batcher.submit(crops) for _ in range(3)]  # while that call runs
    release.set()
    assert [len(f.result(timeout=10)) for f in [first] + queued] == [1, 1, 1, 1]
    batcher.close()
    assert sizes == [1, 3] and batcher.stats.calls == 2


def test_a_warm_up_that_arrives_while_a_batch_gathers_runs_after_it(age_models):
    batcher = AgeBatcher(AgeModel(age_models[40]), max_batch=32, max_wait_ms=2000, producers=2)
    pending = batcher.submit(np.zeros((1, 64, 64, 3), np.uint8))  # gathering: waits for the second camera
    time.sleep(0.1)
    assert batcher.warm_up() == 0.0 and len(pending.result(timeout=1)) == 1  # not the 2 s deadline
    assert batcher.alive() and len(batcher.submit(np.zeros((1, 64, 64, 3), np.uint8)).result(timeout=5)) == 1
    batcher.close()
    with pytest.raises(ModelError, match="^the age batcher stopped before the model's warm-up ran$"):
        batcher.warm_up()  # a one-line error, not a daemon that hangs at start


def test_batcher_respects_max_batch(age_models):
    batcher = AgeBatcher(AgeModel(age_models[40]), max_batch=3, max_wait_ms=0, producers=1)
    estimates = batcher.submit(np.zeros((7, 64, 64, 3), np.uint8)).result(timeout=10)
    batcher.close()
    assert len(estimates) == 7 and batcher.stats.max_batch_seen == 3


def test_batcher_does_not_wait_for_absent_producers_beyond_the_deadline(age_models):
    batcher = AgeBatcher(AgeModel(age_models[40]), max_batch=32, max_wait_ms=20, producers=3)
    assert len(batcher.submit(np.zeros((1, 64, 64, 3), np.uint8)).result(timeout=2)) == 1
    batcher.close()


def _variants(folder, ages: dict) -> None:
    """age.onnx, age_fp16.onnx, age_int8.onnx answering different ages, so a test sees which one answers."""
    for variant, age in ages.items():
        name = {"fp32": "age.onnx", "fp16": "age_fp16.onnx", "int8": "age_int8.onnx"}[variant]
        (folder / name).write_bytes(build_constant_age_model(age, input_size=32))


def test_the_precision_suits_the_provider_int8_on_a_cpu(tmp_path):
    from edge.tiers import AgeModelChoice, pick_variant
    _variants(tmp_path, {"fp32": 30, "fp16": 31, "int8": 32})
    shipped = AgeModelChoice(tmp_path / "age.onnx", "resnet50")
    assert pick_variant(shipped, "auto", on_gpu=False).path.name == "age_int8.onnx"
    assert pick_variant(shipped, "auto", on_gpu=True).path.name == "age_fp16.onnx"
    assert pick_variant(shipped, "fp32", on_gpu=False).path.name == "age.onnx"
    (tmp_path / "age_int8.onnx").unlink()
    assert pick_variant(shipped, "auto", on_gpu=False) == shipped  # fp32 is the fallback
    mine = AgeModelChoice(tmp_path / "age.onnx", "file")
    assert pick_variant(mine, "auto", on_gpu=True) == mine  # a file the user named is served as it is
    assert pick_variant(mine, "fp16", on_gpu=False).path.name == "age_fp16.onnx"  # unless a variant is named
    with pytest.raises(ModelError, match="age model variant int8 not found: .*age_int8.onnx .export writes it with --int8."):
        pick_variant(mine, "int8", on_gpu=False)


def test_a_resnet50_shipped_only_as_int8_is_found_and_served(tmp_path, monkeypatch):
    """The fp32 ResNet50 (~95 MB) cannot ship in the repository; its int8 variant (~25 MB) can, alone."""
    from edge import tiers
    _variants(tmp_path, {"int8": 32})
    monkeypatch.setattr(tiers, "SHIPPED_AGE_MODEL", tmp_path / "age.onnx")
    assert tiers.resnet50_ships() and tiers.resolve_age_model("auto").tier == "resnet50"
    for on_gpu in (False, True):
        assert tiers.pick_variant(tiers.resolve_age_model("resnet50"), "auto", on_gpu).path.name == "age_int8.onnx"
    model = AgeModel.load("auto", ["cuda", "cpu"])
    assert model.describe()["tier"] == "resnet50" and model.describe()["variant"] == "int8"
    assert [e.age for e in model.predict(np.zeros((1, 32, 32, 3), np.uint8))] == [32.0]
    (tmp_path / "age_int8.onnx").unlink()
    assert not tiers.resnet50_ships()


def test_a_named_variant_really_answers_and_says_so(tmp_path):
    _variants(tmp_path, {"fp32": 30, "fp16": 31, "int8": 32})
    model = AgeModel.load(str(tmp_path / "age.onnx"), ["cpu"], variant="int8")
    assert [e.age for e in model.predict(np.zeros((2, 32, 32, 3), np.uint8))] == [32.0, 32.0]
    assert model.describe()["variant"] == "int8" and model.describe()["provider"] == "CPUExecutionProvider"


def test_sessions_run_without_spinning_and_with_the_threads_asked(age_models):
    from edge.runtime import session_options
    options = session_options(threads=1, spinning=False)
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    model = AgeModel(age_models[16], ["cpu"], threads=1)
    assert [e.age for e in model.predict(np.zeros((3, 64, 64, 3), np.uint8))] == [16.0] * 3


_LOAD_RSS = """
import onnx
from onnx import numpy_helper
from edge.infer import AgeModel
from edge.tiers import SHIPPED_AGE_MODEL, variant_of
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
weights = onnx.load(str(variant_of(SHIPPED_AGE_MODEL, "int8"))).graph.initializer
float_mb = sum(numpy_helper.to_array(w).size for w in weights) * 4 / 2**20  # every weight as float32
del weights
before = rss_mb()
model = AgeModel.load("resnet50", ["cpu"])
print(model.describe()["variant"], round(rss_mb() - before, 1), round(float_mb, 1))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_the_shipped_resnet50_holds_its_float_weights_not_the_copies_made_while_loading():
    """Its int8 weights become 95 MB of float at load; building the session also makes copies it then frees.
    Those went back to the system only with edge/runtime.py `return_freed_memory`: 275 MB held before, ~110 after,
    for 95 MB of float weights: the bound is relative, for other ONNX Runtime and glibc versions."""
    from edge.tiers import resnet50_ships
    if not resnet50_ships():
        pytest.skip("the trained ResNet50 is not in edge/models")
    out = subprocess.run([sys.executable, "-c", _LOAD_RSS], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    variant, grown_mb, float_mb = out.stdout.split()
    assert variant == "int8" and 0.8 * float(float_mb) < float(grown_mb) < 1.8 * float(float_mb), out.stdout


def test_on_a_gpu_calls_are_padded_to_a_few_batch_sizes_each_run_once_before_the_first_customer(tmp_path,
                                                                                                monkeypatch):
    model = AgeModel(_model_with_spread(tmp_path / "mean.onnx"), ["cpu"])
    assert model.warm_up_sizes(8) == [] and model.warm_up(8) == 0.0  # a CPU has no first-call preparation
    assert model.batch_sizes is None
    # the provider's name alone is made a GPU's: the session that runs is the real (CPU) one
    monkeypatch.setattr(AgeModel, "providers", property(lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert model.warm_up_sizes(32) == [1, 2, 4, 8, 16, 32] and model.warm_up_sizes(12) == [1, 2, 4, 8, 12]
    ran = []
    real_run = model._run
    monkeypatch.setattr(model, "_run", lambda chunk, *session: ran.append(len(chunk)) or real_run(chunk, *session))
    assert model.warm_up(12) > 0 and ran == [1, 2, 4, 8, 12] and model.batch_sizes == [1, 2, 4, 8, 12]
    # a session per size: the CUDA provider prepares again whenever a call's shape differs from the previous one's
    # (about 200 ms a change on the H100), and the batcher's sizes change from call to call
    assert list(model._sessions) == [1, 2, 4, 8, 12] and model._sessions[1] is model.session
    assert len({id(session) for session in model._sessions.values()}) == 5
    used = []
    for size, session in model._sessions.items():
        monkeypatch.setattr(session, "run", (lambda real, size: lambda *a, **k: used.append(size) or real(*a, **k))(
            session.run, size))
    ran.clear()
    crops = np.stack([np.full((32, 32, 3), v, np.uint8) for v in range(10, 160, 10)])  # 15 faces
    estimates = model.predict(crops[:5])
    assert ran == [8] and [round(e.age) for e in estimates] == [10, 20, 30, 40, 50]  # padding answers nothing
    assert used == [8]  # on the session of its size
    model.predict(crops[:1]), model.predict(crops[:12])
    assert used == [8, 1, 12]
    ran.clear()
    estimates = model.predict(crops)
    assert ran == [12, 4] and [round(e.age) for e in estimates] == list(range(10, 160, 10))
    assert [round(e.spread) for e in estimates[:2]] == [1, 2]
    # a size that fails at warm-up (out of GPU memory, say): calls are capped at the largest size that ran
    def out_of_memory(chunk, *session):
        if len(chunk) >= 8:
            raise ModelError("age model x failed when run: CUDA failure 2: out of memory")
        return real_run(chunk, *session)
    monkeypatch.setattr(model, "_run", lambda chunk, *session: ran.append(len(chunk)) or out_of_memory(chunk, *session))
    assert model.warm_up(32) > 0 and model.batch_sizes == [1, 2, 4]
    ran.clear()
    assert [round(e.age) for e in model.predict(crops)] == list(range(10, 160, 10)) and ran == [4, 4, 4, 4]
    fixed = tmp_path / "fixed.onnx"
    fixed.write_bytes(build_constant_age_model(33, input_size=32, fixed_batch=4))
    assert AgeModel(fixed).warm_up_sizes(32) == [4]  # a fixed-batch model has one shape


def test_the_daemon_warms_its_models_up_at_start(tmp_path, monkeypatch, age_models):
    from edge.config import parse_config
    from edge.detect import FaceDetector
    from edge.service import Service
    warmed = []
    # the age model's on the batcher's thread, the one that makes the calls: CUDA prepares once per calling thread
    monkeypatch.setattr(AgeModel, "warm_up", lambda self, max_batch: warmed.append(
        ("age", max_batch, threading.current_thread().name)) or 0.0)
    monkeypatch.setattr(FaceDetector, "warm_up", lambda self: warmed.append(("detector",)))
    config = parse_config({"store_id": "s", "cameras": [{"id": "a", "source": 0}], "mqtt": {"host": "localhost"},
                           "models": {"age_model": str(age_models[16]), "max_batch": 12, "providers": ["cpu"]}})
    Service(config, replay=True)
    assert warmed == [("detector",), ("age", 12, "age-batcher")]


def test_a_warm_up_that_fails_is_raised_to_the_caller_and_the_batcher_serves_on(age_models, monkeypatch):
    model = AgeModel(age_models[40])
    batcher = AgeBatcher(model, max_batch=4, max_wait_ms=0)
    monkeypatch.setattr(model, "warm_up", lambda max_batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        batcher.warm_up()
    assert batcher.alive() and round(batcher.submit(np.zeros((1, 64, 64, 3), np.uint8)).result(timeout=10)[0].age) == 40
    batcher.close()


def test_on_a_gpu_the_crops_go_up_as_uint8_and_every_age_is_the_same_to_the_bit(two_people_photo):
    """On the H100 `session.run`, the daemon's call, ran 35-40 % below IO binding: the float32 upload (issue 10). On
    a GPU the served model takes uint8 crops (a Cast first in the graph), a quarter of the bytes. The crops are
    whole pixel values, so every age must be the float input's exactly: the shipped ResNet50 as fp32 (its int8
    weights as ORT folds them) and as the fp16 made at load; float crops are taken as the nearest pixels, and
    the padding of a GPU's warmed-up batch sizes is uint8 zeros."""
    import cv2

    from edge.crop import crop_face
    from edge.detect import FaceDetector, detect_in_photo
    from edge.infer import made_for_gpu
    from edge.precision import dequantize_weights, to_fp16
    from edge.tiers import pick_variant, resolve_age_model, resnet50_ships
    if not resnet50_ships():
        pytest.skip("the trained ResNet50 is not in edge/models")
    shipped = pick_variant(resolve_age_model("auto"), "auto", on_gpu=True).path
    image = cv2.imread(str(two_people_photo))
    crops = np.stack([crop_face(image, f, 160, 0.0) for f in detect_in_photo(FaceDetector(), image)])
    assert crops.dtype == np.uint8 and len(crops) == 2

    def ages(model, batch=crops):
        return [e.age for e in model.predict(batch)]

    as_file = AgeModel(shipped, ["cpu"])
    pixels = AgeModel(shipped, ["cpu"], made=made_for_gpu(shipped, fp16=False))
    assert (as_file.input_dtype, pixels.input_dtype) == (np.float32, np.uint8)
    assert pixels.session.get_inputs()[0].type == "tensor(uint8)" and pixels.describe()["input"] == "uint8"
    expected = ages(as_file)
    assert ages(pixels) == expected and ages(pixels, crops.astype(np.float32)) == expected
    pixels.batch_sizes = [4]  # as warm_up leaves them on a GPU: two faces padded to four
    assert ages(pixels) == expected
    half_float = AgeModel(shipped, ["cpu"], variant="fp16",
                          made=to_fp16(dequantize_weights(onnx.load(str(shipped)))[0]).SerializeToString())
    half_pixels = AgeModel(shipped, ["cpu"], variant="fp16", made=made_for_gpu(shipped, fp16=True))
    assert half_pixels.input_dtype == np.uint8 and ages(half_pixels) == ages(half_float)


def test_on_a_gpu_every_node_of_the_shipped_model_can_run_on_cuda_and_the_ages_are_the_same_to_the_bit(
        two_people_photo):
    """CUDA graphs refused the shipped ResNet50 on the H100 ("not all nodes partitioned to CUDA"): tf2onnx lowers the
    caffe channel flip to ReverseSequence with lengths computed by Shape/Gather/Expand, which ONNX Runtime runs on the
    CPU. The model a GPU serves has a Gather of constant indices instead, no shape node, and answers the same."""
    import cv2

    from edge.crop import crop_face
    from edge.detect import FaceDetector, detect_in_photo
    from edge.precision import made_for_gpu, with_whole_reversals_as_gather
    from edge.tiers import pick_variant, resolve_age_model, resnet50_ships
    if not resnet50_ships():
        pytest.skip("the trained ResNet50 is not in edge/models")
    shipped = pick_variant(resolve_age_model("auto"), "auto", on_gpu=True).path
    original = onnx.load(str(shipped))
    assert {"ReverseSequence", "Shape", "Expand"} <= {node.op_type for node in original.graph.node}  # what it fixes
    rewritten = with_whole_reversals_as_gather(original)
    gathers = [node for node in rewritten.graph.node if node.op_type == "Gather"]
    indices = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert len(gathers) == 1 and indices[gathers[0].input[1]].tolist() == [2, 1, 0]  # the three channels, reversed
    shape_ops = {"ReverseSequence", "Shape", "Expand", "Size"}
    assert not shape_ops & {node.op_type for node in rewritten.graph.node}
    assert len(rewritten.graph.node) == len(original.graph.node) - 5  # Shape x2, Gather x2, Expand: gone
    for fp16 in (False, True):
        assert not shape_ops & {node.op_type for node in onnx.load_from_string(made_for_gpu(shipped, fp16)).graph.node}
    image = cv2.imread(str(two_people_photo))
    crops = np.stack([crop_face(image, f, 160, 0.0) for f in detect_in_photo(FaceDetector(), image)])
    before = AgeModel(shipped, ["cpu"], made=original.SerializeToString()).predict(crops)
    after = AgeModel(shipped, ["cpu"], made=rewritten.SerializeToString()).predict(crops)
    assert len(before) == 2 and [(e.age, e.spread) for e in after] == [(e.age, e.spread) for e in before]


def _reversal_model(lengths: np.ndarray | None, time: int | str = 3) -> onnx.ModelProto:
    """x [time, 2, 4] float reversed along axis 0 by ReverseSequence, with constant `lengths`, or (None) lengths
    read from x's shape as tf2onnx does: Expand(Shape(x)[0], [2])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [time, 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [time, 2, 4])
    if lengths is not None:
        nodes, inits = [], [onnx.numpy_helper.from_array(lengths.astype(np.int64), "lengths")]
    else:
        nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["t"]),
                 helper.make_node("Expand", ["t", "two"], ["lengths"])]
        inits = [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 onnx.numpy_helper.from_array(np.array([2], np.int64), "two")]
    nodes.append(helper.make_node("ReverseSequence", ["x", "lengths"], ["y"], time_axis=0, batch_axis=1))
    return helper.make_model(helper.make_graph(nodes, "reversal", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("lengths, time, rewritten", [
    (None, 3, True),  # tf2onnx's lowering, time axis fixed at 3: whole
    (np.array([3, 3]), 3, True),  # constant, whole
    (np.array([2, 3]), 3, False),  # one sequence reversed in part
    (np.array([2, 2]), 3, False),  # every sequence in part
    (None, "T", False),  # the time axis is not fixed: nothing proves the lengths whole
])
def test_only_reversals_proved_whole_become_a_gather(lengths, time, rewritten):
    import onnxruntime as ort

    from edge.precision import with_whole_reversals_as_gather
    model = _reversal_model(lengths, time)
    made = with_whole_reversals_as_gather(model)
    ops = [node.op_type for node in made.graph.node]
    assert ops == (["Gather"] if rewritten else [node.op_type for node in model.graph.node])
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(run(made), run(model))
    if rewritten:
        assert np.array_equal(run(made), x[::-1])


def test_a_model_file_that_takes_uint8_is_served_on_a_gpu_as_it_is(tmp_path, monkeypatch, caplog):
    """The contract takes uint8 crops too: on a GPU such a file needs nothing made (no warning, no second load)."""
    import logging

    from edge.precision import with_uint8_input
    made = with_uint8_input(onnx.load_from_string(build_constant_age_model(30.0, input_size=64)))
    assert with_uint8_input(made) == made  # already uint8: unchanged
    path = tmp_path / "age_uint8.onnx"
    onnx.save(made, str(path))
    monkeypatch.setattr("edge.infer.resolve_providers",
                        lambda providers: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(AgeModel, "providers", property(lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    caplog.set_level(logging.INFO, logger="edge.infer")
    model = AgeModel.load(str(path), ["cuda", "cpu"])
    assert (model.input_dtype, model.variant) == (np.uint8, "fp32")
    assert not [r for r in caplog.records if "made for the GPU" in r.getMessage()]
    crops = np.full((3, 64, 64, 3), 200, np.uint8)
    assert [e.age for e in model.predict(crops)] == [30.0] * 3 == [e.age for e in model.predict(crops / 1.0)]


def test_on_a_gpu_the_shipped_int8_file_is_served_as_fp16_made_at_load_and_answers_as_the_cpu(two_people_photo,
                                                                                              monkeypatch, caplog):
    """Only age_int8.onnx ships; fp16 runs faster on a GPU (issue 10), so the daemon makes it at start. Here the
    made model runs on the CPU: its ages must be the int8 file's within half a year on real faces. Where CUDA does
    not load after all, fp16 (the slowest on a CPU) is dropped for the CPU's variant."""
    import logging

    import cv2

    from edge.crop import crop_face
    from edge.detect import FaceDetector, detect_in_photo
    from edge.infer import fp16_at_load, made_for_gpu
    from edge.tiers import pick_variant, resolve_age_model, resnet50_ships
    if not resnet50_ships():
        pytest.skip("the trained ResNet50 is not in edge/models")
    shipped = pick_variant(resolve_age_model("auto"), "auto", on_gpu=True)
    assert shipped.variant == "int8" and fp16_at_load(shipped, "auto", on_gpu=True)
    assert not fp16_at_load(shipped, "auto", on_gpu=False) and not fp16_at_load(shipped, "int8", on_gpu=True)
    as_file = pick_variant(resolve_age_model(str(shipped.path)), "auto", on_gpu=True)
    assert not fp16_at_load(as_file, "auto", on_gpu=True)  # a file named in the config is served as it is
    image = cv2.imread(str(two_people_photo))
    crops = np.stack([crop_face(image, f, 160, 0.0) for f in detect_in_photo(FaceDetector(), image)])
    cpu = AgeModel.load("auto", ["cpu"])
    half = AgeModel(shipped.path, ["cpu"], shipped.tier, "fp16", made=made_for_gpu(shipped.path, fp16=True))
    assert (cpu.describe()["variant"], half.describe()["variant"], half.describe()["file"]) == \
        ("int8", "fp16", "age_int8.onnx")
    assert (half.describe()["input"], "input" in cpu.describe()) == ("uint8", False)  # the crops go up as uint8
    expected, ages = [e.age for e in cpu.predict(crops)], [e.age for e in half.predict(crops)]
    assert len(expected) == 2 and np.abs(np.subtract(ages, expected)).max() < 0.5, (ages, expected)
    # a GPU build whose CUDA does not load: the int8 file is served, nothing made (1.3 s and 0.6 GB saved)
    monkeypatch.setattr("edge.infer.resolve_providers",
                        lambda providers: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caplog.set_level(logging.INFO, logger="edge.infer")
    fallen = AgeModel.load("auto", ["cuda", "cpu"])
    assert (fallen.variant, fallen.providers[0]) == ("int8", "CPUExecutionProvider")
    assert "age model made for the GPU" not in [r.getMessage() for r in caplog.records]
    # CUDA serving (the provider's name alone is made a GPU's; the sessions are the CPU's): fp16 is made and served
    monkeypatch.setattr(AgeModel, "providers", property(lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    served = AgeModel.load("auto", ["cuda", "cpu"])
    assert (served.variant, served.input_dtype) == ("fp16", np.uint8)
    assert [e.age for e in served.predict(crops)] == ages
    # a conversion that fails (onnx's checker, a missing module): a warning, and the int8 file serves
    def broken(path, fp16):
        raise ValueError("shape inference failed\nmore lines")
    monkeypatch.setattr("edge.precision.made_for_gpu", broken)
    caplog.clear()
    kept = AgeModel.load("auto", ["cuda", "cpu"])
    assert kept.variant == "int8" and [e.age for e in kept.predict(crops)] == expected
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert (warning.getMessage(), warning.error) == ("age model not made for the GPU, serving its file as it is",
                                                     "shape inference failed")
