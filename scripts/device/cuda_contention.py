#!/usr/bin/env python3
"""Where the daemon's age calls lose time on a GPU (issue 10, 2026-11-26: 40 ms a call at one camera,
170-290 ms at 4-32, while the same model alone takes 2-5 ms a call and the GPU idled at 2-6 %).

One process, the daemon's own builders (edge.service.build_detector / build_age_model, its config's
defaults), the age model's `predict` timed at batch 1, 8 and 32:

    main        from the thread that loaded and warmed it up
    thread      from a fresh thread (the daemon's batcher is one): its first call timed apart
    cuda-det K  while K camera threads run the shared detector session on CUDA on real frames (the daemon)
    cpu-det K   the same with a CPU detector session per thread
    resize K    while K threads only letterbox frames (OpenCV, no ORT)

with the cores the process kept busy in each load case (`--blocking-sync`: CUDA's waiting threads sleep instead).

    python3 scripts/device/cuda_contention.py --model M --variant fp16 --video CLIP [--providers cuda,cpu]

Prints one line per case (p50 / p90 / max ms a call, detector calls/s) and writes --out JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from edge.config import CudaConfig, ModelsConfig  # noqa: E402
from edge.detect import letterbox  # noqa: E402
from edge.service import build_age_model, build_detector  # noqa: E402


def read_frames(video: Path, count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    if not frames:
        raise SystemExit(f"no frames read from {video}")
    return frames


def face_crops(age, detector, frames: list[np.ndarray], count: int) -> np.ndarray:
    """`count` crops of the faces the detector finds in the frames, cut as the daemon cuts them for this model
    (its metadata's size, margin and eye line: edge.crop.crop_face), repeated to make up the count."""
    crops = [age.info.crop(frame, face) for frame in frames for face in detector(frame)]
    if not crops:
        raise SystemExit(f"no face found in the {len(frames)} frames read: the age model is timed on face crops")
    return np.stack((crops * (count // len(crops) + 1))[:count])


def timed_calls(model, crops: np.ndarray, batches: list[int], calls: int) -> dict:
    result = {}
    for batch in batches:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            model.predict(crops[:batch])
            times.append(1000 * (time.perf_counter() - started))
        result[batch] = {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
                         "max": max(times)}
    return result


def in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn()))
    thread.start()
    thread.join()
    return box["value"]


def with_load(work, threads: int, fn) -> tuple[dict, float]:
    """fn's result while `threads` threads loop `work(i)`, with the cores the process kept busy meanwhile (threads
    waiting on CUDA may spin); and their calls per second."""
    stop = threading.Event()
    counts = [0] * threads

    def loop(i: int) -> None:
        while not stop.is_set():
            work(i)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    started, before, cpu = time.perf_counter(), sum(counts), time.process_time()
    result = fn()
    wall = time.perf_counter() - started
    rate = (sum(counts) - before) / wall
    result = {**result, "cores": (time.process_time() - cpu) / wall}
    stop.set()
    for w in workers:
        w.join()
    return result, rate


def line(name: str, timings: dict, rate: float | None = None) -> str:
    parts = [f"b{b}: {t['p50']:.1f}/{t['p90']:.1f}/{t['max']:.1f}" for b, t in timings.items() if isinstance(t, dict)]
    return f"{name:14s} " + "  ".join(parts) + (f"  detector/letterbox {rate:.0f} calls/s" if rate is not None else "") \
        + (f", {timings['cores']:.1f} cores busy" if "cores" in timings else "")


def blocking_sync() -> str:
    """CUDA's host threads sleep while they wait for the GPU instead of spinning (cudaDeviceScheduleBlockingSync),
    set before the first session makes the context: with one core per waiting thread, 16 camera threads spin on
    16 cores."""
    import ctypes
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        return f"cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync) in {name}: {runtime.cudaSetDeviceFlags(4)} (0: set)"
    return "no libcudart found: CUDA's default scheduling"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--providers", default="cuda,cpu")
    parser.add_argument("--loads", default="1,4,16")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--prefer-nhwc", type=int, choices=(0, 1), default=1, help="[models.cuda] prefer_nhwc")
    parser.add_argument("--blocking-sync", action="store_true", help="CUDA's waiting threads sleep, not spin")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    providers = opts.providers.split(",")
    if opts.blocking_sync:
        print(blocking_sync(), flush=True)
    models = ModelsConfig(age_model=opts.model, age_variant=opts.variant, providers=providers,
                          cuda=CudaConfig(prefer_nhwc=bool(opts.prefer_nhwc)))
    started = time.perf_counter()
    age = build_age_model(models)
    loaded = time.perf_counter() - started
    warm = age.warm_up(models.max_batch)
    print(f"age model {age.describe()} loaded in {loaded:.1f} s, warmed up in {warm:.1f} s; sizes {age.batch_sizes}")
    detector = build_detector(models)
    detector.warm_up()
    print(f"detector providers {detector.session.get_providers()}")
    cpu_models = ModelsConfig(age_model=opts.model, providers=["cpu"])
    frames = read_frames(opts.video, 32)
    batches = [1, 8, 32]
    crops = face_crops(age, detector, frames, max(batches))
    report: dict = {"age_model": age.describe(), "load_s": loaded, "warm_up_s": warm}

    report["main"] = timed_calls(age, crops, batches, opts.calls)
    print(line("main", report["main"]), flush=True)

    def first_then_timed():
        t = time.perf_counter()
        age.predict(crops[:1])
        return {"first_ms": 1000 * (time.perf_counter() - t), **timed_calls(age, crops, batches, opts.calls)}

    fresh = in_thread(first_then_timed)
    print(f"thread         first call {fresh.pop('first_ms'):.1f} ms; " + line("", fresh), flush=True)
    report["thread"] = fresh

    cpu_detectors = []
    for k in [int(x) for x in opts.loads.split(",")]:
        timings, rate = with_load(lambda i: detector(frames[i % len(frames)]), k,
                                  lambda: in_thread(lambda: timed_calls(age, crops, batches, opts.calls)))
        report[f"cuda-det {k}"] = {**timings, "rate": rate}
        print(line(f"cuda-det {k}", timings, rate), flush=True)
        while len(cpu_detectors) < k:
            cpu_detectors.append(build_detector(cpu_models))
        timings, rate = with_load(lambda i: cpu_detectors[i](frames[i % len(frames)]), k,
                                  lambda: in_thread(lambda: timed_calls(age, crops, batches, opts.calls)))
        report[f"cpu-det {k}"] = {**timings, "rate": rate}
        print(line(f"cpu-det {k}", timings, rate), flush=True)
        timings, rate = with_load(lambda i: letterbox(frames[i % len(frames)], detector.variant.input_size), k,
                                  lambda: in_thread(lambda: timed_calls(age, crops, batches, opts.calls)))
        report[f"resize {k}"] = {**timings, "rate": rate}
        print(line(f"resize {k}", timings, rate), flush=True)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
