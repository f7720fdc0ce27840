"""How long an H.264 camera repeats a still, empty till to the bit: the premise of the frozen-picture rule.

    python benchmarks/still_scene.py [--size 1280x720] [--fps 15] [--seconds 12] [--sample-fps 5]
                                     [--keyframe-s 2,4,10] [--noise 0,0.5,1,2] [--out bench-out/still_scene]

A till with nobody at it, with a sensor's temporal noise (σ grey levels; an IP camera's 3D noise
reduction leaves 0 to 2), is encoded with libx264 as IP cameras do (no B-frames, a fixed keyframe
interval, three rate settings), decoded by OpenCV as the daemon decodes, sampled at the daemon's
`fps_limit`, and judged by `edge.capture.PictureCheck` with the shipped limits. Printed per setting:
the share of bit-identical frame pairs, the longest run of them, and whether the picture would be
called frozen with a face in view (`picture_check_s`, 3 s) and with nobody in view (`still_scene_s`,
120 s). Writes still_scene.json and still_scene.png (with matplotlib).

Needs PyAV (`av`, the dev extra): the only pip package with an H.264 encoder (its FFmpeg has libx264).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from edge.capture import FROZEN, PictureCheck
from edge.config import CameraConfig

RATES = {"crf 23": {"crf": "23"}, "crf 30": {"crf": "30"},
         "512 kbit/s cap": {"crf": "28", "maxrate": "512000", "bufsize": "1024000"}}


def till_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An empty till: a textured counter and shelves (edges an encoder must spend bits on), nobody there."""
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.integers(40, 220, (height, width, 3), np.uint8), (0, 0), 5)
    scene = cv2.addWeighted(texture, 0.7, np.full_like(texture, 110), 0.3, 0)
    for x in range(0, width, max(8, width // 13)):
        cv2.rectangle(scene, (x, height // 7), (x + width // 21, height * 3 // 7),
                      (x % 255, 80, 200 - x % 150), -1)
    return scene


def encode(path: Path, scene: np.ndarray, noise: float, fps: int, seconds: float, keyframe_s: float,
           rate: dict, seed: int = 1) -> float:
    """The still scene as an IP camera streams it (libx264, no B-frames); returns kbit/s."""
    import av
    rng = np.random.default_rng(seed)
    keyint = str(max(1, round(keyframe_s * fps)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = scene.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "bf": "0", "g": keyint, "keyint_min": keyint, "sc_threshold": "0",
                          **rate}
        for _ in range(round(fps * seconds)):
            image = scene if noise == 0 else np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.stat().st_size * 8 / seconds / 1000


def judge(path: Path, fps: int, sample_fps: float) -> dict:
    """Decode with OpenCV, keep the frames the daemon's fps_limit keeps, and judge them as the daemon would."""
    defaults = CameraConfig(id="c", source=0)
    with_face = PictureCheck(defaults.picture_check_s, defaults.still_scene_s)
    nobody = PictureCheck(defaults.picture_check_s, defaults.still_scene_s)
    capture = cv2.VideoCapture(str(path))
    step = max(1, round(fps / sample_fps))
    previous, index, pairs, identical, run, longest = None, 0, 0, 0, 0, 0
    frozen = {"face_in_view": False, "nobody_in_view": False}
    while True:
        ok, image = capture.read()
        if not ok:
            break
        index += 1
        if (index - 1) % step:
            continue
        t = (index - 1) / fps
        frozen["face_in_view"] |= with_face.see(image, t, face_in_view=True) == FROZEN
        frozen["nobody_in_view"] |= nobody.see(image, t, face_in_view=False) == FROZEN
        if previous is not None:
            pairs += 1
            same = cv2.norm(image, previous, cv2.NORM_INF) == 0
            identical += same
            run = run + 1 if same else 0
            longest = max(longest, run)
        previous = image
    capture.release()
    return {"identical_share": round(identical / max(pairs, 1), 3), "longest_identical_s": round(longest * step / fps, 2),
            "frozen_if_face_in_view": frozen["face_in_view"], "frozen_if_nobody_in_view": frozen["nobody_in_view"]}


def plot(rows: list[dict], out: Path, picture_check_s: float) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keyframes = sorted({r["keyframe_s"] for r in rows})
    fig, axes = plt.subplots(1, len(keyframes), figsize=(4 * len(keyframes), 3.6), sharey=True, squeeze=False)
    for ax, keyframe_s in zip(axes[0], keyframes):
        for rate in RATES:
            chosen = [r for r in rows if r["keyframe_s"] == keyframe_s and r["rate"] == rate]
            ax.plot([r["noise"] for r in chosen], [r["longest_identical_s"] for r in chosen], marker="o", label=rate)
        ax.axhline(picture_check_s, color="red", linestyle="--", label=f"picture_check_s ({picture_check_s:g} s)")
        ax.set_title(f"keyframe every {keyframe_s:g} s")
        ax.set_xlabel("sensor noise σ (grey levels)")
    axes[0][0].set_ylabel("longest bit-identical run, s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("A still, empty till through libx264 and OpenCV")
    fig.tight_layout()
    path = out / "still_scene.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def numbers(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        sys.exit(f"still_scene: --{name} {text!r}: numbers separated by commas")
    if not values or any(v < 0 for v in values):
        sys.exit(f"still_scene: --{name} {text!r}: numbers of 0 or more")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--sample-fps", type=float, default=5.0, help="the daemon's fps_limit")
    parser.add_argument("--keyframe-s", default="2,4,10")
    parser.add_argument("--noise", default="0,0.5,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench-out/still_scene"))
    args = parser.parse_args()
    if importlib.util.find_spec("av") is None:
        sys.exit("still_scene: PyAV is not installed (pip install 'tillsight[dev]', or pip install av)")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        assert 16 <= width <= 4096 and 16 <= height <= 4096 and width % 2 == 0 and height % 2 == 0
    except (ValueError, AssertionError):
        sys.exit(f"still_scene: --size {args.size!r}: WIDTHxHEIGHT, even, 16 to 4096")
    if not 1 <= args.fps <= 60 or not 0 < args.sample_fps <= args.fps or not 1 <= args.seconds <= 600:
        sys.exit("still_scene: --fps 1 to 60, --sample-fps up to --fps, --seconds 1 to 600")
    keyframes, noises = numbers(args.keyframe_s, "keyframe-s"), numbers(args.noise, "noise")
    scene = till_scene(width, height)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'keyframe':>9} {'noise σ':>8} {'rate':<15} {'kbit/s':>7} {'identical':>10} {'longest run':>12} "
          f"{'frozen: face / nobody':>22}")
    with tempfile.TemporaryDirectory() as folder:
        for keyframe_s in keyframes:
            for noise in noises:
                for rate, options in RATES.items():
                    path = Path(folder) / "still.mp4"
                    kbps = encode(path, scene, noise, args.fps, args.seconds, keyframe_s, options)
                    row = {"keyframe_s": keyframe_s, "noise": noise, "rate": rate, "kbit_s": round(kbps),
                           **judge(path, args.fps, args.sample_fps)}
                    rows.append(row)
                    verdict = "/".join("yes" if row[k] else "no" for k in ("frozen_if_face_in_view",
                                                                          "frozen_if_nobody_in_view"))
                    print(f"{keyframe_s:>7g} s {noise:>8g} {rate:<15} {row['kbit_s']:>7} "
                          f"{row['identical_share']:>10.0%} {row['longest_identical_s']:>10.1f} s {verdict:>22}",
                          flush=True)
    defaults = CameraConfig(id="c", source=0)
    result = {"size": [width, height], "fps": args.fps, "seconds": args.seconds, "sample_fps": args.sample_fps,
              "picture_check_s": defaults.picture_check_s, "still_scene_s": defaults.still_scene_s, "rows": rows}
    (args.out / "still_scene.json").write_text(json.dumps(result, indent=1))
    figure = plot(rows, args.out, defaults.picture_check_s)
    tripped = [r for r in rows if r["frozen_if_face_in_view"]]
    print(f"{len(tripped)} of {len(rows)} settings repeat the empty till for {defaults.picture_check_s:g} s or more "
          f"(frozen if a face were in view); {sum(r['frozen_if_nobody_in_view'] for r in rows)} are called frozen "
          f"with nobody in view")
    print(f"written: {args.out / 'still_scene.json'}" + (f", {figure}" if figure else " (no plot: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
