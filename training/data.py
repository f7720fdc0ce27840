"""Labelled face photos: reading, splitting, and cropping them exactly as serving does.

A data folder holds `labels.csv` (`file_name,real_age[,gender,race]`, the
APPA-REAL / UTKFace layout) and the images, either as files (in the folder
or in `images/`) or as `images-*.tar.gz` shards with the images under
`images/` (the team's UTKFace pool). Shards are read in place, streaming:
nothing is unpacked to disk.

Every image goes through the daemon's own detector and `edge.crop.crop_face`,
so training sees what serving sees. Rules, documented in the README:
- no face found: the image is left out (serving would not see that face
  either) and counted;
- several faces: the largest is the labelled person (the photos are portraits);
- portrait padding: each photo is framed in black, half its size on every
  side, before detection. The full-range BlazeFace is built for till-distance
  faces and misses most faces that fill the frame (23 of 200 UTKFace chips
  found unpadded, 200 of 200 padded); the crop is then cut from the original
  photo by the same `crop_face` as serving, so only detection sees the frame;
- unreadable or missing files are listed, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge.crop import crop_face
from edge.detect import FaceDetector, decode_photo, detect_framed
from edge.types import Face

PARALLEL_FROM = 500  # photos: fewer are detected in this process
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(Exception):
    """A data folder or labels file that cannot be used: one line for the user."""


@dataclass(frozen=True)
class Label:
    file_name: str
    age: float
    gender: int | None = None  # UTKFace: 0 male, 1 female
    race: int | None = None  # UTKFace: 0 White, 1 Black, 2 Asian, 3 Indian, 4 Other


GENDERS = {0: "male", 1: "female"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Other"}


def read_labels(path: Path) -> list[Label]:
    """Parse labels.csv; a row with a bad age is a DataError naming its line, a file name given different labels
    on two rows one naming the first few; a row repeated as it was is read once."""
    return read_labels_counted(path)[0]


def read_labels_counted(path: Path) -> tuple[list[Label], int]:
    """read_labels, and how many repeated rows it read once (`data inspect` says so)."""
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    try:
        labels = _read_rows(path)
    except UnicodeDecodeError as exc:  # a spreadsheet's own encoding (UTF-16, Latin-1), or not text at all
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}): "
                        "save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not labels:
        raise DataError(f"{path}: no rows")
    return once_each(path, labels)


def once_each(path: Path, rows: list[tuple[int, Label]]) -> tuple[list[Label], int]:
    """One label a file name: the last row of a name won silently, whatever age the first gave it."""
    lines: dict[str, list[int]] = {}
    labels: dict[str, set[Label]] = {}
    for line, label in rows:
        lines.setdefault(label.file_name, []).append(line)
        labels.setdefault(label.file_name, set()).add(label)
    conflicting = [name for name, given in labels.items() if len(given) > 1]
    if conflicting:
        shown = "; ".join(f"{name} (lines {', '.join(map(str, lines[name][:4]))}: {_differences(labels[name])})"
                          for name in conflicting[:3])
        more = f" and {len(conflicting) - 3} more" if len(conflicting) > 3 else ""
        raise DataError(f"{path}: {len(conflicting)} file name(s) labelled differently on several rows: "
                        f"{shown}{more}; keep one row each")
    return [next(iter(given)) for given in labels.values()], len(rows) - len(labels)


def _differences(labels: set[Label]) -> str:
    ages = sorted({label.age for label in labels})
    return f"ages {', '.join(f'{a:g}' for a in ages)}" if len(ages) > 1 else f"age {ages[0]:g}, other gender or race"


def _read_rows(path: Path) -> list[tuple[int, Label]]:
    labels = []
    with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(handle)
        missing = {"file_name", "real_age"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} (need file_name,real_age)")
        for line, row in enumerate(reader, start=2):
            try:
                age = float(row["real_age"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: real_age {row['real_age']!r} is not a number") from None
            # a NUL in a name is no file's (opening it raised ValueError deep in the detection workers)
            if not 0 <= age <= 130 or not row["file_name"] or "\0" in row["file_name"]:
                raise DataError(f"{path}:{line}: bad row (file_name {row['file_name']!r}, age {age:g})")
            labels.append((line, Label(row["file_name"], age, _optional_int(row.get("gender")),
                                       _optional_int(row.get("race")))))
    return labels


def _optional_int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def split_of(file_name: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """'val', 'test' or 'train', from a hash h in [0, 1) of the file name: the same on every machine, every run.
    h < val_fraction: validation (picks the checkpoint); then test_fraction more: the held-out test split, never
    trained on nor used to choose anything, which the shipped figures are measured on. Validation is the same
    faces whatever test_fraction is, so runs with and without a test split compare on it."""
    digest = hashlib.sha1(file_name.encode()).digest()
    h = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"


def sample_fraction(file_name: str) -> float:
    """A second, independent hash in [0, 1) for taking a deterministic subset (--limit)."""
    return int.from_bytes(hashlib.sha1(b"subset:" + file_name.encode()).digest()[:8], "big") / 2**64


def select(labels: list[Label], limit: int | None) -> list[Label]:
    """All labels, or a deterministic spread-out subset of `limit` of them."""
    if limit is None or limit >= len(labels):
        return labels
    return sorted(labels, key=lambda label: sample_fraction(label.file_name))[:limit]


def iter_image_bytes(data_dir: Path, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """(file_name, encoded bytes) for the wanted files, from shards or loose files."""
    shards = sorted(data_dir.glob("images-*.tar.gz")) + sorted(data_dir.glob("images-*.tar"))
    if shards:
        for shard in shards:
            try:
                with tarfile.open(shard) as archive:
                    for member in archive:
                        name = Path(member.name).name
                        if member.isfile() and name in wanted:
                            yield name, archive.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"shard {shard} is unreadable: {exc}") from None
        return
    for name in sorted(wanted):
        for folder in (data_dir, data_dir / "images"):
            path = folder / name
            if path.is_file():
                yield name, path.read_bytes()
                break


def copies_of_training(data_dir: Path, labels: list[Label], val_fraction: float, test_fraction: float) -> set[str]:
    """The validation and test images whose bytes are also a training image's: the split goes by file name, and
    UTKFace holds 285 pictures under two or more names (95 of them across splits, 4 of those minors). Left out
    of validation and test, where they would score a face the network was trained on."""
    split = {label.file_name: split_of(label.file_name, val_fraction, test_fraction) for label in labels}
    if all(s == "train" for s in split.values()) or all(s != "train" for s in split.values()):
        return set()
    digests = {name: hashlib.sha1(data).digest() for name, data in iter_image_bytes(data_dir, set(split))}
    trained = {digest for name, digest in digests.items() if split[name] == "train"}
    return {name for name, digest in digests.items() if split[name] != "train" and digest in trained}


@dataclass
class FaceSet:
    """Cropped faces with their labels, in a fixed order."""

    crops: np.ndarray  # uint8 [N, S, S, 3] RGB
    labels: list[Label]
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)

    @property
    def ages(self) -> np.ndarray:
        return np.array([label.age for label in self.labels], np.float32)

    def subset(self, keep: np.ndarray) -> "FaceSet":
        return FaceSet(self.crops[keep], [l for l, k in zip(self.labels, keep) if k])


def detect_portrait_face(detector: FaceDetector, image: np.ndarray) -> Face | None:
    """The largest face of a portrait photo, in the photo's own pixel coordinates."""
    faces = detect_framed(detector, image)
    return max(faces, key=lambda f: f.width * f.height) if faces else None


