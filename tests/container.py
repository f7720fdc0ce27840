"""A systemd booted in a container over a throw-away overlay of this machine's own file system, with tillsight
installed as deploy/README.md says: for tests/test_systemd_boot.py and benchmarks/sandbox.py.

`systemd-nspawn` (Debian package systemd-container, which `make test` installs) boots it; whatever the boot
and the install write (the user, /etc/systemd/system, /var/lib/tillsight, the journal) lands in a tmpfs and is gone
afterwards. The container shares the host's network, so a daemon in it reaches a broker started here. One
difference from a till PC: /opt/tillsight/.venv is Debian's python3 with this checkout's environment on its path
(a `.pth` file), where a till would have the wheel pip-installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tskit import REPO, write_config

UNIT = REPO / "deploy" / "tillsight.service"
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


def boot_problem() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    if NSPAWN is None:
        return "systemd-nspawn is absent (Debian package systemd-container; make test installs it)"
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


@contextmanager
def booted(base: Path) -> Iterator[Machine]:
    """A container booted over an overlay of this machine's file system, the upper layer a tmpfs mounted on `base`
    (an empty folder); powered off and unmounted on leaving, whatever happened."""
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
        machine = Machine(root, nspawn, _container_init(nspawn, base / "nspawn.log"))
        deadline = time.monotonic() + 90
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:  # until its bus answers
            state = machine.run("systemctl", "is-system-running", "--wait", timeout=90, check=False).stdout.strip()
            time.sleep(0.1)
        assert state in ("running", "degraded"), f"the container's systemd: {state!r}"
        yield machine
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
