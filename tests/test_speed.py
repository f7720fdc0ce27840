"""`tillsight bench --model-only` (edge/speed.py) on the CPU, the end-to-end part's batch-size reading, and the
weightless model of the GPU machine's carry (scripts/device/model_skeleton.py). Tiny models, tiny time budgets:
that every mode runs, answers what plain calls answer, and reports what the README says; not the figures."""

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge.contract import contract_metadata
from test_cli import one_line_error
from tskit import REPO, tillsight


def _skeleton_tool():
    spec = importlib.util.spec_from_file_location("model_skeleton", REPO / "scripts/device/model_skeleton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_age_model(path, size=32, seed=0):
    """A small contract-following CNN (NHWC input, two convolutions, a dense head): real arithmetic to time."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(0, 0.2, (8, 3, 3, 3)), "w2": rng.normal(0, 0.05, (32, 8, 3, 3)),
               "scale": rng.uniform(0.5, 1.5, (32,)), "dense": rng.normal(0, 0.1, (32, 1)), "bias": np.array([30.0])}
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["crops"], ["nchw"], perm=[0, 3, 1, 2]),
         helper.make_node("Conv", ["nchw", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
         helper.make_node("MatMul", ["scaled", "dense"], ["mm"]),
         helper.make_node("Add", ["mm", "bias"], ["age"])],
        "tiny_age",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tillsight-test")
    model.ir_version = 8
    for key, value in contract_metadata(size, 0.0, kind="tiny test CNN").items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_model_only_on_the_cpu_every_mode_answers_as_plain_runs(tmp_path):
    model = tiny_age_model(tmp_path / "age.onnx")
    onnx.save(_skeleton_tool().to_fp16(onnx.load(str(model))), str(tmp_path / "age_fp16.onnx"))  # export's fp16 path
    out = tmp_path / "out"
    result = tillsight("bench", "--model-only", "--model", str(model), "--batches", "1,4", "--point-seconds", "0.05",
                       "--modes", "plain,iobinding,upload,cudagraph", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "speed.json").read_text())
    assert report["variants"] == ["fp32", "fp16"] and report["batches"] == [1, 4]
    assert [s["providers"] for s in report["sessions"]] == [["CPUExecutionProvider"]] * 2
    points = {(p["variant"], p["mode"], p["batch"]): p for p in report["points"]}
    assert set(points) == {(v, m, b) for v in ("fp32", "fp16") for m in ("plain", "iobinding", "upload") for b in (1, 4)}
    assert all(p["faces_per_s"] > 0 and p["calls"] >= 3 for p in points.values())
    assert all(p["max_abs_diff_vs_plain"] <= 1e-5 for p in points.values())  # IO binding answers what run() answers
    assert not any("cpu_ratio" in p for p in points.values())  # no GPU here: nothing to compare with the CPU
    assert [s["mode"] for s in report["skipped"]] == ["cudagraph"] and "CUDA does not serve" in report["skipped"][0]["reason"]
    assert report["gpu_utilisation"]["available"] is False and report["gpu_utilisation"]["reason"]
    assert report["target"]["best"] is None  # the 15,000 faces/s target is for GPU points at batch >= 64
    assert (out / "speed.png").stat().st_size > 10_000
    assert "session.get_providers() = ['CPUExecutionProvider']" in result.stdout
    assert "age model alone, faces/s" in result.stdout and "skipped: [cpu] fp32 cudagraph" in result.stdout


def test_model_only_bad_options_are_one_line(tmp_path):
    model = tiny_age_model(tmp_path / "age.onnx")
    line = one_line_error(tillsight("bench", "--model-only", "--model", str(model), "--batches", "1,x"), code=2)
    assert line == "tillsight: error: --batches takes batch sizes like 1,8,32"
    line = one_line_error(tillsight("bench", "--model-only", "--model", str(model), "--modes", "plain,fast"), code=2)
    assert line == "tillsight: error: --modes: fast is not one of plain, iobinding, upload, cudagraph"
    line = one_line_error(tillsight("bench", "--model-only", "--model", str(tmp_path / "none.onnx")), code=1)
    assert "none.onnx" in line


def test_batch_sizes_are_read_from_the_daemons_metrics():
    from edge.bench import scrape_batch_sizes
    from edge.broker import free_port
    from edge.metrics import Metrics

    class Service:
        def metrics_snapshot(self):
            return {"cameras": {}}

    metrics, port = Metrics(Service()), free_port()
    assert metrics.serve("127.0.0.1", port) is None
    try:
        for faces in (1, 1, 2, 3, 5, 32, 40):
            metrics.observe_age_call(faces, 0.01)
        sizes = scrape_batch_sizes({"host": "127.0.0.1", "port": port})
    finally:
        metrics.close()
    assert sizes["calls"] == 7 and sizes["mean_faces"] == round(84 / 7, 2) and sizes["mean_call_ms"] == 10.0
    assert sizes["buckets"] == {"1": 2, "2": 1, "3-4": 1, "5-8": 1, "17-32": 1, "33-64": 1}
    assert sizes["largest_bucket"] == "33-64"
    assert scrape_batch_sizes({"host": "127.0.0.1", "port": free_port()})["available"] is False


def test_gpu_sampler_without_nvml_says_why():
    from edge.gpu import GpuSampler
    sampler = GpuSampler()
    with sampler:
        window = sampler.window()
    if not sampler.available:  # this machine: no pynvml or no driver
        assert window == {"available": False, "reason": sampler.reason} and sampler.reason


def test_weightless_model_regenerates_the_same_graph_with_finite_outputs(tmp_path):
    tool = _skeleton_tool()
    original = tmp_path / "orig"
    original.mkdir()
    tiny_age_model(original / "age.onnx")
    skeleton = tool.strip(original / "age.onnx", tmp_path / "skel", min_elements=1000)
    emptied = [t for t in onnx.load(str(skeleton)).graph.initializer if t.doc_string.startswith(tool.MARK)]
    assert [t.name for t in emptied] == ["w2"] and not emptied[0].raw_data  # w1 (216), 1-D scale: kept as they are
    written = tool.regen(tmp_path / "skel", tmp_path / "regen")
    assert [p.name for p in written] == ["age.onnx", "age_fp16.onnx"]  # fp16 by export's conversion
    a, b = onnx.load(str(original / "age.onnx")), onnx.load(str(tmp_path / "regen/age.onnx"))
    assert tool._signature(a) == tool._signature(b)
    w2a, w2b = (numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2")) for m in (a, b))
    assert not np.array_equal(w2a, w2b) and abs(w2a.std() - w2b.std()) < 0.1 * w2a.std()
    assert w2b.min() >= w2a.min() and w2b.max() <= w2a.max()
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    for path in written:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ages = session.run(None, {"crops": x})[0]
        assert ages.shape == (3, 1) and np.isfinite(ages).all()
    assert dict((p.key, p.value) for p in b.metadata_props)["tillsight.contract"] == "1"


def test_gpu_report_ratios_target_and_plot(tmp_path, capsys):
    """The GPU branches without a GPU: a report as the H100 run would make it, through the same functions."""
    from edge.speed import _ratios, _target, plot_speed, print_speed
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    report = {"model": "age.onnx", "onnxruntime": "1.31.1", "gpu": "NVIDIA H100 80GB HBM3", "machine": "16 cores",
              "sessions": [{"setting": "cuda", "variant": "fp16", "providers": gpu},
                           {"setting": "cpu", "variant": "fp16", "providers": ["CPUExecutionProvider"]}],
              "skipped": [], "gpu_utilisation": {"available": True, "util_mean_pct": 80.0, "util_max_pct": 99.0,
                                                 "mem_max_mib": 5000.0},
              "points": [{"setting": "cuda", "variant": "fp16", "mode": m, "batch": b, "faces_per_s": f,
                          "gpu_util_mean_pct": 90.0} for m, b, f in (("plain", 8, 2000.0), ("plain", 64, 9000.0),
                                                                      ("iobinding", 64, 16000.0))]
              + [{"setting": "cpu", "variant": "fp16", "mode": "plain", "batch": 8, "faces_per_s": 100.0,
                  "gpu_util_mean_pct": None}]}
    _ratios(report)
    report["target"] = _target(report)
    ratios = {(p["mode"], p["batch"]): (p["cpu_ratio"], p["cpu_ratio_to"]) for p in report["points"] if "cpu_ratio" in p}
    assert ratios == {("plain", 8): (20.0, "cpu batch 8"), ("plain", 64): (90.0, "cpu best (batch 8)*"),
                      ("iobinding", 64): (160.0, "cpu best (batch 8)*")}
    assert report["target"]["met"] is True and report["target"]["best"]["mode"] == "iobinding"
    print_speed(report)
    printed = capsys.readouterr().out
    assert "2000 (20x)" in printed and "16000 (160x*)" in printed and "MET, best 16000" in printed
    plot_speed(report, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 10_000
