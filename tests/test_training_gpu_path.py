"""What makes a training run fit a GPU lent for minutes: augmentation inside the compiled step,
a learning rate that follows the share of the time spent, faces detected in parallel, and the
best weights carried off the machine in parts. On the CPU, with the suite's Keras backend."""

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tskit import REPO

keras = pytest.importorskip("keras", reason="the train extra is not installed")
from keras import ops  # noqa: E402

from training.augment import FaceJitter, inverse_affine  # noqa: E402
from training.progress import learning_rate  # noqa: E402
from training.train import TrainOptions  # noqa: E402


def _smooth_image(size=32):
    noise = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
    return cv2.GaussianBlur(noise, (5, 5), 2)[None]


def _warp(image, flip, degrees, scale, shift_x, shift_y):
    rows = inverse_affine(*(np.array([v], np.float32) for v in (flip, math.radians(degrees), scale, shift_x, shift_y)),
                          image.shape[1])
    return np.asarray(ops.image.affine_transform(image, rows, interpolation="bilinear", fill_mode="nearest"))


def test_the_affine_map_is_identity_flip_and_opencvs_rotation():
    image = _smooth_image()
    assert np.abs(_warp(image, 0, 0, 1, 0, 0) - image).max() < 1e-4
    assert np.abs(_warp(image, 1, 0, 1, 0, 0) - image[:, :, ::-1]).max() < 1e-4
    # the same rotation, scale and shift by OpenCV (its positive angle is our negative one)
    matrix = cv2.getRotationMatrix2D((15.5, 15.5), 8, 1.05)
    matrix[:, 2] += (2, -1)
    expected = cv2.warpAffine(image[0], matrix, (32, 32), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(_warp(image, 0, -8, 1.05, 2, -1)[0] - expected)[4:-4, 4:-4].max() < 1.0


def test_face_jitter_changes_crops_only_when_training():
    batch = np.repeat(_smooth_image(), 8, axis=0)
    layer = FaceJitter(seed=3)
    served = np.asarray(layer(batch, training=False))
    trained = np.asarray(layer(batch, training=True))
    assert np.array_equal(served, batch)
    assert trained.shape == batch.shape and 0 <= trained.min() and trained.max() <= 255
    per_crop = np.abs(trained - batch).mean(axis=(1, 2, 3))
    assert (per_crop > 1).all()  # every crop moved or relit
    assert len({round(float(v), 3) for v in per_crop}) == 8  # each in its own way


def test_strong_augmentation_erases_a_rectangle_in_half_the_crops_and_only_when_training():
    batch = np.repeat(_smooth_image(), 64, axis=0)
    layer = FaceJitter(seed=5, strength="strong")
    assert np.array_equal(np.asarray(layer(batch, training=False)), batch)
    trained = np.asarray(layer(batch, training=True))
    # painted in one grey (the crop's mean before erasing): R = G = B = that value, which noise never is
    grey = np.zeros(trained.shape[:3], bool)
    for index, crop in enumerate(trained):
        flat = crop[(crop[..., 0] == crop[..., 1]) & (crop[..., 1] == crop[..., 2])][:, 0]
        if len(flat):
            values, counts = np.unique(flat, return_counts=True)
            grey[index] = (crop == values[counts.argmax()]).all(axis=-1)
    painted = grey.mean(axis=(1, 2))  # share of each crop's pixels
    erased = painted > 0.01
    assert 16 <= erased.sum() <= 48, painted  # about half of them
    assert painted.max() <= 0.3  # no more than ERASE_AREA's 20 %, plus a pixel's rounding on each side
    for index in np.flatnonzero(erased)[:4]:  # one solid rectangle
        rows, cols = np.nonzero(grey[index])
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert FaceJitter.from_config(layer.get_config()).strength == "strong"  # kept in checkpoints
    with pytest.raises(ValueError, match="augmentation strength 'wild': one of standard, strong"):
        FaceJitter(strength="wild")


def test_learning_rate_warms_up_then_falls_to_a_hundredth():
    by_epochs = TrainOptions(data="d", epochs=10, learning_rate=1e-3, warmup_epochs=1)
    rates = [learning_rate(by_epochs, e / 10) for e in range(11)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] == pytest.approx(1e-5)
    by_time = TrainOptions(data="d", epochs=400, learning_rate=2e-3, minutes=7.5)
    assert learning_rate(by_time, 0.0) == pytest.approx(2e-4)
    assert learning_rate(by_time, 0.5) == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.47 / 0.97))))
    assert learning_rate(by_time, 1.0) == pytest.approx(2e-5)


