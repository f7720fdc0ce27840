"""The face crop: the one definition of what the age model sees.

Training (`training/`) and serving (`edge/`) both call `crop_face`, so the
two can never drift apart: rotate so the eyes are level, take a square of the
detector box's side widened by `margin` on every side, resize to the model's
input size, RGB. The square is centred on the box, or, when the model asks
for it with `eye_y`, placed so the eyes' midpoint sits at the horizontal
centre and at `eye_y` of the height: the alignment of models trained on
landmark-aligned chips (dlib's put the eyes at 0.30).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from edge.types import Face


def crop_transform(face: Face, size: int, margin: float, eye_y: float | None = None) -> np.ndarray:
    """2x3 affine matrix mapping frame pixels to crop pixels."""
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    (lx, ly), (rx, ry) = face.left_eye, face.right_eye
    if eye_y is None:
        centre, target = ((x0 + x1) / 2, (y0 + y1) / 2), (size / 2, size / 2)
    else:
        centre, target = ((lx + rx) / 2, (ly + ry) / 2), (size / 2, eye_y * size)
    # Image y grows downwards, so a positive angle is a clockwise tilt of the
    # eye line; OpenCV's positive angle rotates counter-clockwise, undoing it.
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    matrix = cv2.getRotationMatrix2D(centre, angle, size / side)
    matrix[:, 2] += (target[0] - centre[0], target[1] - centre[1])
    return matrix


def crop_face(image_bgr: np.ndarray, face: Face, size: int, margin: float, eye_y: float | None = None) -> np.ndarray:
    """Aligned square RGB uint8 crop of shape (size, size, 3).

    Outside the frame the edge pixels are repeated (BORDER_REPLICATE): faces at
    the frame edge and the tight UTKFace crops then look alike, with no black
    bars for the model to learn from.
    """
    matrix = crop_transform(face, size, margin, eye_y)
    # Bilinear, with no anti-aliasing: what every model so far was trained on. (This said INTER_AREA until
    # 2026-11-27, which warpAffine takes for bilinear: the same pixels.) An area-averaged crop, kinder to large
    # faces at the till, would change what the network sees: a change of the model contract, with a retrain.
    crop = cv2.warpAffine(image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
