"""The ResNet50 age model, in Keras 3, for any backend (TensorFlow, JAX, PyTorch).

Two heads on the same backbone:
- `regression`: one linear unit, the age in years, trained with MAE.
- `distribution`: softmax over ages 0..MAX_AGE (DEX / DLDL), trained against a
  Gaussian label distribution (sigma LABEL_SIGMA years); the age is the
  expectation and the spread the standard deviation of that distribution.

The serving model takes RGB crops 0..255 (edge/contract.py): the ImageNet
"caffe" preprocessing lives inside the graph, so serving needs none.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
from keras import layers, ops

from training.augment import FaceJitter

MAX_AGE = 100
LABEL_SIGMA = 2.0
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsError(Exception):
    pass


@keras.saving.register_keras_serializable(package="tillsight")
class CaffePreprocess(layers.Layer):
    """RGB 0..255 -> BGR minus the ImageNet mean: what Keras' ResNet50 weights expect."""

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(IMAGENET_MEAN_BGR, dtype=inputs.dtype)


@keras.saving.register_keras_serializable(package="tillsight")
class AgeFromDistribution(layers.Layer):
    """Softmax probabilities over ages -> (expected age, standard deviation)."""

    def call(self, probabilities):
        probabilities = ops.cast(probabilities, "float32")
        ages = ops.arange(MAX_AGE + 1, dtype="float32")
        mean = ops.sum(probabilities * ages, axis=-1)
        variance = ops.sum(probabilities * ops.square(ages[None, :] - mean[:, None]), axis=-1)
        return mean, ops.sqrt(ops.maximum(variance, 0.0))


def build_model(input_size: int, head: str, weights: str = "none", dropout: float = 0.2,
                mean_age: float = 33.0, seed: int | None = None, augment: str = "standard") -> keras.Model:
    """The training model: outputs the age (regression) or the age probabilities (distribution).
    Augmentation is its first layer (training only; see training/augment.py)."""
    inputs = keras.Input((input_size, input_size, 3), name="crops")
    x = FaceJitter(seed=seed, strength=augment, name="face_jitter")(inputs)
    x = CaffePreprocess(name="caffe_preprocess")(x)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(input_size, input_size, 3),
                                           pooling="avg")
    load_backbone_weights(backbone, weights)
    x = backbone(x)
    x = layers.Dropout(dropout)(x)
    if head == "regression":
        outputs = layers.Dense(1, dtype="float32", name="age_dense",
                               bias_initializer=keras.initializers.Constant(mean_age))(x)
        outputs = layers.Reshape((), name="age_years")(outputs)
    elif head == "distribution":
        outputs = layers.Dense(MAX_AGE + 1, activation="softmax", dtype="float32", name="age_probabilities")(x)
    else:
        raise ValueError(f"unknown head {head!r}")
    return keras.Model(inputs, outputs, name=f"resnet50_age_{head}")


def serving_model(model: keras.Model) -> keras.Model:
    """What is exported: outputs `age` [N] and, for the distribution head, `age_spread` [N]."""
    if model.output.shape[-1] == MAX_AGE + 1:
        age, spread = AgeFromDistribution(name="age_from_distribution")(model.output)
        outputs = {"age": layers.Identity(name="age")(age), "age_spread": layers.Identity(name="age_spread")(spread)}
    else:
        outputs = {"age": layers.Identity(name="age")(model.output)}
    return keras.Model(model.input, outputs, name="tillsight_age")


def imagenet_cache_path() -> Path:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return keras_home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def check_weights(weights: str) -> None:
    """Before any work: the weights named are here. Nothing is downloaded, ever (no internet at the till or on
    the training machines; a download at run time is not ours to make): ImageNet weights only from Keras' cache."""
    if weights == "imagenet" and not imagenet_cache_path().is_file():
        raise WeightsError(f"ImageNet weights are not in Keras' cache ({imagenet_cache_path()}) and tillsight "
                           "downloads nothing: copy the file there, or use --weights none or a file")
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise WeightsError(f"weights file not found: {weights}")


def load_backbone_weights(backbone: keras.Model, weights: str) -> None:
    check_weights(weights)
    if weights == "none":
        return
    path = imagenet_cache_path() if weights == "imagenet" else Path(weights)
    try:
        backbone.load_weights(str(path))
    except Exception as exc:
        raise WeightsError(f"weights file {path} does not fit a ResNet50 backbone: {str(exc).splitlines()[0]}") from None


# Losses and metrics, written with keras.ops so that every backend runs them.

def gaussian_targets(ages, sigma: float = LABEL_SIGMA):
    grid = ops.arange(MAX_AGE + 1, dtype="float32")
    ages = ops.clip(ops.reshape(ops.cast(ages, "float32"), (-1, 1)), 0.0, float(MAX_AGE))
    weights = ops.exp(-0.5 * ops.square((grid[None, :] - ages) / sigma))
    return weights / ops.sum(weights, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="tillsight")
def distribution_loss(y_true, y_pred, sigma: float = LABEL_SIGMA):
    """DLDL: cross-entropy to a Gaussian around the true age, plus the L1 of the expectation. (Checkpoints
    saved before `--label-sigma` name this function: it stays.)"""
    y_pred = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0)
    ce = -ops.sum(gaussian_targets(y_true, sigma) * ops.log(y_pred), axis=-1)
    expected = ops.sum(y_pred * ops.arange(MAX_AGE + 1, dtype="float32"), axis=-1)
    return ce + 0.1 * ops.abs(expected - ops.reshape(ops.cast(y_true, "float32"), (-1,)))


@keras.saving.register_keras_serializable(package="tillsight")
class DistributionLoss(keras.losses.Loss):
    """`distribution_loss` with the label Gaussian's sigma as a setting, kept in the checkpoint (resume)."""

    def __init__(self, sigma: float = LABEL_SIGMA, name: str = "distribution_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.sigma = float(sigma)

    def call(self, y_true, y_pred):
        return distribution_loss(y_true, y_pred, self.sigma)

    def get_config(self) -> dict:
        return {**super().get_config(), "sigma": self.sigma}


# The metrics return each face's error, not the batch's mean: Keras averages what a metric returns over the
# faces it was given, so a short last batch counts for its faces, not as much as a full batch (the validation
# MAE picks best.keras and goes into the model card).
@keras.saving.register_keras_serializable(package="tillsight")
def expected_age_mae(y_true, y_pred):
    expected = ops.sum(ops.cast(y_pred, "float32") * ops.arange(MAX_AGE + 1, dtype="float32"), axis=-1)
    return ops.abs(expected - ops.reshape(ops.cast(y_true, "float32"), (-1,)))


@keras.saving.register_keras_serializable(package="tillsight")
def age_mae(y_true, y_pred):
    return ops.abs(ops.reshape(ops.cast(y_pred, "float32"), (-1,)) - ops.reshape(ops.cast(y_true, "float32"), (-1,)))


def loss_and_metric(head: str, label_sigma: float = LABEL_SIGMA):
    if head == "distribution":
        return DistributionLoss(label_sigma), expected_age_mae
    return "mean_absolute_error", age_mae


def predict_ages(model: keras.Model, crops, batch_size: int = 64):
    """Ages in years from the training model, whatever its head."""
    import numpy as np
    outputs = serving_model(model).predict(crops.astype("float32"), batch_size=batch_size, verbose=0)
    return np.asarray(outputs["age"], np.float32).reshape(-1)
