"""`tillsight train`: fine-tune ResNet50 for age on a labelled face folder.

Run folder layout (all written by this command):
    run.json                 options, data and split (written first, read by resume and export)
    faces.npz                the detected, cropped faces (reused on resume; derived from the data: never commit)
    checkpoints/best.keras   best validation MAE so far
    checkpoints/last.keras   end of the last finished epoch, optimizer included (resume)
    history.csv, curves.png  per-epoch loss and MAE, as numbers and as a plot
    summary.json             the outcome: data counts, best MAE, time per epoch
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge import __version__
from training.data import DataError, FaceSet, Label, load_faces, read_labels, select, split_of


@dataclass
class TrainOptions:
    data: str
    labels: str | None = None
    out: str = "runs/age"
    input_size: int = 224
    # BlazeFace full-range boxes already span forehead to chin: on the tight UTKFace chips a box
    # is ~197 of 200 px, so any margin is mostly invented (edge-replicated) pixels: 0.3 -> 60 %
    # of the crop, 0.1 -> 28 %, 0.0 -> 4.5 % (median, 150 chips). Training and serving share it.
    crop_margin: float = 0.0
    head: str = "distribution"
    weights: str = "none"
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1
    limit: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # auto: on when a GPU is present
    data_parallel: bool = False


class TrainError(Exception):
    pass


def labels_path(data_dir: Path, labels: str | None) -> Path:
    return Path(labels) if labels else data_dir / "labels.csv"


def prepare_faces(opts: TrainOptions, run_dir: Path) -> tuple[FaceSet, dict]:
    """Crop every labelled face once; later runs and resumes read faces.npz."""
    cache = run_dir / "faces.npz"
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        if int(stored["input_size"]) == opts.input_size and float(stored["crop_margin"]) == opts.crop_margin:
            labels = [Label(str(n), float(a), _none(g), _none(r))
                      for n, a, g, r in zip(stored["names"], stored["ages"], stored["genders"], stored["races"])]
            return FaceSet(stored["crops"], labels), json.loads(str(stored["counts"]))
    data_dir = Path(opts.data)
    labels = select(read_labels(labels_path(data_dir, opts.labels)), opts.limit)
    faces = load_faces(data_dir, labels, opts.input_size, opts.crop_margin)
    counts = {"labelled": len(labels), "faces": len(faces.labels), "no_face": len(faces.no_face),
              "unreadable": len(faces.unreadable), "missing": len(faces.missing)}
    if not faces.labels:
        raise DataError(f"no usable face in {data_dir} ({counts})")
    np.savez(cache, crops=faces.crops, names=[l.file_name for l in faces.labels], ages=faces.ages,
             genders=[_int(l.gender) for l in faces.labels], races=[_int(l.race) for l in faces.labels],
             input_size=opts.input_size, crop_margin=opts.crop_margin, counts=json.dumps(counts))
    return faces, counts


def _int(value: int | None) -> int:
    return -1 if value is None else value


def _none(value) -> int | None:
    return None if int(value) < 0 else int(value)


def has_gpu() -> bool:
    import keras
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax
            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "tensorflow":
            import tensorflow as tf

            from training import silenced_stderr
            with silenced_stderr():  # cuInit failure chatter on CPU machines
                return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch
            return torch.cuda.is_available()
    except Exception:
        return False
    return False


def configure_devices(opts: TrainOptions) -> dict:
    """Mixed precision and data parallelism, through Keras' own switches."""
    import keras
    gpu = has_gpu()
    mixed = opts.mixed_precision == "on" or (opts.mixed_precision == "auto" and gpu)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    devices = 1
    if opts.data_parallel:
        # keras.distribution shards each batch over every local accelerator (JAX backend);
        # on TensorFlow use tf.distribute.MirroredStrategy instead (README, "Multi-GPU").
        if keras.backend.backend() != "jax":
            raise TrainError("--data-parallel needs KERAS_BACKEND=jax (keras.distribution)")
        all_devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=all_devices))
        devices = len(all_devices)
    return {"backend": keras.backend.backend(), "gpu": gpu, "mixed_precision": mixed, "devices": devices}


