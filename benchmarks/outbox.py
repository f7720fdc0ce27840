"""What the durable outbox costs per message: add (its commit: INSERT + fsync) and done (at the broker's ack: in
memory, its DELETE with the next commit or the service's tick, here the tick after each add), on this disk, against the outbox in memory, measured in the same
run. One thread; what many cameras' threads gain from group commit: benchmarks/slow_disk.py.

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


def per_message_ms(box: Outbox, messages: int, payload: bytes) -> dict[str, list[float]]:
    """ms of each add (a camera's thread, before publishing), each done (paho's thread, at the broker's ack) and
    each tidy (the service's tick, which deletes the acknowledged rows)."""
    timings: dict[str, list[float]] = {"add": [], "done": [], "tidy": []}
    for i in range(messages):
        started = time.perf_counter()
        key = box.add("tillsight/s/till-1/estimate", payload, 1)
        added = time.perf_counter()
        box.done(key)
        acknowledged = time.perf_counter()
        box.tidy()
        timings["add"].append((added - started) * 1000)
        timings["done"].append((acknowledged - added) * 1000)
        timings["tidy"].append((time.perf_counter() - acknowledged) * 1000)
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
        every = sorted(sum(steps) for steps in zip(*timings.values()))
        parts = ", ".join(f"{step} p50 {statistics.median(t):.3f} / p99 {sorted(t)[int(len(t) * 0.99)]:.3f} ms"
                          for step, t in timings.items())
        print(f"{name:>6}: add+done+tidy per message p50 {statistics.median(every):.3f} ms, "
              f"p99 {every[int(len(every) * 0.99)]:.3f} ms, {len(every) / (sum(every) / 1000):,.0f} messages/s ({parts})")
    ratio = statistics.median([sum(steps) for steps in zip(*results["disk"].values())]) / \
        statistics.median([sum(steps) for steps in zip(*results["memory"].values())])
    print(f"disk / memory (p50): {ratio:.0f}x")


if __name__ == "__main__":
    main()
