"""`tillsight bench`: what this machine can do, measured in one run, as a table and a PNG.

1. The age model alone: faces/s at batch 1, 8 and 32 for Keras `predict`
   (when the train extra and a .keras checkpoint are there) and ONNX Runtime
   fp32, fp16 and int8 of the same weights (those there: the shipped ResNet50
   is int8 alone), interleaved round by round so a busy neighbour slows all
   of them alike; ratios to Keras (else to ORT fp32, else to the one there).
2. One camera, replayed as fast as it goes: decoding alone, decoding and
   detection, and the whole pipeline, with the inference budget on and off
   (age-network calls per customer, and the fused ages each way).
3. Cameras x fps: the daemon (`tillsight run`, a child process) with N copies
   of the clip as live cameras at F fps for S seconds (each copy starting at a
   different point, and its frames out of step with the others' by a share of
   a frame interval, as independent tills would: `--phases`), against a local
   mosquitto. From its status topic: frames dropped and the lag behind real
   time, at the start and the end (a lag that grows means the box cannot keep
   up); from the messages: frame->alert and frame->estimate latency p50/p99
   (each message carries its frame's capture time, `frame_time`); its peak RSS;
   from its metrics endpoint (`[metrics]`, on for the run) the batch sizes the
   age batcher really formed; GPU utilisation through NVML where there is one.
   Every customer is challenged in this part (challenge age 100), so every
   track gives an alert to time.

`--model-only` (edge/speed.py) measures the age model alone on any provider
(CUDA: IO binding, CUDA graphs, a CPU baseline in the same run);
`--skip-model-speed` leaves part 1 out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edge.broker import LocalBroker
from edge.tiers import VARIANTS, model_dir, variant_of

BATCHES = (1, 8, 32)
REPO = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """A benchmark that cannot run here: one line for the user."""


@dataclass
class BenchOptions:
    model: str  # a tier or an ONNX file (fp32; its _fp16/_int8 siblings are measured when present)
    keras: Path | None  # a .keras checkpoint of the same weights
    video: Path
    cameras: list[int]
    fps: float
    seconds: float
    rounds: int
    out: Path
    config: dict  # extra daemon config sections, e.g. {"models": {"age_threads": 1}}
    model_speed: bool = True  # part 1 (the model alone, CPU); `--model-only` (edge/speed.py) does any provider
    daemons: int = 1  # the cameras of a run shared among this many daemon processes (a store server's instances)
    # "spread": the cameras' frames evenly out of step (start_offset_s), as independent tills' clocks are; "in-step":
    # all together, a burst at every tick (the bench's only way until 2026-11-27, and a worst case)
    phases: str = "spread"
    # the train extra's loader of a .keras checkpoint, for the Keras figures: given by the CLI, the entry point
    # (edge's stages never import training or export); None without the train extra or where nothing needs it
    load_keras: Callable[[Path], Any] | None = None


# ------------------------------------------------------------------ the model


def random_resnet50(data: Path) -> tuple[Path, Path]:
    """A random-init ResNet50 (speed does not depend on training) exported by our own tools, cached.

    Returns (age.onnx, best.keras). Needs the train extra and a labelled face folder (for the
    one-epoch run and int8 calibration)."""
    folder = model_dir() / "bench-resnet50-random"
    onnx_path, keras_path = folder / "onnx" / "age.onnx", folder / "run" / "checkpoints" / "best.keras"
    if all(variant_of(onnx_path, v).is_file() for v in VARIANTS) and keras_path.is_file():
        return onnx_path, keras_path
    if not (data / "labels.csv").is_file():
        raise BenchError(f"no ResNet50 ships yet, and making a random-init one for the benchmark needs labelled "
                         f"faces: --data DIR (not found: {data})")
    print(f"making a random-init ResNet50 in {folder} (once; a few minutes)", flush=True)
    tool = [sys.executable, "-m", "edge"]
    steps = [tool + ["train", "--data", str(data), "--out", str(folder / "run"), "--limit", "40", "--input-size", "224",
                     "--batch-size", "8", "--epochs", "1", "--head", "regression"],
             tool + ["export", str(keras_path), "--out", str(folder / "onnx"), "--fp16", "--int8",
                     "--calibration", str(data)]]
    if keras_path.is_file():
        steps = steps[1:]
    elif (folder / "run").exists():
        shutil.rmtree(folder / "run")  # an interrupted run: start it again
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(step[2:4])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return onnx_path, keras_path


def bench_model_path(model: str, data: Path) -> Path:
    """The fp32 ONNX file `--model` names: a tier, a file, or for "auto" the shipped ResNet50, else the cached
    random-init one (made once, with the train extra, when it is not there)."""
    from edge.tiers import resnet50_ships, resolve_age_model
    if model != "auto" or resnet50_ships():
        return resolve_age_model(model).path
    cached = model_dir() / "bench-resnet50-random" / "onnx" / "age.onnx"
    if cached.is_file():
        return cached
    if importlib.util.find_spec("keras") is None:  # made by `tillsight train` and `export`, in child processes
        raise BenchError(f"no ResNet50 ships and none is cached ({cached}); making the random-init one needs the "
                         f"train extra, or name an ONNX file: --model FILE")
    return random_resnet50(data)[0]


def model_speed(onnx_path: Path, keras_path: Path | None, rounds: int, threads: int,
                load_keras: Callable[[Path], Any] | None = None) -> dict:
    """faces/s per engine and batch, interleaved; {engine: {batch: faces_per_s}}. Keras too where there is a
    checkpoint and its loader (BenchOptions.load_keras)."""
    from edge.infer import AgeModel
    models = {variant: AgeModel(variant_of(onnx_path, variant), ["cpu"], variant=variant, threads=threads)
              for variant in VARIANTS if variant_of(onnx_path, variant).is_file()}
    if not models:
        raise BenchError(f"age model not found: {onnx_path}")
    engines = {f"ORT {variant}": model.predict for variant, model in models.items()}
    size = next(iter(models.values())).info.input_size
    if keras_path is not None and load_keras is not None:
        keras_model = load_keras(keras_path)
        engines = {"Keras": lambda crops: keras_model.predict(crops.astype(np.float32), batch_size=len(crops),
                                                              verbose=0), **engines}
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in BATCHES}
    timings: dict[str, dict[int, list[float]]] = {e: {b: [] for b in BATCHES} for e in engines}
    for engine in engines.values():  # warm-up: the first call of each shape allocates (and Keras traces)
        for crops in batches.values():
            engine(crops)
    for _ in range(rounds):
        for name, engine in engines.items():
            for batch, crops in batches.items():
                calls = max(3, 64 // batch)
                started = time.perf_counter()
                for _ in range(calls):
                    engine(crops)
                timings[name][batch].append(calls * batch / (time.perf_counter() - started))
    return {name: {b: round(float(np.median(v)), 1) for b, v in per.items()} for name, per in timings.items()}


def served_variant(onnx_path: Path) -> str:
    """What the daemon serves in the benchmark: the provider's variant, as for a shipped model
    (int8 on a CPU, fp16 on a GPU), also for the random-init stand-in given as a file. The GPU's only where
    CUDA really serves (a probe session of the small detector): a GPU build whose CUDA does not load would
    otherwise have the daemon run fp16, the slowest of all, on the CPU."""
    from edge.catalog import DEFAULT_VARIANT, VARIANTS as DETECTORS
    from edge.errors import ModelError
    from edge.runtime import CPU, open_session
    try:
        on_gpu = open_session(DETECTORS[DEFAULT_VARIANT].onnx_path, ["cuda", "cpu"],
                              "GPU probe").get_providers()[0] != CPU
    except ModelError:
        on_gpu = False
    wanted = "fp16" if on_gpu else "int8"
    return wanted if variant_of(onnx_path, wanted).is_file() else "auto"


# ------------------------------------------------------------------ one camera, flat out


def pipeline_stages(video: Path, model: str, broker: LocalBroker, config: dict) -> dict:
    from edge.service import run_replay
    from edge.config import CudaConfig, parse_config
    from edge.detect import FaceDetector
    decode = _frames_per_second(video, lambda image: None)
    models = config.get("models", {})
    detector = FaceDetector(threads=models.get("detector_threads", 1),
                            providers=models.get("detector_providers") or models.get("providers"),
                            cuda_options=CudaConfig(**models.get("cuda", {})).provider_options())
    detector.warm_up()  # as the daemon does: a GPU's first call is not a frame's
    detect = _frames_per_second(video, detector)
    result = {"decode_fps": round(decode, 1), "detect_fps": round(detect, 1)}
    for budget in (False, True):
        finals: list[dict] = []
        sub = _Subscriber(broker.port, lambda topic, body, at: finals.append(body)
                          if topic.endswith("/estimate") and body.get("final") else None)
        settings = _merge({"models": {"age_model": model}}, _merge(config, {"budget": {"enabled": budget}}))
        summary = run_replay(parse_config({"store_id": "bench", "daemon_id": "bench",
                                           "cameras": [{"id": "cam", "source": str(video), "fps_limit": None}],
                                           "mqtt": {"host": "127.0.0.1", "port": broker.port}, **settings}))
        time.sleep(0.3)
        sub.close()
        key = "budget" if budget else "every_frame"
        result[key] = {"replay_fps": summary["fps"], "tracks": summary["tracks"], "faces_aged": summary["faces_aged"],
                       "aged_per_customer": round(summary["faces_aged"] / max(1, summary["tracks"]), 1),
                       # in the order the customers came (track ids grow; they differ between runs)
                       "alerts": summary["alerts"], "final_ages": [b["age"] for b in sorted(finals, key=lambda b: b["track"])]}
    every, budget = result["every_frame"], result["budget"]
    # the same video gives the same tracks (tracking does not depend on the ages): pair them in order
    pairs = list(zip(every["final_ages"], budget["final_ages"])) \
        if len(every["final_ages"]) == len(budget["final_ages"]) else []
    result["calls_ratio"] = round(every["faces_aged"] / max(1, budget["faces_aged"]), 1)
    result["fused_age_diff"] = {"mean": round(float(np.mean([abs(a - b) for a, b in pairs])), 2) if pairs else None,
                                "max": round(max((abs(a - b) for a, b in pairs), default=0), 2)}
    return result


def _frames_per_second(video: Path, work) -> float:
    capture = cv2.VideoCapture(str(video))
    frames, started = 0, time.perf_counter()
    while True:
        ok, image = capture.read()
        if not ok:
            break
        work(image)
        frames += 1
    return frames / (time.perf_counter() - started)


# ------------------------------------------------------------------ N cameras at F fps, live

START_TIMEOUT_S = 180.0  # a daemon not online by then has a problem the benchmark cannot measure past


def _online(status: dict) -> bool:
    return status.get("state") in ("online", "degraded") and bool(status.get("cameras"))


def _last_line(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
    return lines[-1] if lines else "?"


def _wait_until_online(daemon: subprocess.Popen, statuses: list[dict], cameras: int, log_path: Path,
                       timeout: float = START_TIMEOUT_S) -> float:
    """Seconds from the daemon's start to its first status with cameras: the measuring starts there, not at a
    fixed time (on the H100 loading and warming the models up took longer than a 10 s run, which then measured
    nothing: issue 10). A daemon that exits or is not online within `timeout` is a BenchError."""
    started = time.monotonic()
    while not any(_online(s) for s in list(statuses)):
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited ({daemon.returncode}) before it was online with {cameras} cameras: "
                             f"{_last_line(log_path)}")
        if time.monotonic() - started > timeout:
            daemon.kill()
            daemon.wait()
            raise BenchError(f"the daemon was not online with {cameras} cameras after {timeout:.0f} s")
        time.sleep(0.1)
    return round(time.monotonic() - started, 2)


def cameras_at_fps(video: Path, model: str, cameras: int, fps: float, seconds: float, broker: LocalBroker,
                   config: dict, workdir: Path, sampler=None, daemons: int = 1, phases: str = "spread") -> dict:
    """The daemon with `cameras` copies of `video` as live cameras; latency, lag, drops and peak RSS; the batches
    the age batcher really formed (from the daemon's metrics endpoint); GPU utilisation (`sampler`, NVML).
    daemons > 1: the cameras shared among that many daemon processes on the same broker (and GPU), as a store
    server runs one instance per group of tills; the figures are the group's (sums, or over all the messages)."""
    from edge.broker import free_port
    # per kind: (the frame's capture time, its latency in s, the camera), so that only the measuring window's count
    latencies: dict[str, list[tuple[float, float, str]]] = {"alert": [], "estimate": []}
    statuses: dict[str, list[dict]] = {}  # by daemon

    def on_message(topic: str, body: dict, received: float) -> None:
        if topic.endswith("/status"):
            statuses.setdefault(str(body.get("daemon")), []).append({**body, "received": received})
        elif "frame_time" in body and (topic.endswith("/alert") or not body.get("final")):
            kind = "alert" if topic.endswith("/alert") else "estimate"
            captured = datetime.fromisoformat(body["frame_time"].replace("Z", "+00:00")).timestamp()
            latencies[kind].append((captured, received - captured, str(body.get("camera"))))

    sources = staggered_copies(video, cameras, workdir)
    daemons = max(1, min(daemons, cameras))
    sub = _Subscriber(broker.port, on_message)
    procs, logs, all_settings = [], [], []
    try:
        for k in range(daemons):
            name = "bench" if daemons == 1 else f"bench-{k + 1}"
            settings = _merge({"policy": {"challenge_age": 100}, "logging": {"level": "warning"},
                               "models": {"age_model": model},
                               # the batch-size histogram is read from here at the end (edge/metrics.py)
                               "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
                               # on disk, as under systemd: every message costs a write and an fsync first
                               "outbox": {"path": str(workdir / f"{name}-{cameras}.outbox.sqlite3")}}, config)
            config_path = workdir / f"{name}-{cameras}.toml"
            config_path.write_text(_toml({"store_id": "bench", "daemon_id": name, "status_interval_s": 1.0,
                                          "mqtt": {"host": "127.0.0.1", "port": broker.port}, **settings,
                                          "cameras": [{"id": f"till-{i + 1}", "source": str(sources[i]),
                                                       "fps_limit": fps,
                                                       "start_offset_s": _phase(i, cameras, fps, phases)}
                                                      for i in range(k, cameras, daemons)]}))
            # its log to a file: a pipe nobody reads while it runs could fill and block it (logging.level=info)
            log_path = workdir / f"daemon-{cameras}-{k + 1}.log"
            with open(log_path, "w") as log_file:
                procs.append(subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config_path)],
                                              stdout=subprocess.DEVNULL, stderr=log_file, text=True))
            logs.append(log_path)
            all_settings.append(settings)
        row = {**_measure(procs, logs, statuses, latencies, cameras, fps, seconds, all_settings, sampler),
               "phases": phases}
        return {**row, "daemons": daemons} if daemons > 1 else row
    finally:
        sub.close()
        for daemon in procs:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()


