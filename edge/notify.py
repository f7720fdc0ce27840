"""systemd integration: readiness, status and the watchdog (sd_notify(3), sd_watchdog_enabled(3)).

deploy/tillsight.service is `Type=notify` with `WatchdogSec=`: the service calls
`SystemdNotifier.ready()` once it can do its job, and a `WatchdogFeeder` thread sends WATCHDOG=1
every half WatchdogSec while no part of the daemon is stalled (`stalled_parts`). When a part
stalls the feeder says which in the unit's status line and stops feeding, and systemd kills and
restarts the daemon (Restart=on-failure). Outside systemd (NOTIFY_SOCKET unset) every call is a
no-op. A failed send never raises: it is logged once, as a warning.

The library: cysystemd. Its `cysystemd.daemon.notify` calls the real `sd_notify()` of
libsystemd, so the protocol details (abstract "@" socket names, message size, the socket
address rules) are systemd's own code, not ours. Its manylinux_2_34 wheels (x86_64, aarch64)
bundle libsystemd: nothing to compile on a till (Debian 12, Ubuntu 22.04+, RHEL 9), it is
maintained, and it is typed. The others on the index: `systemd-python` is the official binding
but ships only an sdist that needs the libsystemd-dev headers and a compiler at install time;
`sdnotify` (0.3.2, 2017) is forty lines of socket code that swallow every error, including a
missing socket, silently. cysystemd has no `sd_watchdog_enabled()`, so the few lines that read
WATCHDOG_USEC and WATCHDOG_PID are here, with that function's rules.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

from cysystemd.daemon import Notification, notify

log = logging.getLogger(__name__)


def watchdog_timeout_s(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd expects of this process, in seconds; None when there is none.

    sd_watchdog_enabled(3): WATCHDOG_USEC is the timeout in microseconds (a positive integer);
    WATCHDOG_PID, when set, is the process that must feed it: another PID means not us (the
    variables were inherited from a parent). A malformed value disables the watchdog, with a warning.
    """
    environ = os.environ if environ is None else environ
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    try:
        usec = int(usec_text)
        watched = int(pid_text) if pid_text else None
    except ValueError:
        log.warning("watchdog: ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec_text, pid_text)
        return None
    if usec <= 0:
        log.warning("watchdog: ignoring WATCHDOG_USEC=%r (not a positive number of microseconds)", usec_text)
        return None
    if watched is not None and watched != (os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000


class SystemdNotifier:
    """sd_notify for the service; every method is a no-op when `enabled` is false.

    Make it with `from_env()`. libsystemd reads NOTIFY_SOCKET from the environment at each
    send (the environment is not changed here: setenv is unsafe beside other threads), so
    `socket` must be the process's NOTIFY_SOCKET; it is kept for `enabled` and the log.
    """

    def __init__(self, socket: str | None = None, watchdog_timeout: float | None = None):
        self.socket = socket or None  # NOTIFY_SOCKET: a path, or "@name" for an abstract socket
        self.watchdog_timeout_s = watchdog_timeout if self.socket else None
        self._warned = False

    @classmethod
    def from_env(cls) -> "SystemdNotifier":
        """NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID of this process."""
        return cls(os.environ.get("NOTIFY_SOCKET"), watchdog_timeout_s())

    @property
    def enabled(self) -> bool:
        return self.socket is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_timeout_s is None else self.watchdog_timeout_s / 2

    def _send(self, notification: Notification, value: str | None = None) -> bool:
        if not self.enabled:
            return False
        try:
            notify(notification, value, return_exceptions=False)
            return True
        except Exception as error:  # noqa: BLE001 - a notification must never take the daemon down
            if not self._warned:
                self._warned = True
                log.warning("systemd notification to %s failed (%s: %s); further failures are not logged",
                            self.socket, type(error).__name__, error)
            return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (systemd starts the watchdog clock now); status first if given."""
        if status:
            self.status(status)
        return self._send(Notification.READY)

    def status(self, text: str) -> bool:
        """STATUS=...: the line `systemctl status` shows (one line; newlines become spaces)."""
        return self._send(Notification.STATUS, " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """WATCHDOG=1: alive and well."""
        return self._send(Notification.WATCHDOG)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1: a reload has begun; the process that follows (exec'd in place) says READY=1 when done."""
        if status:
            self.status(status)
        return self._send(Notification.RELOADING)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutting down (no watchdog restart from here on)."""
        if status:
            self.status(status)
        return self._send(Notification.STOPPING)


def stalled_parts(beats: Mapping[str, float | None], now: float, limit_s: float) -> list[str]:
    """The parts whose last progress is more than `limit_s` before `now`, sorted by name.

    `beats` maps a part's name (e.g. "pipeline-till-1") to the time.monotonic() of its last
    progress. None means the part is not watched at the moment (not started yet, or idle by
    design) and is never stalled. To watch a part from the start, give it its start time as its
    first beat: it then has `limit_s` to make its first progress. A part that waits for work
    (an empty frame queue) should beat while it waits, or it reads as stalled.
    """
    return sorted(name for name, beat in beats.items() if beat is not None and now - beat > limit_s)


class WatchdogFeeder(threading.Thread):
    """Feeds the systemd watchdog every `interval_s` while `check()` names no stalled part.

    `check()` returns the names of the stalled parts (e.g. a `stalled_parts(...)` call). When
    it names some, or raises, the feeder logs one warning, puts them in the unit's status line,
    and stops feeding: systemd then kills and restarts the daemon when WatchdogSec runs out.
    `interval_s` defaults to the notifier's (half WatchdogSec); with no watchdog the thread
    ends at once. `stalled` holds the names once it stopped for a stall.
    """

    def __init__(self, notifier: SystemdNotifier, check: Callable[[], list[str]],
                 interval_s: float | None = None, name: str = "systemd-watchdog"):
        super().__init__(name=name, daemon=True)
        self.notifier = notifier
        self.check = check
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s
        self.stalled: list[str] | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        if self.interval_s is None or not self.notifier.enabled:
            return
        while not self._stop_event.is_set():
            try:
                stalled = list(self.check())
            except Exception as error:  # noqa: BLE001 - a broken check is not a healthy daemon
                stalled = [f"watchdog check ({type(error).__name__}: {error})"]
            if stalled:
                self.stalled = stalled
                log.warning("watchdog: stalled: %s; no longer feeding the systemd watchdog, "
                            "systemd restarts the daemon", ", ".join(stalled))
                self.notifier.status(f"stalled: {', '.join(stalled)}")
                return
            self.notifier.watchdog()
            self._stop_event.wait(self.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
