"""Whether the daemon holds steady over time: its memory, threads and open files while it serves looping
cameras for a while, with a local broker, sampled from /proc; the growth after warm-up, per hour.

    python benchmarks/soak.py [--minutes 6] [--cameras 1] [--fps 10] [--video FILE] [--out bench-out/soak]

A leak shows as RSS that keeps climbing after the first minute (models loaded, arenas grown, queues
full); threads or file descriptors that grow are a leak of their own (a reconnect that forgets to
close). Prints a line per sample, a summary, and writes soak.json and soak.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.broker import LocalBroker, find_mosquitto
from edge.demo import bundled_clip

REPO = Path(__file__).resolve().parents[1]
HAMILTON = REPO.parent / "shared" / "media" / "short_hamilton_clip.mp4"


def sample(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except PermissionError:  # the daemon is not dumpable (no core dump: frames), so its fd list is root's to read:
        fds = int(status["FDSize"])  # its fd table's size instead, which grows (in powers of two) with a leak
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]), "fds": fds}


def write_config(folder: Path, port: int, video: Path, cameras: int, fps: float) -> Path:
    lines = ['store_id = "soak"', 'daemon_id = "soak-pc"', "[mqtt]", 'host = "127.0.0.1"', f"port = {port}",
             "[analytics]", "interval_s = 60", "[logging]", 'level = "warning"']
    for index in range(cameras):
        lines += ["[[cameras]]", f'id = "till-{index + 1}"', f'source = "{video}"', f"fps_limit = {fps}"]
    path = folder / "soak.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def summary(samples: list[dict], warm_up_s: float) -> dict:
    """Growth from the first sample after warm-up to the last, and per hour at that pace."""
    settled = [s for s in samples if s["t"] >= warm_up_s] or samples[-1:]
    first, last = settled[0], samples[-1]
    hours = max(last["t"] - first["t"], 1e-9) / 3600
    growth = last["rss_mb"] - first["rss_mb"]
    return {"rss_after_warm_up_mb": round(first["rss_mb"], 1), "rss_end_mb": round(last["rss_mb"], 1),
            "rss_growth_mb": round(growth, 2), "rss_growth_mb_per_hour": round(growth / hours, 1),
            "threads": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
            "fds": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)]}


def plot(samples: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    minutes = [s["t"] / 60 for s in samples]
    fig, (memory, counts) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    memory.plot(minutes, [s["rss_mb"] for s in samples], marker=".")
    memory.set_ylabel("RSS, MB")
    memory.set_ylim(bottom=0)  # from zero: a zoomed axis makes a fraction of a megabyte look like a leak
    memory.set_title("tillsight run: memory, threads and open files over time")
    counts.plot(minutes, [s["threads"] for s in samples], label="threads")
    counts.plot(minutes, [s["fds"] for s in samples], label="open files")
    counts.set_ylim(bottom=0)
    counts.set_xlabel("minutes")
    counts.legend()
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=20.0)
    parser.add_argument("--warm-up-s", type=float, default=60.0)
    parser.add_argument("--video", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-out/soak"))
    args = parser.parse_args()
    video = args.video or (HAMILTON if HAMILTON.is_file() else bundled_clip())
    if video is None or not Path(video).is_file():
        sys.exit(f"soak: video not found: {video} (--video FILE)")
    if find_mosquitto() is None:
        sys.exit("soak: mosquitto is not installed (make test installs it)")
    args.out.mkdir(parents=True, exist_ok=True)
    estimates = [0]
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as folder:
        config = write_config(Path(folder), broker.port, Path(video).resolve(), args.cameras, args.fps)
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-listener")
        listener.on_message = lambda c, u, m: estimates.__setitem__(0, estimates[0] + 1)
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("tillsight/soak/+/estimate")
        listener.loop_start()
        log = Path(folder) / "daemon.log"  # a file, not a pipe: a pipe nobody reads would stall a chatty daemon
        daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                  stderr=log.open("w"))
        samples, started = [], time.monotonic()
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(args.sample_s)
                if daemon.poll() is not None:
                    sys.exit(f"soak: the daemon exited ({daemon.returncode}): {log.read_text()[-500:]}")
                row = {"t": round(time.monotonic() - started, 1), **sample(daemon.pid), "estimates": estimates[0]}
                samples.append(row)
                print(f"{row['t']:7.0f} s  rss {row['rss_mb']:7.1f} MB  threads {row['threads']:3d}  "
                      f"open files {row['fds']:3d}  estimates {row['estimates']}", flush=True)
        finally:
            daemon.terminate()
            daemon.wait(30)
            listener.loop_stop()
    if not samples:
        sys.exit("soak: no sample taken (--minutes shorter than --sample-s)")
    result = {"minutes": args.minutes, "cameras": args.cameras, "fps": args.fps, "video": str(video),
              "warm_up_s": args.warm_up_s, **summary(samples, args.warm_up_s), "samples": samples}
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    figure = plot(samples, args.out)
    print(f"after warm-up: RSS {result['rss_after_warm_up_mb']} -> {result['rss_end_mb']} MB "
          f"({result['rss_growth_mb']:+} MB, {result['rss_growth_mb_per_hour']:+} MB/hour at that pace); "
          f"threads {result['threads'][0]}-{result['threads'][1]}, open files {result['fds'][0]}-{result['fds'][1]}; "
          f"{samples[-1]['estimates']} estimates published")
    print(f"written: {args.out / 'soak.json'}" + (f", {figure}" if figure else " (no plot: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
