"""Resume and the model's random draws (FaceJitter's augmentation, Dropout's masks).

Keras keeps a SeedGenerator's state in a variable that `model.save` leaves out of the .keras file, so a run
resumed from last.keras started every random stream over: its epoch k+1 drew epoch 1's augmentation and
dropout again; and Keras' fit shuffled the batches of each epoch once more with Python's global `random`, whose
state no checkpoint has either (training/train.py now passes shuffle=False). A run of EPOCHS interrupted after epoch INTERRUPTED_AFTER (as by Ctrl-C or the GPU machine's
time limit, right after the checkpoint of that epoch) and resumed must draw, in every later epoch, what the
uninterrupted run drew there.

Tiny on purpose (16 faces at 32 px, batches of 4, 3 epochs), in-process, under whichever Keras backend is set
(`KERAS_BACKEND`: the suite's TensorFlow; JAX where it is installed): it checks the draws, not the model.
The first test is the mechanism on a model of a few hundred weights, in seconds.
"""

import csv
import shutil

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the train extra is not installed")

from training import progress  # noqa: E402
from training.train import TrainOptions, prepare_faces, train  # noqa: E402

pytestmark = pytest.mark.timeout(900)

EPOCHS, INTERRUPTED_AFTER = 3, 1


class Interrupted(Exception):
    """Stands for the Ctrl-C, or the kill at the GPU machine's time limit."""


def _seed_states(model) -> list[list[int]]:
    """Every SeedGenerator's state in the model, as the next random op will read it."""
    return [np.asarray(keras.ops.convert_to_numpy(v.value)).tolist()
            for v in model.non_trainable_variables if v.name == "seed_generator_state"]


def _train(monkeypatch, opts: TrainOptions, resume: bool = False, stop_after: int | None = None) -> dict:
    """train() as `tillsight train` runs it. Returns, per epoch, the seed states its first training step read
    (the epoch's draws follow from them) and those at its end. `stop_after`: interrupted right after that
    epoch's checkpoint."""
    states: dict[int, dict] = {}
    on_epoch_begin, on_epoch_end = progress.Progress.on_epoch_begin, progress.Progress.on_epoch_end

    def began(self, epoch, logs=None):
        on_epoch_begin(self, epoch, logs)
        self.epoch_now = epoch

    def first_step(self, batch, logs=None):
        # before the epoch's first step: on JAX the variables are still the model's here (the trainer takes them
        # into state of its own at that step, and gives them back at the epoch's end); TensorFlow's step reads them
        if batch == 0:
            states[self.epoch_now] = {"first": _seed_states(self.model)}

    def ended(self, epoch, logs=None):
        states[epoch]["end"] = _seed_states(self.model)
        on_epoch_end(self, epoch, logs)
        if stop_after == epoch + 1:
            raise Interrupted

    monkeypatch.setattr(progress.Progress, "on_epoch_begin", began)
    monkeypatch.setattr(progress.Progress, "on_train_batch_begin", first_step)
    monkeypatch.setattr(progress.Progress, "on_epoch_end", ended)
    # the checkpoint at every epoch's end (it is every 2 minutes): an interruption resumes at the last epoch
    monkeypatch.setattr(progress, "CHECKPOINT_EVERY_S", -1.0 if stop_after else 1e9)
    if stop_after:
        with pytest.raises(Interrupted):
            train(opts, resume=resume)
    else:
        train(opts, resume=resume)
    monkeypatch.undo()
    return states


