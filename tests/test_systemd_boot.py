"""The shipped unit under a real systemd: started, reloaded, killed and stopped as a till PC's systemd would.

This machine's PID 1 is not systemd, so the tests boot one in a container (`systemd-nspawn`, Debian package
systemd-container, which `make mosquitto` installs) over a throw-away overlay of this machine's own file system:
whatever the boot and the install write (the user, /etc/systemd/system, /var/lib/tillsight, the journal) lands in a
tmpfs and is gone after the tests. The container shares the host's network, so the daemon publishes to the test's
own mosquitto. Installed as deploy/README.md says, with one difference: /opt/tillsight/.venv is Debian's python3
with this checkout's environment on its path (a `.pth` file), where a till PC would have the wheel pip-installed.

Skipped, with the reason, where a container cannot be booted: not root, no systemd-nspawn, no overlayfs, or a
Debian python3 of another minor version than the test's (the environment's compiled modules must fit it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tskit import REPO, write_config

UNIT = REPO / "deploy" / "tillsight.service"
INSTANCE_DROP_IN = REPO / "deploy" / "tillsight-instance.conf"
GPU_DROP_IN = REPO / "deploy" / "tillsight-gpu.conf"
NSPAWN = shutil.which("systemd-nspawn")
DEBIAN_PYTHON = Path("/usr/bin/python3")
# The container's default target: the base system (journald, the users, tmpfiles) and nothing the host may have
# enabled besides (its own mosquitto would take the port of ours).
CHECK_TARGET = """[Unit]
Description=tillsight boot check: the base system, nothing else
Requires=basic.target
After=basic.target
"""
ENTRY_POINT = """#!/opt/tillsight/.venv/bin/python
import sys
from edge.cli import main
sys.exit(main())
"""

pytestmark = pytest.mark.broker


def boot_problem() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    if NSPAWN is None:
        return "systemd-nspawn is absent (Debian package systemd-container; make mosquitto installs it)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "this kernel has no overlayfs"
    if not DEBIAN_PYTHON.exists():
        return "no /usr/bin/python3 to make /opt/tillsight/.venv with"
    found = subprocess.run([DEBIAN_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True).stdout.split()
    if found != [str(v) for v in sys.version_info[:2]]:
        return f"/usr/bin/python3 is {'.'.join(found)}, the test environment's Python {sys.version_info[0]}.{sys.version_info[1]}"
    return None


class Machine:
    """A booted container: `root` is its file system as seen from here, `run` a command inside it."""

    def __init__(self, root: Path, nspawn: subprocess.Popen, leader: int):
        self.root, self.nspawn, self.leader = root, nspawn, leader

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *command], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def show(self, unit: str) -> dict[str, str]:
        props = "MainPID,ActiveState,SubState,Result,ReloadResult,NRestarts,StatusText"
        out = self.run("systemctl", "show", unit, "-p", props).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_until(self, unit: str, predicate, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(unit)
            if predicate(state) or time.monotonic() > deadline:
                return state
            time.sleep(0.25)

    def journal(self, unit: str, pid: str | None = None) -> list[str]:
        """The unit's journal lines (the messages only); `pid`: only that process's."""
        match = [f"_PID={pid}"] if pid else []
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *match).stdout.splitlines()

    def uid_gid(self, user: str, group: str) -> tuple[int, int]:
        uid = next(int(line.split(":")[2]) for line in (self.root / "etc/passwd").read_text().splitlines()
                   if line.startswith(f"{user}:"))
        gid = next(int(line.split(":")[2]) for line in (self.root / "etc/group").read_text().splitlines()
                   if line.startswith(f"{group}:"))
        return uid, gid


def install(root: Path) -> None:
    """deploy/README.md's till PC install, into the overlay: the user, the venv, the unit (the target to boot)."""
    subprocess.run(["chroot", str(root), "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "tillsight"], check=True, capture_output=True)
    venv = root / "opt/tillsight/.venv"
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    # addsitedir, not a bare path: the checkout is installed editable, through a .pth file of its own
    (venv / "lib" / minor / "site-packages" / "tillsight-checkout.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    entry = venv / "bin/tillsight"
    entry.write_text(ENTRY_POINT)
    entry.chmod(0o755)
    units = root / "etc/systemd/system"
    shutil.copy(UNIT, units / "tillsight.service")
    (units / "tillsight-check.target").write_text(CHECK_TARGET)
    (root / "etc/tillsight").mkdir(exist_ok=True)


def install_config(machine: Machine, name: str, **sections) -> Path:
    """/etc/tillsight/NAME.toml, owned by tillsight with mode 600, as deploy/README.md installs it."""
    path = write_config(machine.root / "etc/tillsight" / f"{name}.toml", **sections)
    uid, _ = machine.uid_gid("tillsight", "video")
    os.chown(path, uid, 0)
    path.chmod(0o600)
    return path


def _container_init(nspawn: subprocess.Popen, log: Path, timeout: float = 30) -> int:
    """The PID, here, of the container's systemd: nspawn's child once it runs systemd (before, a child that
    prepares the container)."""
    deadline = time.monotonic() + timeout
    while nspawn.poll() is None and time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
            except OSError:
                continue
            if stat and int(stat.rsplit(")", 1)[1].split()[1]) == nspawn.pid and "(systemd)" in stat:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"the container did not start: {log.read_text()[-2000:]}")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    problem = boot_problem()
    if problem:
        pytest.skip(problem)
    base = tmp_path_factory.mktemp("container")
    _mount("-t", "tmpfs", "-o", "size=1g", "tmpfs", str(base))
    mounted = [base]
    nspawn = None
    try:
        for name in ("upper", "work", "root"):
            (base / name).mkdir()
        root = base / "root"
        _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={base / 'upper'},workdir={base / 'work'}",
               str(root))
        mounted.insert(0, root)
        install(root)
        with (base / "nspawn.log").open("w") as log:
            nspawn = subprocess.Popen([NSPAWN, "--quiet", "--directory", str(root), "--boot", "--register=no",
                                       "--keep-unit", "--link-journal=no", "--console=passive",
                                       f"--machine=till-pc-{os.getpid()}", "--", "systemd.unit=tillsight-check.target"],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        booted = Machine(root, nspawn, _container_init(nspawn, base / "nspawn.log"))
        deadline = time.monotonic() + 90
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:  # until its bus answers
            state = booted.run("systemctl", "is-system-running", "--wait", timeout=90, check=False).stdout.strip()
            time.sleep(0.1)
        assert state in ("running", "degraded"), f"the container's systemd: {state!r}"
        yield booted
    finally:
        if nspawn is not None and nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                nspawn.wait(30)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(10)
        for path in mounted:
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def retained_status(subscriber, daemon_id: str) -> list[dict]:
    return [body for body in subscriber.json("/status") if body.get("daemon") == daemon_id]


def test_the_unit_starts_reloads_restarts_after_a_kill_and_stops_under_systemd(machine, broker, subscriber,
                                                                              hamilton_clip):
    install_config(machine, "tillsight", store_id="s1", mqtt={"host": "127.0.0.1", "port": broker.port},
                   cameras=[{"id": "till-1", "source": str(hamilton_clip), "fps_limit": 5}])
    host = machine.run("hostname").stdout.strip()
    machine.run("systemctl", "enable", "--now", "tillsight", timeout=150)  # Type=notify: back at READY=1
    state = machine.wait_until("tillsight", lambda st: "1/1 cameras online" in st["StatusText"], 30)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert "1/1 cameras online" in state["StatusText"], state  # the daemon's STATUS= line
    pid = state["MainPID"]

    # the daemon's own view, over MQTT: online under the host's name, and a customer's age on its way
    assert subscriber.wait_for(lambda s: any(b["state"] == "online" for b in retained_status(s, host)), 30)
    assert subscriber.wait_for(lambda s: s.json("s1/till-1/estimate"), 60), "no estimate from the service"

    # the sandbox, as the kernel sees the process
    status = dict(line.split(":\t", 1) for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    uid, gid = machine.uid_gid("tillsight", "video")
    assert status["Uid"].split()[0] == str(uid) and status["Gid"].split()[0] == str(gid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2" and int(status["CapEff"], 16) == 0
    assert machine.run("cat", f"/proc/{pid}/oom_score_adj").stdout.strip() == "500"  # the POS outlives it
    state_dir = machine.root / "var/lib/tillsight"
    assert (state_dir.stat().st_mode & 0o777, state_dir.stat().st_uid) == (0o700, uid)
    assert (state_dir / "outbox.sqlite3").stat().st_uid == uid  # the outbox, in $STATE_DIRECTORY

    # quiet and structured: every line the daemon wrote is JSON (ProcSubset=pid once added two lines of ONNX
    # Runtime's cpuinfo errors, and a slower age model, to every start)
    lines = machine.journal("tillsight", pid)
    assert lines and all(line.startswith("{") and json.loads(line) for line in lines), lines[:5]

    # a bad config: the reload fails and says why; the daemon runs on, as it was
    config = machine.root / "etc/tillsight/tillsight.toml"
    good = config.read_text()
    config.write_text(good.replace("fps_limit = 5", 'fps_limit = "fast"'))
    refused = machine.run("systemctl", "reload", "tillsight", check=False)
    assert refused.returncode != 0
    state = machine.show("tillsight")
    assert (state["ActiveState"], state["MainPID"], state["ReloadResult"]) == ("active", pid, "exit-code"), state
    assert any("fps_limit" in line for line in machine.journal("tillsight")), "the reason is not in the journal"

    # a good one: the same process, a new daemon instance in the status
    config.write_text(good)
    before = {b["instance"] for b in retained_status(subscriber, host)}
    machine.run("systemctl", "reload", "tillsight")
    assert subscriber.wait_for(lambda s: any(b["state"] == "online" and b["instance"] not in before
                                             for b in retained_status(s, host)), 60), "not back after the reload"
    state = machine.wait_until("tillsight", lambda st: st["ActiveState"] == "active", 30)
    assert (state["ActiveState"], state["MainPID"]) == ("active", pid), state

    # killed outright: systemd restarts it (Restart=on-failure, RestartSec=5)
    machine.run("systemctl", "kill", "--signal=SIGKILL", "tillsight")
    state = machine.wait_until("tillsight", lambda st: st["NRestarts"] == "1" and st["SubState"] == "running", 60)
    assert state["NRestarts"] == "1" and state["SubState"] == "running" and state["MainPID"] != pid, state

    # a clean stop: the retained status says offline
    machine.run("systemctl", "stop", "tillsight", timeout=60)
    state = machine.show("tillsight")
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
    assert subscriber.wait_for(lambda s: retained_status(s, host)[-1]["state"] == "offline", 10)


def test_a_store_servers_instance_runs_on_its_own_config_and_state_and_feeds_the_watchdog(
        machine, broker, subscriber, hamilton_clip):
    """tillsight@NAME with the instance and GPU drop-ins (deploy/README.md, "Installing on a store server"); on
    this machine the GPU drop-in's daemon runs on the CPU. The watchdog is shortened to 3 s by a drop-in of the
    test's own: the daemon must feed it to live, and is restarted when it stops (a frozen process here)."""
    units = machine.root / "etc/systemd/system"
    (units / "tillsight@.service").write_text(UNIT.read_text())
    drop_ins = units / "tillsight@.service.d"
    drop_ins.mkdir(exist_ok=True)
    shutil.copy(INSTANCE_DROP_IN, drop_ins / "instance.conf")
    shutil.copy(GPU_DROP_IN, drop_ins / "gpu.conf")
    (drop_ins / "zz-test-watchdog.conf").write_text("[Service]\nWatchdogSec=3\nTimeoutAbortSec=1\n")
    install_config(machine, "tills-a", store_id="s1", mqtt={"host": "127.0.0.1", "port": broker.port},
                   cameras=[{"id": "till-9", "source": str(hamilton_clip), "fps_limit": 5}])
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "start", "tillsight@tills-a", timeout=150)
    try:
        host = machine.run("hostname").stdout.strip()
        assert subscriber.wait_for(lambda s: any(b["state"] == "online"
                                                 for b in retained_status(s, f"{host}-tills-a")), 30)
        uid, _ = machine.uid_gid("tillsight", "video")
        own = machine.root / "var/lib/tillsight/tills-a"
        assert (own / "outbox.sqlite3").stat().st_uid == uid
        state = machine.wait_until("tillsight@tills-a", lambda st: "1/1 cameras online" in st["StatusText"], 30)
        assert "1/1 cameras online" in state["StatusText"], state
        time.sleep(8)  # well past WatchdogSec=3: the daemon fed it every 1.5 s
        fed = machine.show("tillsight@tills-a")
        assert (fed["NRestarts"], fed["MainPID"], fed["SubState"]) == ("0", state["MainPID"], "running"), fed

        machine.run("systemctl", "kill", "--signal=SIGSTOP", "tillsight@tills-a")  # hung: no more WATCHDOG=1
        restarted = machine.wait_until("tillsight@tills-a",
                                       lambda st: st["NRestarts"] == "1" and st["SubState"] == "running", 40)
        assert restarted["NRestarts"] == "1" and restarted["MainPID"] != state["MainPID"], restarted
        assert any("Watchdog timeout" in line for line in machine.journal("tillsight@tills-a"))
    finally:
        machine.run("systemctl", "stop", "tillsight@tills-a", timeout=60)
