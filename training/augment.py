"""Augmentation inside the model, as a Keras layer: on the GPU it runs in the same compiled
training step as the network (JAX jit or a TensorFlow graph), so no CPU worker has to keep an
H100 fed; when serving (training=False) it is the identity and exports to nothing.

What it does, per crop, with its reason:
- horizontal flip (p=0.5): faces are near-symmetric; the cheapest, surest gain;
- small rotation (±10°), scale (±10 %) and shift (±6 % of the side): the
  detector's boxes and eye points jitter frame to frame at the till;
- brightness (±25 %) and contrast (±20 %): till lighting varies by store and hour;
- no colour hue changes: skin tone carries age cues we do not want to scramble.
`strength="strong"` (`tillsight train --augment strong`, against overfitting): scale ±20 %, shift
±10 %, and half the crops get one rectangle (2-20 % of the area, less where it runs off the crop's edge)
painted in their mean grey, as a
hand, a phone or a scarf covers part of a face at the till (random erasing).
Flip, rotation, scale and shift are one affine map, so each crop is resampled once
(bilinear, edges repeated as `edge.crop.crop_face` repeats them).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

MAX_DEGREES = 10.0
SCALE = 0.1
SHIFT = 0.06
BRIGHTNESS = 0.25
CONTRAST = 0.2
STRENGTHS = {"standard": {"scale": SCALE, "shift": SHIFT, "erase_p": 0.0},
             "strong": {"scale": 0.2, "shift": 0.1, "erase_p": 0.5}}
ERASE_AREA = (0.02, 0.2)  # of the crop


@keras.saving.register_keras_serializable(package="tillsight")
class FaceJitter(layers.Layer):
    """Random flip, rotation, scale, shift, brightness and contrast of RGB crops 0..255, when training."""

    def __init__(self, seed: int | None = None, strength: str = "standard", **kwargs):
        kwargs.setdefault("dtype", "float32")  # 0..255 in bfloat16 would step by 1-2 grey levels
        super().__init__(**kwargs)
        if strength not in STRENGTHS:
            raise ValueError(f"augmentation strength {strength!r}: one of {', '.join(STRENGTHS)}")
        self.seed, self.strength = seed, strength
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        images = ops.cast(images, "float32")
        moved = ops.image.affine_transform(images, self.random_transforms(ops.shape(images)[0], images.shape[1]),
                                           interpolation="bilinear", fill_mode="nearest")
        lit = self.random_light(moved)
        return self.random_erase(lit, images.shape[1]) if STRENGTHS[self.strength]["erase_p"] else lit

    def random_transforms(self, count, size: int):
        """[N, 8] maps from each output pixel back to the input pixel it is read from."""
        uniform = lambda low, high: keras.random.uniform((count,), low, high, seed=self.seed_generator)  # noqa: E731
        flip = ops.cast(uniform(0.0, 1.0) < 0.5, "float32")
        angle = uniform(-MAX_DEGREES, MAX_DEGREES) * (math.pi / 180)
        limits = STRENGTHS[self.strength]
        scale = uniform(1 - limits["scale"], 1 + limits["scale"])
        shift = limits["shift"]
        shift_x, shift_y = uniform(-shift, shift) * size, uniform(-shift, shift) * size
        return inverse_affine(flip, angle, scale, shift_x, shift_y, size)

    def random_light(self, images):
        count = ops.shape(images)[0]
        contrast = keras.random.uniform((count, 1, 1, 1), 1 - CONTRAST, 1 + CONTRAST, seed=self.seed_generator)
        brightness = keras.random.uniform((count, 1, 1, 1), 1 - BRIGHTNESS, 1 + BRIGHTNESS, seed=self.seed_generator)
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        return ops.clip((images - mean) * contrast + mean * brightness, 0.0, 255.0)

    def random_erase(self, images, size: int):
        """One rectangle of ERASE_AREA of the crop, aspect 1:2 to 2:1, in the crop's mean grey, on erase_p of them."""
        uniform = lambda low, high: keras.random.uniform((ops.shape(images)[0], 1, 1, 1), low, high,  # noqa: E731
                                                         seed=self.seed_generator)
        area = uniform(*ERASE_AREA) * (size * size)
        aspect = ops.exp(uniform(-math.log(2.0), math.log(2.0)))
        half_width, half_height = ops.sqrt(area * aspect) / 2, ops.sqrt(area / aspect) / 2
        centre_x, centre_y = uniform(0.0, float(size)), uniform(0.0, float(size))
        grid = ops.arange(size, dtype="float32")
        inside = ops.logical_and(ops.abs(ops.reshape(grid, (1, 1, size, 1)) - centre_x) < half_width,
                                 ops.abs(ops.reshape(grid, (1, size, 1, 1)) - centre_y) < half_height)
        erased = ops.logical_and(inside, uniform(0.0, 1.0) < STRENGTHS[self.strength]["erase_p"])
        return ops.where(erased, ops.mean(images, axis=(1, 2, 3), keepdims=True), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "strength": self.strength}