def _phase(index: int, cameras: int, fps: float, phases: str) -> float:
    """Camera `index`'s start offset: spread, the cameras' frames evenly over one frame interval."""
    return round(index / cameras / fps, 4) if phases == "spread" else 0.0


def _measure(procs: list[subprocess.Popen], logs: list[Path], statuses: dict[str, list[dict]], latencies: dict,
             cameras: int, fps: float, seconds: float, all_settings: list[dict], sampler) -> dict:
    start_s = 0.0
    for k, (daemon, log_path) in enumerate(zip(procs, logs)):  # loading, warming the models up: not counted
        name = "bench" if len(procs) == 1 else f"bench-{k + 1}"
        start_s = max(start_s, _wait_until_online(daemon, statuses.setdefault(name, []), cameras, log_path))
    started = time.monotonic()
    settle = min(3.0, seconds / 4)  # the first frames: not the steady state
    time.sleep(settle)
    # The measuring window, from here to the stop. Only what happened in it counts: frames captured in it (a
    # daemon online early ran while the others still loaded and warmed their models up on the same GPU, and
    # the stop's last frames wait on it), statuses received in it, and the stage histograms' growth in it.
    window_start = time.time()
    cpu_start = [cpu_sample(daemon.pid) for daemon in procs]
    scraped_start = _scrape_all(all_settings)
    time.sleep(seconds - settle)
    window_end = time.time()
    cpu = _cpu_of_all([cpu_use(start, cpu_sample(daemon.pid)) for start, daemon in zip(cpu_start, procs)])
    gpu = sampler.window(started + settle, time.monotonic()) if sampler is not None else None
    scraped = _scrape_all(all_settings)
    batches = _batches_of_all([batch_sizes(text) if text is not None else {"available": False, "reason": reason}
                               for text, reason in scraped])
    texts, befores = window_scrapes(scraped, scraped_start)
    stages = frame_stages(texts, before=befores)
    stalls = daemon_stalls(texts, before=befores)
    commits = outbox_commits(texts, before=befores)
    statuses = {daemon: [s for s in history if s["received"] <= window_end] for daemon, history in statuses.items()}
    memory = [_memory_mb(daemon.pid) for daemon in procs]
    peak_rss, rss = (None if any(m[i] is None for m in memory) else round(sum(m[i] for m in memory), 1)
                     for i in (0, 1))
    for daemon in procs:
        daemon.send_signal(signal.SIGTERM)
    for daemon, log_path in zip(procs, logs):
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.returncode not in (0, -signal.SIGTERM):
            raise BenchError(f"the daemon failed with {cameras} cameras: {_last_line(log_path)}")
    # only now: the window's last frames' messages (the slowest, as often as not) have arrived; the stop's own
    # frames were captured after the window and stay out
    in_window = {kind: [(at, lat, camera) for at, lat, camera in values if window_start <= at <= window_end]
                 for kind, values in latencies.items()}
    # "degraded" statuses count too: the cameras' figures are there, and the problems are reported (a GPU that
    # did not load makes the daemon degraded, and is what a GPU benchmark most needs to say)
    by_daemon = [[s for s in history if _online(s)] for history in statuses.values()]
    by_daemon = [online for online in by_daemon if online]
    lags = []  # the worst camera's lag at each status, per daemon; the worst daemon's at the start and the end
    for online in by_daemon:
        per_status = [max(lag) for lag in ([c["lag_s"] for c in s["cameras"].values() if c.get("lag_s") is not None]
                                           for s in online) if lag]
        if per_status:
            lags.append((per_status[min(2, len(per_status) - 1)], per_status[-1]))
    start_lag, end_lag = (max(a for a, _ in lags), max(b for _, b in lags)) if lags else (None, None)
    lasts = [online[-1] for online in by_daemon] or [{"cameras": {}, "age_network": {}}]
    dropped = sum(c.get("dropped", 0) for last in lasts for c in last["cameras"].values())
    frames = sum(c.get("frames", 0) for last in lasts for c in last["cameras"].values())
    network = [last.get("age_network", {}) for last in lasts]
    total = lambda key: round(sum(n[key] for n in network), 2) if all(n.get(key) is not None for n in network) \
        else None  # noqa: E731
    return {
        "cameras": cameras, "fps": fps, "seconds": seconds, "start_s": start_s, "frames": frames, "dropped": dropped,
        # the measuring window's length: the stage figures and the alerts are its; "frames" is each camera's whole run
        "window_s": round(window_end - window_start, 2),
        "lag_start_s": start_lag, "lag_end_s": end_lag,
        "keeps_up": bool(lags) and dropped <= 0.01 * max(frames, 1) and end_lag < max(0.5, 2 * (start_lag or 0)),
        "alert_p50_ms": _pct(_lat(in_window["alert"]), 50), "alert_p99_ms": _pct(_lat(in_window["alert"]), 99),
        "estimate_p50_ms": _pct(_lat(in_window["estimate"]), 50),
        "estimate_p99_ms": _pct(_lat(in_window["estimate"]), 99),
        "alerts": len(in_window["alert"]),
        # what every run before 2026-11-27 (session 23) reported: all of them, the start and the stop too
        "alert_p99_whole_run_ms": _pct(_lat(latencies["alert"]), 99), "alerts_whole_run": len(latencies["alert"]),
        "slowest_alerts": _slowest(in_window["alert"], window_start),
        "age_calls_per_s": total("calls_per_s"),
        "age_faces_per_s": total("faces_per_s"), "peak_rss_mb": peak_rss,
        "rss_mb": rss,  # at the end: what a long-running daemon holds (the peak includes loading the models)
        "provider": lasts[0].get("provider"), "variant": lasts[0].get("age_model", {}).get("variant"),
        "detector_provider": lasts[0].get("detector_provider"),
        "problems": sorted({p for online in by_daemon for s in online for p in s.get("problems", [])}),
        "batch_sizes": batches, "frame_stages": stages, "stalls": stalls, "outbox_commits": commits, "cpu": cpu, **({"gpu": gpu} if gpu is not None else {}),
    }


