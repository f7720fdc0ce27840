"""Prometheus metrics, with prometheus-client, on a loopback port (`[metrics]`, off by default).

Most figures already exist as the service's own counters (the status topic shows them), so they are
read when Prometheus scrapes, by a custom collector (prometheus-client's documented way to export
existing stats), rather than counted a second time on the hot path. Only what needs a distribution
is observed as it happens: the age network's call latency and batch sizes, the time a frame spends in
each stage of its camera's pipeline and in all of it, and the broker's time to acknowledge a message
(histograms).

The service passes itself (anything with `metrics_snapshot()`) in; this module never imports the
service, so the stages keep pointing one way. deploy/grafana-dashboard.json shows these series.
"""

from __future__ import annotations

import errno
import gc
import logging
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# per camera: (metric suffix, help, counter?) read from the snapshot's "cameras" entries
CAMERA_SERIES = (
    ("frames", "Frames analysed", True),
    ("faces", "Faces detected", True),
    ("dropped_frames", "Frames dropped because the pipeline was behind", True),
    ("tracks", "Customers (finished tracks with an age)", True),
    ("alerts", "Age-check alerts raised", True),
    ("estimates", "Estimate messages published", True),
    ("lag_seconds", "Wall clock minus the capture time of the last frame analysed", False),
    ("online", "1 while the camera delivers frames", False),
    ("picture_ok", "1 while the camera's picture is live: 0 when frozen or blank (edge/capture.py)", False),
    ("picture_faces", "Faces in view taken for pictures (posters) and left out (edge/track.py)", False),
)
# whole daemon: (name, help, counter?) read from the snapshot's top level
DAEMON_SERIES = (
    ("mqtt_connected", "1 while connected to the MQTT broker", False),
    ("mqtt_delivered", "Messages acknowledged by the broker", True),
    ("mqtt_denied", "Messages the broker refused (ACL), never delivered", True),
    ("mqtt_dropped", "Messages paho's full queue refused that nothing keeps (answers to the POS)", True),
    ("mqtt_unacknowledged", "Messages sent or held back, not yet acknowledged by the broker", False),
    ("outbox_depth", "Messages waiting in the outbox for the broker's acknowledgement", False),
    ("outbox_dropped", "Messages dropped from the outbox unsent (over its bounds)", True),
    ("outbox_on_disk", "1 while the outbox is written to disk, 0 when it fell back to memory", False),
    ("age_errors", "Failed age-network calls", True),
    ("degraded", "1 while the daemon reports problems in its status", False),
    ("store_open", "1 while the store is open by its opening_hours (always without them)", False),
    ("watchdog_ok", "1 while every pipeline and the age batcher make progress", False),
)


# The stages of a frame in its camera's pipeline (edge/service.py, CameraPipeline._process): queued, from its
# capture to its pick-up by the pipeline (a pipeline behind, or waiting for the GIL); detect, from the pick-up
# through the face detector; track, the looks, the picture check, the tracker and the inference budget; age, the
# crops, the wait for a batch and the network (frames that asked for ages only); judge, the policy and publishing.
FRAME_STAGES = ("queued", "detect", "track", "age", "judge")
# and "total", from its capture to the end of judge (live cameras only, like queued): the p99 of the whole is not
# the sum of the stages' p99s, and frame->alert minus it is the MQTT leg (issue 10)
FRAME_TOTAL = "total"
# fine enough between 10 and 200 ms to tell a 30 ms p99 from a 60 ms one (issue 10's target is frame->alert p99 30 ms)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                   0.5, 1, 2)


class ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        snapshot = self.service.metrics_snapshot()
        for name, text, counter in CAMERA_SERIES:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                f"tillsight_camera_{name}", text, labels=["camera"])
            for camera, values in snapshot["cameras"].items():
                if values.get(name) is not None:
                    family.add_metric([camera], values[name])
            yield family
        for name, text, counter in DAEMON_SERIES:
            if snapshot.get(name) is None:
                continue
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(f"tillsight_{name}", text)
            family.add_metric([], snapshot[name])
            yield family