def load_faces(data_dir: Path, labels: list[Label], size: int, margin: float,
               detector: FaceDetector | None = None, progress: bool = True, workers: int | None = None) -> FaceSet:
    """Detect and crop every labelled image, as the daemon would."""
    cropper = lambda image, face: crop_face(image, face, size, margin)  # noqa: E731
    faces = load_face_sets(data_dir, labels, [cropper], detector, progress, workers)[0]
    if not faces.labels:
        faces.crops = np.zeros((0, size, size, 3), np.uint8)
    return faces


def load_face_sets(data_dir: Path, labels: list[Label], croppers: list[Callable[[np.ndarray, Face], np.ndarray]],
                   detector: FaceDetector | None = None, progress: bool = True,
                   workers: int | None = None) -> list[FaceSet]:
    """Detect every labelled image once, crop each face once per cropper (models with different crops).

    Detection, the slow part (~10 ms a photo), runs in `workers` processes (default: one per core;
    16 on the GPU machine turn its 20,000 photos from minutes into seconds); decoding again and
    cropping stay here, so croppers need not be picklable. A given `detector`, or fewer than
    PARALLEL_FROM photos, means this process alone."""
    by_name = {label.file_name: label for label in labels}
    workers = 1 if detector is not None else (workers or os.cpu_count() or 1)
    if len(by_name) < PARALLEL_FROM:
        workers = 1  # starting the processes (a second or two each) costs more than it saves
    crops: list[list[np.ndarray]] = [[] for _ in croppers]
    kept, unreadable, no_face, seen = [], [], [], set()
    for name, encoded, image, face in _progress(_detected(data_dir, set(by_name), detector, workers),
                                                len(by_name), progress):
        seen.add(name)
        if image is None:
            image = decode_photo(encoded)
        if image is None:
            unreadable.append(name)
            continue
        if face is None:
            no_face.append(name)
            continue
        for out, cropper in zip(crops, croppers):
            out.append(cropper(image, face))
        kept.append(by_name[name])
    order = np.argsort([label.file_name for label in kept], kind="stable")
    missing, ordered = sorted(set(by_name) - seen), [kept[i] for i in order]
    return [FaceSet(np.stack(c)[order] if c else np.zeros((0, 1, 1, 3), np.uint8), ordered, missing,
                    sorted(unreadable), sorted(no_face)) for c in crops]