def window_scrapes(end: list[tuple[str | None, str | None]],
                   start: list[tuple[str | None, str | None]]) -> tuple[list[str], list[str]]:
    """The daemons' metrics at the window's end and at its start, for those whose both scrapes were read: one
    without its first would add its whole run, its warm-up too, to the window's figures."""
    pairs = [(text, before) for (text, _), (before, _) in zip(end, start) if text is not None and before is not None]
    return [text for text, _ in pairs], [before for _, before in pairs]


def _scrape_all(all_settings: list[dict]) -> list[tuple[str | None, str | None]]:
    return [scrape_metrics(settings["metrics"]) if settings["metrics"].get("enabled") else
            (None, "metrics disabled by --set") for settings in all_settings]


def _lat(samples: list[tuple[float, float, str]]) -> list[float]:
    return [latency for _, latency, _ in samples]


def _slowest(samples: list[tuple[float, float, str]], window_start: float, count: int = 5) -> list[dict]:
    """The slowest messages of the window, with when (s into it) and which camera: several cameras at one moment
    are a stall of the whole daemon (the interpreter, the GPU, the disk), one camera again and again its own."""
    return [{"at_s": round(at - window_start, 2), "ms": round(1000 * latency, 1), "camera": camera}
            for at, latency, camera in sorted(samples, key=lambda s: -s[1])[:count]]


