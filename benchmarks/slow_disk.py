"""The daemon end to end on a slow disk: frame->alert latency when every fsync takes longer than this disk's,
against this disk as it is, measured in the same run (issue 10).

    python benchmarks/slow_disk.py [--delays-ms 0,5,20] [--cameras 6] [--seconds 20] [--rounds 2]
                                   [--baseline-tree DIR] [--out bench-out/slow-disk]

Every message is on disk before it is published (edge/outbox.py), so a disk's fsync is in every alert's path: an
SD card or eMMC in a till PC takes 5-20 ms and more, a busy server's disk too, where this VM's takes 0.1 ms. The
delay is added to each fsync and fdatasync of the daemon (the outbox's commits, the analytics intervals' file) by a
small LD_PRELOAD library compiled here (needs `cc`; Linux with glibc). Each point is `tillsight bench
--skip-model-speed` at 10 fps (the light model unless --model); the p99s are the median over the rounds, and each
delay's ratio is against delay 0 of the same tree. --baseline-tree: another checkout of tillsight (e.g. `git
worktree add /tmp/before HEAD~3`): its daemon, measured by this tree's bench (the same window and figures) in
the same rounds, alternating (A B, then B A), so that a change is compared on the same machine at the same time. Writes
slow_disk.json and slow_disk.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under -P
from baseline_tree import (add_arguments, bench_video, copy_baseline, finish_plot, median,  # noqa: E402
                           round_order, trees_to_measure)

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void slow(void) {
    const char *us = getenv("TS_FSYNC_DELAY_US");
    long delay = us ? atol(us) : 0;
    if (delay > 0) { struct timespec t = {delay / 1000000, (delay % 1000000) * 1000}; nanosleep(&t, 0); }
}
int fsync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); slow(); return real(fd); }
int fdatasync(int fd) {
    static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); slow(); return real(fd);
}
"""


def build_shim(folder: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("slow_disk: error: no C compiler (cc) to build the fsync delay library: apt install gcc")
    source, library = folder / "slow_fsync.c", folder / "slow_fsync.so"
    source.write_text(SHIM)
    built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"slow_disk: error: the fsync delay library did not build: {built.stderr.strip().splitlines()[-1]}")
    return library


def one_point(tree: Path, library: Path, delay_ms: float, args, out: Path) -> dict:
    env = {**os.environ, "LD_PRELOAD": str(library), "TS_FSYNC_DELAY_US": str(int(delay_ms * 1000)),
           "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "edge", "bench", "--skip-model-speed", "--model", args.model,
               "--cameras", str(args.cameras), "--seconds", str(args.seconds), "--fps", "10", "--out", str(out)]
    if args.video:
        command += ["--video", str(args.video)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"slow_disk: error: the bench failed ({tree}, fsync +{delay_ms:g} ms): "
                 f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    row = json.loads((out / "bench.json").read_text())["cameras"][0]
    stages = row.get("frame_stages") or {}
    return {"alert_p50_ms": row["alert_p50_ms"], "alert_p99_ms": row["alert_p99_ms"], "alerts": row["alerts"],
            "dropped": row["dropped"], "judge_p99_ms": (stages.get("judge") or {}).get("p99_ms"),
            "total_p99_ms": (stages.get("total") or {}).get("p99_ms"),
            "ack_p99_ms": (stages.get("mqtt_ack") or {}).get("p99_ms"),
            # the daemon's own view of its disk (None from a tree before the metric)
            "commit_p99_ms": (row.get("outbox_commits") or {}).get("p99_ms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays-ms", default="0,5,20", help="added to every fsync, comma-separated")
    add_arguments(parser, cameras=6, seconds=20.0, out="bench-out/slow-disk")
    args = parser.parse_args()
    args.video = bench_video(args.video)  # one clip for every tree
    try:
        delays = [float(d) for d in args.delays_ms.split(",")]
    except ValueError:
        sys.exit(f"slow_disk: error: --delays-ms {args.delays_ms!r}: numbers, comma-separated")
    trees = trees_to_measure(args.baseline_tree, "slow_disk")
    args.out.mkdir(parents=True, exist_ok=True)
    points: dict[str, dict[float, list[dict]]] = {name: {d: [] for d in delays} for name in trees}
    with tempfile.TemporaryDirectory(prefix="tillsight-slow-disk-") as folder:
        library = build_shim(Path(folder))
        copy_baseline(trees, Path(folder))  # its daemon, this tree's bench
        for round_no in range(args.rounds):
            for name, tree in round_order(trees, round_no):
                for delay in delays:
                    point = one_point(tree, library, delay, args, Path(folder) / "out")
                    points[name][delay].append(point)
                    print(f"round {round_no + 1}, {name}, fsync +{delay:g} ms: frame->alert p50 {point['alert_p50_ms']}"
                          f" p99 {point['alert_p99_ms']} ms, judge p99 {point['judge_p99_ms']}, MQTT ack p99 "
                          f"{point['ack_p99_ms']}, outbox commit p99 {point['commit_p99_ms']}, dropped {point['dropped']}", flush=True)
    summary = {name: {f"{d:g}": {key: median([p[key] for p in runs]) for key in runs[0]} for d, runs in by_delay.items()}
               for name, by_delay in points.items()}
    print(f"\n{args.cameras} cameras at 10 fps, {args.seconds:g} s a point, {Path(str(args.video)).name} for "
          f"every tree, median of {args.rounds} rounds "
          "(ms; ratio: p99 against fsync +0 of the same tree)")
    for name, by_delay in summary.items():
        base = by_delay[f"{delays[0]:g}"]["alert_p99_ms"]
        for delay, figures in by_delay.items():
            ratio = f"{figures['alert_p99_ms'] / base:.2f}x" if base and figures["alert_p99_ms"] else "-"
            print(f"  {name:>9}, fsync +{delay:>3} ms: frame->alert p50 {figures['alert_p50_ms']:>6} p99 "
                  f"{figures['alert_p99_ms']:>6} ({ratio}), judge p99 {figures['judge_p99_ms']}, total p99 "
                  f"{figures['total_p99_ms']}, MQTT ack p99 {figures['ack_p99_ms']}, outbox commit p99 "
                  f"{figures['commit_p99_ms']}, dropped {figures['dropped']}")
    (args.out / "slow_disk.json").write_text(json.dumps({"cameras": args.cameras, "seconds": args.seconds, "video": str(args.video),
                                                         "rounds": args.rounds, "summary": summary,
                                                         "points": {n: {f"{d:g}": r for d, r in b.items()}
                                                                    for n, b in points.items()}}, indent=1))
    plot(summary, delays, args)
    print(f"wrote {args.out / 'slow_disk.json'} and {args.out / 'slow_disk.png'}")


def plot(summary: dict, delays: list[float], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, by_delay in summary.items():
        for key, style in (("alert_p99_ms", "-o"), ("alert_p50_ms", "--s")):
            axis.plot(delays, [by_delay[f"{d:g}"][key] for d in delays], style,
                      label=f"{name}: frame->alert {key.split('_')[1]}")
    axis.axhline(30, color="grey", linewidth=0.8, linestyle=":", label="issue 10's p99 target")
    axis.set_xlabel("added to every fsync (ms)")
    axis.set_ylabel("ms")
    finish_plot(figure, axis, f"{args.cameras} cameras at 10 fps on a slow disk (median of {args.rounds} rounds)",
                args.out / "slow_disk.png")


if __name__ == "__main__":
    main()
