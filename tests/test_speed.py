"""`tillsight bench --model-only` (edge/speed.py) on the CPU, the end-to-end part's batch-size reading, and the
models the GPU machine makes from the shipped one (scripts/device/bench_models.py). Tiny models, tiny time budgets:
that every mode runs, answers what plain calls answer, and reports what the README says; not the figures."""

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge.contract import contract_metadata
from test_cli import one_line_error
from tskit import REPO, tillsight


def _bench_models_tool():
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "scripts/device/bench_models.py")
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
    """uint8 runs the model made with a uint8 input (the daemon's on a GPU): the same ages to the bit, also from
    export's fp16 file, whose input casts come last in its node list."""
    model = tiny_age_model(tmp_path / "age.onnx")
    onnx.save(_bench_models_tool().to_fp16(onnx.load(str(model))), str(tmp_path / "age_fp16.onnx"))  # export's fp16 path
    out = tmp_path / "out"
    result = tillsight("bench", "--model-only", "--model", str(model), "--batches", "1,4", "--point-seconds", "0.05",
                       "--modes", "plain,uint8,iobinding,upload,cudagraph", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "speed.json").read_text())
    assert report["variants"] == ["fp32", "fp16"] and report["batches"] == [1, 4]
    assert [s["providers"] for s in report["sessions"]] == [["CPUExecutionProvider"]] * 2
    points = {(p["variant"], p["mode"], p["batch"]): p for p in report["points"]}
    assert set(points) == {(v, m, b) for v in ("fp32", "fp16") for m in ("plain", "uint8", "iobinding", "upload")
                           for b in (1, 4)}
    assert all(p["faces_per_s"] > 0 and p["calls"] >= 3 for p in points.values())
    assert all(p["max_abs_diff_vs_plain"] <= 1e-5 for p in points.values())  # IO binding answers what run() answers
    assert [p["max_abs_diff_vs_plain"] for p in points.values() if p["mode"] == "uint8"] == [0.0] * 4
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
    assert line == "tillsight: error: --modes: fast is not one of plain, uint8, iobinding, upload, cudagraph"
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


def test_frame_stages_are_read_from_the_metrics_of_every_daemon():
    from edge.bench import frame_stages, scrape_metrics
    from edge.broker import free_port
    from edge.metrics import Metrics

    class Service:
        def metrics_snapshot(self):
            return {"cameras": {}}

    texts = []
    for frames in ([(0.001, 0.004, 0.0003, None, 0.0002, 0.0056)] * 99 + [(0.3, 0.004, 0.0003, 0.03, 0.0002, 0.335)],
                   [(None, 0.006, 0.0003, 0.01, 0.0002, None)] * 100):  # two daemons; the second a replay (no queue)
        metrics, port = Metrics(Service()), free_port()
        assert metrics.serve("127.0.0.1", port) is None
        try:
            for seconds in frames:
                metrics.observe_frame(seconds)
            for ack_s in (0.001,) * 98 + (0.035, 0.035):
                metrics.observe_ack(ack_s)
            text, reason = scrape_metrics({"host": "127.0.0.1", "port": port})
        finally:
            metrics.close()
        assert reason is None
        texts.append(text)
    stages = frame_stages(texts)
    assert list(stages) == ["queued", "detect", "track", "age", "judge", "total", "mqtt_ack"]
    assert stages["queued"] == {"frames": 100, "mean_ms": round((99 * 1 + 300) / 100, 2), "p99_ms": 1.0, "max_ms": 300.0}
    assert stages["detect"] == {"frames": 200, "mean_ms": 5.0, "p99_ms": 10.0, "max_ms": 10.0}  # 4, 6 ms: 5-10 ms
    assert stages["age"]["frames"] == 101 and stages["age"]["p99_ms"] == 10.0  # only the frames that asked ages
    # the whole, live frames only; 5.6 ms falls in the 5-10 ms bucket, one frame in 100 at 335 ms is the p99's edge
    assert stages["total"] == {"frames": 100, "mean_ms": round((99 * 5.6 + 335) / 100, 2), "p99_ms": 10.0,
                               "max_ms": 500.0}
    # the broker's acks of both daemons: 4 in 200 at 35 ms put the p99 in the 30-40 ms bucket (finer than 20-50)
    assert stages["mqtt_ack"] == {"messages": 200, "mean_ms": round((196 * 1 + 4 * 35) / 200, 2), "p99_ms": 40.0,
                                  "max_ms": 40.0}
    assert frame_stages([]) == {} and scrape_metrics({"port": free_port()})[0] is None


