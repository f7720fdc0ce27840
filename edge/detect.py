"""Face detection: MediaPipe BlazeFace converted to ONNX, run with ONNX Runtime.

The network gives, per SSD anchor, a box (centre, size) and six keypoints as
offsets in input pixels, plus one logit. We letterbox the frame into the
square input, decode against the anchors, keep scores above a threshold,
merge overlapping boxes with MediaPipe's weighted NMS and map back to frame
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.catalog import DEFAULT_VARIANT, VARIANTS, BlazeFaceVariant
from edge.runtime import CPU, open_session, provider_fallback, session_options
from edge.types import Face


# MediaPipe clips logits at +-100; 80 keeps exp() finite in float32.
_RAW_SCORE_LIMIT = 80.0


def generate_anchors(variant: BlazeFaceVariant) -> np.ndarray:
    """Anchor centres, (N, 2) normalised to [0, 1], in the network's output order."""
    centres = []
    for stride, repeats in zip(variant.strides, variant.anchors_per_cell):
        cells = variant.input_size // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(grid, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the square network input."""

    scale: float
    pad_x: float
    pad_y: float


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio, pad to size x size, RGB float in [-1, 1]."""
    h, w = image_bgr.shape[:2]
    scale = min(size / w, size / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = cv2.copyMakeBorder(resized, pad_y, size - new_h - pad_y, pad_x, size - new_w - pad_x,
                                cv2.BORDER_CONSTANT, value=0)
    # scaled in place: every frame of every camera comes through here (0.8 ms a 640x480 frame, was 1.15)
    tensor = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32)
    tensor *= 1 / 127.5
    tensor -= 1.0
    return tensor, Letterbox(scale, pad_x, pad_y)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, input_size: int):
    """Raw outputs (N, 16) and (N,) -> boxes (N, 4) x0y0x1y1, keypoints (N, 6, 2), scores (N,).

    Coordinates are in network-input pixels.
    """
    points = raw_boxes.reshape(-1, 8, 2).astype(np.float32)
    anchor_px = anchors * input_size
    centre = points[:, 0] + anchor_px
    half = points[:, 1] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = points[:, 2:] + anchor_px[:, None, :]
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.reshape(-1), -_RAW_SCORE_LIMIT, _RAW_SCORE_LIMIT)))
    return boxes, keypoints, scores


def _logit(probability: float) -> float:
    """The raw score at which the sigmoid gives `probability`, a hair lower: decode() re-checks the score itself."""
    return float(np.log(probability / (1 - probability))) - 1e-4


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x0y0x1y1 box against many."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def box_iou(a: tuple, b: tuple) -> float:
    """IoU of two x0y0x1y1 boxes in plain Python: the tracker compares a few boxes a frame, for which numpy's
    cost per call outweighs the arithmetic (this runs in every camera's pipeline thread, under the GIL)."""
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1e-9)


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """IoU of every x0y0x1y1 box against every other, (N, N)."""
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(areas[:, None] + areas[None, :] - inter, 1e-9)


def weighted_nms(boxes, keypoints, scores, iou_threshold: float):
    """MediaPipe's weighted NMS: each cluster of overlapping candidates becomes
    one detection whose box and keypoints are the score-weighted mean of the
    cluster and whose score is the best in it. More stable frame to frame than
    plain NMS, which the tracker and the eye alignment both like."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    overlapping = iou_matrix(boxes) > iou_threshold  # at once: a face's cluster is a few dozen anchors
    remaining = np.ones(len(scores), bool)
    kept = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        cluster = remaining & overlapping[i]
        cluster[i] = True
        weights = scores[cluster][:, None]
        box = (boxes[cluster] * weights).sum(0) / weights.sum()
        kps = (keypoints[cluster] * weights[:, :, None]).sum(0) / weights.sum()
        kept.append((box, kps, float(scores[i])))
        remaining &= ~cluster
    return kept


def _fixed(dim) -> int | None:
    """A dimension of a model's input or output: its size, or None where the model leaves it open ('N')."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _shape_fits(shape, wanted: tuple) -> bool:
    """Whether a declared shape has the rank of `wanted` and its sizes where both are fixed (None: any)."""
    return shape is not None and len(shape) == len(wanted) and all(
        want is None or _fixed(dim) is None or _fixed(dim) == want for dim, want in zip(shape, wanted))