def test_each_epoch_draws_from_the_seed_and_the_epoch_alone_through_a_save_and_load(tmp_path):
    """seed_epoch at each epoch's start, through the backend's compiled step (jit on JAX, whose trainer holds the
    variables in state of its own during an epoch): a model saved after epoch 1 and loaded trains epochs 2 and 3
    as the model that went on did. Without it the loaded model's streams start over: epoch 1's draws."""
    from training.augment import FaceJitter, seed_epoch

    def build():
        keras.utils.set_random_seed(1)
        crops = keras.Input((8, 8, 3))
        x = keras.layers.Flatten()(FaceJitter(seed=3, strength="strong")(crops))
        model = keras.Model(crops, keras.layers.Dense(1)(keras.layers.Dropout(0.5)(x)))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        return model

    class Seeded(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seed_epoch(self.model, 5, epoch)

    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3)).astype(np.float32)
    y = np.linspace(1.0, 60.0, 16, dtype=np.float32)
    fit = dict(batch_size=4, shuffle=False, verbose=0, callbacks=[Seeded()])
    whole = build().fit(x, y, epochs=3, **fit).history["loss"]
    model = build()
    first = model.fit(x, y, epochs=1, **fit).history["loss"]
    model.save(tmp_path / "epoch1.keras")
    rest = keras.models.load_model(tmp_path / "epoch1.keras").fit(x, y, epochs=3, initial_epoch=1, **fit).history["loss"]
    assert len(set(whole)) == 3 and first == pytest.approx(whole[:1], rel=1e-6)
    assert rest == pytest.approx(whole[1:], rel=1e-5)


def _losses(run_dir) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader((run_dir / "history.csv").open())]


def test_a_resumed_run_draws_what_the_uninterrupted_run_drew_not_epoch_ones_again(tmp_path, monkeypatch, utkface):
    common = dict(data=str(utkface), input_size=32, batch_size=4, limit=16, val_fraction=0.25, test_fraction=0.0,
                  epochs=EPOCHS, augment="strong", dropout=0.3, seed=7, workers=1, mixed_precision="off")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    faces, _ = prepare_faces(TrainOptions(out=str(whole), **common), whole)
    assert len(faces.labels) >= 12, "too few faces found in the tiny subset"
    broken.mkdir()
    shutil.copy(whole / "faces.npz", broken / "faces.npz")  # the same crops, detected once

    uninterrupted = _train(monkeypatch, TrainOptions(out=str(whole), **common))
    before = _train(monkeypatch, TrainOptions(out=str(broken), **common), stop_after=INTERRUPTED_AFTER)
    after = _train(monkeypatch, TrainOptions(out=str(broken), **common), resume=True)

    assert sorted(uninterrupted) == list(range(EPOCHS))
    assert sorted(before) == list(range(INTERRUPTED_AFTER)) and sorted(after) == list(range(INTERRUPTED_AFTER, EPOCHS))
    first = {epoch: s["first"] for epoch, s in uninterrupted.items()}
    assert len(first[0]) == 2, "FaceJitter's and Dropout's seed generators"
    assert len({repr(draws) for draws in first.values()}) == EPOCHS  # each epoch draws anew
    resumed = {epoch: s["first"] for epoch, s in {**before, **after}.items()}
    for epoch in range(EPOCHS):
        assert resumed[epoch] == first[epoch], (
            f"epoch {epoch + 1}: the resumed run drew from {resumed[epoch]}, the uninterrupted one from "
            f"{first[epoch]} (epoch 1: {first[0]})")
    # each epoch's steps drew on from the states set before it (the JAX trainer, which holds them in state of its
    # own during an epoch, started from those, and gave back where it got to)
    for states in (uninterrupted, before, after):
        for epoch, seen in states.items():
            assert [s[0] for s in seen["end"]] == [s[0] for s in seen["first"]], epoch
            assert all(end[1] > start[1] for end, start in zip(seen["end"], seen["first"])), epoch
    # the same draws, the same order of the crops and the same weights: the resumed epochs train as the
    # uninterrupted ones did (the interrupted epoch's line never reached history.csv)
    print("losses, uninterrupted:", _losses(whole), "resumed:", _losses(broken))
    assert _losses(broken) == pytest.approx(_losses(whole)[INTERRUPTED_AFTER:], rel=1e-4)
