"""A local Mosquitto broker for the demo and the tests: a real `mosquitto`
process on a free loopback port, with its own config file, no persistence
(unless asked: the bridge test's store broker)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(Exception):
    pass


def find_mosquitto() -> str | None:
    for candidate in MOSQUITTO_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalBroker:
    """`with LocalBroker() as broker:` ... `broker.port`; `stop()`/`start()` to simulate an outage."""

    def __init__(self, port: int | None = None, extra_config: str = "", persistence: bool = False):
        """`extra_config`: more mosquitto.conf lines (e.g. a bridge); `persistence`: keep the
        in-flight and queued messages in `self.dir` across a `stop()`/`start()`."""
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto not found: install the Debian package 'mosquitto' (make demo and make test do)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tillsight-mosquitto-"))
        self.config = self.dir / "mosquitto.conf"
        stored = f"persistence true\npersistence_location {self.dir}/\n" if persistence else "persistence false\n"
        self.config.write_text(
            # as root, mosquitto switches to its own user, which cannot write the 0700 folder above: its
            # persistence then failed at every save ("Permission denied" in its log), and a test's restarted
            # broker had no session; as any other user, `user` is ignored
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{stored}"
            # small messages out at once: without it, Nagle and delayed ACKs add ~40 ms to an answer
            "set_tcp_nodelay true\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
            + (f"\n{extra_config}\n" if extra_config else "")
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> "LocalBroker":
        # not our systemd's to hear from: mosquitto says READY=1 to a NOTIFY_SOCKET it inherits (a test's stand-in
        # for systemd, or the demo run under a unit), as if it were the daemon
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=environment)
        # every listener of the config, not only the first: mosquitto opens them one after the other, and a client
        # of the second one could otherwise be refused (a test's plain POS beside the daemon's TLS listener)
        waiting = [int(line.split()[1]) for line in self.config.read_text().splitlines()
                   if line.startswith("listener ")] or [self.port]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace").strip().splitlines()
                raise BrokerError(f"mosquitto exited at start: {error[-1] if error else 'no message'}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.2).close()
                waiting.pop(0)
                if not waiting:
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {waiting[0]} within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