def check_contract(session, variant: BlazeFaceVariant, path: Path) -> None:
    """The model's inputs and outputs are those of the configured BlazeFace variant: ModelError (one line) if
    not. Another file (an age model, another variant's detector) would fail in the first frame's decode with an
    IndexError or a shape error: at start, in `config check --models` and in a reload's model check alike."""
    from edge.errors import ModelError
    size, anchors = variant.input_size, len(generate_anchors(variant))
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or not _shape_fits(inputs[0].shape, (None, size, size, 3)):
        shown = ", ".join(f"{i.type} {i.shape}" for i in inputs)
        other = [v.name for v in VARIANTS.values() if len(inputs) == 1 and inputs[0].type == "tensor(float)"
                 and _shape_fits(inputs[0].shape, (None, v.input_size, v.input_size, 3))]
        which = f", the {other[0]} variant's" if other else ""
        raise ModelError(f"face detector {path}: its input is {shown}{which}; models.detector_variant = "
                         f"{variant.name!r} takes a {size}x{size} RGB float picture")
    if len(outputs) < 2 or not (_shape_fits(outputs[0].shape, (None, None, 16))
                                and _shape_fits(outputs[1].shape, (None, None, 1))):
        shown = ", ".join(str(o.shape) for o in outputs)
        raise ModelError(f"face detector {path}: its outputs are {shown}, not BlazeFace's boxes [1, N, 16] and "
                         "scores [1, N, 1]: not a face detector")
    found = {_fixed(outputs[0].shape[1]), _fixed(outputs[1].shape[1])} - {None}
    if found and found != {anchors}:
        count = found.pop()
        matching = [v.name for v in VARIANTS.values() if len(generate_anchors(v)) == count]
        which = f", which is the {matching[0]} variant's count" if matching else ""
        raise ModelError(f"face detector {path}: {count} anchors in the model{which}; models.detector_variant = "
                         f"{variant.name!r} expects {anchors}")


