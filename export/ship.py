"""`tillsight ship CHECKPOINT --data DIR`: a trained age model into the product, or one line saying why not.

What follows a training run, as one command, so that it is done the same way every time:

 1. export: fp32, fp16 and int8 ONNX (export/age.py; int8 calibrated on photos of the run's training
    split);
 2. eval through the full edge pipeline (detector, crop, ONNX Runtime) on the run's held-out test split
    (which neither trained it nor chose its checkpoint; the validation split for runs made without one):
    the int8 file against the fp32 one on the very same faces (training/evaluate.py). The errors written
    into the shipped file's metadata (the risk policy's table, edge/risk.py) are always measured on the
    validation split, which chose the checkpoint and is reported on only by a run without a test split; the
    risk mode's operating points score the test faces with that very table (out of sample, as served), or,
    without a test split, are cross-fitted on validation (`risk_text`);
 3. the gates: MAE under the model it replaces (`max_mae`, the seeds' 6.04 years), int8 within
    `max_int8_mae_change` (0.1) years of fp32's MAE, and no face moved by int8 more than
    `max_int8_shift` (3) years; if full int8 fails them, int8 weights with float maths
    (`int8_recipes`), scored and gated the same way; then the size budget (30 MB tracked);
 4. faces/s of fp32 and the int8 that passed on this CPU (edge/speed.py);
 5. only when every gate passes: `age_int8.onnx` into `into` (edge/models; the fp32 file is ~95 MB and
    fp16 ~47 MB, over the budget), the model card `AGE.md` with its plots in `age-card/`, and the
    generated parts of README.md and edge/models/README.md.

Everything measured stays in the work folder (`ship.json`), shipped or not.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SHIPPED_NAME = "age_int8.onnx"
CARD_NAME = "AGE.md"
CARD_PLOTS = "age-card"
TRACKED_BUDGET_BYTES = 30_000_000
SEED_MAE = 6.04  # the best seed model's MAE (issue 7): a shipped model must beat it
LICENCE = "UTKFace: non-commercial research only"
README_ROW = re.compile(r"^\| `resnet50` \|.*$", re.MULTILINE)
BLOCK = "<!-- age-model: written by `tillsight ship` -->\n{}\n<!-- /age-model -->"
BLOCK_PATTERN = re.compile(r"<!-- age-model: written by `tillsight ship` -->\n.*?\n<!-- /age-model -->", re.DOTALL)
CHALLENGE25_TARGETS = {"minors_13_17_flagged": 0.99, "adults_30plus_challenged": 0.10}  # issue 7: >= and <=


class ShipError(Exception):
    """The model does not ship: one line for the user."""


@dataclass
class ShipOptions:
    checkpoint: Path
    data: Path  # the labelled folder the run trained on: its held-out test split is scored (validation without one);
    # the risk policy's table is measured on its validation split
    work: Path  # exports, eval, speed and ship.json
    into: Path = Path("edge/models")
    readme: Path | None = Path("README.md")
    labels: Path | None = None
    limit: int | None = None  # score only this many photos of that split, and of validation for the table (rehearsals)
    max_mae: float = SEED_MAE
    max_int8_mae_change: float = 0.1
    max_int8_shift: float = 3.0
    speed_seconds: float = 2.0


def ship(opts: ShipOptions) -> dict:
    from export.age import export_age_model, run_info
    from training.evaluate import evaluate, print_eval
    if opts.work.exists() and not opts.work.is_dir():  # unlink below raised NotADirectoryError
        raise ShipError(f"--work {opts.work}: a file, not a folder")
    try:
        (opts.work / "ship.json").unlink(missing_ok=True)  # it must describe this attempt, never an older one
    except OSError as exc:  # a file above it, no permission
        raise ShipError(f"--work {opts.work}: {exc.strerror or exc}") from None
    if not opts.into.is_dir():
        raise ShipError(f"{opts.into} is not a folder: run from the repository root or pass --into edge/models")
    if not opts.checkpoint.is_file():
        raise ShipError(f"checkpoint not found: {opts.checkpoint}")
    info = run_info(opts.checkpoint)
    if "run.json" not in info:
        raise ShipError(f"no run.json beside {opts.checkpoint}: ship needs the training run's folder (its split, "
                        "recipe and history go into the model card)")
    options = info["run.json"]["options"]
    # what the model card and the scoring read, checked before the export (minutes): a hand-edited run.json
    missing = [key for key in ("data", "split") if key not in info["run.json"]] + \
        [f"options.{key}" for key in ("val_fraction", "head", "input_size") if key not in options]
    if missing:
        raise ShipError(f"{info['run_dir'] / 'run.json'}: {', '.join(missing)} missing: not the run.json "
                        "`tillsight train` writes")
    val_fraction, test_fraction = options["val_fraction"], options.get("test_fraction", 0.0)
    onnx_dir = opts.work / "onnx"
    exported = _earlier_export(opts, onnx_dir) or export_age_model(opts.checkpoint, onnx_dir, fp16=True, int8=True,
                                                                   calibration=opts.data)
    candidate = opts.work / "candidate" / SHIPPED_NAME
    result = {"checkpoint": str(opts.checkpoint), "run": _run_figures(info), "export": exported, "attempts": [],
              "shipped": False}
    try:
        for recipe, folder in int8_recipes(onnx_dir):
            # the table the model serves from validation; on test, the risk mode's points are scored with it
            report = evaluate(folder / SHIPPED_NAME, opts.data, opts.labels,
                              split=scored_split(options, info["run.json"].get("split")),
                              val_fraction=val_fraction, test_fraction=test_fraction,
                              limit=opts.limit, out=folder / "eval", compare=onnx_dir / "age.onnx",
                              residuals_into=candidate, residuals_split=TABLE_SPLIT)
            print(f"int8, {recipe}:")
            print_eval(report)
            checks = gates(report, opts)
            result["attempts"].append({"recipe": recipe, "folder": str(folder), "gates": checks})
            result.update(recipe=recipe, eval=report, gates=checks, eval_dir=str(folder / "eval"))
            if all(g["passed"] for g in checks):
                break
            if not report["mae"] or report["compared_with"]["mae"] >= opts.max_mae:
                raise ShipError(f"not shipped: int8 ({recipe}): " + ", ".join(  # fp32 itself is short: no int8 helps
                    g["why"] for g in checks if not g["passed"]) + f"; fp32's MAE is "
                    f"{_years(report['compared_with']['mae'])}")
        else:
            raise ShipError("not shipped: " + "; ".join(
                f"int8 ({a['recipe']}): " + ", ".join(g["why"] for g in a["gates"] if not g["passed"])
                for a in result["attempts"]))
        if "residuals_into" not in report:  # no validation face found (a tiny --limit): risk mode would refuse it
            raise ShipError(f"not shipped: no face found in the {report['residual_table']['n']} validation photos: "
                            "the risk policy's table cannot be measured")
        result["speed"] = cpu_speed(Path(result["attempts"][-1]["folder"]) / "age.onnx", opts.work / "speed",
                                    opts.speed_seconds)
        _add_metadata(candidate, report, info, recipe)
        result["tracked_bytes"] = _check_budget(opts.into, candidate, _card_plots(info, result))
        _install(opts, candidate, result, info)
        result["shipped"] = True
    finally:
        opts.work.mkdir(parents=True, exist_ok=True)
        (opts.work / "ship.json").write_text(json.dumps(result, indent=2, default=str))
    return result


FULL_INT8, WEIGHTS_INT8 = "weights and activations", "weights only"
TABLE_SPLIT = "val"  # the served residual table's faces: never the split whose figures the model card reports


def int8_recipes(onnx_dir: Path):
    """(recipe, folder holding age.onnx and that recipe's age_int8.onnx), fastest first: full int8 (about 3x
    fp32 on a CPU), then int8 weights with float maths (fp32's speed and accuracy in a quarter of the
    file), made only if the first is not good enough."""
    yield FULL_INT8, onnx_dir
    from export.age import quantize_weights_int8
    folder = onnx_dir.parent / "onnx-int8-weights"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "age.onnx").unlink(missing_ok=True)
    (folder / "age.onnx").symlink_to((onnx_dir / "age.onnx").resolve())  # the speed sweep finds its fp32 beside it
    (folder / SHIPPED_NAME).write_bytes(quantize_weights_int8(onnx_dir / "age.onnx"))
    yield WEIGHTS_INT8, folder


def _earlier_export(opts: ShipOptions, onnx_dir: Path) -> dict | None:
    """The export a previous `ship` of this very checkpoint (by sha256) and calibration data left, if complete:
    shipping again after a refusal re-scores, it does not convert again (minutes for a full-size model)."""
    from export.age import file_sha256
    try:
        report = json.loads((onnx_dir / "export.json").read_text())
    except (OSError, ValueError):
        return None
    names = ("age.onnx", "age_fp16.onnx", SHIPPED_NAME)
    if not isinstance(report, dict) or report.get("calibration") != str(opts.data) \
            or not all((onnx_dir / name).is_file() for name in names):
        return None
    if report.get("checkpoint_sha256") != file_sha256(opts.checkpoint):
        return None
    # each file the export recorded, as it wrote it: a variant left by another export (or by an export.json
    # from before the files were recorded) is no part of this one
    recorded = report.get("files") if isinstance(report.get("files"), dict) else {}
    if not all(recorded.get(name) == file_sha256(onnx_dir / name) for name in names):
        return None
    print(f"{onnx_dir}: the export of this checkpoint is there already (export.json): reused")
    return report


def gates(report: dict, opts: ShipOptions) -> list[dict]:
    """Each gate with its figure, limit and verdict (ship.json keeps them, passed or not)."""
    fp32 = report["compared_with"]
    agreement = report.get("agreement")
    rows = []

    def gate(name: str, value, limit: float, passed: bool, why: str) -> None:
        rows.append({"gate": name, "value": value, "limit": limit, "passed": passed, "why": why})

    if report["mae"] is None:
        gate("faces", 0, 1, False, f"no face found in the {report['n']} {split_words(report)} photos")
        return rows
    gate("mae", report["mae"], opts.max_mae, report["mae"] < opts.max_mae,
         f"int8 MAE {report['mae']:.3f} years is not under {opts.max_mae} (the model it would replace)")
    change = round(report["mae"] - fp32["mae"], 4)
    gate("int8_mae_change", change, opts.max_int8_mae_change, abs(change) <= opts.max_int8_mae_change,
         f"int8 MAE {report['mae']:.3f} is {change:+.3f} years from fp32's {fp32['mae']:.3f} "
         f"(at most {opts.max_int8_mae_change})")
    if agreement is None:
        gate("int8_shift", None, opts.max_int8_shift, False,
             "int8 and fp32 were not scored on the same faces: their shift cannot be measured")
    else:
        gate("int8_shift", agreement["max_abs_diff"], opts.max_int8_shift,
             agreement["max_abs_diff"] <= opts.max_int8_shift,
             f"int8 moves {agreement['max_abs_diff_file']} by {agreement['max_abs_diff']:.2f} years from fp32 "
             f"(at most {opts.max_int8_shift})")
    return rows


def cpu_speed(fp32_model: Path, out: Path, seconds: float) -> dict:
    """faces/s of fp32 and int8, batch 8 (a busy till's batch), plain `session.run`, every core of this CPU."""
    from edge.speed import SpeedOptions, model_sweep
    report = model_sweep(SpeedOptions(model=fp32_model, out=out, providers=["cpu"], variants=["fp32", "int8"],
                                      batches=[8], modes=["plain"], point_seconds=seconds))
    figures = {p["variant"]: p["faces_per_s"] for p in report["points"]}
    return {"machine": report["machine"], "onnxruntime": report["onnxruntime"], "batch": 8, "faces_per_s": figures}


def scored_split(options: dict, split: dict | None = None) -> str:
    """The split the shipped figures are measured on: the held-out test split, or validation for a run without one
    (or whose test split came out empty: a tiny `--limit`)."""
    return "test" if options.get("test_fraction", 0.0) > 0 and (split or {}).get("test", 1) > 0 else "val"


def split_words(report: dict) -> str:
    return "held-out test" if report.get("split") == "test" else "validation"


def _run_figures(info: dict) -> dict:
    """The training run as the model card tells it: recipe, data, split, time, throughput."""
    run = info["run.json"]
    summary = info.get("summary.json", {})
    history = info["run_dir"] / "history.csv"
    rows = list(csv.DictReader(history.open())) if history.is_file() else []
    utilisation = [float(r["gpu_utilisation"]) for r in rows if r.get("gpu_utilisation")]
    late = rows[-LATE_EPOCHS:]
    return {**_late_mae(late), "run_dir": str(info["run_dir"]), "options": run["options"], "data": run["data"], "split": run["split"],
            "device": run.get("device", {}), "epochs": summary.get("epochs_done", len(rows)),
            "best_val_mae": summary.get("best_val_mae"), "best_epoch": summary.get("best_epoch"),
            "train_seconds": summary.get("train_seconds"), "seconds_per_epoch": summary.get("seconds_per_epoch"),
            "images_per_second": summary.get("images_per_second"),
            "gpu_utilisation_mean": round(sum(utilisation) / len(utilisation), 1) if utilisation else None}


LATE_EPOCHS = 20  # the model card's "where training ended" figures average this many last epochs


def _late_mae(rows: list[dict]) -> dict:
    """Mean training and validation MAE over the run's last epochs: the validation figure not picked as the best
    of many noisy epochs on the very split it is reported on, and the gap that shows overfitting."""
    columns = list(rows[0]) if rows else []
    val_column = next((c for c in columns if c.startswith("val_") and c.endswith("mae")), None)
    train_column = next((c for c in columns if c.endswith("mae") and not c.startswith("val_")), None)

    def mean(column: str | None) -> float | None:
        values = [float(r[column]) for r in rows if column and r.get(column)]
        return round(sum(values) / len(values), 2) if values else None
    return {"late_epochs": len(rows), "late_val_mae": mean(val_column), "late_train_mae": mean(train_column)}


def _add_metadata(model_path: Path, report: dict, info: dict, recipe: str) -> None:
    """What `tillsight demo` and the status topic say about the model: its kind, licence and measured figures."""
    import onnx
    model = onnx.load(str(model_path))
    options = info["run.json"]["options"]
    c25 = report["challenge25"]
    extra = {"tillsight.kind": f"ResNet50 ({options['head']} head, {options['input_size']} px, random init), int8 "
                               f"{recipe}",
             "tillsight.licence": f"trained on {LICENCE}",
             "tillsight.measured": f"MAE {report['mae']:.2f} years on {report['n_scored']} UTKFace {split_words(report)} faces "
                                   f"(full pipeline); Challenge 25 flags {100 * c25['minors_13_17_flagged']:.1f} % "
                                   f"of 13-17-year-olds, challenges {100 * c25['adults_30plus_challenged']:.1f} % "
                                   f"of adults 30+" if c25["minors_13_17_flagged"] is not None
                                   and c25["adults_30plus_challenged"] is not None
                                   else f"MAE {report['mae']:.2f} years on {report['n_scored']} {split_words(report)} faces"}
    kept = [p for p in model.metadata_props if p.key not in extra]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in extra.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(model_path))