def inverse_affine(flip, angle, scale, shift_x, shift_y, size: int):
    """The [N, 8] projective rows (a0 a1 a2 b0 b1 b2 0 0) of keras.ops.image.affine_transform for:
    flip (1 or 0) of the input, then rotation by `angle` and scaling by `scale` about the
    centre, then a shift. Written for both NumPy and keras.ops arguments."""
    centre = (size - 1) / 2
    cos, sin = ops.cos(angle) / scale, ops.sin(angle) / scale
    qx, qy = centre + shift_x, centre + shift_y
    a0, a1, a2 = cos, sin, centre - (cos * qx + sin * qy)
    b0, b1, b2 = -sin, cos, centre - (-sin * qx + cos * qy)
    sign = 1 - 2 * flip  # a flipped input reads column (size-1) - x
    zero = ops.zeros_like(a0)
    return ops.stack([sign * a0, sign * a1, sign * a2 + flip * (size - 1), b0, b1, b2, zero, zero], axis=1)


def seed_epoch(model: keras.Model, seed: int, epoch: int) -> None:
    """Start every random stream of `model` (FaceJitter's augmentation, Dropout's masks: each a
    keras.random.SeedGenerator) for `epoch` from (seed, epoch, its place in the model) alone, as CropBatches
    orders the epoch's crops: a resumed run draws in epoch k what the uninterrupted run drew there. Keras keeps
    a SeedGenerator's state out of the .keras file, so a resumed run started its streams over and drew epoch 1's
    augmentation and dropout again.

    Called at the epoch's start (Progress.on_epoch_begin), before its first step, where every backend's trainer
    reads the variables afresh: the JAX trainer holds them in state of its own from that step to the epoch's end
    (Keras 3.15 gives them back to the model whenever a callback reads `self.model`; at the epoch's start they
    are the model's whatever the version)."""
    states = [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]
    for index, state in enumerate(states):
        # [start, counter]: the counter steps by one a draw. start < 2**31 fits every backend's seed dtype
        # (uint32 on JAX, int64 on TensorFlow, int32 on PyTorch)
        start = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]) >> 1
        state.assign(np.array([start, 0], dtype=state.dtype))


class CropBatches(keras.utils.PyDataset):
    """Batches of (crops uint8 0..255, ages); training batches in a new order each epoch, all full
    (the few crops left over go in the next epoch's order: one batch shape, one compiled step).
    The crops travel as uint8, a quarter of float32's bytes, and the model's input casts them on
    the device."""

    def __init__(self, crops: np.ndarray, ages: np.ndarray, batch_size: int, train: bool, seed: int = 0,
                 repeats: np.ndarray | None = None, **kwargs):
        """`repeats`: how many times each crop is in a training epoch (1 each by default; oversampling)."""
        super().__init__(**kwargs)
        self.crops, self.ages = crops, ages.astype(np.float32)
        self.epoch_items = np.repeat(np.arange(len(crops)), repeats) if repeats is not None and train \
            else np.arange(len(crops))
        self.batch_size, self.train, self.seed = min(batch_size, len(self.epoch_items)), train, seed
        self.epoch = 0
        self.order = self.epoch_items
        self.on_epoch_end()

    def __len__(self) -> int:
        if self.train:
            return len(self.epoch_items) // self.batch_size
        return math.ceil(len(self.crops) / self.batch_size)

    def __getitem__(self, index: int):
        picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.crops[picked], self.ages[picked]

    def resume_at(self, epoch: int) -> None:
        """Carry on at `epoch` (a resumed run) in the order the uninterrupted run had there."""
        self.epoch = epoch
        self.on_epoch_end()

    def on_epoch_end(self) -> None:
        if self.train:
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(self.epoch_items)
            self.epoch += 1