def _cpu_of_all(uses: list[dict]) -> dict:
    """cpu_use of several daemons: their cores added up (the machine's share is the same for all)."""
    if len(uses) == 1 or not all(u.get("available") for u in uses):
        return uses[0] if len(uses) == 1 else next(u for u in uses if not u.get("available"))
    return {**uses[-1], "daemon_cores": round(sum(u["daemon_cores"] for u in uses), 2)}


def _batches_of_all(sizes: list[dict]) -> dict:
    """scrape_batch_sizes of several daemons as one: calls and buckets added, means weighted by calls."""
    if len(sizes) == 1 or not all(s.get("available") for s in sizes):
        return sizes[0] if len(sizes) == 1 else next(s for s in sizes if not s.get("available"))
    calls = sum(s["calls"] for s in sizes)
    buckets: dict[str, int] = {}
    for s in sizes:
        for name, count in s["buckets"].items():
            buckets[name] = buckets.get(name, 0) + count
    buckets = dict(sorted(buckets.items(), key=lambda item: int(item[0].lstrip(">").split("-")[0])))
    weighted = lambda key: round(sum(s[key] * s["calls"] for s in sizes if s[key] is not None) / calls, 2) \
        if calls else None  # noqa: E731
    return {"available": True, "calls": calls, "mean_faces": weighted("mean_faces"), "buckets": buckets,
            "largest_bucket": next(reversed(buckets), None), "mean_call_ms": weighted("mean_call_ms")}


