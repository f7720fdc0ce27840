"""`tillsight train`: fine-tune ResNet50 for age on a labelled face folder.

Run folder layout (all written by this command):
    run.json                 options, data and split, with the copies of training left out by name (written
                             first, read by resume and export)
    faces.npz                the detected, cropped faces (always reused on resume, by a new run only while the
                             data is unchanged; derived from the data: never commit)
    checkpoints/best.keras   best validation MAE so far (no optimizer state)
    checkpoints/last.keras   the latest checkpoint, optimizer included (resume); written every
                             progress.CHECKPOINT_EVERY_S and at the end, not every epoch: with Adam's
                             state a ResNet50 checkpoint is ~280 MB, seconds an epoch on a GPU
    history.csv, curves.png  per-epoch loss and MAE, as numbers and as a plot
    summary.json             the outcome: data counts, best MAE, time per epoch
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge import __version__
from training.data import (DataError, FaceSet, Label, copies_of_training, load_faces, read_labels, select,
                           split_of)


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
    weight_decay: float = 0.0  # AdamW's decoupled decay when > 0 (not on biases and batch-norm scales)
    warmup_epochs: float = 1.0
    dropout: float = 0.2  # before the head
    augment: str = "standard"  # or "strong": wider scale and shift, random erasing (training/augment.py)
    label_sigma: float = 2.0  # the distribution head's label Gaussian, in years
    # Training faces aged 13-17 this many times an epoch: the Challenge 25 minors target rests on them and
    # they are 3 % of UTKFace (62 of 2,140 validation faces)
    oversample_minors: int = 1
    val_fraction: float = 0.1
    # Held out from training and from choosing the checkpoint; `tillsight ship` reports on it (training/data.py).
    test_fraction: float = 0.1
    limit: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bfloat16 maths when a GPU is present
    data_parallel: bool = False
    # The whole run's training time in minutes: the learning rate follows the fraction of it spent
    # (or of the epochs, whichever runs out first) and training stops before the next epoch would
    # overrun it. For a GPU lent for a fixed time, where the epochs that fit are known only there.
    minutes: float | None = None
    workers: int | None = None  # processes detecting faces (default: one per core)


class TrainError(Exception):
    pass


MINORS = (13, 17)  # the ages Challenge 25's minors target is measured on (export/ship.py)


def minor_repeats(ages: np.ndarray, times: int) -> np.ndarray:
    """How many times each training face is in an epoch: `times` for the 13-17-year-olds, once for the rest."""
    return np.where((ages >= MINORS[0]) & (ages < MINORS[1] + 1), times, 1)


def labels_path(data_dir: Path, labels: str | None) -> Path:
    return Path(labels) if labels else data_dir / "labels.csv"


def data_fingerprint(opts: TrainOptions) -> str:
    """What the crops are made from: the folder, --labels and --limit, the labels file's sha256, and the size and
    modification time of the shards, or of each labelled loose image. A run folder reused after the data changed
    (labels.csv fixed after a run that failed early, photos replaced) makes its faces anew."""
    data_dir = Path(opts.data)
    labels_file = labels_path(data_dir, opts.labels)
    try:
        labels_sha256 = hashlib.sha256(labels_file.read_bytes()).hexdigest()
    except OSError:
        labels_sha256 = None  # read_labels says what is wrong with it
    images = hashlib.sha256()
    for path in image_files(data_dir, labels_file if labels_sha256 else None):
        try:
            stat = path.stat()
        except OSError:
            continue
        images.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return json.dumps({"data": str(data_dir.resolve()), "labels": opts.labels, "limit": opts.limit,
                       "labels_sha256": labels_sha256, "images": images.hexdigest()})


def image_files(data_dir: Path, labels_file: Path | None) -> list[Path]:
    """The shards of a folder, or else where its labelled loose images would be (in it, or in images/)."""
    shards = sorted(data_dir.glob("images-*.tar.gz")) + sorted(data_dir.glob("images-*.tar"))
    if shards or labels_file is None:
        return shards
    try:
        names = sorted({label.file_name for label in read_labels(labels_file)})
    except DataError:
        return []
    return [folder / name for name in names for folder in (data_dir, data_dir / "images")]


def prepare_faces(opts: TrainOptions, run_dir: Path, resume: bool = False) -> tuple[FaceSet, dict]:
    """Crop every labelled face once; later runs read faces.npz while the data is unchanged, and a resumed run
    always does: it goes on with the faces it started on, wherever its data folder is now."""
    cache = run_dir / "faces.npz"
    source = None if resume else data_fingerprint(opts)
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        if int(stored["input_size"]) == opts.input_size and float(stored["crop_margin"]) == opts.crop_margin \
                and "source" in stored and (resume or str(stored["source"]) == source):
            labels = [Label(str(n), float(a), _none(g), _none(r))
                      for n, a, g, r in zip(stored["names"], stored["ages"], stored["genders"], stored["races"])]
            return FaceSet(stored["crops"], labels), json.loads(str(stored["counts"]))
    data_dir = Path(opts.data)
    labels = select(read_labels(labels_path(data_dir, opts.labels)), opts.limit)
    faces = load_faces(data_dir, labels, opts.input_size, opts.crop_margin, workers=opts.workers)
    counts = {"labelled": len(labels), "faces": len(faces.labels), "no_face": len(faces.no_face),
              "unreadable": len(faces.unreadable), "missing": len(faces.missing)}
    if not faces.labels:
        raise DataError(f"no usable face in {data_dir} ({counts})")
    np.savez(cache, crops=faces.crops, names=[l.file_name for l in faces.labels], ages=faces.ages,
             genders=[_int(l.gender) for l in faces.labels], races=[_int(l.race) for l in faces.labels],
             input_size=opts.input_size, crop_margin=opts.crop_margin, counts=json.dumps(counts),
             source=source or data_fingerprint(opts))
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
    # bfloat16, not float16: float32's range, so no loss scaling (Ampere and newer GPUs)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed else "float32")
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


_OPTION_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _read_json(path: Path, what: str):
    """A run folder's JSON file; TrainError (one line) if it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"{path} is missing: {what}") from None
    except OSError as exc:
        raise TrainError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TrainError(f"{path}: not valid JSON ({exc}); {what}") from None