def test_a_run_with_minutes_stops_before_an_epoch_would_overrun_them(tmp_path):
    from training.progress import Progress
    opts = TrainOptions(data="d", epochs=400, minutes=1.0)
    state = {"epoch": 9, "best_val_mae": 9.0, "best_epoch": 9, "epoch_seconds": [6.0] * 9, "train_seconds": 50.0}
    progress = Progress(opts, state, tmp_path / "state.json", tmp_path, 1000)
    assert not progress.out_of_time() and progress.done(9) == pytest.approx(50 / 60)
    state["train_seconds"] = 55.0  # 55 s + a 6 s epoch > 60 s
    assert progress.out_of_time()
    assert not Progress(TrainOptions(data="d", epochs=5), state, tmp_path / "s", tmp_path, 1).out_of_time()


def test_the_learning_rate_set_before_an_epoch_is_the_one_the_compiled_step_uses():
    """Keras compiles the step once (jit on JAX): the rate must be the optimizer's variable, not a constant."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = np.random.default_rng(0).random((64, 4), np.float32), np.random.default_rng(1).random(64, np.float32)
    kernels = []

    class ZeroInEpochOne(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = 0.0 if epoch == 1 else 1e-2

        def on_epoch_end(self, epoch, logs=None):
            kernels.append(self.model.get_weights()[0].copy())

    model.fit(x, y, epochs=3, verbose=0, callbacks=[ZeroInEpochOne()])
    assert np.array_equal(kernels[0], kernels[1]) and not np.array_equal(kernels[1], kernels[2])


def test_faces_detected_in_worker_processes_are_the_same_faces(utkface, monkeypatch):
    from training import data
    labels = data.select(data.read_labels(utkface / "labels.csv"), 24)
    alone = data.load_faces(utkface, labels, 48, 0.0, progress=False, workers=1)
    monkeypatch.setattr(data, "PARALLEL_FROM", 0)
    shared = data.load_faces(utkface, labels, 48, 0.0, progress=False, workers=2)
    assert [l.file_name for l in shared.labels] == [l.file_name for l in alone.labels] and len(alone.labels) >= 22
    assert np.array_equal(shared.crops, alone.crops) and shared.no_face == alone.no_face


def test_best_weights_travel_in_parts_and_rebuild_the_same_model(tmp_path):
    """scripts/device/weights.py: a GPU run's best.keras -> float16 parts under $OUT's 16 MiB -> best.keras here."""
    from training.model import build_model, predict_ages
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model = build_model(32, "distribution", seed=0)
    model.save(run / "checkpoints" / "best.keras")
    (run / "run.json").write_text(json.dumps({"options": {"input_size": 32, "head": "distribution"}}))
    (run / "history.csv").write_text("epoch,loss\n0,1.0\n")
    script = REPO / "scripts" / "device" / "weights.py"
    for args in (["pack", str(run), str(tmp_path / "out")], ["unpack", str(tmp_path / "out"), str(tmp_path / "here")]):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    parts = sorted((tmp_path / "out").glob("weights.npz.part*"))
    assert len(parts) >= 3 and all(p.stat().st_size <= 15 * 2**20 for p in parts)  # ~48 MB as float16
    assert (tmp_path / "here" / "history.csv").read_text() == "epoch,loss\n0,1.0\n"
    rebuilt = keras.models.load_model(tmp_path / "here" / "checkpoints" / "best.keras", compile=False)
    crops = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    # float16 weights move a random-init network's ages by up to 0.07 years (seen over unseeded runs);
    # a weight out of place moves them by years
    assert np.abs(predict_ages(model, crops) - predict_ages(rebuilt, crops)).max() < 0.25
    damaged = bytearray(parts[1].read_bytes())
    damaged[-1] ^= 0xFF  # one byte changed, whatever it was
    parts[1].write_bytes(bytes(damaged))
    done = subprocess.run([sys.executable, str(script), "unpack", str(tmp_path / "out"), str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "do not match their sha256" in done.stderr


def test_a_checkpoint_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path):
    """The device's 10-minute limit kills the command wherever it is; killed inside model.save, last.keras was
    half a file and --resume could not load it, while state.json still pointed at it."""
    from training.progress import save_whole
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "last.keras"
    save_whole(model, path)
    before = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in before])

    def killed_part_way(target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"PK\x03\x04 the first megabytes")
        raise KeyboardInterrupt  # what SIGINT is; SIGKILL leaves the same partial file and nothing after it
    model.save = killed_part_way
    with pytest.raises(KeyboardInterrupt):
        save_whole(model, path)
    loaded = keras.models.load_model(path, compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), before))
    assert (tmp_path / "last.partial.keras").exists()  # the cut-short file, next to it, overwritten next time


def test_oversampled_minors_are_in_each_epoch_that_many_times_and_the_others_once():
    from training.augment import CropBatches
    from training.train import minor_repeats
    ages = np.array([5, 13, 15, 17, 18, 30, 16, 40], np.float32)
    crops = np.arange(len(ages), dtype=np.uint8).reshape(-1, 1, 1, 1)
    plain = CropBatches(crops, ages, batch_size=3, train=True, seed=1)
    assert np.array_equal(plain.order, np.random.default_rng([1, 0]).permutation(len(ages)))  # as before the option
    batches = CropBatches(crops, ages, batch_size=4, train=True, seed=1, repeats=minor_repeats(ages, 3))
    assert len(batches) == (4 + 4 * 3) // 4  # 16 items an epoch: full batches only
    seen = np.concatenate([batches[i][0].reshape(-1) for i in range(len(batches))])
    assert sorted(np.bincount(seen, minlength=len(ages)).tolist()) == [1, 1, 1, 1, 3, 3, 3, 3]
    assert {int(i) for i in np.flatnonzero(np.bincount(seen) == 3)} == {1, 2, 3, 6}  # aged 13, 15, 17 and 16
    validation = CropBatches(crops, ages, batch_size=4, train=False, repeats=minor_repeats(ages, 3))
    assert sum(len(validation[i][0]) for i in range(len(validation))) == len(ages)  # never oversampled


def test_the_label_sigma_shapes_the_loss_and_is_kept_in_the_checkpoint(tmp_path):
    from training.model import MAX_AGE, DistributionLoss, expected_age_mae
    y_true = np.array([30.0], np.float32)
    peaked = np.zeros((1, MAX_AGE + 1), np.float32)
    peaked[0, 30] = 1.0
    near = np.clip(peaked, 1e-3, 1)
    near /= near.sum()
    # a wider label Gaussian asks for a wider distribution: a spike at the true age costs more
    def loss(sigma: float) -> float:
        return float(ops.convert_to_numpy(DistributionLoss(sigma)(y_true, near)))
    assert loss(3.0) > loss(1.0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(MAX_AGE + 1, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss=DistributionLoss(3.5), metrics=[expected_age_mae])
    model.fit(np.zeros((2, 4), np.float32), np.array([30.0, 40.0], np.float32), verbose=0)  # a step: as a checkpoint
    model.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").loss.sigma == 3.5  # resume trains with the same sigma