class FaceDetector:
    """BlazeFace through ONNX Runtime; call it with a BGR frame."""

    def __init__(
        self,
        model_path: Path | None = None,
        variant: str = DEFAULT_VARIANT,
        score_threshold: float = 0.5,
        iou_threshold: float = 0.3,
        min_face_px: float = 20.0,
        providers: list[str] | None = None,
        threads: int = 0,
        spinning: bool = False,
        cuda_options: dict[str, str] | None = None,
        providers_setting: str = "models.providers",
    ):
        self.variant = VARIANTS[variant]
        self.session = open_session(model_path or self.variant.onnx_path, providers, "face detector",
                                    session_options(threads, spinning), cuda_options, setting=providers_setting)
        self.fallback = provider_fallback(self.session, providers)
        self.input_name = self.session.get_inputs()[0].name
        self.anchors = generate_anchors(self.variant)
        check_contract(self.session, self.variant, model_path or self.variant.onnx_path)
        self.score_threshold = score_threshold
        self._raw_threshold = _logit(score_threshold)  # once: every frame of every camera compares with it
        self.iou_threshold = iou_threshold
        self.min_face_px = min_face_px

    def warm_up(self) -> None:
        """On a GPU, one call before the first frame: the provider prepares the input shape on its first call
        (the detector's is fixed). The CPU has nothing to prepare."""
        if self.session.get_providers()[0] != CPU:
            size = self.variant.input_size
            self(np.zeros((size, size, 3), np.uint8))

    def __call__(self, image_bgr: np.ndarray) -> list[Face]:
        size = self.variant.input_size
        tensor, lb = letterbox(image_bgr, size)
        raw_boxes, raw_scores = self.session.run(None, {self.input_name: tensor[None]})
        # only the anchors that score enough are decoded (a few dozen of 2,304): this runs for every frame of
        # every camera in the Python thread of its pipeline (the sigmoid keeps the order, the answers are the same)
        likely = np.flatnonzero(raw_scores[0].reshape(-1) >= self._raw_threshold)
        boxes, keypoints, scores = decode(raw_boxes[0][likely], raw_scores[0].reshape(-1)[likely], self.anchors[likely],
                                          size)
        keep = (scores >= self.score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        faces = []
        for box, kps, score in weighted_nms(boxes[keep], keypoints[keep], scores[keep], self.iou_threshold):
            face = _to_frame_pixels(box, kps, score, lb, image_bgr.shape)
            if min(face.width, face.height) >= self.min_face_px:
                faces.append(face)
        return faces


def _to_frame_pixels(box, keypoints, score, lb: Letterbox, shape) -> Face:
    h, w = shape[:2]
    offset = np.array([lb.pad_x, lb.pad_y], np.float32)
    (x0, y0), (x1, y1) = (box[:2] - offset) / lb.scale, (box[2:] - offset) / lb.scale
    points = (keypoints[:3] - offset) / lb.scale  # MediaPipe order: right eye, left eye, nose tip, ...
    left, right = sorted(map(tuple, points[:2].tolist()))  # by x: image left first
    clipped = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
    return Face(tuple(float(v) for v in clipped), score, left, right, tuple(points[2].tolist()))


# Still photos (predict, eval, training): the full-range model is built for
# till-distance faces and misses most faces that fill the frame (23 of 200
# UTKFace chips found as they are, 200 of 200 framed in black half the photo's
# size on every side). Framing halves small faces, so photos are searched both ways.
PORTRAIT_PAD = 0.5


def detect_framed(detector: FaceDetector, image_bgr: np.ndarray) -> list[Face]:
    """Faces of a photo framed in black, in the photo's own pixel coordinates."""
    pad = int(PORTRAIT_PAD * max(image_bgr.shape[:2]))
    framed = cv2.copyMakeBorder(image_bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    move = lambda point: (point[0] - pad, point[1] - pad)  # noqa: E731
    faces = []
    for face in detector(framed):
        x0, y0, x1, y1 = face.box
        faces.append(Face((x0 - pad, y0 - pad, x1 - pad, y1 - pad), face.score, move(face.left_eye), move(face.right_eye),
                          move(face.nose) if face.nose else None))
    return faces


MAX_PHOTO_BYTES = 1 << 28  # a larger file is no photo (a video given by mistake): not read into memory


def decode_photo(encoded: bytes) -> np.ndarray | None:
    """A photo's BGR pixels; None where its bytes are no image OpenCV reads, as for a header that claims more pixels
    than OpenCV's limit (2^30: a PNG's 60000x60000), where imdecode raised cv2.error."""
    try:
        return cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def read_photo(path: Path) -> np.ndarray | None:
    """A photo file's BGR pixels; None where it cannot be read or decoded. Python reads the file, not cv2.imread:
    OpenCV's bindings crash the process (a segfault) on a file name that is not UTF-8."""
    try:
        if path.stat().st_size > MAX_PHOTO_BYTES:
            return None
        return decode_photo(path.read_bytes())
    except OSError:
        return None


def detect_in_photo(detector: FaceDetector, image_bgr: np.ndarray, same_face_iou: float = 0.3) -> list[Face]:
    """Faces at any scale in a still photo: as it is (small faces) and framed (close-ups)."""
    faces = detector(image_bgr)
    for face in detect_framed(detector, image_bgr):
        if not faces or iou(np.array(face.box), np.array([f.box for f in faces])).max() <= same_face_iou:
            faces.append(face)
    return faces