def saved_options(run_dir: Path) -> dict:
    """The options of the run in `run_dir` (its run.json), checked against TrainOptions: a run.json edited by
    hand, or from another version, gave a KeyError or TypeError traceback."""
    path = run_dir / "run.json"
    body = _read_json(path, "a run folder holds the run.json train writes first")
    saved = body.get("options") if isinstance(body, dict) else None
    if not isinstance(saved, dict):
        raise TrainError(f"{path}: no \"options\" object: not a run.json written by `tillsight train`")
    saved = {"test_fraction": 0.0, **saved}  # a run from before test splits had none: its split stays
    fields = TrainOptions.__dataclass_fields__
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise TrainError(f"{path}: unknown option(s) {', '.join(map(repr, unknown))[:200]} (from another version?)")
    if "data" not in saved:
        raise TrainError(f"{path}: options.data is missing")
    for name, value in saved.items():
        kinds = [_OPTION_TYPES.get(part.strip(), ()) for part in str(fields[name].type).split("|")]
        optional = "None" in str(fields[name].type)
        bad_bool = isinstance(value, bool) and (bool,) not in kinds
        if not (value is None and optional) and (bad_bool or not any(isinstance(value, k) for k in kinds if k)):
            raise TrainError(f"{path}: options.{name} = {json.dumps(value)[:60]} should be of type {fields[name].type}")
    return saved


def read_state(state_file: Path) -> dict:
    """The resumed run's progress (state.json), as training.progress.Progress writes it."""
    state = _read_json(state_file, "the run's progress; resume needs it")
    number = (int, float)
    if not (isinstance(state, dict) and {"epoch", "best_val_mae", "best_epoch"} <= set(state)
            and isinstance(state["epoch"], int) and not isinstance(state["epoch"], bool)
            and state["epoch"] >= 0 and isinstance(state.get("best_val_mae"), (*number, type(None)))
            and isinstance(state.get("best_epoch"), (int, type(None)))
            and isinstance(state.get("train_seconds", 0.0), number)
            and isinstance(state.get("epoch_seconds", []), list)
            and all(isinstance(s, number) for s in state.get("epoch_seconds", []))):
        raise TrainError(f"{state_file}: not the progress `tillsight train` writes (epoch, best_val_mae, "
                         "best_epoch): restore it, or start a new run in another --out")
    return state


