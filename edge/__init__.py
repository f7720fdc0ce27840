"""tillsight edge daemon: camera -> face -> age -> MQTT.

One module per pipeline stage: capture, detect, crop, infer, track, policy,
publish; `service` wires them together and `cli` is the command line.
"""

import os

# OpenCV (and FFmpeg through it) print warnings straight to stderr, e.g. for a
# corrupt file; we report such failures ourselves, in one line. Set before cv2 loads.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "0")  # AV_LOG_PANIC: FFmpeg's own error lines too

# ONNX Runtime >= 1.29 ships POSIX telemetry: an uploader, a device id and an
# offline cache under ~/.cache/Microsoft. A till must not phone home nor write
# files we did not ask for; the opt-out only works if set before ORT loads.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