def scrape_metrics(metrics: dict) -> tuple[str | None, str | None]:
    """(the text of the daemon's Prometheus endpoint, None) or (None, why it could not be read)."""
    import urllib.request
    url = f"http://{metrics.get('host', '127.0.0.1')}:{metrics.get('port', 9464)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.read().decode(), None
    except OSError as exc:
        return None, f"{url}: {getattr(exc, 'reason', exc)}"


def scrape_batch_sizes(metrics: dict) -> dict:
    text, reason = scrape_metrics(metrics)
    return batch_sizes(text) if text is not None else {"available": False, "reason": reason}


def batch_sizes(text: str) -> dict:
    """The age batcher's batch sizes from the daemon's metrics: calls, mean faces per call, calls per size bucket
    ("3-4": calls of 3 or 4 faces), the largest bucket used, and the mean call duration."""
    cumulative, values = [], {}
    for line in text.splitlines():
        if line.startswith("tillsight_age_batch_faces_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            cumulative.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(("tillsight_age_batch_faces_", "tillsight_age_network_seconds_")) and " " in line \
                and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    calls = int(values.get("tillsight_age_batch_faces_count", 0))
    buckets, previous_le, previous_count = {}, 0.0, 0.0
    for le, count in sorted(cumulative):
        low = int(previous_le) + 1
        name = (f"{low}" if le == low else f"{low}-{int(le)}") if le != float("inf") else f">{int(previous_le)}"
        if count - previous_count > 0:
            buckets[name] = int(count - previous_count)
        previous_le, previous_count = le, count
    seconds = values.get("tillsight_age_network_seconds_sum")
    return {"available": True, "calls": calls,
            "mean_faces": round(values.get("tillsight_age_batch_faces_sum", 0) / calls, 2) if calls else None,
            "buckets": buckets, "largest_bucket": next(reversed(buckets), None),
            "mean_call_ms": round(1000 * seconds / calls, 2) if calls and seconds is not None else None}


def frame_stages(texts: list[str], before: list[str] | None = None) -> dict:
    """Where a frame's time goes in the camera pipelines of one or more daemons (their metrics' texts, the
    histogram tillsight_frame_stage_seconds added up): per stage (edge/metrics.py, FRAME_STAGES, then "total")
    the frames that passed it, the mean and the p99 in ms (p99: the upper edge of the bucket it falls in, so
    "at most"); then "mqtt_ack", the broker's time to acknowledge a message (tillsight_mqtt_ack_seconds), with
    "messages" for "frames". `before`: the same daemons' scrapes at the start of a window, taken off (the
    histograms count from the daemon's start: the window's share alone)."""
    from edge.metrics import FRAME_STAGES, FRAME_TOTAL
    stages = {}
    for stage in FRAME_STAGES + (FRAME_TOTAL,):
        summary = _histogram(texts, "tillsight_frame_stage_seconds", f'stage="{stage}"', before)
        if summary is not None:
            stages[stage] = summary
    ack = _histogram(texts, "tillsight_mqtt_ack_seconds", None, before)
    if ack is not None:
        stages["mqtt_ack"] = {"messages": ack.pop("frames"), **ack}
    return stages


def daemon_stalls(texts: list[str], before: list[str] | None = None) -> dict:
    """What stops a whole daemon (edge/metrics.py): its garbage collections ("pauses"), with mean, p99 and max
    (bucket edges: "at most") in ms."""
    summary = _histogram(texts, "tillsight_gc_pause_seconds", None, before)
    return {} if summary is None else {"gc": {"pauses": summary.pop("frames"), **summary}}


def outbox_commits(texts: list[str], before: list[str] | None = None) -> dict | None:
    """The daemons' commits of messages to their outbox (edge/outbox.py): each ends in an fsync, and an alert
    is published only after its own; "commits", mean, p99 and max (bucket edges: "at most") in ms."""
    summary = _histogram(texts, "tillsight_outbox_commit_seconds", 'kind="messages"', before)
    return None if summary is None else {"commits": summary.pop("frames"), **summary}


def _histogram(texts: list[str], metric: str, label: str | None, before: list[str] | None = None) -> dict | None:
    """One histogram added up over several scrapes (one label's series, e.g. 'stage="detect"', or the
    unlabelled one), less the scrapes `before` (earlier ones of the same daemons): count as "frames", mean and
    p99 (the upper edge of its bucket) in ms; None when empty."""
    buckets: dict[float, float] = {}
    total_s = 0.0
    for sign, text in [(1, t) for t in texts] + [(-1, t) for t in before or []]:
        for line in text.splitlines():
            if not line.startswith(f"{metric}_") or (label is not None and label not in line):
                continue
            name, value = line.rsplit(" ", 1)
            if name.startswith(f"{metric}_bucket"):
                le = name.split('le="', 1)[1].split('"', 1)[0]
                edge = float("inf") if le == "+Inf" else float(le)
                buckets[edge] = buckets.get(edge, 0.0) + sign * float(value)
            elif name.startswith(f"{metric}_sum"):
                total_s += sign * float(value)
    cumulative = sorted(buckets.items())
    count = int(cumulative[-1][1]) if cumulative else 0
    if not count:
        return None
    p99 = next(edge for edge, seen in cumulative if seen >= 0.99 * count)
    top = next(edge for edge, seen in cumulative if seen >= count)
    return {"frames": count, "mean_ms": round(1000 * total_s / count, 2),
            "p99_ms": None if p99 == float("inf") else round(1000 * p99, 1),
            "max_ms": None if top == float("inf") else round(1000 * top, 1)}


WORKDIR_PREFIX = "tillsight-bench-"


def remove_stale_workdirs() -> None:
    """The work folders of earlier benches that were killed before their cleanup (SIGKILL, the OOM killer): they hold
    copies of the video, which may be a till's recording of customers."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:  # a bench's own work folder has its pid in it: any other folder (a user's --out) is not ours
            os.kill(int((folder / "pid").read_text()), 0)
            continue  # its bench still runs
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):  # not a work folder, another user's bench still running, or no pid yet
            continue


def staggered_copies(video: Path, count: int, workdir: Path) -> list[Path]:
    """The clip `count` times, each starting a different way into it: independent tills do not see
    their customers arrive in the same frame (the same clip in step would make every burst coincide)."""
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    copies = []
    for i in range(count):
        path = workdir / f"camera-{i + 1}-of-{count}.mp4"
        if not path.is_file():
            shift = i * len(frames) // count
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[1::-1])
            for image in frames[shift:] + frames[:shift]:
                writer.write(image)
            writer.release()
        copies.append(path)
    return copies


def _pct(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 1) if values else None


def cpu_sample(pid: int) -> dict | None:
    """The daemon's CPU seconds so far and the machine's busy and total CPU seconds (/proc), at a monotonic time."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        machine = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = machine[3] + machine[4]  # idle and iowait
    return {"at": time.monotonic(), "daemon_s": (int(fields[11]) + int(fields[12])) / ticks,
            "machine_busy_s": (sum(machine[:8]) - idle) / ticks, "machine_s": sum(machine[:8]) / ticks}


def cpu_use(start: dict | None, end: dict | None) -> dict:
    """Between two samples: the cores the daemon kept busy, and how busy the whole machine was (what limits a run
    whose GPU idles: a daemon near all the cores is CPU-bound; one near a single core with the machine idle is
    held by one thread, such as Python's GIL)."""
    if start is None or end is None or end["at"] <= start["at"]:
        return {"available": False, "reason": "the daemon had exited, or no /proc here"}
    wall, machine = end["at"] - start["at"], end["machine_s"] - start["machine_s"]
    return {"available": True, "cores": os.cpu_count(),
            "daemon_cores": round((end["daemon_s"] - start["daemon_s"]) / wall, 2),
            "machine_busy_pct": round(100 * (end["machine_busy_s"] - start["machine_busy_s"]) / machine, 1)
            if machine > 0 else None}


def _memory_mb(pid: int) -> tuple[float | None, float | None]:
    """(VmHWM, VmRSS) of a process in MB: its peak resident set and now, from one read (a new peak between two
    reads would put the resident set above the peak)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return tuple(round(int(fields[name].split()[0]) / 1024, 1) for name in ("VmHWM", "VmRSS"))
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


class _Subscriber:
    """A POS on the local broker; `on_message(topic, body, received_wall_time)` for each JSON message."""

    def __init__(self, port: int, on_message):
        import paho.mqtt.client as mqtt
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("tillsight/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = lambda c, u, msg: on_message(msg.topic, json.loads(msg.payload), time.time())
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise BenchError("could not subscribe to the local broker")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def _toml(data: dict) -> str:
    def value(v) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{key}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    for item in data.get("cameras", []):
        lines += ["[[cameras]]"] + [f"{k} = {value(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ all of it


def run_bench(opts: BenchOptions, data: Path) -> dict:
    from edge.tiers import resnet50_ships, resolve_age_model
    keras = opts.keras
    if opts.model == "auto" and not resnet50_ships():
        onnx_path, keras = random_resnet50(data)
        model, label = str(onnx_path), "ResNet50, random init (speed only)"
    else:
        choice = resolve_age_model(opts.model)
        # a tier by its name, so that the daemon picks the variant as in a store (the shipped ResNet50 is
        # age_int8.onnx alone: its `age.onnx` names the family, not a file)
        model = choice.tier if choice.tier != "file" else str(choice.path)
        onnx_path, label = choice.path, f"{choice.tier} ({choice.path.name})"
    from edge.gpu import GpuSampler
    threads = opts.config.get("models", {}).get("age_threads", 0)
    sampler = GpuSampler(interval=0.2)
    report = {"machine": f"{os.cpu_count()} cores" + (f", {sampler.name}" if sampler.name else ""), "model": label,
              "video": str(opts.video)}
    print(f"age model: {label}; clip: {opts.video.name}", flush=True)
    report["model_speed"] = model_speed(onnx_path, keras, opts.rounds, threads, opts.load_keras) \
        if opts.model_speed else {}
    if report["model_speed"]:
        _print_speed(report["model_speed"])
    served = _merge({"models": {"age_variant": served_variant(onnx_path)}}, opts.config)
    report["served_variant"] = served["models"]["age_variant"]
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))  # the clip's copies (0700), configs, daemons' logs
    (workdir / "pid").write_text(str(os.getpid()))
    try:
        with LocalBroker() as broker:
            report["one_camera"] = pipeline_stages(opts.video, model, broker, served)
            _print_stages(report["one_camera"])
            report["cameras"] = []
            with sampler:
                for cameras in opts.cameras:
                    row = cameras_at_fps(opts.video, model, cameras, opts.fps, opts.seconds, broker, served,
                                         workdir, sampler, opts.daemons, opts.phases)
                    report["cameras"].append(row)
                    _print_cameras_row(row)
            report["gpu_utilisation"] = sampler.window()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot_bench(report, opts.out / "bench.png")
    print(f"wrote {opts.out / 'bench.json'} and {opts.out / 'bench.png'}")
    return report


def _print_speed(speed: dict) -> None:
    base = next((name for name in ("Keras", "ORT fp32") if name in speed), next(iter(speed)))  # int8 alone ships
    print(f"\nage model alone, faces/s (ratio to {base}):")
    print(f"{'engine':<10}" + "".join(f"{'batch ' + str(b):>20}" for b in BATCHES))
    for name, row in speed.items():
        cells = [f"{row[b]:>9.1f} ({row[b] / speed[base][b]:4.1f}x)" for b in BATCHES]
        print(f"{name:<10}" + "".join(f"{c:>20}" for c in cells))


def _print_stages(stages: dict) -> None:
    every, budget = stages["every_frame"], stages["budget"]
    print(f"\none camera, flat out: decode {stages['decode_fps']} fps, decode+detect {stages['detect_fps']} fps, "
          f"full pipeline {budget['replay_fps']} fps with the inference budget ({every['replay_fps']} ageing every face)")
    print(f"age-network calls per customer: {every['aged_per_customer']} ageing every face, "
          f"{budget['aged_per_customer']} with the budget ({stages['calls_ratio']}x fewer); "
          f"fused ages differ by {stages['fused_age_diff']['mean']} years on average "
          f"(max {stages['fused_age_diff']['max']}); alerts {every['alerts']} vs {budget['alerts']}")


def _print_cameras_row(row: dict) -> None:
    print(f"{row['cameras']} camera(s) at {row['fps']:g} fps for {row['seconds']:g} s "
          + (f"in {row['daemons']} daemons " if row.get("daemons", 1) > 1 else "")
          + ("in step " if row.get("phases") == "in-step" and row["cameras"] > 1 else "") +
          f"(online {row.get('start_s')} s after start): "
          f"{'keeps up' if row['keeps_up'] else 'FALLS BEHIND'}; lag {row['lag_start_s']} -> {row['lag_end_s']} s, "
          f"dropped {row['dropped']}/{row['frames']}; frame->alert p50 {row['alert_p50_ms']} p99 {row['alert_p99_ms']} ms "
          f"({row['alerts']} alerts" + (f"; whole run, start and stop too: p99 {row['alert_p99_whole_run_ms']} ms"
                                        if row.get("alert_p99_whole_run_ms") is not None else "") +
          f"); frame->estimate p50 {row['estimate_p50_ms']} p99 {row['estimate_p99_ms']} ms; "
          f"age network {row['age_faces_per_s']} faces/s; RSS {row['rss_mb']} MB (peak {row['peak_rss_mb']})", flush=True)
    sizes, gpu = row.get("batch_sizes") or {}, row.get("gpu") or {}
    print(f"    age model on {row.get('provider')} ({row.get('variant')}), detector on {row.get('detector_provider')}; "
          "batches formed: "
          + (f"{sizes['calls']} calls, mean {sizes['mean_faces']} faces/call, {sizes['mean_call_ms']} ms/call, "
             f"calls per size {sizes['buckets']}" if sizes.get("available") else f"unknown ({sizes.get('reason')})")
          + ("; GPU " + (f"{gpu.get('util_mean_pct')}% mean, {gpu.get('util_max_pct')}% max, "
                         f"{gpu.get('mem_max_mib')} MiB" if gpu.get("available") else f"not sampled ({gpu.get('reason')})")
             if gpu else ""), flush=True)
    if row.get("frame_stages"):
        print("    a frame's time in the pipeline, mean / p99 ms: " + ", ".join(
            f"{stage.replace('mqtt_ack', 'MQTT ack')} {v['mean_ms']} / {v['p99_ms'] if v['p99_ms'] is not None else '>max'}"
            + (f" ({v['frames']} frames)" if stage == "age" else "") for stage, v in row["frame_stages"].items()),
            flush=True)
    stalls = row.get("stalls") or {}
    if stalls:
        gc_ = stalls["gc"]
        print(f"    garbage collections (every thread stops), ms: {gc_['pauses']} pauses, mean {gc_['mean_ms']}, "
              f"p99 {gc_['p99_ms']}, worst {gc_['max_ms']}", flush=True)
    commits = row.get("outbox_commits")
    if commits:
        print(f"    outbox commits (an fsync each; every alert waits for one), ms: {commits['commits']} commits, "
              f"mean {commits['mean_ms']}, p99 {commits['p99_ms']}, worst {commits['max_ms']}", flush=True)
    if row.get("slowest_alerts"):
        print("    slowest alerts (s into the window, ms, camera): " + ", ".join(
            f"{a['at_s']} s {a['ms']} ms {a['camera']}" for a in row["slowest_alerts"]), flush=True)
    cpu = row.get("cpu") or {}
    if cpu.get("available"):
        print(f"    CPU: the daemon {cpu['daemon_cores']} cores, the machine {cpu['machine_busy_pct']} % busy "
              f"({cpu['cores']} cores)", flush=True)
    if row.get("problems"):
        print(f"    daemon degraded: {'; '.join(row['problems'])}", flush=True)


def _plot_batch_sizes(axis, report: dict) -> None:
    rows = [r for r in report["cameras"] if (r.get("batch_sizes") or {}).get("available")]
    buckets = []
    for r in rows:
        buckets += [b for b in r["batch_sizes"]["buckets"] if b not in buckets]
    buckets.sort(key=lambda b: int(b.lstrip(">").split("-")[0]))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        sizes, gpu = r["batch_sizes"], r.get("gpu") or {}
        share = [100 * sizes["buckets"].get(b, 0) / max(1, sizes["calls"]) for b in buckets]
        label = f"{r['cameras']} cameras: {sizes['calls']} calls, mean {sizes['mean_faces']}" + \
            (f", GPU {gpu['util_mean_pct']}%" if gpu.get("available") and "util_mean_pct" in gpu else "")
        axis.bar(np.arange(len(buckets)) + (i - (len(rows) - 1) / 2) * width, share, width, label=label)
    axis.set_xticks(np.arange(len(buckets)), buckets)
    axis.set_xlabel("faces per age-network call")
    axis.set_ylabel("share of calls (%)")
    axis.set_title(f"batches the age batcher formed: {report['model']}", fontsize=9)
    if rows:
        axis.legend(fontsize=7)


def _plot_frame_stages(axis, rows: list[dict]) -> None:
    """Mean ms a frame spends in each pipeline stage, stacked, per camera count (age: over the frames asking)."""
    from edge.metrics import FRAME_STAGES
    bottom = np.zeros(len(rows))
    for stage in FRAME_STAGES:
        means = np.array([(r["frame_stages"].get(stage) or {}).get("mean_ms") or 0.0 for r in rows])
        axis.bar(np.arange(len(rows)), means, 0.6, bottom=bottom, label=stage)
        bottom += means
    for i, r in enumerate(rows):
        axis.annotate(f"p99 {r['alert_p99_ms']} ms" if r.get("alert_p99_ms") is not None else "", (i, bottom[i]),
                      fontsize=7, ha="center", textcoords="offset points", xytext=(0, 3))
    axis.set_xticks(np.arange(len(rows)), [f"{r['cameras']} cameras" for r in rows])
    axis.set_ylabel("mean ms a frame")
    axis.set_title("where a frame's time goes (annotated: frame->alert p99)", fontsize=9)
    axis.legend(fontsize=7)


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    staged = [r for r in report["cameras"] if r.get("frame_stages")]
    fig, axes = plt.subplots(1, 3 if staged else 2, figsize=(18 if staged else 12, 4))
    left, right = axes[0], axes[1]
    if staged:
        _plot_frame_stages(axes[2], staged)
    speed = report["model_speed"]
    if speed:
        width = 0.8 / len(speed)
        for i, (name, row) in enumerate(speed.items()):
            left.bar(np.arange(len(BATCHES)) + (i - (len(speed) - 1) / 2) * width, [row[b] for b in BATCHES], width,
                     label=name)
        left.set_xticks(np.arange(len(BATCHES)), [f"batch {b}" for b in BATCHES])
        left.set_ylabel("faces per second")
        left.set_title(f"age model alone: {report['model']}", fontsize=9)
        left.legend(fontsize=8)
    else:  # --skip-model-speed (the model alone: --model-only, speed.png): the batches the batcher formed
        _plot_batch_sizes(left, report)
    rows = report["cameras"]
    counts = [r["cameras"] for r in rows]
    for key, label in (("alert_p99_ms", "frame->alert p99"), ("estimate_p99_ms", "frame->estimate p99"),
                       ("alert_p50_ms", "frame->alert p50")):
        right.plot(counts, [r[key] or np.nan for r in rows], "o-", label=label)
    right.axhline(150, color="#cc3311", linestyle="--", linewidth=1, label="150 ms target")
    for r in rows:
        right.annotate(f"lag {r['lag_end_s']} s\n{r['rss_mb']} MB", (r["cameras"], r["alert_p99_ms"] or 0),
                       fontsize=7, textcoords="offset points", xytext=(4, 4))
    right.set_xlabel(f"cameras at {rows[0]['fps'] if rows else '?'} fps")
    right.set_ylabel("latency (ms)")
    right.set_title(f"the daemon on this machine ({report['machine']})", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