def training_copies(opts: TrainOptions, labels: list[Label], run_dir: Path, resume: bool) -> set[str]:
    """The validation and test faces left out as copies of training images. Found in the data folder's bytes by a
    new run, and kept in run.json: a resumed run takes them from there, since its faces come from faces.npz and
    the folder may have moved since (found again, they were none, and the checkpoint was then chosen on another
    validation set)."""
    if not resume:
        return copies_of_training(Path(opts.data), labels, opts.val_fraction, opts.test_fraction)
    body = _read_json(run_dir / "run.json", "a run folder holds the run.json train writes first")
    split = body.get("split") if isinstance(body, dict) and isinstance(body.get("split"), dict) else {}
    if isinstance(split.get("copies_of_training"), list):
        return set(map(str, split["copies_of_training"]))
    # a run.json from before the names were kept: found again, and only if the folder gives the run's count
    copies = copies_of_training(Path(opts.data), labels, opts.val_fraction, opts.test_fraction)
    if len(copies) != split.get("copies_of_training_left_out", len(copies)):
        raise TrainError(f"{opts.data} gives {len(copies)} validation and test copies of training images, the run "
                         f"left out {split['copies_of_training_left_out']}: resume with the run's data folder where "
                         "it was (run.json's options.data)")
    return copies


RESUME_TAKES = ("epochs", "out", "workers", "minutes")  # the options a resumed run takes from its command line


def ignored_options(given: TrainOptions, saved: dict) -> list[str]:
    """The options given to a resume that differ from the run's, which it keeps: those that differ from their
    default (a default cannot be told from an option not given), and --data, which is always given."""
    defaults = TrainOptions(data="")
    ignored = []
    for name in TrainOptions.__dataclass_fields__:
        value = getattr(given, name)
        if name in RESUME_TAKES or name not in saved or (name != "data" and value == getattr(defaults, name)):
            continue
        same = Path(value).resolve() == Path(saved[name]).resolve() if name == "data" else value == saved[name]
        if not same:
            ignored.append(f"--{name.replace('_', '-')} {value} (the run's: {saved[name]})")
    return ignored


