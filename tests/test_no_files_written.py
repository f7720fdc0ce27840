"""A replay writes no file anywhere: no frames, no crops, no caches (privacy)."""

import re
import shutil
import subprocess
import sys


from tskit import REPO, absent, write_config

WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")
WRITE_CALLS = ("creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat",
               "symlink", "symlinkat", "truncate")


def written_paths(trace: str) -> list[str]:
    paths = []
    for line in trace.splitlines():
        call = re.match(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if not call or call.group(3).startswith("-"):
            continue  # unfinished, resumed or failed calls
        name, args = call.group(1), call.group(2)
        if name in ("open", "openat") and not WRITE_FLAGS.search(args):
            continue
        if name not in ("open", "openat") + WRITE_CALLS:
            continue
        path = re.search(r'"([^"]*)"', args)
        if path:
            paths.append(path.group(1))
    return paths


def traced_replay(tmp_path, config, video) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Replay under strace: (the result, the paths it wrote)."""
    if shutil.which("strace") is None:
        absent("strace is not installed (make test installs it)")
    trace = tmp_path / "trace.txt"
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=" + ",".join(("open", "openat") + WRITE_CALLS),
         sys.executable, "-m", "edge", "replay", str(video), "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    # Python's own bytecode cache of installed modules is not our data
    return result, {p for p in written_paths(trace.read_text())
                    if not p.endswith(".pyc") and "__pycache__" not in p and p not in ("/dev/null", "/dev/tty")}


def test_replay_writes_no_file(tmp_path, broker, age_models, carphone_clip):
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "x", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, logging={"level": "warning"})
    result, writes = traced_replay(tmp_path, config, carphone_clip)
    assert '"frames": 120' in result.stdout
    assert writes == set()


def test_the_trace_parser_sees_writes():
    trace = ('123 openat(AT_FDCWD, "/tmp/x.jpg", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3\n'
             '123 openat(AT_FDCWD, "/etc/hosts", O_RDONLY|O_CLOEXEC) = 4\n'
             '123 mkdir("/tmp/d", 0777) = 0\n'
             '123 openat(AT_FDCWD, "/nope", O_WRONLY) = -1 ENOENT (No such file or directory)\n')
    assert written_paths(trace) == ["/tmp/x.jpg", "/tmp/d"]


def test_with_an_outbox_configured_it_is_the_only_file_written(tmp_path, broker, age_models, carphone_clip):
    outbox = tmp_path / "state" / "outbox.sqlite3"
    outbox.parent.mkdir()
    config = write_config(tmp_path / "c.toml", store_id="s", cameras=[{"id": "x", "source": 0}],
                          mqtt={"host": "127.0.0.1", "port": broker.port}, outbox={"path": str(outbox)},
                          models={"age_model": str(age_models[16])}, logging={"level": "warning"})
    result, writes = traced_replay(tmp_path, config, carphone_clip)
    assert writes and writes <= {str(outbox), f"{outbox}-wal", f"{outbox}-shm", f"{outbox}-journal", f"{outbox}.lock"}, writes
    assert '"alerts": 1' in result.stdout  # the alert went through the outbox (and left it: the file is empty)
    import sqlite3
    assert sqlite3.connect(outbox).execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def test_a_running_daemon_dumps_no_core_and_writes_its_files_for_itself_alone(tmp_path, broker, age_models,
                                                                               carphone_clip):
    """A core dump holds every camera frame in memory: the watchdog's SIGABRT wrote 510 MB of them where a core
    handler listens (2026-11-27 privacy review). The daemon sets RLIMIT_CORE 0 and is not dumpable (no ptrace or
    /proc/PID/mem by another process of its user), and what it writes is its user's alone when run by hand too."""
    import os
    import stat
    import time
    from pathlib import Path

    from tskit import start_daemon, stop_daemon
    config = write_config(tmp_path / "c.toml", store_id="s", daemon_id="till-pc", status_interval_s=1,
                          cameras=[{"id": "till-1", "source": str(carphone_clip)}],
                          mqtt={"host": "127.0.0.1", "port": broker.port}, models={"age_model": str(age_models[40])},
                          outbox={"path": str(tmp_path / "state" / "outbox.sqlite3")})
    (tmp_path / "state").mkdir()
    previous = os.umask(0o022)  # a shell's usual: the daemon's files would be readable by every user
    try:
        daemon = start_daemon(config, tmp_path / "daemon.log")
    finally:
        os.umask(previous)
    try:
        deadline = time.monotonic() + 40
        while not (tmp_path / "state" / "outbox.sqlite3").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        [core] = [line for line in limits.splitlines() if line.startswith("Max core file size")]
        assert core.split()[4:6] == ["0", "0"], core
        probe = subprocess.run([sys.executable, "-c", "import ctypes, os; from edge.service import keep_frames_private; "
                                "keep_frames_private(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), oct(os.umask(0)))"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert probe.stdout.split() == ["0", "0o77"], probe  # PR_GET_DUMPABLE: 0
    finally:
        stop_daemon(daemon)
    written = [path for path in (tmp_path / "state").iterdir()]
    assert written and all(stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 for path in written), \
        [(path.name, oct(path.stat().st_mode)) for path in written]