def _tracked_bytes(repo: Path) -> int | None:
    """The bytes git tracks in the checkout around `repo`; None outside a git checkout."""
    try:
        root = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, check=True).stdout.strip()
        names = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in names.decode().split("\0"):
        path = Path(root) / name
        if name and path.is_file():
            total += path.stat().st_size
    return total


CARD_BYTES = 20_000  # AGE.md is about 6 kB: room for long group tables


def _check_budget(into: Path, candidate: Path, plots: dict[str, Path]) -> int | None:
    """The tracked tree's size once the model, its card and plots replace the ones there."""
    tracked = _tracked_bytes(into)
    if tracked is None:
        print(f"{into} is not in a git checkout: the 30 MB budget of the tracked tree is not checked")
        return None
    old = _age_files(into) + [into / CARD_NAME] + [into / CARD_PLOTS / name for name in plots]
    new = candidate.stat().st_size + CARD_BYTES + sum(p.stat().st_size for p in plots.values() if p.is_file())
    after = tracked - sum(p.stat().st_size for p in old if p.is_file()) + new
    if after > TRACKED_BUDGET_BYTES:
        raise ShipError(f"not shipped: the tracked tree would hold {after / 1e6:.1f} MB with {candidate.name} "
                        f"({candidate.stat().st_size / 1e6:.1f} MB), over the {TRACKED_BUDGET_BYTES / 1e6:.0f} MB budget")
    return after