def warn_ignored(given: TrainOptions, saved: dict) -> None:
    ignored = ignored_options(given, saved)
    if ignored:  # a resumed run is the run it continues: a changed recipe would be another run under its name
        print(f"warning: resuming with the run's own options; ignored: {', '.join(ignored)}", file=sys.stderr)


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
        saved = saved_options(run_dir)
        warn_ignored(opts, saved)
        opts = TrainOptions(**{**saved, "epochs": opts.epochs, "out": str(run_dir), "workers": opts.workers,
                               "minutes": opts.minutes if opts.minutes is not None else saved.get("minutes")})
        read_state(state_file)  # before the faces are prepared (minutes): a bad one is said at once
    elif (checkpoints / "last.keras").exists():
        raise TrainError(f"{run_dir} already holds a run: pass --resume to continue it, or another --out")
    checkpoints.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts.seed)
    device = configure_devices(opts)
    faces, counts = prepare_faces(opts, run_dir, resume)
    splits = np.array([split_of(l.file_name, opts.val_fraction, opts.test_fraction) for l in faces.labels])
    copies = training_copies(opts, faces.labels, run_dir, resume)
    splits[[l.file_name in copies for l in faces.labels]] = "copy"  # picks no checkpoint, scores nothing
    train_set, val_set = faces.subset(splits == "train"), faces.subset(splits == "val")
    if len(train_set.labels) == 0 or len(val_set.labels) == 0:
        raise TrainError(f"split left {len(train_set.labels)} training and {len(val_set.labels)} validation faces; "
                         "use more data or another --val-fraction")
    split = {"val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
             "rule": "h = sha1(file_name) in [0, 1): h < val_fraction -> val, "
                     "< val_fraction + test_fraction -> test, else train; a val or test image whose bytes are a "
                     "train image's too is left out",
             "train": len(train_set.labels), "val": len(val_set.labels), "test": int((splits == "test").sum()),
             "copies_of_training_left_out": len(copies), "copies_of_training": sorted(copies)}
    (run_dir / "run.json").write_text(json.dumps(
        {"options": asdict(opts), "data": counts, "split": split, "device": device, "tillsight": __version__}, indent=2))

    # threads gather the next batches while the accelerator runs this one
    train_batches = CropBatches(train_set.crops, train_set.ages, opts.batch_size, train=True, seed=opts.seed,
                                repeats=minor_repeats(train_set.ages, opts.oversample_minors), workers=4)
    val_batches = CropBatches(val_set.crops, val_set.ages, opts.batch_size, train=False, workers=4)
    state = read_state(state_file) if resume else {"epoch": 0, "best_val_mae": None, "best_epoch": None}
    if resume:
        model = keras.models.load_model(checkpoints / "last.keras")  # random state: none; Progress sets it each epoch
        train_batches.resume_at(state["epoch"])
        keep_history(run_dir / "history.csv", state["epoch"])
    else:
        model = build_model(opts.input_size, opts.head, opts.weights, dropout=opts.dropout, augment=opts.augment,
                            mean_age=float(train_set.ages.mean()), seed=opts.seed)
        loss, metric = loss_and_metric(opts.head, opts.label_sigma)
        # the learning rate is set before every epoch by `Progress`, from the share of the run done
        model.compile(optimizer=_optimizer(opts), loss=loss, metrics=[metric])
    from training.progress import Progress
    progress = Progress(opts, state, state_file, checkpoints, len(train_batches) * train_batches.batch_size)
    callbacks = [progress, keras.callbacks.CSVLogger(run_dir / "history.csv", append=resume)]
    if state["epoch"] < opts.epochs and not progress.out_of_time():
        # shuffle=False: train_batches orders each epoch from the seed and the epoch alone (a resumed epoch as the
        # uninterrupted run had it); Keras' shuffle would permute its batches again with Python's global `random`,
        # whose state a resumed run does not have
        model.fit(train_batches, validation_data=val_batches, epochs=opts.epochs, initial_epoch=state["epoch"],
                  shuffle=False, callbacks=callbacks, verbose="auto" if sys.stdout.isatty() else 2)  # a line an epoch
    plot_curves(run_dir / "history.csv", run_dir / "curves.png")
    epoch_times = state.get("epoch_seconds", [])
    summary = {"run_dir": str(run_dir), "data": counts, "split": split, "options": asdict(opts), "device": device,
               "epochs_done": state["epoch"], "best_val_mae": state["best_val_mae"], "best_epoch": state["best_epoch"],
               "train_seconds": round(state.get("train_seconds", 0.0), 1),
               "seconds_per_epoch": round(float(np.mean(epoch_times)), 2) if epoch_times else None,
               "seconds_per_step": round(float(np.mean(epoch_times)) / len(train_batches), 3) if epoch_times else None,
               "images_per_second": round(len(train_batches) * train_batches.batch_size / float(np.median(epoch_times)),
                                          1) if epoch_times else None,
               "tillsight": __version__}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def keep_history(path: Path, epochs: int) -> None:
    """history.csv as it was at the saved state: the epochs that ran after it (the state is saved every few
    minutes, the CSV every epoch) run again on resume, and would be in it twice, in the curves and the card."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines[1:] if line.split(",", 1)[0].strip().isdigit() and int(line.split(",", 1)[0]) < epochs]
    path.write_text("".join(lines[:1] + kept))


def _optimizer(opts: TrainOptions):
    import keras
    if opts.weight_decay <= 0:
        return keras.optimizers.Adam(opts.learning_rate)
    optimizer = keras.optimizers.AdamW(opts.learning_rate, weight_decay=opts.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer
