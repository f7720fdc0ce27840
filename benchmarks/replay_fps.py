"""Replay throughput on this machine: `make bench` (or python benchmarks/replay_fps.py).

For each clip, three figures measured in the same run, so ratios are fair on
a shared machine:
  decode    OpenCV decoding alone (the floor no pipeline can beat)
  detect    decoding + BlazeFace detection
  replay    the whole `tillsight replay` pipeline in-process (detector, crop,
            batched age model, tracker, policy, MQTT QoS 1 to a real mosquitto,
            waiting for every ack)
The age model is the contract's constant model: until a trained model ships
these figures measure everything but the age network itself.
Writes bench-out/replay_fps.json and bench-out/replay_fps.png.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.broker import LocalBroker  # noqa: E402
from edge.cli import run_replay  # noqa: E402
from edge.config import parse_config  # noqa: E402
from edge.contract import build_constant_age_model  # noqa: E402
from edge.demo import bundled_clip  # noqa: E402
from edge.detect import FaceDetector  # noqa: E402

SHARED = Path(os.environ.get("TILLSIGHT_SHARED", REPO.parent / "shared"))


def frames_per_second(video: Path, work) -> float:
    capture = cv2.VideoCapture(str(video))
    frames, started = 0, time.perf_counter()
    while True:
        ok, image = capture.read()
        if not ok:
            break
        work(image)
        frames += 1
    return frames / (time.perf_counter() - started)


def main() -> None:
    clips = {"carphone": bundled_clip(), "hamilton": SHARED / "media/short_hamilton_clip.mp4"}
    clips = {name: path for name, path in clips.items() if path and path.is_file()}
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    model = Path(tempfile.mkdtemp()) / "age.onnx"
    model.write_bytes(build_constant_age_model(40, input_size=224))
    detector = FaceDetector()
    results = {}
    with LocalBroker() as broker:
        for name, video in clips.items():
            decode = frames_per_second(video, lambda image: None)
            detect = frames_per_second(video, detector)
            config = parse_config({"store_id": "bench", "cameras": [{"id": "b", "source": str(video), "fps_limit": None}],
                                   "mqtt": {"host": "127.0.0.1", "port": broker.port},
                                   "models": {"age_model": str(model)}})
            summary = run_replay(config)
            results[name] = {"decode_fps": round(decode, 1), "detect_fps": round(detect, 1),
                             "replay_fps": summary["fps"], "replay_vs_detect": round(summary["fps"] / detect, 2),
                             "frames": summary["frames"], "frames_with_faces": summary["frames_with_faces"],
                             "faces": summary["faces"], "provider": summary["provider"]}
            print(f"{name:9s} decode {decode:7.1f} fps | detect {detect:6.1f} fps | replay {summary['fps']:6.1f} fps "
                  f"({summary['fps'] / detect:.2f}x detect) | faces in {summary['frames_with_faces']}/{summary['frames']} frames")
    (out / "replay_fps.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "replay_fps.png")
    print(f"wrote {out / 'replay_fps.json'} and {out / 'replay_fps.png'}")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    stages = ["decode_fps", "detect_fps", "replay_fps"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(results)
    for i, (name, row) in enumerate(results.items()):
        ax.bar([s + i * width for s in range(len(stages))], [row[s] for s in stages], width, label=name)
    ax.set_xticks([s + width * (len(results) - 1) / 2 for s in range(len(stages))],
                  ["decode only", "decode + detect", "full replay"])
    ax.set_ylabel("frames per second")
    ax.set_yscale("log")
    ax.set_title(f"tillsight replay on this machine ({os.cpu_count()} cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