class Metrics:
    """The registry, the live histograms, and the HTTP endpoint."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        self.age_latency = Histogram("tillsight_age_network_seconds", "Duration of one age-network call",
                                     registry=self.registry,
                                     buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.batch_size = Histogram("tillsight_age_batch_faces", "Faces per age-network call",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.frame_stage = Histogram("tillsight_frame_stage_seconds", "Time a frame spends in each stage of its "
                                     "camera pipeline: queued, detect, track, age, judge, and total, from its "
                                     "capture to the end of judge (edge/metrics.py)",
                                     ["stage"], registry=self.registry, buckets=LATENCY_BUCKETS)
        # bound once: every frame
        self._stages = [self.frame_stage.labels(stage) for stage in FRAME_STAGES + (FRAME_TOTAL,)]
        self.mqtt_ack = Histogram("tillsight_mqtt_ack_seconds", "Time from handing a QoS 1 message to the MQTT "
                                  "client to the broker's acknowledgement, on one connection (outages left out)", registry=self.registry,
                                  buckets=LATENCY_BUCKETS + (5, 10, 30, 60))
        # What stops every camera at once (issue 10: a p99 from a stall of the whole daemon, in all stages alike):
        # a collection holds the interpreter. Timed by gc's own callbacks, no cost between collections. (A thread
        # waking 50 times a second to time the interpreter's delays was tried and left out: its own GIL hand-overs
        # put 6 cameras' frame->alert p99 from 26 to 30 ms, 2 cores, four alternating rounds.)
        self.gc_pause = Histogram("tillsight_gc_pause_seconds", "Python garbage collections: each one stops every "
                                  "thread of the daemon", ["generation"], registry=self.registry,
                                  buckets=LATENCY_BUCKETS)
        # one child a generation, made here: the callback (inside a collection, on any thread) never takes the
        # parent's lock, which a scrape may hold when an allocation of its own sets a collection off
        self._gc_generations = [self.gc_pause.labels(str(generation)) for generation in range(3)]
        self._gc_started: float | None = None
        # the outbox's commits: one that writes messages ends in an fsync, and every alert waits for one before
        # it is published (a till PC's SD card or a busy server's disk: 20 ms fsyncs put 6 cameras' frame->alert
        # p99 at 272 ms before the group commit, 149 after, issue 10); deletes go without one, yet hold the disk
        # meanwhile
        self.outbox_commit = Histogram("tillsight_outbox_commit_seconds", "Duration of one commit to the outbox "
                                       "file: kind=messages (rows added, ends in an fsync; alerts wait for it) or "
                                       "deletes (acknowledged rows removed)", ["kind"], registry=self.registry,
                                       buckets=LATENCY_BUCKETS)
        self._commit_kinds = {kind: self.outbox_commit.labels(kind) for kind in ("messages", "deletes")}
        self.server = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            generation = info.get("generation")
            if generation in (0, 1, 2):
                self._gc_generations[generation].observe(time.perf_counter() - self._gc_started)
            self._gc_started = None

    def time_collections(self) -> None:
        gc.callbacks.append(self._on_gc)

    def observe_age_call(self, faces: int, seconds: float) -> None:
        self.age_latency.observe(seconds)
        self.batch_size.observe(faces)

    def observe_frame(self, seconds: tuple[float | None, ...]) -> None:
        """One frame's seconds in each of FRAME_STAGES, then its total, in order (None: the frame did not pass
        that stage)."""
        for stage, value in zip(self._stages, seconds):
            if value is not None:
                stage.observe(value)

    def observe_ack(self, seconds: float) -> None:
        self.mqtt_ack.observe(seconds)

    def observe_commit(self, kind: str, seconds: float) -> None:
        self._commit_kinds[kind].observe(seconds)

    def serve(self, host: str, port: int) -> str | None:
        """Start the endpoint; the reason it could not, else None (the daemon runs on without it)."""
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = unservable(host, port, exc)
            log.error(reason)
            return reason
        log.info("metrics endpoint", extra={"url": f"http://{host}:{port}/metrics"})
        return None

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def unservable(host: str, port: int, exc: OSError) -> str:
    """Why the endpoint cannot be served, naming the setting to change: the daemon's error line and its
    status, and `config check --live`'s, alike."""
    setting = "metrics.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "metrics.host"
    return f"metrics endpoint {host}:{port} cannot be served: {exc.strerror or exc} (check {setting})"