def train(opts: TrainOptions, resume: bool = False) -> dict:
    import keras

    from training.augment import CropBatches
    from training.model import build_model, loss_and_metric
    from training.plots import plot_curves

    run_dir = Path(opts.out)
    checkpoints = run_dir / "checkpoints"
    state_file = run_dir / "state.json"
    if resume:
        if not (checkpoints / "last.keras").is_file() or not state_file.is_file():
            raise TrainError(f"nothing to resume in {run_dir} (no checkpoints/last.keras)")
        saved = json.loads((run_dir / "run.json").read_text())["options"]
        opts = TrainOptions(**{**saved, "epochs": opts.epochs, "out": str(run_dir)})
    elif (checkpoints / "last.keras").exists():
        raise TrainError(f"{run_dir} already holds a run: pass --resume to continue it, or another --out")
    checkpoints.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts.seed)
    device = configure_devices(opts)
    faces, counts = prepare_faces(opts, run_dir)
    is_val = np.array([split_of(l.file_name, opts.val_fraction) == "val" for l in faces.labels])
    train_set, val_set = faces.subset(~is_val), faces.subset(is_val)
    if len(train_set.labels) == 0 or len(val_set.labels) == 0:
        raise TrainError(f"split left {len(train_set.labels)} training and {len(val_set.labels)} validation faces; "
                         "use more data or another --val-fraction")
    split = {"val_fraction": opts.val_fraction, "rule": "sha1(file_name) < val_fraction -> val",
             "train": len(train_set.labels), "val": len(val_set.labels)}
    (run_dir / "run.json").write_text(json.dumps(
        {"options": asdict(opts), "data": counts, "split": split, "device": device, "tillsight": __version__}, indent=2))

    train_batches = CropBatches(train_set.crops, train_set.ages, opts.batch_size, train=True, seed=opts.seed)
    val_batches = CropBatches(val_set.crops, val_set.ages, opts.batch_size, train=False)
    state = json.loads(state_file.read_text()) if resume else {"epoch": 0, "best_val_mae": None, "best_epoch": None}
    if resume:
        model = keras.models.load_model(checkpoints / "last.keras")
        train_batches.epoch = state["epoch"]
    else:
        model = build_model(opts.input_size, opts.head, opts.weights, mean_age=float(train_set.ages.mean()))
        loss, metric = loss_and_metric(opts.head)
        steps = len(train_batches) * opts.epochs
        warmup = min(int(len(train_batches) * opts.warmup_epochs), steps - 1)
        schedule = keras.optimizers.schedules.CosineDecay(
            opts.learning_rate * 0.1, decay_steps=max(1, steps - warmup), alpha=0.01,
            warmup_target=opts.learning_rate, warmup_steps=warmup)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=[metric])
    epoch_times: list[float] = state.get("epoch_seconds", [])
    callbacks = [
        keras.callbacks.ModelCheckpoint(checkpoints / "best.keras", monitor=f"val_{_metric_name(opts.head)}",
                                        save_best_only=True, mode="min",
                                        initial_value_threshold=state["best_val_mae"]),
        keras.callbacks.CSVLogger(run_dir / "history.csv", append=resume),
        _save_state_callback()(checkpoints / "last.keras", state_file, state, epoch_times, f"val_{_metric_name(opts.head)}"),
    ]
    if state["epoch"] < opts.epochs:
        model.fit(train_batches, validation_data=val_batches, epochs=opts.epochs, initial_epoch=state["epoch"],
                  callbacks=callbacks, verbose="auto")
    plot_curves(run_dir / "history.csv", run_dir / "curves.png")
    summary = {"run_dir": str(run_dir), "data": counts, "split": split, "options": asdict(opts), "device": device,
               "epochs_done": state["epoch"], "best_val_mae": state["best_val_mae"], "best_epoch": state["best_epoch"],
               "seconds_per_epoch": round(float(np.mean(epoch_times)), 2) if epoch_times else None,
               "seconds_per_step": round(float(np.mean(epoch_times)) / len(train_batches), 3) if epoch_times else None,
               "tillsight": __version__}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _metric_name(head: str) -> str:
    return "expected_age_mae" if head == "distribution" else "age_mae"


def _save_state_callback():
    import keras

    class SaveState(keras.callbacks.Callback):
        """After each epoch: the resumable checkpoint and the epoch counter, written together."""

        def __init__(self, last_path, state_file, state, epoch_times, monitor):
            super().__init__()
            self.last_path, self.state_file, self.state = last_path, state_file, state
            self.epoch_times, self.monitor = epoch_times, monitor

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_times.append(time.perf_counter() - self.started)
            value = float(logs[self.monitor])
            if self.state["best_val_mae"] is None or value < self.state["best_val_mae"]:
                self.state.update(best_val_mae=value, best_epoch=epoch + 1)
            self.model.save(self.last_path)
            self.state.update(epoch=epoch + 1, epoch_seconds=self.epoch_times)
            temporary = self.state_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.state))
            temporary.replace(self.state_file)  # atomic: an interruption leaves the old state whole

    return SaveState