def _age_files(into: Path) -> list[Path]:
    """Every ResNet50 age file (any variant) an earlier ship or export may have left in `into`."""
    return [into / f"age{suffix}.onnx" for suffix in ("", "_fp16", "_int8")]


def _install(opts: ShipOptions, candidate: Path, result: dict, info: dict) -> None:
    for stale in _age_files(opts.into):  # one model answers: no variant of an older one may be picked instead
        stale.unlink(missing_ok=True)
    shutil.copyfile(candidate, opts.into / SHIPPED_NAME)
    plots = opts.into / CARD_PLOTS
    plots.mkdir(exist_ok=True)
    for name, source in _card_plots(info, result).items():
        if source.is_file():
            shutil.copyfile(source, plots / name)
    shipped = opts.into / SHIPPED_NAME
    result["file"] = {"path": str(shipped), "size_bytes": shipped.stat().st_size,
                      "sha256": hashlib.sha256(shipped.read_bytes()).hexdigest()}
    (opts.into / CARD_NAME).write_text(model_card(result, opts))
    _replace_block(opts.into / "README.md", models_readme_block(result))
    if opts.readme is not None:
        _replace_block(opts.readme, readme_block(result), row=readme_row(result))


def _card_plots(info: dict, result: dict) -> dict[str, Path]:
    """The model card's plots (name in age-card/ -> where the run or the eval wrote it)."""
    plots = {"curves.png": info["run_dir"] / "curves.png"}
    plots.update({name: Path(result["eval_dir"]) / name
                  for name in ("error_by_band.png", "predicted_vs_true.png", "operating_points.png")})
    return plots


