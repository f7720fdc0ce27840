"""The training run's per-epoch bookkeeping, as a Keras callback (training/train.py uses it; a module of
its own because it needs Keras at import, which `tillsight data inspect` does not load)."""

from __future__ import annotations

import json
import time

import keras
import numpy as np

from edge.gpu import GpuSampler
from training.augment import seed_epoch

CHECKPOINT_EVERY_S = 120.0  # last.keras and best.keras this often, and at the end (training/train.py says why)


class Progress(keras.callbacks.Callback):
    """Per epoch: the learning rate, the time and throughput figures, the best weights (kept in memory),
    the stop when the run's time is up, and the checkpoints every CHECKPOINT_EVERY_S and at the end."""

    def __init__(self, opts, state, state_file, checkpoints, images_per_epoch):
        super().__init__()
        self.opts, self.state, self.state_file, self.checkpoints = opts, state, state_file, checkpoints
        self.images_per_epoch = images_per_epoch
        self.monitor = f"val_{metric_name(opts.head)}"
        self.best_weights = None
        self.saved_at = time.monotonic()
        self.gpu = GpuSampler(interval=0.2).start()

    def done(self, epoch: int) -> float:
        by_epochs = epoch / self.opts.epochs
        if self.opts.minutes is None:
            return by_epochs
        return max(by_epochs, self.state.get("train_seconds", 0.0) / (self.opts.minutes * 60))

    def out_of_time(self) -> bool:
        if self.opts.minutes is None:
            return False
        seconds = self.state.get("epoch_seconds", [])
        next_epoch = float(np.median(seconds[-5:])) if seconds else 0.0
        return self.state.get("train_seconds", 0.0) + next_epoch > self.opts.minutes * 60

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = learning_rate(self.opts, self.done(epoch))
        self.model.optimizer.learning_rate = self.rate
        seed_epoch(self.model, self.opts.seed, epoch)  # the epoch's augmentation and dropout, resumed or not
        self.started, self.started_monotonic = time.perf_counter(), time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        logs = logs if logs is not None else {}
        logs.update(learning_rate=self.rate, seconds=round(seconds, 2),
                    images_per_second=round(self.images_per_epoch / seconds, 1))
        utilisation = self.gpu.window(self.started_monotonic).get("util_mean_pct")
        if utilisation is not None:  # NVML's mean over the epoch: well under 90 % means the GPU waits for input
            logs["gpu_utilisation"] = utilisation
        value = float(logs[self.monitor])
        if self.state["best_val_mae"] is None or value < self.state["best_val_mae"]:
            self.state.update(best_val_mae=value, best_epoch=epoch + 1)
            self.best_weights = self.model.get_weights()
        self.state["epoch_seconds"] = self.state.get("epoch_seconds", []) + [seconds]
        self.state.update(epoch=epoch + 1, train_seconds=self.state.get("train_seconds", 0.0) + seconds)
        if self.out_of_time():
            print(f"stopping after epoch {epoch + 1}: the next would overrun the run's {self.opts.minutes:g} "
                  "minutes", flush=True)
            self.model.stop_training = True
        elif time.monotonic() - self.saved_at > CHECKPOINT_EVERY_S:
            self.save()

    def on_train_end(self, logs=None):
        self.gpu.stop()
        self.save()

    def save(self) -> None:
        """best.keras (the best weights, no optimizer), last.keras, then the state, each written whole
        and then renamed into place: an interruption (the GPU machine's 10-minute limit kills the command,
        a ResNet50 with Adam's state is ~280 MB) leaves the files of the last save, never half a file."""
        if self.best_weights is not None:
            holder = getattr(self, "holder", None) or keras.models.clone_model(self.model)
            self.holder = holder
            holder.set_weights(self.best_weights)
            save_whole(holder, self.checkpoints / "best.keras")
            self.best_weights = None
        save_whole(self.model, self.checkpoints / "last.keras")
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.state))
        temporary.replace(self.state_file)
        self.saved_at = time.monotonic()


def save_whole(model, path) -> None:
    """model.save to a partial file beside `path` (Keras wants the .keras suffix), then rename it over `path`."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    model.save(partial)
    partial.replace(path)


def learning_rate(opts, done: float) -> float:
    """The run's (`opts`: its TrainOptions) learning rate: linear warm-up from a tenth over
    `warmup_epochs`' share of the run, then cosine down to a hundredth.
    done: the share of the run behind us, 0..1 (epochs, or minutes when the run has a time budget)."""
    warmup = min(0.5, opts.warmup_epochs / max(opts.epochs, 1)) if opts.minutes is None else 0.03
    if done < warmup:
        return opts.learning_rate * (0.1 + 0.9 * done / warmup)
    cosine = 0.5 * (1 + np.cos(np.pi * min(1.0, (done - warmup) / max(1e-9, 1 - warmup))))
    return float(opts.learning_rate * (0.01 + 0.99 * cosine))


def metric_name(head: str) -> str:
    return "expected_age_mae" if head == "distribution" else "age_mae"
