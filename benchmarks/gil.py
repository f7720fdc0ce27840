"""What the daemon's Python costs each frame under the interpreter lock (the GIL), by stage, against a baseline
tree measured in the same run (issue 10).

    python benchmarks/gil.py [--cameras 4] [--seconds 25] [--rounds 2] [--baseline-tree DIR] [--out bench-out/gil]

Every camera of a daemon runs its pipeline in a thread of one process, and only one thread at a time runs Python.
The native work (decoding, the networks, resizing) lets go of the lock; the Python around it does not. So the
milliseconds of Python a frame needs bound the cameras one daemon can serve: at 10 fps, 1000 / (10 x ms) cameras
hold the lock all the time, and well before that the threads queue for it, every camera's frames late together
(16 cameras in one daemon on the H200 in session 23: every stage's p99 and the broker's acks rose at once).

Each point is `tillsight bench --skip-model-speed` (the light model unless --model, 10 fps) with py-spy sampling its
daemon from outside (`py-spy record --gil --nonblocking`: only the thread that holds the lock is sampled, and the
daemon is never paused), from 2 s after its first frames (its models loaded) to 2 s before the bench stops it. The
share of samples is the share of time the lock was held; divided by the frames the daemon's metrics counted in
that time, the lock's milliseconds a frame. Each sample is charged to the innermost of the daemon's own modules in
its stack (edge/detect.py: the detector's Python and the numpy it calls), else to paho-mqtt's network thread, else
"other". py-spy reads the daemon's memory, which the daemon makes undumpable (no core file holds a face): it needs
CAP_SYS_PTRACE, i.e. root. --baseline-tree: another
checkout of tillsight (`git worktree add /tmp/before HEAD~3`): its daemon, measured by this tree's bench, in the
same rounds, alternating (A B, then B A: ABBA). Writes gil.json and gil.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # also under -P
from baseline_tree import (add_arguments, bench_video, copy_baseline, finish_plot, median,  # noqa: E402
                           round_order, trees_to_measure)
from edge.bench import frame_stages, scrape_metrics  # noqa: E402
SAMPLE_RATE_HZ = 250
SETTLE_S = 2.0  # from the daemon's first frames: the first seconds are not the steady state
EDGE_MODULE = re.compile(r"\((?:.*/)?edge/(\w+)\.py:\d+\)$")


class GilError(Exception):
    """One line for the user."""


def py_spy() -> str:
    found = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                       if (Path(sys.executable).parent / "py-spy").is_file() else None)
    if found is None:
        raise GilError("py-spy not found: pip install py-spy (the dev extra has it)")
    return found


def daemon_of(bench: subprocess.Popen, timeout_s: float = 900.0) -> tuple[int, dict]:
    """The daemon the bench started (`python -m edge run --config FILE`, its child): its pid, and its config's
    [metrics] (the bench turns them on). Before it, the bench replays the clip flat out: minutes for a long one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if bench.poll() is not None:
            raise GilError("the bench ended before its daemon started")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = [part.decode() for part in (entry / "cmdline").read_bytes().split(b"\0")]
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            if parent == bench.pid and "run" in command and "--config" in command:
                config = tomllib.loads(Path(command[command.index("--config") + 1]).read_text())
                return int(entry.name), config["metrics"]
        time.sleep(0.2)
    raise GilError(f"no daemon started by the bench within {timeout_s:g} s")


def frames_done(metrics: dict) -> tuple[str, int] | None:
    """The daemon's metrics now, and the frames it has detected faces in so far (None: not served yet)."""
    text, _ = scrape_metrics(metrics)
    if text is None:
        return None
    return text, (frame_stages([text]).get("detect") or {}).get("frames", 0)


