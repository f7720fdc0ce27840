import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge.contract import build_constant_age_model, contract_metadata
from edge.infer import AgeBatcher, AgeModel
from edge.runtime import ModelError


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


def test_batcher_respects_max_batch(age_models):
    batcher = AgeBatcher(AgeModel(age_models[40]), max_batch=3, max_wait_ms=0, producers=1)
    estimates = batcher.submit(np.zeros((7, 64, 64, 3), np.uint8)).result(timeout=10)
    batcher.close()
    assert len(estimates) == 7 and batcher.stats.max_batch_seen == 3


def test_batcher_does_not_wait_for_absent_producers_beyond_the_deadline(age_models):
    batcher = AgeBatcher(AgeModel(age_models[40]), max_batch=32, max_wait_ms=20, producers=3)
    assert len(batcher.submit(np.zeros((1, 64, 64, 3), np.uint8)).result(timeout=2)) == 1
    batcher.close()