def _replace_block(path: Path, text: str, row: str | None = None) -> None:
    """Rewrite the generated block (and the `resnet50` table row) of a README; a file without them is left as it
    is, with a line saying so."""
    if not path.is_file():
        print(f"{path} not found: its age model section is not updated")
        return
    content = path.read_text()
    if not BLOCK_PATTERN.search(content):
        print(f"{path} has no generated age model block: not updated")
        return
    content = BLOCK_PATTERN.sub(lambda _: BLOCK.format(text), content, count=1)
    if row is not None:
        content = README_ROW.sub(lambda _: row, content, count=1)
    path.write_text(content)


# ------------------------------------------------------------------ the texts


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _years(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _target(key: str, value) -> str:
    limit = CHALLENGE25_TARGETS[key]
    if value is None:
        return "n/a"
    met = value >= limit if key == "minors_13_17_flagged" else value <= limit
    return "met" if met else "**not met**"


def _recipe_text(result: dict, export: dict) -> str:
    if result["recipe"] == FULL_INT8:
        return ("static int8 (QDQ, per-channel weights; pooling and the age head after the last convolution in "
                f"float) calibrated on {export['int8'].get('calibration_crops', '?')} faces of the training "
                "split")
    first = result["attempts"][0]
    why = ", ".join(g["why"] for g in first["gates"] if not g["passed"])
    return ("int8 weights (one scale per output channel) with float maths: ONNX Runtime turns them back into "
            f"float weights at load, so it runs at fp32's speed. Full int8 was not good enough ({why})")


def readme_row(result: dict) -> str:
    report, speed = result["eval"], result["speed"]
    c25 = report["challenge25"]
    return (f"| `resnet50` | our ResNet50 (random init, trained on UTKFace: **non-commercial research only**), "
            f"`edge/models/{SHIPPED_NAME}` | MAE {_years(report['mae'])} years; Challenge 25 flags "
            f"{_pct(c25['minors_13_17_flagged'])} of 13–17-year-olds, challenges "
            f"{_pct(c25['adults_30plus_challenged'])} of adults 30+ | ~{speed['faces_per_s'].get('int8', 0):.0f} "
            f"faces/s ({speed['machine']}, batch 8) |")


def readme_block(result: dict) -> str:
    report, run = result["eval"], result["run"]
    return "\n".join([
        f"The ResNet50 ships as `edge/models/{SHIPPED_NAME}` (model card: `edge/models/{CARD_NAME}`): "
        f"MAE {_years(report['mae'])} years through the full pipeline on {report['n_scored']} UTKFace "
        f"{split_words(report)} faces (fp32: {_years(report['compared_with']['mae'])}), after {run['epochs']} epochs "
        f"({_minutes(run['train_seconds'])}) on {_device(run)}. It was trained on UTKFace, which is licensed for "
        "**non-commercial research only**: before deploying, a retailer trains it again on data they hold the "
        "rights to, with the same commands (`tillsight train`, then `tillsight ship`).",
        "",
        f"![training curves](edge/models/{CARD_PLOTS}/curves.png)",
        f"![error by age band](edge/models/{CARD_PLOTS}/error_by_band.png)",
    ])


def models_readme_block(result: dict) -> str:
    report = result["eval"]
    return (f"`{SHIPPED_NAME}` ({result['file']['size_bytes'] / 1e6:.1f} MB): the trained ResNet50, int8, "
            f"MAE {_years(report['mae'])} years on UTKFace {split_words(report)} faces (full pipeline). Trained on UTKFace: "
            f"non-commercial research only. Model card: `{CARD_NAME}`. The light tier remains for weak till PCs: "
            "its card is `LIGHT.md`.")


# `tillsight train` options that are flags of the command (the rest are fixed by the code)
TRAIN_FLAGS = ("input_size", "crop_margin", "head", "weights", "epochs", "batch_size", "learning_rate",
               "weight_decay", "dropout", "augment", "label_sigma", "oversample_minors", "val_fraction", "test_fraction", "limit",
               "seed", "mixed_precision", "minutes")


def train_command(options: dict) -> str:
    """The `tillsight train` command line that repeats the run (run.json's options)."""
    options = {"test_fraction": 0.0, **options}  # a run from before test splits held none out (now 0.1 by default)
    words = ["tillsight train --data DIR --out RUN"]
    words += [f"--{key.replace('_', '-')} {options[key]}" for key in TRAIN_FLAGS if options.get(key) is not None]
    if options.get("data_parallel"):
        words.append("--data-parallel")
    return " ".join(words)


def _late_text(run: dict, report: dict) -> str:
    if run.get("late_val_mae") is None:
        return ""
    chosen = ("chosen on the split the figures below are measured on, which flatters them a little"
              if report["split"] == "val" else "the figures below are on the held-out test split, which chose nothing")
    return (f". The checkpoint is the epoch with the best validation MAE; {chosen}: over the last "
            f"{run['late_epochs']} epochs the validation "
            f"MAE averaged {_years(run['late_val_mae'])} years"
            + (f" and the training MAE {_years(run['late_train_mae'])}" if run.get("late_train_mae") is not None else ""))


def _split_row(split: dict) -> str:
    test = split.get("test_fraction", 0.0)
    if not test:
        return (f"| Split | by file name: sha1(name) < {split['val_fraction']} → validation ({split['val']} faces), "
                f"else training ({split['train']}); the same rule as `tillsight eval --split val` |")
    return (f"| Split | by file name, h = sha1(name) in [0, 1): h < {split['val_fraction']} → validation "
            f"({split['val']} faces; chose the checkpoint, measured the risk policy's table), then {test} more → "
            f"held-out test ({split['test']}; "
            f"trained nothing, chose nothing: the figures below), else training ({split['train']}) |")


def _eval_split_flags(split: dict, report: dict) -> str:
    if report["split"] != "test":
        return "--split val"
    return f"--split test --val-fraction {split['val_fraction']} --test-fraction {split['test_fraction']}"


def _table_faces(report: dict) -> int:
    """How many faces the shipped residual table was measured on: validation's, or the scored ones without a test
    split (the scored split is validation then)."""
    return report["residual_table"]["n_scored"] if "residual_table" in report else report["n_scored"]


def risk_text(report: dict) -> str:
    """The model card's risk mode paragraph: where the served table was measured, where its operating points were
    scored, and the points around the default maximum risk."""
    from edge.policy import Policy
    risk = report["operating_points"]["risk"]  # settings ascending
    near = [p for p in risk if p["setting"] <= Policy.max_risk][-1:] + \
        [p for p in risk if p["setting"] > Policy.max_risk][:1]
    figures = "13–17-year-olds flagged and adults 25+ challenged at a maximum risk of " + "; at ".join(
        f"{100 * p['setting']:.1f} %: {_pct(p['minors_flagged'])} and {_pct(p['adults_challenged'])}" for p in near)
    minors = f"13–17: {report['n_by_band']['13-17']} of the {report['n_scored']} faces"
    head = "**Risk mode** (`policy.mode = \"risk\"`, default maximum risk " \
           f"{100 * Policy.max_risk:g} %, single photos): "
    if "residual_table" in report:
        table = report["residual_table"]
        return (head + f"the table in the file was measured on {table['n_scored']} validation faces (the split "
                "that chose the checkpoint; left out: its photos whose bytes are a training photo's, "
                f"{table['copies_of_training_left_out']}, or a held-out test photo's, "
                f"{table['copies_of_scored_split_left_out']}), never on the test faces above. The operating points "
                f"(plot; `operating_points` in `ship.json`) score the held-out test faces with that very table, as "
                f"the daemon serves it, so they are out of sample ({minors}): {figures}. (`tillsight eval --split "
                "test` cross-fits them on the test faces instead: each half scored with a table measured on the "
                "other half.)")
    return (head + f"the table in the file was measured on these {report['n_scored']} validation faces: the run "
            "holds no test split, and validation is the only split the model did not train on, for the table and "
            "for the figures alike. So the operating points (plot) are cross-fitted: each half of the faces is "
            "scored with a table measured on the other half, never with its own error, and not with the served "
            f"table itself, which holds every face ({minors}): {figures}. A run with a test split "
            "(`tillsight train --test-fraction`, 0.1 by default) gives figures of the served table out of sample.")


def _minutes(seconds) -> str:
    return "time unknown" if seconds is None else f"{seconds / 60:.1f} min of training"


def _device(run: dict) -> str:
    device = run["device"]
    if not device:
        return "an unrecorded device"
    return (f"{'a GPU' if device.get('gpu') else 'the CPU'} ({device.get('backend')} backend"
            f"{', bfloat16' if device.get('mixed_precision') else ''})")


def model_card(result: dict, opts: ShipOptions) -> str:
    report, fp32, run = result["eval"], result["eval"]["compared_with"], result["run"]
    options, split, data = run["options"], run["split"], run["data"]
    agreement, speed, export = result["eval"].get("agreement") or {}, result["speed"], result["export"]
    c25, c25_fp32 = report["challenge25"], fp32["challenge25"]
    recipe = train_command(options)
    lines = [
        "# ResNet50 age model — model card",
        "",
        f"The age model tillsight answers with by default (`models.age_model = \"auto\"`, tier `resnet50`). "
        f"Written by `tillsight ship` on {datetime.now(timezone.utc):%Y-%m-%d}: run it again rather than edit this "
        "file.",
        "",
        "| | |",
        "|---|---|",
        f"| What | ResNet50 (Keras 3), **random init** (no ImageNet weights exist here), {options['head']} head; "
        f"input {options['input_size']}×{options['input_size']} RGB face crops, crop margin {options['crop_margin']} "
        "(`edge.crop.crop_face`, as in training) |",
        f"| File | `{SHIPPED_NAME}`, {result['file']['size_bytes'] / 1e6:.1f} MB, sha256 `{result['file']['sha256']}`: "
        + _recipe_text(result, export) + f"; its errors measured on {_table_faces(report)} validation faces are in "
        "the metadata (the risk policy's table, below). The "
        f"fp32 file ({export['fp32']['size_bytes'] / 1e6:.0f} MB) and fp16 "
        f"({export.get('fp16', {}).get('size_bytes', 0) / 1e6:.0f} MB) do not fit the repository's 30 MB: "
        "`tillsight export CHECKPOINT --fp16` writes them for a GPU server |",
        f"| Training data | UTKFace: {data.get('labelled')} labelled photos, {data.get('faces')} with a face found "
        f"by the shipped detector. **Licence: non-commercial research only.** A retailer must not deploy this "
        "file commercially: train on data you hold the rights to with the same commands, ship that, and check "
        "its figures on your own labelled till footage with `tillsight eval` |",
        _split_row(split),
        f"| Recipe | `{recipe}` (on the GPU machine: `scripts/device/train_age.sh`) |",
        f"| Training | {run['epochs']} epochs, {_minutes(run['train_seconds'])} on {_device(run)}: "
        f"{run['seconds_per_epoch']} s an epoch, {run['images_per_second']} images/s"
        + (f", GPU utilisation {run['gpu_utilisation_mean']} % (NVML, mean of the epochs)"
           if run["gpu_utilisation_mean"] is not None else "")
        + f"; best validation MAE {_years(run['best_val_mae'])} years at epoch {run['best_epoch']} "
        "(training-time crops, Keras)" + _late_text(run, report) + " |",
        "",
        "## Accuracy through the full pipeline",
        "",
        f"`tillsight eval --model {SHIPPED_NAME} --compare age.onnx {_eval_split_flags(split, report)}`: the shipped "
        f"detector, crop and ONNX Runtime on {report['n']} {split_words(report)} photos of `{Path(report['data']).name}` "
        f"({report['n_no_face']} without a face found, {report['n_scored']} scored; both files on the same faces).",
        "",
        "| | faces | int8 (shipped) | fp32 |",
        "|---|---|---|---|",
        f"| MAE (years) | {report['n_scored']} | **{_years(report['mae'])}** | {_years(fp32['mae'])} |",
    ]
    lines += [f"| MAE {band} | {report['n_by_band'][band]} | {_years(value)} | {_years(fp32['mae_by_band'][band])} |"
              for band, value in report["mae_by_band"].items()]
    for key in ("mae_by_gender", "mae_by_race"):
        counts = report[key.replace("mae_", "n_")]
        lines += [f"| MAE {group} | {counts.get(group, '')} | {_years(value)} | {_years(fp32[key].get(group))} |"
                  for group, value in report[key].items()]
    lines += [
        "",
        "| Challenge 25 (estimated under 25) | target | int8 (shipped) | fp32 | |",
        "|---|---|---|---|---|",
        f"| true 13–17-year-olds flagged | ≥ 99 % | {_pct(c25['minors_13_17_flagged'])} | "
        f"{_pct(c25_fp32['minors_13_17_flagged'])} | {_target('minors_13_17_flagged', c25['minors_13_17_flagged'])} |",
        f"| true adults 30+ challenged | ≤ 10 % | {_pct(c25['adults_30plus_challenged'])} | "
        f"{_pct(c25_fp32['adults_30plus_challenged'])} | "
        f"{_target('adults_30plus_challenged', c25['adults_30plus_challenged'])} |",
        f"| true adults 25+ challenged | | {_pct(c25['adults_25plus_challenged'])} | "
        f"{_pct(c25_fp32['adults_25plus_challenged'])} | |",
        "",
        risk_text(report),
        "",
        f"**int8 against fp32**, face by face: {agreement.get('mean_abs_diff', 'n/a')} years apart on average, "
        f"{agreement.get('p99_abs_diff', 'n/a')} at the 99th percentile, {agreement.get('max_abs_diff', 'n/a')} at "
        f"most (the gate: {opts.max_int8_shift}; {agreement.get('over_3_years', 'n/a')} faces over 3), MAE change "
        f"{report['mae'] - fp32['mae']:+.3f} years (the gate: ±{opts.max_int8_mae_change}).",
        "",
        f"**Speed on a CPU** ({speed['machine']}, ONNX Runtime {speed['onnxruntime']}, batch {speed['batch']}): "
        + ", ".join(f"{variant} {figure:.0f} faces/s" for variant, figure in speed["faces_per_s"].items()) + ".",
        "",
        f"![training curves]({CARD_PLOTS}/curves.png)",
        f"![error by age band]({CARD_PLOTS}/error_by_band.png)",
        f"![predicted against true age]({CARD_PLOTS}/predicted_vs_true.png)",
        f"![operating points]({CARD_PLOTS}/operating_points.png)",
        "",
        "## Known limits",
        "",
        "- UTKFace's labels can be wrong (its authors describe the ages as estimated by an algorithm and checked "
        "by a person), its photos are portraits from the web, not till cameras looking down, and its groups are "
        "unequal (see the table): the figures above say how the model does on UTKFace, not in a store. Measure "
        "on your own footage before trusting a threshold.",
        f"- The age bands with few {split_words(report)} faces (see `faces`) have the least certain figures.",
        "- Served at the till through the detector: faces under `models.min_face_px` are not aged, and the budget's "
        "face-quality checks (`[budget]`) skip blurred and turned faces.",
        "- Random init: no ImageNet pre-training exists here. Published ResNet-50 results on UTKFace, which start "
        "from ImageNet weights, are 4.4–4.7 years MAE.",
        "",
    ]
    return "\n".join(lines)
