"""What the durable outbox costs per message: add (INSERT + fsync) and done (DELETE + fsync), on this
disk, against the outbox in memory, measured in the same run.

    python benchmarks/outbox.py [--messages 2000] [--dir /var/lib/tillsight]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edge.outbox import Outbox


def per_message_ms(box: Outbox, messages: int, payload: bytes) -> list[float]:
    timings = []
    for i in range(messages):
        started = time.perf_counter()
        key = box.add("tillsight/s/till-1/estimate", payload, 1)
        box.done(key)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--dir", type=Path, help="folder for the outbox file (default: a temporary one)")
    args = parser.parse_args()
    payload = json.dumps({"id": "0" * 32, "schema": 1, "age": 31.4, "pad": "x" * 300}).encode()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        disk = Outbox(Path(folder) / "outbox.sqlite3")
        memory = Outbox(None)
        results = {"disk": per_message_ms(disk, args.messages, payload),
                   "memory": per_message_ms(memory, args.messages, payload)}
        disk.close()
    for name, timings in results.items():
        timings.sort()
        print(f"{name:>6}: add+done per message p50 {statistics.median(timings):.3f} ms, "
              f"p99 {timings[int(len(timings) * 0.99)]:.3f} ms, {len(timings) / (sum(timings) / 1000):,.0f} messages/s")
    ratio = statistics.median(results["disk"]) / statistics.median(results["memory"])
    print(f"disk / memory (p50): {ratio:.0f}x")


if __name__ == "__main__":
    main()