def wait_for_frames(bench: subprocess.Popen, metrics: dict, timeout_s: float = 120.0) -> None:
    """Until the daemon analyses frames: loading its models (10 s and more on a GPU) is not the steady state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if bench.poll() is not None:
            raise GilError("the bench ended before its daemon analysed a frame")
        done = frames_done(metrics)
        if done is not None and done[1] > 0:
            return
        time.sleep(0.5)
    raise GilError(f"the daemon analysed no frame within {timeout_s:g} s")


def stop(bench: subprocess.Popen) -> None:
    """The bench interrupted (its own clean-up stops its daemon and broker and removes its copies of the clip),
    then anything of its process group left, killed."""
    if bench.poll() is None:
        bench.send_signal(signal.SIGINT)
        try:
            bench.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(bench.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    bench.wait()


def charge(stack: list[str]) -> str:
    """The stage a sample's stack is charged to: the innermost of the daemon's own modules."""
    for frame in reversed(stack):
        found = EDGE_MODULE.search(frame)
        if found:
            return f"edge/{found.group(1)}.py"
    return "paho-mqtt (network thread)" if any("paho/" in frame for frame in stack) else "other"


def read_samples(raw: Path) -> tuple[int, Counter, Counter]:
    """py-spy's raw output ("frame;...;innermost count" a line, outermost first; a "process ..." element first
    where py-spy names the process): samples, by stage, by function (each function once a sample, wherever in
    its stack: inclusive)."""
    total, stages, functions = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = [f for f in stack.split(";") if not f.startswith("process ")], int(count)
        total += n
        stages[charge(frames)] += n
        for function in {re.sub(r":\d+\)$", ")", frame) for frame in frames}:
            functions[function] += n
    return total, stages, functions


def one_point(tree: Path, args, folder: Path) -> dict:
    out, raw = folder / "bench-out", folder / "gil.txt"
    raw.unlink(missing_ok=True)
    command = [sys.executable, "-m", "edge", "bench", "--skip-model-speed", "--model", args.model,
               "--cameras", str(args.cameras), "--seconds", str(args.seconds), "--fps", "10", "--out", str(out)]
    if args.video:
        command += ["--video", str(args.video)]
    # a session of its own: whatever it started goes with it if this run fails
    # (SIGINT as by default: a shell that starts this in the background ignores it, and so would the bench)
    bench = subprocess.Popen(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        daemon, metrics = daemon_of(bench)
        wait_for_frames(bench, metrics)
        time.sleep(SETTLE_S)
        seconds = int(args.seconds - SETTLE_S - 2)  # ends before the bench stops its daemon
        before, scraped_at = frames_done(metrics), time.monotonic()
        spy = subprocess.run([py_spy(), "record", "--gil", "--nonblocking", "--rate", str(SAMPLE_RATE_HZ),
                              "--duration", str(seconds), "--format", "raw", "--output", str(raw),
                              "--pid", str(daemon)], capture_output=True, text=True)
        after, scraped_s = frames_done(metrics), time.monotonic() - scraped_at
        if spy.returncode != 0 or not raw.is_file():
            raise GilError("py-spy could not sample the daemon (the daemon makes itself undumpable: py-spy needs "
                           f"CAP_SYS_PTRACE, i.e. root): {(spy.stderr.strip().splitlines() or ['no output'])[-1]}")
        if before is None or after is None or after[1] <= before[1]:
            raise GilError("the daemon's metrics counted no frame while it was sampled")
        try:
            returncode = bench.wait(timeout=args.seconds + 120)
        except subprocess.TimeoutExpired:
            raise GilError(f"the bench did not end within {args.seconds + 120:g} s of its daemon's start") from None
        if returncode != 0:
            raise GilError(f"the bench failed ({tree}), exit {returncode}: run it alone to see why")
    finally:
        stop(bench)
    row = json.loads((out / "bench.json").read_text())["cameras"][0]
    samples, stages, functions = read_samples(raw)
    # detected between the two scrapes (every frame is), scaled to the seconds sampled: the scrapes also take in
    # py-spy's start and its writing out
    frames = (after[1] - before[1]) * seconds / max(scraped_s, seconds)
    per_frame = lambda n: round(1000 * n / SAMPLE_RATE_HZ / frames, 3)  # noqa: E731
    return {"held_pct": round(100 * samples / (SAMPLE_RATE_HZ * seconds), 1), "ms_per_frame": per_frame(samples),
            "stages_ms_per_frame": {stage: per_frame(n) for stage, n in stages.most_common()},
            "top_functions_ms_per_frame": {f: per_frame(n) for f, n in functions.most_common(15)},
            "frames": round(frames), "keeps_up": row["keeps_up"], "alert_p99_ms": row["alert_p99_ms"], "samples": samples}


def summarise(runs: list[dict]) -> dict:
    stages = sorted({stage for run in runs for stage in run["stages_ms_per_frame"]})
    return {"held_pct": median([r["held_pct"] for r in runs]),
            "ms_per_frame": median([r["ms_per_frame"] for r in runs], 3),
            "stages_ms_per_frame": {s: median([r["stages_ms_per_frame"].get(s, 0.0) for r in runs], 3) for s in stages},
            "alert_p99_ms": median([r["alert_p99_ms"] for r in runs]), "keeps_up": all(r["keeps_up"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, cameras=4, seconds=25.0, out="bench-out/gil")
    args = parser.parse_args()
    args.video = bench_video(args.video)  # one clip for every tree
    if args.seconds < SETTLE_S + 5:
        sys.exit(f"gil: error: --seconds {args.seconds:g}: at least {SETTLE_S + 5:g} (the first {SETTLE_S:g} and "
                 "the last 2 are not sampled)")
    trees = trees_to_measure(args.baseline_tree, "gil")
    args.out.mkdir(parents=True, exist_ok=True)
    points: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        py_spy()
        with tempfile.TemporaryDirectory(prefix="tillsight-gil-") as folder:
            copy_baseline(trees, Path(folder))  # its daemon, this tree's bench
            for round_no in range(args.rounds):
                for name, tree in round_order(trees, round_no):
                    point = one_point(tree, args, Path(folder))
                    points[name].append(point)
                    print(f"round {round_no + 1}, {name}: the lock held {point['held_pct']} % of the time, "
                          f"{point['ms_per_frame']} ms a frame; frame->alert p99 {point['alert_p99_ms']} ms"
                          + ("" if point["keeps_up"] else " (did not keep up)"), flush=True)
    except GilError as exc:
        sys.exit(f"gil: error: {exc}")
    summary = {name: summarise(runs) for name, runs in points.items()}
    print(f"\n{args.cameras} cameras at 10 fps, median of {args.rounds} rounds, {Path(str(args.video)).name} for "
          "every tree: the GIL's ms a frame, by stage (ratio: against the baseline)")
    base = summary.get("baseline", {}).get("ms_per_frame")
    for name, figures in summary.items():
        ratio = f" ({figures['ms_per_frame'] / base:.2f}x)" if base and name != "baseline" else ""
        ceiling = round(1000 / (10 * figures["ms_per_frame"])) if figures["ms_per_frame"] else None
        print(f"  {name:>9}: {figures['ms_per_frame']} ms a frame{ratio}, held {figures['held_pct']} % "
              f"(all the time at about {ceiling} cameras); frame->alert p99 {figures['alert_p99_ms']} ms")
        print("             " + ", ".join(f"{stage} {ms}" for stage, ms in
                                          sorted(figures["stages_ms_per_frame"].items(), key=lambda kv: -kv[1])))
    last = points["this tree"][-1]["top_functions_ms_per_frame"]
    print("  this tree's top functions (inclusive, last round), ms a frame: "
          + ", ".join(f"{f} {ms}" for f, ms in list(last.items())[:10]))
    (args.out / "gil.json").write_text(json.dumps({"cameras": args.cameras, "seconds": args.seconds, "video": str(args.video),
                                                   "rounds": args.rounds, "summary": summary, "points": points},
                                                  indent=1))
    plot(summary, args)
    print(f"wrote {args.out / 'gil.json'} and {args.out / 'gil.png'}")


def plot(summary: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = sorted({s for f in summary.values() for s in f["stages_ms_per_frame"]},
                    key=lambda s: -max(f["stages_ms_per_frame"].get(s, 0.0) for f in summary.values()))
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(stages) * len(summary) + 1.5))
    height = 0.8 / len(summary)
    for k, (name, figures) in enumerate(summary.items()):
        axis.barh([i + k * height for i in range(len(stages))],
                  [figures["stages_ms_per_frame"].get(s, 0.0) for s in stages], height,
                  label=f"{name}: {figures['ms_per_frame']} ms a frame in all")
    axis.set_yticks([i + height * (len(summary) - 1) / 2 for i in range(len(stages))], stages)
    axis.invert_yaxis()
    axis.set_xlabel("ms a frame holding the interpreter lock")
    finish_plot(figure, axis, f"{args.cameras} cameras at 10 fps, median of {args.rounds} rounds", args.out / "gil.png")


if __name__ == "__main__":
    main()
