"""Augmentation in NumPy/OpenCV, fed through keras.utils.PyDataset: no TensorFlow
in the input pipeline, so every Keras backend trains from the same code.

What it does, per crop, with its reason:
- horizontal flip (p=0.5): faces are near-symmetric; the cheapest, surest gain;
- small rotation (±10°), scale (±10 %) and shift (±6 % of the side): the
  detector's boxes and eye points jitter frame to frame at the till;
- brightness (±25 %) and contrast (±20 %): till lighting varies by store and hour;
- no colour hue changes: skin tone carries age cues we do not want to scramble.
"""

from __future__ import annotations

import math

import cv2
import keras
import numpy as np


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = crop.shape[0]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, 2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += shift
    crop = cv2.warpAffine(np.ascontiguousarray(crop), matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)
    out = crop.astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.75, 1.25)
    return np.clip(out, 0, 255)


class CropBatches(keras.utils.PyDataset):
    """Batches of (crops float32 0..255, ages) in a new order each epoch, augmented for training."""

    def __init__(self, crops: np.ndarray, ages: np.ndarray, batch_size: int, train: bool, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.crops, self.ages = crops, ages.astype(np.float32)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.epoch = 0
        self.order = np.arange(len(crops))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.crops) / self.batch_size)

    def __getitem__(self, index: int):
        picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        if not self.train:
            return self.crops[picked].astype(np.float32), self.ages[picked]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return np.stack([augment(self.crops[i], rng) for i in picked]), self.ages[picked]

    def on_epoch_end(self) -> None:
        if self.train:
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.crops))
            self.epoch += 1