def test_a_window_of_the_metrics_and_the_daemons_collections():
    """The bench counts what happened between two scrapes (the histograms count from the daemon's start: its
    models' warm-up and first frames are not the steady state), and what stops a whole daemon: its garbage
    collections (issue 10's tail)."""
    import gc
    from edge.bench import daemon_stalls, frame_stages, scrape_metrics
    from edge.broker import free_port
    from edge.metrics import Metrics

    class Service:
        def metrics_snapshot(self):
            return {"cameras": {}}

    metrics, port = Metrics(Service()), free_port()
    assert metrics.serve("127.0.0.1", port) is None
    metrics.time_collections()
    try:
        for _ in range(10):  # the start: slow frames, before the window
            metrics.observe_frame((0.5, 0.2, 0.001, None, 0.001, 0.7))
        gc.collect()
        before, _ = scrape_metrics({"host": "127.0.0.1", "port": port})
        for _ in range(100):
            metrics.observe_frame((0.001, 0.004, 0.0003, None, 0.0002, 0.006))
        gc.collect()
        gc.collect(0)
        after, _ = scrape_metrics({"host": "127.0.0.1", "port": port})
    finally:
        metrics.close()
    assert gc.callbacks.count(metrics._on_gc) == 0  # closed: no more timing
    assert frame_stages([after])["total"]["frames"] == 110 and frame_stages([after])["total"]["p99_ms"] == 1000.0
    window = frame_stages([after], before=[before])
    assert window["total"] == {"frames": 100, "mean_ms": 6.0, "p99_ms": 10.0, "max_ms": 10.0}
    assert window["detect"]["max_ms"] == 5.0 and "mqtt_ack" not in window
    stalls = daemon_stalls([after], before=[before])
    assert stalls["gc"]["pauses"] >= 2  # the window's two (and any the scrape itself set off), not the one before
    assert daemon_stalls([after])["gc"]["pauses"] >= stalls["gc"]["pauses"] + 1
    assert 'generation="2"' in after and 'generation="0"' in after
    assert daemon_stalls([]) == {}
    from edge.bench import outbox_commits
    assert outbox_commits([after]) is None  # no outbox commits observed
    # two daemons, the second's first scrape not read: left out, not added whole to the window
    from edge.bench import window_scrapes
    texts, befores = window_scrapes([(after, None), (after, None)], [(before, None), (None, "timed out")])
    assert texts == [after] and befores == [before]
    assert frame_stages(texts, before=befores)["total"]["frames"] == 100


def test_gpu_sampler_without_nvml_says_why():
    """Without NVML (this machine: no pynvml or no driver) the window says why; with it, which GPU it sampled."""
    from edge.gpu import GpuSampler
    sampler = GpuSampler()
    with sampler:
        time.sleep(0.3 if sampler.available else 0)  # a few samples at its 0.1 s interval
        window = sampler.window()
    if not sampler.available:
        assert window == {"available": False, "reason": sampler.reason} and sampler.reason
    else:
        assert window["available"] is True and window["gpu"] and window["samples"] >= 1 and sampler.reason is None


def test_bench_models_from_the_shipped_int8_answer_as_the_daemon_serves_it(tmp_path, two_people_photo):
    """The GPU machine has only edge/models/age_int8.onnx (int8 weights, float maths): fp32 made from it holds the
    float weights ONNX Runtime folds at load, so it answers what the daemon's session answers; fp16 within
    half a year on real faces; the int8 file is the shipped one."""
    from edge.crop import crop_face
    from edge.detect import FaceDetector, detect_in_photo
    from edge.infer import AgeModel
    import cv2
    shipped = REPO / "edge" / "models" / "age_int8.onnx"
    written = _bench_models_tool().from_shipped(shipped, tmp_path)
    assert [p.name for p in written] == ["age.onnx", "age_fp16.onnx", "age_int8.onnx"]
    assert (tmp_path / "age_int8.onnx").read_bytes() == shipped.read_bytes()
    fp32 = onnx.load(str(tmp_path / "age.onnx"))
    assert not [n for n in fp32.graph.node if n.op_type == "DequantizeLinear"]
    meta = {p.key: p.value for p in fp32.metadata_props}
    assert "tillsight.quantization" not in meta and meta["tillsight.input_size"] == "160"
    image = cv2.imread(str(two_people_photo))
    crops = np.stack([crop_face(image, f, 160, 0.0) for f in detect_in_photo(FaceDetector(), image)]).astype(np.float32)
    served = AgeModel.load(shipped, ["cpu"]).session  # the daemon's session: weights folded at load
    expected = np.ravel(served.run(None, {"crops": crops})[0])
    ages = {name: np.ravel(ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                           .run(None, {"crops": crops})[0]) for name in ("age.onnx", "age_fp16.onnx")}
    assert len(expected) == 2 and np.allclose(ages["age.onnx"], expected, atol=1e-3)
    assert np.abs(ages["age_fp16.onnx"] - expected).max() < 0.5
    assert one_line_error(subprocess.run([sys.executable, str(REPO / "scripts/device/bench_models.py"), "shipped",
                                          str(tmp_path / "age.onnx"), "--out", str(tmp_path / "again")],
                                         capture_output=True, text=True)) == \
        "no weights to dequantize: not an int8 weights-only model"


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
              + [{"setting": "cpu", "variant": "fp16", "mode": m, "batch": 8, "faces_per_s": f,
                  "gpu_util_mean_pct": None} for m, f in (("plain", 100.0), ("uint8", 50.0))]}
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


def test_cuda_contention_times_the_daemons_age_calls_under_camera_threads(tmp_path, hamilton_clip):
    """The device's diagnosis of issue 10 (a change of batch size cost 200 ms a call on the H100), rehearsed on the
    CPU: every case has a timing per batch size, the load cases the rate their threads kept."""
    out = tmp_path / "contention.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts/device/cuda_contention.py"), "--model", "light",
                           "--video", str(hamilton_clip), "--providers", "cpu", "--loads", "2", "--calls", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["age_model"]["provider"] == "CPUExecutionProvider"
    for case in ("main", "thread", "cuda-det 2", "cpu-det 2", "resize 2"):
        assert set(report[case]) >= {"1", "8", "32"}, case
        assert 0 < report[case]["1"]["p50"] <= report[case]["1"]["max"]
    assert report["cpu-det 2"]["rate"] > 0 and report["resize 2"]["rate"] > report["cpu-det 2"]["rate"]
    assert 0 < report["cpu-det 2"]["cores"] <= 2.5  # this VM's 2 cores, busy with the detector and the age calls