def _detected(data_dir: Path, wanted: set[str], detector: FaceDetector | None, workers: int):
    """(name, encoded bytes, decoded image or None, the portrait's face or None) per wanted file."""
    images = iter_image_bytes(data_dir, wanted)
    if workers <= 1:
        detector = detector or FaceDetector(min_face_px=0)
        for name, encoded in images:
            image = decode_photo(encoded)
            yield name, encoded, image, None if image is None else detect_portrait_face(detector, image)
        return
    stop = threading.Event()

    def fed():
        for item in images:
            if stop.is_set():
                return
            yield item

    # spawn, not fork: the trainer has JAX or TensorFlow running (threads) by the time faces load
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker)
    try:
        for name, encoded, face in pool.imap(_detect_encoded, fed(), chunksize=32):
            yield name, encoded, None, face
    finally:
        # Wound down, not terminated: Pool.terminate() can catch its task thread sending a chunk that nobody
        # will read, and wait for it for ever (the test of a worker that cannot start hung so in CI, once in
        # four runs). The feeding stops at the next image; the workers finish what was sent and exit.
        stop.set()
        pool.close()
        pool.join()


_worker_detector: FaceDetector | None = None
_worker_failure: str | None = None  # why this worker has no detector


def _start_worker() -> None:
    # An initializer that raises makes multiprocessing.Pool start another worker, which fails the same way,
    # for ever (a package the machine lacks: 667 tracebacks and no end, in a rehearsal of the GPU job). The
    # failure is kept and raised by the first task instead, which ends the pool and the command in one line.
    global _worker_detector, _worker_failure
    try:
        _worker_detector = FaceDetector(min_face_px=0, threads=1)  # one thread each: the processes share the cores
    except Exception as exc:  # noqa: BLE001 - whatever it is, the parent says it
        _worker_failure = f"{type(exc).__name__}: {exc}"


def _detect_encoded(item: tuple[str, bytes]) -> tuple[str, bytes, Face | None]:
    if _worker_failure is not None:
        raise DataError(f"the face detector could not start in a worker process: {_worker_failure}")
    name, encoded = item
    image = decode_photo(encoded)
    return name, encoded, None if image is None else detect_portrait_face(_worker_detector, image)


def _progress(items, total: int, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track
    return track(items, total=total, description="detecting and cropping faces", transient=True)
