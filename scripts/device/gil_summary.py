#!/usr/bin/env python3
"""What held a daemon's interpreter lock: a summary of `py-spy record --gil --format raw` (issue 10).

py-spy --gil samples only the thread that holds the GIL, so a daemon's samples at rate R over its frames give
the GIL time each frame costs; past about half of every second held, camera threads queue for it and the
frame->alert tail grows. Stacks of `tillsight bench` (py-spy --subprocesses) are kept for its daemons only.

    python3 scripts/device/gil_summary.py RAW [--rate 100] [--frames N] [--top 30]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

# a daemon's threads, by the function they run (edge/service.py, capture.py, infer.py; paho's network loop)
THREADS = {"CameraPipeline.run": "camera pipelines", "CameraReader.run": "camera readers",
           "AgeBatcher._run": "age batcher", "Client._thread_main": "MQTT client", "WatchdogFeeder": "watchdog"}


def daemon_stacks(path: str):
    """(frames of one stack, samples) for each raw line from a `tillsight run` process."""
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            daemon = next((i for i, f in enumerate(frames) if f.startswith("process ") and "edge run" in f), None)
            if daemon is None and any(f.startswith("process ") for f in frames):
                continue  # the bench process itself, or mosquitto
            yield frames[(daemon or -1) + 1:], int(count)


def summary(path: str, rate: float, frames: int | None, top: int) -> str:
    threads, inclusive, leaves = Counter(), Counter(), Counter()
    total = 0
    for stack, count in daemon_stacks(path):
        total += count
        kind = next((name for f in stack for key, name in THREADS.items() if f.startswith(key)), "other (main)")
        threads[kind] += count
        leaves[stack[-1][:110] if stack else "?"] += count
        for function in {f.split(" (")[0] for f in stack}:
            inclusive[function] += count
    if not total:
        return f"gil summary: no daemon samples in {path}\n"
    out = [f"GIL held by the daemon(s): {total} samples at {rate:g} Hz = {total / rate:.1f} s"]
    if frames:
        out.append(f"  {1000 * total / rate / frames:.2f} ms a frame over {frames} frames "
                   f"(camera pipelines alone: {1000 * threads['camera pipelines'] / rate / frames:.2f} ms)")
    out.append("by thread:")
    out += [f"  {n:7d} {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common()]
    out.append(f"functions, inclusive (top {top}):")
    out += [f"  {n:7d} {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out.append(f"lines where it was held (top {top}):")
    out += [f"  {n:7d} {100 * n / total:5.1f}%  {name}" for name, n in leaves.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate")
    parser.add_argument("--frames", type=int, help="frames the daemon(s) processed meanwhile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        print(summary(args.raw, args.rate, args.frames, args.top), end="")
    except OSError as exc:
        print(f"gil summary: {args.raw}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
