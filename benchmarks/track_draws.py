"""Merges and splits of the tracker over several draws of the composed till videos.

    python benchmarks/track_draws.py [--draws 6] [--min-similarity 0.23]

tests/test_track_split.py composes three scenes of 100 UTKFace validation customers (walking in
and out, stepping straight into the same spot, the same under changing light) with one draw of
noise, gaps and head movements, and asserts no merge and no split. This runs the same scenes
over `--draws` draws (draw 0 is the test's), counts merges and splits with the test's own
rule, and collects the appearance similarity of every face against every track it overlaps:
against its own track (same person) and against the previous customer's (another person, until
that track has taken in a second customer). Prints a table, writes
bench-out/track_draws.{json,png}. Needs ../shared (UTKFace); generated videos stay in a
temporary folder.

Measured (6 draws, 600 customers, 2-core VM, 2026-11-26):

    tracker                                              merges  splits  customers seen
    best overlap over the floor (before 0399c93)            3       3     588
    best look over the floor (0399c93)                      1       1     588
    and a face width away counts as near, with looks (now)  1       0     588

    similarity (now)  comparisons  1st percentile  lowest  highest  over the floor (0.23)
    same person           16,999        0.569       0.072
    previous customer      4,547                             0.260          5

With the picture rule first, as in the daemon (`--picture-face-s 60`, the default; 2026-11-26, later): the
same 1 merge and 0 splits, and none of the 600 customers taken for a picture (`pictures` in the JSON).

The 5 comparisons with the previous customer's track over the floor made 1 merge (draw 3): two
look-alikes, the second stepping in under another light one frame after the first left, 0.257.
Until 0399c93 the track that overlapped a face most took it if it passed the floor, even when
the face's own track was there. The split of 0399c93 (draw 2) was a customer walking off: 80 px
in one frame at 10 fps, box overlap 0.19 against a gate of 0.2, similarity 0.76.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from edge.detect import FaceDetector, iou  # noqa: E402
from edge.track import FaceTracker, PictureFaces, Signature  # noqa: E402
from test_track_split import FPS, SCENES, scene_frames, track_scene  # noqa: E402
from tskit import compose_till_video  # noqa: E402
from training.data import iter_image_bytes, read_labels, select, split_of  # noqa: E402

UTKFACE = REPO.parent / "shared" / "datasets" / "utkface"


def validation_faces(count: int) -> list[np.ndarray]:
    labels = select([l for l in read_labels(UTKFACE / "labels.csv") if split_of(l.file_name, 0.1) == "val"], count)
    photos = dict(iter_image_bytes(UTKFACE, {l.file_name for l in labels}))
    return [cv2.imdecode(np.frombuffer(photos[l.file_name], np.uint8), cv2.IMREAD_COLOR) for l in labels]


def similarities(path: Path, times: list[tuple[float, float]], min_similarity: float) -> tuple[list, list]:
    """(same person, another person): each face's similarity to each live track its box overlaps."""
    detector, tracker = FaceDetector(min_face_px=24), FaceTracker("till", min_similarity=min_similarity)
    owner: dict[int, int | None] = {}  # track id -> its first customer; None once it has taken in another
    same, other = [], []
    for t, customer, image in scene_frames(path, times):
        faces = detector(image)
        for face in faces:
            signature = None
            for track in tracker.tracks:
                overlaps = iou(np.array(track.box, np.float32), np.array([face.box], np.float32))[0]
                if customer is None or owner.get(track.track_id) is None or overlaps < tracker.iou_threshold:
                    continue
                signature = signature or Signature.of(image, face)
                alike = track.signature.similarity(signature)
                (same if owner[track.track_id] == customer else other).append(alike)
        matched, _ = tracker.update(t, faces, image)
        for track in matched:
            first = owner.setdefault(track.track_id, customer)
            if first is not None and customer is not None and first != customer:
                owner[track.track_id] = None
    return same, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--min-similarity", type=float, default=0.23)
    parser.add_argument("--picture-face-s", type=float, default=60.0, help="faces go through the picture rule first, "
                        "as in the daemon: a customer taken for a picture is counted (0: off)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = parser.parse_args()
    if not (UTKFACE / "labels.csv").is_file():
        sys.exit(f"track_draws: error: UTKFace not found at {UTKFACE} (../shared)")
    faces = validation_faces(sum(n for n, _ in SCENES.values()))
    rows, same, other = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for draw in range(args.draws):
            start = 0
            for i, (name, (count, options)) in enumerate(SCENES.items()):
                path = Path(folder) / f"draw{draw}-scene{i}.mp4"
                times = compose_till_video(faces[start:start + count], path, fps=FPS, seconds=3, gap_s=(0.0, 0.5),
                                           seed=draw * 10 + i, **options)  # draw 0: the test's seeds
                start += count
                pictures = PictureFaces(args.picture_face_s)
                merges, splits, seen = track_scene(path, times, args.min_similarity, pictures)
                s, o = similarities(path, times, args.min_similarity)
                same += s
                other += o
                rows.append({"draw": draw, "scene": name, "customers": count, "seen": seen, "merges": merges,
                             "splits": splits, "pictures": len(pictures.pictures), "min_same": min(s, default=None),
                             "max_other": max(o, default=None)})
                print(f"draw {draw}  {name:<26} {seen:>3}/{count} seen  {merges} merged  {splits} split  "
                      f"{len(pictures.pictures)} taken for pictures  "
                      f"same >= {min(s):.3f}  other <= {max(o, default=float('nan')):.3f}", flush=True)
    totals = {key: sum(r[key] for r in rows) for key in ("customers", "seen", "merges", "splits", "pictures")}
    report = {"min_similarity": args.min_similarity, "draws": args.draws, "totals": totals, "rows": rows,
              "similarities": {"same": [round(s, 4) for s in same], "other": [round(o, 4) for o in other]},
              "same": {"n": len(same), "min": min(same), "p1": float(np.percentile(same, 1))},
              "other": {"n": len(other), "max": max(other, default=None),
                        "p99": float(np.percentile(other, 99)) if other else None,
                        "over_floor": int(sum(o >= args.min_similarity for o in other))}}
    print(f"total: {totals['customers']} customers, {totals['seen']} seen, {totals['merges']} merged, "
          f"{totals['splits']} split, {totals['pictures']} taken for pictures; same person >= {report['same']['min']:.3f} (1st percentile "
          f"{report['same']['p1']:.3f}), another <= {report['other']['max']:.3f} "
          f"({report['other']['over_floor']} of {len(other)} comparisons over the floor)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "track_draws.json").write_text(json.dumps(report, indent=2))
    plot(same, other, args.min_similarity, args.out / "track_draws.png")


def plot(same: list[float], other: list[float], floor: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(-1.5, 1.0, 101)
    axis.hist(same, bins, alpha=0.6, label=f"same person ({len(same)})")
    axis.hist(other, bins, alpha=0.6, label=f"the previous customer ({len(other)})")
    axis.axvline(floor, color="black", linestyle="--", label=f"floor {floor}")
    axis.set_yscale("log")  # the tails are what matter: a few faces near the floor decide merges and splits
    axis.set_xlabel("similarity of a face to a track it overlaps")
    axis.set_ylabel("comparisons")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
