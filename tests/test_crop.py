import math

import cv2
import numpy as np
import pytest

from edge.crop import crop_face, crop_transform
from edge.types import Face


def _apply(matrix, point):
    return matrix @ np.array([point[0], point[1], 1.0])


@pytest.mark.parametrize("tilt_degrees", [-30, 0, 12, 40])
def test_crop_levels_the_eyes_and_centres_the_face(tilt_degrees):
    cx, cy, half = 200.0, 150.0, 25.0
    t = math.radians(tilt_degrees)
    left = (cx - half * math.cos(t), cy - half * math.sin(t))
    right = (cx + half * math.cos(t), cy + half * math.sin(t))
    face = Face((150, 100, 250, 200), 0.9, left, right)
    matrix = crop_transform(face, size=64, margin=0.25)
    l, r = _apply(matrix, left), _apply(matrix, right)
    assert l[1] == pytest.approx(r[1], abs=1e-6)  # level
    assert l[0] < r[0]  # not flipped
    assert (l + r) / 2 == pytest.approx([32, 32])  # box centre maps to crop centre
    # side = 100 px * (1 + 2 * 0.25) = 150 px -> 64 px
    assert np.linalg.norm(r - l) == pytest.approx(50 * 64 / 150)


def test_crop_is_rgb_uint8_of_the_requested_size():
    image = np.zeros((120, 160, 3), np.uint8)
    image[:, :, 0] = 255  # blue in BGR
    face = Face((40, 30, 100, 90), 0.9, (55, 50), (85, 50))
    crop = crop_face(image, face, size=48, margin=0.4)
    assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
    assert crop[24, 24].tolist() == [0, 0, 255]


def test_crop_beyond_the_frame_repeats_edge_pixels():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, 90:] = 200  # a bright right edge
    face = Face((60, 20, 100, 60), 0.9, (70, 35), (90, 35))  # at the right border
    crop = crop_face(image, face, size=32, margin=0.5)
    assert crop[16, -1].tolist() == [200, 200, 200]  # replicated, not black


def test_crop_matches_cv2_on_an_untilted_face():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 200, 3), np.uint8)
    face = Face((50, 50, 150, 150), 0.9, (80, 90), (120, 90))
    crop = crop_face(image, face, size=100, margin=0.0)
    expected = cv2.cvtColor(image[50:150, 50:150], cv2.COLOR_BGR2RGB)
    assert np.abs(crop.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("tilt_degrees", [-20, 0, 15])
def test_an_eye_anchored_crop_puts_the_eyes_where_the_model_expects_them(tilt_degrees):
    """eye_y: the eyes' midpoint at the horizontal centre and eye_y of the height (dlib-style chips)."""
    t = math.radians(tilt_degrees)
    mid = (210.0, 140.0)  # the eyes sit above the box centre (200, 150), as on a real face
    left = (mid[0] - 20 * math.cos(t), mid[1] - 20 * math.sin(t))
    right = (mid[0] + 20 * math.cos(t), mid[1] + 20 * math.sin(t))
    face = Face((150, 100, 250, 200), 0.9, left, right)
    matrix = crop_transform(face, size=64, margin=0.0, eye_y=0.3)
    l, r = _apply(matrix, left), _apply(matrix, right)
    assert l[1] == pytest.approx(r[1], abs=1e-6)
    assert (l + r) / 2 == pytest.approx([32, 0.3 * 64])
    assert np.linalg.norm(r - l) == pytest.approx(40 * 64 / 100)  # side is still the box's
