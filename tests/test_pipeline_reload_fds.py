"""`systemctl reload` (SIGHUP) runs the daemon again in the same process (os.execv): what it had open must not
cross into the new program. Counted in /proc/PID/fd of a real daemon with a video file and an MJPEG stream as
cameras, across reloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tskit import REPO, MjpegCamera, Subscriber, stop_daemon, write_config

CLOEXEC = 0o2000000  # O_CLOEXEC in /proc/PID/fdinfo's octal flags


def open_fds(pid: int) -> dict[int, tuple[str, bool]]:
    """fd -> (what it is, whether it closes at exec) of a running process."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{name}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue  # closed meanwhile
        found[int(name)] = (target, bool(flags & CLOEXEC))
    return found


def test_a_reload_leaves_nothing_open_behind_it(tmp_path, broker, age_models, carphone_clip):
    """OpenCV's V4L2 backend opens a USB camera without O_CLOEXEC (strace: openat("/dev/videoN", O_RDWR|O_NONBLOCK)
    and no fcntl after), where FFmpeg's files and sockets and Python's own close at exec. A reader stuck in a hung
    camera's read when the reload stops the threads (THREADS_STOP_S) still holds it at the exec: the new program
    inherits it, and as a V4L2 device streams to one file handle, its own open of the camera would find it busy, one
    handle more at every reload. No V4L2 device here: the daemon is given an open descriptor without O_CLOEXEC in that
    camera's stead (a file standing for the device); before, it was still open after every reload."""
    device = tmp_path / "video-device"
    device.write_bytes(b"")
    held = os.open(device, os.O_RDWR)
    mjpeg = MjpegCamera(carphone_clip, fps=10).start()
    config = write_config(tmp_path / "daemon.toml", store_id="store-1", daemon_id="till-pc", status_interval_s=1,
                          cameras=[{"id": "till-1", "source": str(carphone_clip), "fps_limit": 5},
                                   {"id": "till-2", "source": mjpeg.url, "fps_limit": 5}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          outbox={"path": str(tmp_path / "outbox")},  # its files are counted too
                          models={"age_model": str(age_models[40])}, logging={"level": "info"})
    status = Subscriber(broker.port, "tillsight/store-1/till-pc/status")
    log = tmp_path / "daemon.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(held,))
    os.close(held)
    seen: set[str] = set()

    def next_instance() -> None:
        """Wait for the next run, both its cameras online."""
        def fresh(s):
            return [m["instance"] for m in s.json("/status") if m["instance"] not in seen
                    and [c["state"] for c in m.get("cameras", {}).values()] == ["online", "online"]]
        assert status.wait_for(fresh, 60), log.read_text()[-3000:]
        seen.add(fresh(status)[0])
        time.sleep(1.0)  # the cameras' first frames read, the pipelines running

    snapshots = []
    try:
        next_instance()
        snapshots.append(open_fds(process.pid))
        for _ in range(3):
            process.send_signal(signal.SIGHUP)
            next_instance()
            snapshots.append(open_fds(process.pid))
        assert process.poll() is None
    finally:
        stop_daemon(process)
        status.close()
        mjpeg.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert sum(line["msg"] == "config reloaded: restarting in place" for line in lines) == 3
    assert str(device) in [target for target, _ in snapshots[0].values()]  # held as the run began
    for after in snapshots[1:]:
        assert str(device) not in [target for target, _ in after.values()], after
        assert [fd for fd, (_, cloexec) in after.items() if fd > 2 and not cloexec] == [], after
        assert str(carphone_clip) in [target for target, _ in after.values()]  # its cameras open again, once
    # the same number open after every reload: nothing left behind, nothing piling up
    assert len({len(after) for after in snapshots[1:]}) == 1, [sorted(t for t, _ in s.values()) for s in snapshots]
