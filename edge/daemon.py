"""The daemon's life as a process (`tillsight run`): start, the signals systemd sends (SIGTERM, SIGINT, SIGHUP's
reload), a start refused said on the status topic, and the exit. The pipeline itself is edge/service.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from edge.checkup import check_models
from edge.config import ConfigError, load_config, refused_config
from edge.errors import ModelError, UserError
from edge.logs import setup_logging
from edge.outbox import OutboxInUse
from edge.publish import publish_start_failure
from edge.service import Service, daemon_id, daemon_id_of, keep_frames_private

log = logging.getLogger(__name__)

DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # stop, stop, reload


def run_daemon(config_path: Path) -> int:
    """`tillsight run`: the service until SIGTERM or SIGINT; at SIGHUP, a restart in place on the changed config if
    it and its models would load (else it runs on as it is). Exit 0 when everything was delivered or is on disk."""
    try:
        config = load_config(config_path, models_at_load=True)  # a missing model: "model not found", exit 1
    except ConfigError as exc:
        say_config_refused(config_path, exc)
        raise
    setup_logging(config.logging.level, config.logging.format)
    keep_frames_private()  # before a frame is read, or a file written (after the logging: its warning is one)
    reload_asked = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_asked.set())  # systemctl reload; before the models load
    try:
        service = Service(config)
    except ModelError as exc:  # said on the status topic too, for the store's monitoring; then the one line
        publish_start_failure(config.mqtt, config.store_id, daemon_id(config), str(exc),
                              [camera.id for camera in config.cameras])
        raise
    except OutboxInUse as exc:
        # two instances given one outbox path: this one watches none of its tills, which the store's monitoring
        # must see; but a second start of the running daemon (its id, or its cameras: run by hand beside its
        # systemd instance, without the instance's name), or a holder unknown, must not have a status say failed
        cameras = [camera.id for camera in config.cameras]
        if exc.holder is not None and exc.holder[0] != daemon_id(config) and not set(exc.holder[1:]) & set(cameras):
            publish_start_failure(config.mqtt, config.store_id, daemon_id(config), str(exc), cameras)
        raise
    stop_asked = threading.Event()  # apart from the service's stop_event, which its stop() sets for a reload too

    def stop(*_) -> None:
        stop_asked.set()
        service.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)  # blocked across a reload's exec: now handled
    service.start()
    while not stop_asked.is_set():
        service.run_until_stopped(until=reload_asked)
        if stop_asked.is_set() or not reload_asked.is_set():
            break
        reload_asked.clear()
        # the check loads and runs both models, seconds: a SIGTERM meanwhile is a stop, not a restart on the new
        # config (systemd waited TimeoutStopSec for the daemon it had restarted, then killed it)
        if config_reloadable(config_path, service) and not stop_asked.is_set():
            log.info("config reloaded: restarting in place")
            delivered = service.stop(reloading=True)  # a clean stop: what is not delivered waits in the outbox
            if stop_asked.is_set():  # asked during that stop: it was the last one
                return exit_status(service, delivered)
            # a stop asked from here until the new program's handlers are in place (its imports and models take
            # seconds) is kept pending, not the default SIGTERM's death without an offline status
            signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
            try:
                os.execv(sys.executable, [sys.executable, "-m", "edge", "run", "--config", str(config_path)])
            except OSError as exc:  # the interpreter gone (a venv replaced under it): stopped; systemd restarts it
                signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
                raise UserError(f"reload: cannot run {sys.executable} again ({exc.strerror or exc}); the daemon "
                                "stopped") from None
    return exit_status(service, service.stop())


def exit_status(service: Service, delivered: bool) -> int:
    """0, or what was lost said in one line: the messages not acknowledged and not on disk."""
    if not delivered:
        why = f" ({service.publisher.connection_error})" if service.publisher.connection_error else ""
        raise UserError(f"{service.publisher.unacknowledged()} messages were not acknowledged by the broker{why} "
                        f"before exit, and there is no outbox on disk to keep them (outbox.path)")
    return 0


def say_config_refused(path: Path, exc: ConfigError) -> None:
    """A daemon refused at start by its config says so on its status topic where the config's store, daemon id
    and [mqtt] are valid on their own: `failed`, with the keys at fault (not their values: a stream URL's
    password must not reach the broker), so the store's monitoring sees why the till is not watched (a systemd
    unit does not restart after exit 2), where it saw only the `offline` of the last stop."""
    refused = refused_config(path)
    if refused is None:
        return
    keys = list(dict.fromkeys(problem.split(": ", 1)[0] for problem in exc.problems))
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    publish_start_failure(refused.mqtt, refused.store_id, daemon_id_of(refused.daemon_id),
                          f"config refused ({len(exc.problems)} problem{'s' if len(exc.problems) > 1 else ''}: "
                          f"{shown}): `tillsight config check` on the till says what is wrong", refused.cameras)


def config_reloadable(path: Path, service: Service) -> bool:
    """SIGHUP: is the changed config good to restart on? If not, one error line, and the daemon runs on as it is
    (a `systemctl restart` with a bad config would leave the till without a daemon)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("config not reloaded: running on with the one loaded at start",
                  extra={"problems": exc.problems})
        service.notifier.status(f"config not reloaded: {exc.problems[0]}; {service.summary()}")
        return False
    # its models too, as the restart would load them (a model file replaced in place is the usual update):
    # one that would not load leaves the till without a daemon
    failed = [result.line() for result in check_models(config)[0] if not result.ok]
    if failed:
        log.error("config not reloaded: its models would not load; running on with the ones loaded at start",
                  extra={"problems": failed})
        service.notifier.status(f"config not reloaded: {failed[0]}; {service.summary()}")
        return False
    if service.outbox.path is None and not service.publisher.connected.is_set() and service.publisher.unacknowledged():
        log.error("config not reloaded: messages wait for the broker in memory only and a restart would lose them "
                  "(set [outbox] path, or reload once the broker is back)",
                  extra={"messages": service.publisher.unacknowledged()})
        return False
    return True
