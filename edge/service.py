"""The service: wires capture -> detect -> track (and the inference budget) -> crop -> batched age -> policy -> publish.

Per camera: a reader thread (edge.capture) and a pipeline thread (here).
All pipelines share one detector session and one `AgeBatcher`.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge.analytics import AgeBandCounter, OpenIntervals, band_of
from edge.budget import wants_age
from edge.capture import BLANK, END_OF_STREAM, FROZEN, LIVE, CameraReader
from edge.config import RESERVED_ID, CameraConfig, Config, ModelsConfig, config_warnings, stream_fingerprint
from edge.detect import FaceDetector
from edge.errors import EXIT_INTERRUPTED, UserError
from edge.infer import AgeBatcher, AgeModel
from edge.metrics import Metrics
from edge.notify import SystemdNotifier, WatchdogFeeder, stalled_parts
from edge.outbox import Outbox
from edge.peers import Peers
from edge.policy import Policy, build_policy, needs_id_check
from edge.publish import Publisher, utc_iso
from edge.runtime import CPU, cores_hidden
from edge.pos import PosDesk
from edge.track import FaceTracker, PictureFaces, Signature, Track, outside_regions
from edge.types import CameraStatus, CustomerView, TillView

log = logging.getLogger(__name__)
# The camera threads' time to finish at a stop, all of them together: then the broker's acks (up to 10 s), within
# the unit's TimeoutStopSec=20 (a hung camera read must not let systemd kill the daemon before its offline status).
THREADS_STOP_S = 5.0
STALL_AFTER_S = 15.0  # a pipeline or an age-network call without progress this long is stuck (WatchdogSec=30)
# A live camera's frame times going back more than this: the wall clock was stepped back (NTP correcting
# a till PC's clock after boot). Tracks, the inference budget and analytics intervals measure time
# between frames; across a step they would wait until the clock caught up.
CLOCK_STEP_S = 1.0
# No wall clock that was ever set reads earlier than this: it is before this version was written. A PC
# whose clock battery is dead boots into 2000 or 1970 until NTP sets it, or for good without NTP.
EARLIEST_PLAUSIBLE_TIME = 1767225600.0  # 2026-01-01T00:00:00Z


def clock_problem(now: float) -> str | None:
    """Why the wall clock cannot be right, or None: every message's time and every analytics interval depend on it."""
    if now >= EARLIEST_PLAUSIBLE_TIME:
        return None
    return (f"wall clock reads {utc_iso(now)}: never set (no NTP, or a dead clock battery); message times and "
            "analytics intervals are wrong until it is")


@dataclass
class PipelineStats:
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    tracks: int = 0
    estimates: int = 0
    alerts: int = 0
    faces_aged: int = 0  # crops sent to the age network (the inference budget's spend)
    pictures: int = 0  # faces taken for pictures (posters) and left out from then on
    inference_errors: int = 0
    errors: list[str] = field(default_factory=list)


class CameraPipeline(threading.Thread):
    """Frames of one camera through detection, age, tracking, policy and publishing."""

    def __init__(self, camera: CameraConfig, config: Config, frames: queue.Queue, detector: FaceDetector,
                 batcher: AgeBatcher, publisher: Publisher, stop: threading.Event,
                 policy: Policy, replay: bool = False):
        super().__init__(name=f"pipeline-{camera.id}", daemon=True)
        self.policy = policy
        self.replay = replay
        self.camera = camera
        self.config = config
        self.frames = frames
        # shared by every camera, called without a lock: ONNX Runtime runs concurrent calls of one session in
        # parallel, and with one intra-op thread (models.detector_threads) each on its caller's thread
        self.detector = detector
        self.batcher = batcher
        self.publisher = publisher
        self.stop_event = stop
        self.tracker = FaceTracker(camera.id, config.tracking.iou_threshold, config.tracking.lost_after_s,
                                   config.tracking.max_samples, config.tracking.min_similarity)
        self.pictures = PictureFaces(config.tracking.picture_face_s)
        self.stats = PipelineStats()
        self.lag_s: float | None = None  # wall clock minus the capture time of the last frame processed
        self.view: TillView | None = None  # who is at the till now, for the POS desk (replaced, never mutated)
        self.transaction: str | None = None  # the POS's open transaction at this till
        # Transactions in a row in which this camera saw no face: customers paid, the camera saw nobody.
        self.faceless_transactions = 0
        self._transaction_frames = self._transaction_faces = 0
        self._boundaries: queue.SimpleQueue = queue.SimpleQueue()  # transaction events from the POS desk
        analytics = config.analytics
        self.counter = AgeBandCounter(camera.id, analytics.bands, analytics.interval_s, analytics.k) \
            if analytics.enabled else None
        self.camera_fault = lambda: None  # why the camera cannot see now (set by the service), for analytics
        # by opening_hours, at a time (set by the service): only an open store's customers count
        self.store_open: Callable[[float], bool] = lambda at: True
        self.open_intervals: OpenIntervals | None = None  # the interval in progress kept on disk (set by the service)
        # told each frame's seconds in its stages (edge/metrics.py, FRAME_STAGES), where metrics are on
        self.on_frame: Callable[[tuple[float | None, ...]], None] | None = None
        self.camera_status: CameraStatus | None = None  # its reader's (set by the service): told of faces in view
        self._counted_at: float | None = None  # monotonic time of the last _count
        self.finished = threading.Event()
        self.beat = time.monotonic()  # last sign of life of this thread (the watchdog's progress check)
        self.last_frame_time: float | None = None
        # its reader's latest frame gaps (set by the service), for how old a live camera's latest frame may be
        # (edge/pos.py, fresh_s): a camera sending 1 frame/s by itself has no fps_limit to say so
        self.frame_gaps: Sequence[float] = ()
        self.clock_steps = 0
        self.clock = time.time  # the wall clock, as the camera reader's (tests step both)

    @property
    def frame_interval_s(self) -> float | None:
        """The median gap between the latest frames its reader passed on (None before the second): its frame
        interval as it really comes, whatever the camera or the fps_limit makes it. The median, so that one hang
        does not count."""
        gaps = list(self.frame_gaps)
        return statistics.median(gaps) if gaps else None

    def mark_transaction(self, event: str, transaction: str) -> None:
        """From the POS desk's thread: applied by this pipeline's thread before its next frame."""
        self._boundaries.put((event, transaction))

    def _apply_transactions(self, now: float) -> None:
        while True:
            try:
                event, transaction = self._boundaries.get_nowait()
            except queue.Empty:
                return
            # A customer never spans two transactions: whoever is at the till is a new track from here.
            ended = [t for t in self.tracker.end_all() if len(t.ages) >= self.config.policy.min_samples]
            self._finish_tracks(ended, now)
            customer = max(ended, key=lambda t: t.frames) if ended else None  # who stood at the till longest
            if self.transaction is not None and customer is not None and self.config.analytics.per_transaction \
                    and self.store_open(customer.last_seen):  # a sale after hours is staff's, as in the counts
                self.publisher.publish_transaction_band(self.camera.id, self.transaction,
                                                        band_of(customer.estimate().age, self.config.analytics.bands))
            if self.transaction is not None and self._transaction_frames:  # one that ran over frames ends here
                self.faceless_transactions = 0 if self._transaction_faces else self.faceless_transactions + 1
            self._transaction_frames = self._transaction_faces = 0
            self.transaction = transaction if event == "start" else None

    def _count(self, now: float, final: bool = False) -> None:
        """Publish the age-band counts of an interval that has ended (and at the end, the partial one); called
        at every frame and every 0.2 s of a quiet camera, so it also adds up the time the camera could not see."""
        if self.counter is None:
            return
        tick = time.monotonic()
        if self._counted_at is not None and not self.store_open(now):
            self.counter.closed_s += tick - self._counted_at
        elif self._counted_at is not None and self.camera_fault() is not None:
            self.counter.fault_s += tick - self._counted_at
        self._counted_at = tick
        self.counter.open(now)
        if final or self.counter.due(now):
            counts = self.counter.flush(now, partial=final)
            if counts is not None:
                self.publisher.publish_analytics(counts)  # into the outbox before the saved interval goes
        self._save_interval(now)

    def _save_interval(self, now: float) -> None:
        if self.open_intervals is not None and self.counter is not None:
            self.open_intervals.save(self.camera.id, self.counter.state(now))

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.beat = time.monotonic()
                try:
                    frame = self.frames.get(timeout=0.2)
                except queue.Empty:
                    if not self.replay:  # a live camera gone quiet: customers still leave, on the wall clock
                        now = self.clock()
                        self._apply_transactions(now)
                        self._finish_tracks(self.tracker.update(now, [])[1], now)
                        self._count(now)
                    continue
                if frame is END_OF_STREAM:
                    break
                self._process(frame)
            now = None if self.replay else self.clock()  # a replay ends at its last frame's time
            self._finish_tracks(self.tracker.end_all(), now)
            self._count(now or (self.view.frame_time if self.view else self.clock()), final=True)
        except Exception as exc:  # keep the daemon's other cameras alive, and say why this one stopped
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
            log.exception("camera pipeline failed", extra={"camera": self.camera.id})
        finally:
            self.finished.set()

    def _process(self, frame) -> None:
        picked = time.perf_counter()
        queued = None if self.replay else max(0.0, self.clock() - frame.timestamp)  # a replay's times are the video's
        if self.last_frame_time is not None and frame.timestamp < self.last_frame_time - CLOCK_STEP_S:
            self._clock_stepped_back(frame.timestamp)
        self.last_frame_time = frame.timestamp
        self._apply_transactions(frame.timestamp)
        self._count(frame.timestamp)
        faces = self.detector(frame.image)
        detected = time.perf_counter()
        faces = outside_regions(faces, self.camera.ignore_regions, frame.image.shape)
        # each face's looks made once a frame: the picture check and the tracker compare the same ones
        looks = {id(f): Signature.of(frame.image, f) for f in faces} \
            if self.pictures.after_s or self.tracker.min_similarity is not None else None
        faces, recognised = self.pictures.sift(faces, frame.timestamp, frame.image,
                                               [looks[id(f)] for f in faces] if looks is not None else None)
        for picture in recognised:
            self.stats.pictures += 1
            dropped = self.tracker.discard_at(picture.box)
            log.info("a face that held its place is taken for a picture (a poster, a magazine cover) and ignored",
                     extra={"camera": self.camera.id, "box": [round(v) for v in picture.box],
                            "seconds": round(frame.timestamp - picture.since, 1), "tracks": [t.track_id for t in dropped]})
        self.stats.frames += 1
        if self.camera_status is not None:  # an unchanging picture with a face in it is frozen, not a still scene
            self.camera_status.face_in_view = bool(faces)
        if faces:
            self.stats.frames_with_faces += 1
            self.stats.faces += len(faces)
        if self.transaction is not None:
            self._transaction_frames += 1
            self._transaction_faces += len(faces)
        tracks, ended = self.tracker.update(frame.timestamp, faces, frame.image,
                                            [looks[id(f)] for f in faces] if looks is not None else None)
        chosen = [(track, face) for track, face in zip(tracks, faces)
                  if wants_age(track, frame.image, face, frame.timestamp, self.config.budget,
                               self.policy.boundary_age, self.policy.min_samples)]
        tracked = time.perf_counter()
        if chosen:
            self._age(frame, chosen)
        aged = time.perf_counter()
        with self.publisher.frame_batch():  # the frame's messages: one commit to the outbox, then in order to paho
            for track in self.tracker.tracks:
                self._judge(track, frame.timestamp)
            counted = self._finish_tracks(ended, frame.timestamp, save=False)
        if counted:  # after the frame's messages are on their way: its fsyncs are not the alert's wait
            self._save_interval(frame.timestamp)
        # not only the faces found in this frame: a child whose face the detector missed for a frame (turned away)
        # left the check answered about the parent alone, no_challenge
        at_the_till = self.tracker.at_the_till(tracks, self.policy.min_samples)
        self.view = TillView(self.camera.id, frame.timestamp, tuple(_customer_view(t) for t in at_the_till),
                             self.transaction,
                             # a replay's reader waits on the pipeline's queue (a file is read as fast as it goes):
                             # its frames are as fresh as their turn
                             time.monotonic() if self.replay else frame.read_at)
        if not self.replay:  # a replay's frame times are the video's, not the wall clock's
            self.lag_s = self.clock() - frame.timestamp
        if self.on_frame is not None:
            self.on_frame((queued, detected - picked, tracked - detected, aged - tracked if chosen else None,
                           time.perf_counter() - aged,
                           None if self.replay else max(0.0, self.clock() - frame.timestamp)))  # a clock step: 0

    def _clock_stepped_back(self, now: float) -> None:
        """Close what measures time at the last time before the step, and start again from the new clock:
        the customers at the till become new tracks (a split errs on the safe side), the analytics
        interval is sent as partial."""
        before = self.last_frame_time
        self.clock_steps += 1
        log.warning("the wall clock stepped back: tracks and the analytics interval start again",
                    extra={"camera": self.camera.id, "seconds": round(before - now, 3)})
        self._finish_tracks(self.tracker.end_all(), before)
        self._count(before, final=True)

    def _age(self, frame, chosen: list) -> None:
        info = self.batcher.model.info
        crops = np.stack([info.crop(frame.image, face) for _, face in chosen])
        try:
            ages = self.batcher.submit(crops).result(timeout=60)
        except Exception:  # e.g. a GPU out of memory: lose these ages, keep the camera
            self.stats.inference_errors += 1  # the batcher logs once per bout; the status says degraded
            log.debug("age inference failed, frame skipped", extra={"camera": self.camera.id})
            return
        self.stats.faces_aged += len(chosen)
        for (track, _), age in zip(chosen, ages):
            track.add_age(age, frame.timestamp)

    def _judge(self, track: Track, now: float) -> None:
        if len(track.ages) < self.config.policy.min_samples:
            return
        estimate = track.estimate()
        if not track.alerted and needs_id_check(estimate, self.policy):
            track.alerted = True
            self.stats.alerts += 1
            self.publisher.publish_alert(estimate, self.policy, now, self.transaction)
        interval = self.config.tracking.estimate_interval_s
        if track.last_published is None or (now - track.last_published >= interval
                                            and track.last_seen != track.published_seen):
            track.last_published, track.published_seen = now, track.last_seen
            self.stats.estimates += 1
            self.publisher.publish_estimate(estimate, False, now, self.transaction)

    def _finish_tracks(self, ended: list[Track], now: float | None, save: bool = True) -> bool:
        """Publish the final estimate of customers who left; `now`: the capture time of the frame (or the
        wall clock) on which they were found gone, None at the end of a replay (their last frame is used).
        True if any was counted into the analytics interval (save=False: the caller saves it)."""
        counted = False
        for track in ended:
            if len(track.ages) < self.config.policy.min_samples:
                continue  # a glimpse, not a customer
            self._judge(track, track.last_seen)
            self.stats.tracks += 1
            self.stats.estimates += 1
            final = track.estimate()
            self.publisher.publish_estimate(final, True, track.last_seen if now is None else now, self.transaction)
            # the store's hours when the person was last there: while closed, the faces are staff
            if self.counter is not None and self.store_open(track.last_seen):
                self.counter.add(final.age, track.last_seen)
                counted = True
                if save:
                    self._save_interval(track.last_seen if now is None else now)
        return counted


def camera_fault(reader: CameraReader) -> str | None:
    """Why a camera shows nothing usable now (one line), or None while its picture is live."""
    return connection_fault(reader) or picture_fault(reader)


def connection_fault(reader: CameraReader) -> str | None:
    status = reader.status
    return f"{status.state}: {status.last_error}" if status.state in ("reconnecting", "failed") else None


def picture_fault(reader: CameraReader) -> str | None:
    return reader.picture.fault() if reader.status.picture in (FROZEN, BLANK) else None


def _customer_view(track: Track) -> CustomerView:
    if not track.ages:
        return CustomerView(track.track_id, None, None, 0, track.box)
    estimate = track.estimate()
    return CustomerView(track.track_id, estimate.age, estimate.spread, estimate.samples, track.box)


def build_detector(models: ModelsConfig) -> FaceDetector:
    return FaceDetector(models.detector, models.detector_variant, models.detector_score, min_face_px=models.min_face_px,
                        providers=models.detector_providers or models.providers, threads=models.detector_threads,
                        spinning=models.spinning, cuda_options=models.cuda.provider_options(),
                        providers_setting="models.detector_providers" if models.detector_providers else "models.providers")


def build_age_model(models: ModelsConfig, setting: str | None = None) -> AgeModel:
    """The configured age model (or `setting`, a tier or file, instead)."""
    return AgeModel.load(setting or models.age_model, models.providers, models.age_variant, models.age_threads,
                         models.spinning, models.cuda.provider_options())


class Service:
    """Everything the daemon runs; `replay` mode ends when every file source has ended."""

    def __init__(self, config: Config, replay: bool = False, realtime: bool = False):
        self.config = config
        self.replay = replay
        self.clock = time.time  # the wall clock, judged by problems() (tests set one)
        self.stop_event = threading.Event()
        self.daemon_id = daemon_id(config)
        # each network camera's stream fingerprint, in the status: a daemon with the same stream under another
        # camera id says so (edge/peers.py)
        self.streams = {c.id: fp for c in config.cameras if (fp := stream_fingerprint(c.source)) is not None}
        models = config.models
        self.detector = build_detector(models)
        self.age_model = build_age_model(models)
        log.info("age model", extra={"model": self.age_model.describe(), "providers": self.age_model.providers,
                                     "detector_providers": self.detector.session.get_providers()})
        self.provider_fallback = self.age_model.fallback or self.detector.fallback  # logged once by open_session
        if models.age_threads == 0 and self.age_model.providers[0] == CPU and cores_hidden():
            log.warning("ONNX Runtime cannot count the cores (/proc/cpuinfo hidden): the age model runs on one thread",
                        extra={"fix": "ProcSubset=all in the systemd unit (as shipped), or set models.age_threads"})
        self.detector.warm_up()  # on a GPU: the first calls' preparation before the first customer, not during
        self.policy = build_policy(config.policy, self.age_model.info.metadata)
        self.batcher = AgeBatcher(self.age_model, models.max_batch, models.max_wait_ms, producers=len(config.cameras))
        self.batcher.warm_up()  # on the thread that will make the calls (edge.infer)
        self._rates_mark = (time.monotonic(), 0, 0)
        self.outbox = Outbox(outbox_path(config, replay), config.outbox.max_messages, config.outbox.max_age_s,
                             owner="\n".join([self.daemon_id] + [c.id for c in config.cameras]))
        log.info("outbox", extra=self.outbox.status())
        for line in config_warnings(config):
            log.warning(line)
        if self.outbox.path is None and not replay:
            log.warning("outbox in memory only: messages waiting for the broker are lost if the daemon restarts "
                        "(set [outbox] path, or run under the systemd unit)")
        self.publisher = Publisher(config.mqtt, config.store_id, self.daemon_id, self.outbox)
        self.status_due = threading.Event()  # something changed: publish the status now, not at the next tick
        self._said_key: tuple | None = None  # the state the status published at start() said (run_until_stopped)
        self.publisher.on_change = self.status_due.set
        if replay:
            self.publisher.problem_level = self.batcher.problem_level = logging.INFO
        self.readers, self.pipelines = [], []
        for camera in config.cameras:
            frames: queue.Queue = queue.Queue(maxsize=8 if replay else 2)
            self.readers.append(CameraReader(camera, frames, self.stop_event, replay, realtime))
            self.readers[-1].store_open = self.store_open  # a picture fault while closed is logged quietly
            self.pipelines.append(CameraPipeline(camera, config, frames, self.detector, self.batcher, self.publisher,
                                                 self.stop_event, self.policy, replay))
        # a daemon killed outright sends its intervals in progress at its next start (edge/analytics.py)
        # written by the tick and the stop (flush), never by a camera's thread
        self.open_intervals = OpenIntervals(Path(f"{self.outbox.path}.analytics.json"), write_on_save=False) \
            if not replay and self.outbox.path is not None and config.analytics.enabled else None
        for reader, pipeline in zip(self.readers, self.pipelines):
            pipeline.camera_fault = lambda reader=reader: camera_fault(reader)
            pipeline.store_open = self.store_open
            pipeline.camera_status = reader.status
            pipeline.frame_gaps = reader.frame_gaps
            pipeline.open_intervals = self.open_intervals
        self.desk = None
        self.notifier = SystemdNotifier.from_env() if not replay else SystemdNotifier()
        self.watchdog = WatchdogFeeder(self.notifier, self.stalled)
        self.metrics = Metrics(self) if config.metrics.enabled else None
        self.metrics_problem: str | None = None
        if self.metrics is not None:
            self.batcher.on_call = self.metrics.observe_age_call
            for pipeline in self.pipelines:
                pipeline.on_frame = self.metrics.observe_frame
            self.publisher.on_ack = self.metrics.observe_ack
            self.outbox.on_commit = self.metrics.observe_commit
        # a replay is a one-off over a recording, not a till's daemon: no roll call of the store's daemons
        self.peers = None if replay else Peers(self.daemon_id, self.publisher.instance, self.publisher.base,
                                               [c.id for c in config.cameras], self.streams)
        if self.peers is not None:
            self.publisher.status_subscription = self.peers.subscription
            self.publisher.on_status = self.peers.see
            self.peers.on_change = self.status_due.set
        if config.pos.enabled:
            self.desk = PosDesk(self.publisher.base, {p.camera.id: p for p in self.pipelines},
                                self.publisher.publish_reply, self.policy, config.pos.deadline_s,
                                camera_fault=self.camera_fault, replies_under_camera=config.pos.replies_under_camera)
            self.publisher.subscriptions = self.desk.subscriptions
            self.publisher.on_message = self.desk.receive

    def camera_fault(self, camera_id: str) -> str | None:
        """Why what a camera shows cannot answer an age check now (one line), or None."""
        reader = next(r for r in self.readers if r.camera.id == camera_id)
        return camera_fault(reader) or (self.peers.camera_conflict(camera_id) if self.peers is not None else None)

    def store_open(self, at: float | None = None) -> bool:
        """Whether the store is open now (or at Unix time `at`) by its `opening_hours` (always, without them; always
        in replay)."""
        hours = self.config.opening_hours
        return hours is None or self.replay or hours.is_open(self.clock() if at is None else at)

    def problems(self) -> list[str]:
        """Why the daemon is not doing its job fully now: the status says `degraded` with these. While the store
        is closed a blank or frozen picture is none (the lights are off at night; nobody is there to age): it
        becomes one if the store opens with it so. A camera that does not connect is one at any hour, unless it
        is configured `off_while_closed` (powered down with the lanes) and the store is closed."""
        found = []
        store_open = self.store_open()
        if self.provider_fallback is not None and self.provider_fallback.problem:  # frames dropped, say why
            found.append(self.provider_fallback.text)
        if self.batcher.stats.failing is not None:
            found.append(f"age model failing: {self.batcher.stats.failing}")
        for reader, pipeline in zip(self.readers, self.pipelines):
            fault = (connection_fault(reader) if store_open or not reader.camera.off_while_closed else None) \
                or (picture_fault(reader) if store_open else None)
            if fault is not None:
                found.append(f"camera {reader.camera.id} {fault}")
            if pipeline.stats.errors:
                found.append(f"camera {reader.camera.id} pipeline stopped: {pipeline.stats.errors[0]}")
            limit = self.config.pos.faceless_transactions
            if limit and pipeline.faceless_transactions >= limit:
                found.append(f"camera {reader.camera.id} saw no face in {limit} or more transactions in a row at its "
                             "till: aimed away, or the customers stand out of its view")
        if self.outbox.state != "disk" and self.outbox.path is not None:
            found.append(f"outbox in memory only: {self.outbox.reason}")
        if self.metrics_problem:
            found.append(self.metrics_problem)
        takeover = self.publisher.takeover()
        if takeover is not None:
            found.append(takeover)
        if self.peers is not None:
            found += self.peers.problems()
        if self.watchdog.stalled:
            found.append(f"stalled: {', '.join(self.watchdog.stalled)}")
        clock = clock_problem(self.clock())
        if clock is not None and not self.replay:  # a replay's times are its video's
            found.append(clock)
        return found

    def stalled(self) -> list[str]:
        """The parts that have stopped making progress (the systemd watchdog is fed only while none has)."""
        now = time.monotonic()
        beats = {p.name: p.beat for p in self.pipelines if not p.finished.is_set()}
        beats["age-batcher"] = self.batcher.stats.busy_since  # watched only while a call is running
        beats.update({r.name: r.busy_since for r in self.readers})  # a camera's open or read, while it runs
        stuck = stalled_parts(beats, now, STALL_AFTER_S)
        # a thread that died (an unexpected exception) is as stuck as a hung one: the restart heals both
        stuck += [f"{t.name} (thread ended)" for t in self.pipelines + self.readers
                  if t.ident is not None and not t.is_alive() and not self.stop_event.is_set() and not self.replay]
        if not self.batcher.alive():
            stuck.append("age-batcher (thread ended)")
        return stuck

    def summary(self) -> str:
        """One line for `systemctl status`."""
        cameras = [r.status.state for r in self.readers]
        problems = self.problems()
        mqtt = "mqtt ok" if self.publisher.connected.is_set() else f"mqtt: {self.publisher.connection_error or 'connecting'}"
        return (f"{cameras.count('online')}/{len(cameras)} cameras online, {self.batcher.stats.crops} faces aged, "
                f"{mqtt}, outbox {self.outbox.depth()} ({self.outbox.state})"
                + (f"; degraded: {problems[0]}" if problems else ""))

    def metrics_snapshot(self) -> dict:
        """What the Prometheus collector reads at each scrape (edge/metrics.py)."""
        cameras = {}
        for reader, pipeline in zip(self.readers, self.pipelines):
            stats = pipeline.stats
            cameras[reader.camera.id] = {
                "frames": stats.frames, "faces": stats.faces, "dropped_frames": reader.status.extra.get("dropped", 0),
                "tracks": stats.tracks, "alerts": stats.alerts, "estimates": stats.estimates,
                "lag_seconds": pipeline.lag_s, "online": int(reader.status.state == "online"),
                "picture_ok": None if reader.status.picture is None else int(reader.status.picture == LIVE),
                "picture_faces": len(pipeline.pictures.pictures)}
        outbox = self.outbox.status()
        return {"cameras": cameras, "mqtt_connected": int(self.publisher.connected.is_set()),
                "mqtt_delivered": self.publisher.delivered, "mqtt_denied": self.publisher.denied,
                "mqtt_dropped": self.publisher.dropped, "mqtt_unacknowledged": self.publisher.unacknowledged(),
                "outbox_depth": outbox["depth"], "outbox_dropped": outbox["dropped"],
                "outbox_on_disk": int(outbox["state"] == "disk"), "age_errors": self.batcher.stats.errors,
                "degraded": int(bool(self.problems())), "store_open": int(self.store_open()),
                "watchdog_ok": None if not self.watchdog.is_alive() and self.watchdog.stalled is None
                else int(self.watchdog.stalled is None)}

    def _state_key(self) -> tuple:
        """What, when it changes, is worth a status message at once."""
        return (tuple((r.status.state, r.status.picture) for r in self.readers), tuple(self.problems()),
                self.store_open())

    def status(self) -> dict:
        """What the status topic says: cameras, the model, and whether the box keeps up (overload is visible)."""
        problems = self.problems()
        return {
            "state": "degraded" if problems else "online",
            "problems": problems,
            "store_open": self.store_open(),  # by opening_hours: while closed, picture faults are no problem
            "status_interval_s": self.config.status_interval_s,  # so other daemons know when it is overdue
            "provider": self.age_model.providers[0],
            "detector_provider": self.detector.session.get_providers()[0],
            "provider_fallback": None if self.provider_fallback is None else self.provider_fallback.text,
            "age_model": self.age_model.describe(),
            "age_network": self._age_network_rates(),
            **({"pos": {**vars(self.desk.stats), "deadline_s": self.desk.deadline_s}} if self.desk is not None else {}),
            "mqtt": {"delivered": self.publisher.delivered, "denied": self.publisher.denied,
                     "dropped": self.publisher.dropped, "unacknowledged": self.publisher.unacknowledged()},
            "outbox": self.outbox.status(),
            "age_errors": self.batcher.stats.errors,
            "cameras": {r.camera.id: {"state": r.status.state, "frames": r.status.frames,
                                      "reconnects": r.status.reconnects, "last_error": r.status.last_error,
                                      "picture": r.status.picture,
                                      "faceless_transactions": p.faceless_transactions,
                                      "picture_faces": len(p.pictures.pictures),
                                      "dropped": r.status.extra.get("dropped", 0), "queue": r.frames.qsize(),
                                      "lag_s": None if p.lag_s is None else round(p.lag_s, 3),
                                      **({"stream": self.streams[r.camera.id]} if r.camera.id in self.streams else {})}
                        for r, p in zip(self.readers, self.pipelines)},
        }

    def _age_network_rates(self) -> dict:
        """Calls and faces per second since the previous status, and in all."""
        now, calls, faces = time.monotonic(), self.batcher.stats.calls, self.batcher.stats.crops
        then, calls_before, faces_before = self._rates_mark
        self._rates_mark = (now, calls, faces)
        seconds = max(now - then, 1e-6)
        return {"calls": calls, "faces": faces, "calls_per_s": round((calls - calls_before) / seconds, 2),
                "faces_per_s": round((faces - faces_before) / seconds, 2)}

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics_problem = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
            self.metrics.time_collections()
        self.publisher.publish_status(self.status())  # sent by on_connect once the broker is there
        # what that status said: the status loop compares with it, so a camera that comes online before the loop
        # runs (a busy machine) is said at once, not at the next status interval
        self._said_key = self._state_key()
        if self.desk is not None:
            self.desk.start()
        self.publisher.start()  # first what the previous run left in the outbox
        if self.open_intervals is not None:  # then what it left counting (after: it would be in that backlog too)
            # through the outbox, like every analytics message, before the file that kept them goes
            left = self.open_intervals.take_left(self.config.outbox.max_age_s, send=self.publisher.publish_analytics)
            if left:
                log.info("analytics intervals the previous run left open sent as partial",
                         extra={"cameras": [m["camera"] for m in left]})
        for thread in self.pipelines + self.readers:
            thread.start()
        self.notifier.ready(self.summary())  # models loaded, cameras started
        self.watchdog.start()

    def run_until_stopped(self, until: threading.Event | None = None) -> None:
        """Publish status periodically, and at once when a camera, the model or the outbox changes state,
        until stop() is called (or, in replay, the files end), or `until` is set."""
        last_status, last_key = time.monotonic(), self._said_key or self._state_key()
        while not self.stop_event.is_set() and not (until is not None and until.is_set()):
            if self.replay and all(p.finished.is_set() for p in self.pipelines):
                break
            self.stop_event.wait(0.1)
            self.publisher.send_held()  # what paho's full queue held back in the outbox, once it has room
            self.outbox.tidy()  # acknowledged messages off the disk
            if self.open_intervals is not None:
                self.open_intervals.flush()  # the cameras' intervals in progress, when they changed
            key = self._state_key()
            if key != last_key:
                # new problems are logged (a replay reports in its closing line instead); ones from the start,
                # like a GPU provider that did not load, were logged when they arose
                if key[2] != last_key[2]:  # first: it explains the problems that come or go with it
                    log.info("store open" if key[2] else "store closed: a blank or frozen picture is no problem "
                             "until it opens", extra={"opening_hours": self.config.opening_hours.model_dump(
                                 exclude_none=True) if self.config.opening_hours else None})
                if key[1] and key[1] != last_key[1]:
                    log.log(logging.INFO if self.replay else logging.WARNING, "degraded",
                            extra={"problems": list(key[1])})
                last_key = key
                self.status_due.set()
            if self.status_due.is_set() or time.monotonic() - last_status >= self.config.status_interval_s:
                self.status_due.clear()
                last_status = time.monotonic()
                self.publisher.publish_status(self.status())
                self.notifier.status(self.summary())

    def stop(self, delivery_timeout_s: float = 10.0, reloading: bool = False, disk_is_delivery: bool | None = None) \
            -> bool:
        """Stop threads, publish the retained offline status, wait for acks. True if all delivered.
        `reloading`: systemd is told a reload, not a stop (the caller execs the daemon again). `disk_is_delivery`:
        whether a message kept in the outbox on disk counts as delivered (by default the daemon's yes, a replay's no)."""
        if reloading:
            self.notifier.reloading("reloading the config: restarting in place")
        else:
            self.notifier.stopping("stopping")
        self.watchdog.stop()
        self.stop_event.set()
        deadline = time.monotonic() + THREADS_STOP_S  # all together: systemd's TimeoutStopSec counts the whole stop
        for thread in self.readers + self.pipelines:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in self.readers + self.pipelines if thread.is_alive()]
        if stuck:  # what they publish from now on comes after the outbox closed, and is said lost then
            log.error(f"threads did not stop within {THREADS_STOP_S:g} s", extra={"threads": stuck})
        if self.open_intervals is not None:
            self.open_intervals.flush()  # the partial intervals just sent are closed on disk too
        self.batcher.close()
        if self.desk is not None:
            self.desk.close()
        # to the daemon a message on disk is safe (sent at its next start); a replay promises every one acknowledged
        if disk_is_delivery is None:
            disk_is_delivery = not self.replay
        delivered = self.publisher.stop(self.status(), delivery_timeout_s, disk_is_delivery=disk_is_delivery)
        if self.metrics is not None:
            self.metrics.close()
        if reloading:
            close_at_exec()
        return delivered

    def stats(self) -> dict:
        totals = PipelineStats()
        for p in self.pipelines:
            for key in ("frames", "frames_with_faces", "faces", "tracks", "estimates", "alerts", "faces_aged",
                        "inference_errors", "pictures"):
                setattr(totals, key, getattr(totals, key) + getattr(p.stats, key))
            totals.errors += p.stats.errors
        return totals.__dict__


def keep_frames_private() -> None:
    """No camera frame may reach the disk, nor another process: a core dump holds every frame in memory (the unit's
    watchdog restarts with SIGABRT, which dumps core where systemd-coredump or apport listens: 510 MB of them, whole
    frames byte for byte, 2026-11-27 privacy review), so none is written (RLIMIT_CORE 0, the unit's LimitCORE=0 too)
    and the process is not dumpable (PR_SET_DUMPABLE 0: no core even so, and no ptrace or /proc/PID/mem by another
    process of the same user). What the daemon writes (the outbox, the analytics kept across restarts) is its user's
    alone (umask 077, as the unit's UMask= does) when it runs by hand or in a container too."""
    import ctypes
    import resource
    os.umask(0o077)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (OSError, ValueError, AttributeError) as exc:  # not Linux, or a sandbox that refuses it: said, run on
        log.warning("core dumps could not be turned off: a crash could write camera frames to disk",
                    extra={"error": str(exc)})


PR_SET_DUMPABLE = 4  # linux/prctl.h


def close_at_exec() -> None:
    """Mark every descriptor but stdin, stdout and stderr to close at the reload's exec: the new program opens what it
    needs itself. Python's own and FFmpeg's files and sockets close at exec already, but OpenCV's V4L2 backend opens
    a USB camera without O_CLOEXEC (strace: O_RDWR|O_NONBLOCK, no fcntl after), and a reader stuck in a hung camera's
    read past THREADS_STOP_S still holds it at the exec: inherited, it would keep the device's stream (V4L2 serves one
    file handle) from the new program's own open, one handle more at every reload."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:
                pass  # closed since the listing (the listing's own descriptor, or another thread's)


def outbox_path(config: Config, replay: bool) -> Path | None:
    """The outbox file: the config's; else, for the daemon under systemd, in its StateDirectory= (a replay
    writes no file unless the config says so); else none: memory only."""
    if config.outbox.path is not None:
        return config.outbox.path
    state_directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not replay and state_directory and Path(state_directory).is_dir():
        return Path(state_directory) / "outbox.sqlite3"
    return None


def daemon_id(config: Config) -> str:
    return daemon_id_of(config.daemon_id)


def daemon_id_of(configured: str | None) -> str:
    """The config's daemon_id, or by default the host name, and on a store server the systemd instance
    (tillsight@NAME sets TILLSIGHT_INSTANCE, deploy/tillsight-instance.conf), so that its daemons never publish
    as one."""
    if configured:
        return configured

    def named(text: str) -> str:  # ASCII alone: other daemons take only a daemon_id's characters for one
        return "".join(c if c.isascii() and c.isalnum() or c in "-_" else "-" for c in text)
    instance = os.environ.get("TILLSIGHT_INSTANCE", "")
    suffix = named(f"-{instance}")[:64] if instance else ""
    name = named(socket.gethostname())[: 64 - len(suffix)] + suffix  # too long: the host name gives way
    name = name.lstrip("-") or "tillsight"
    return "tillsight-pos" if name == RESERVED_ID else name  # a till PC called pos: not the POS's reply topics


def _interrupted(service: Service, ack_timeout: float) -> UserError:
    """A replay stopped by Ctrl-C, and what became of its messages. With an outbox on disk it stops at once (the
    rest waits there for the next start; it waited the whole --ack-timeout with the broker away); without one it
    waits up to --ack-timeout for the broker's acks, as the daemon does, and a second Ctrl-C gives them up."""
    publisher = service.publisher
    try:
        service.stop(ack_timeout, disk_is_delivery=True)
    except KeyboardInterrupt:
        return UserError(f"interrupted twice: {publisher.unacknowledged()} messages the broker had not acknowledged "
                         f"are lost", EXIT_INTERRUPTED)
    if publisher.kept_on_disk:
        return UserError(f"interrupted: {publisher.kept_on_disk} messages kept in the outbox {publisher.outbox.path} "
                         f"for the next start", EXIT_INTERRUPTED)
    if publisher.unacknowledged():
        return UserError(f"interrupted: {publisher.unacknowledged()} messages not acknowledged within "
                         f"{ack_timeout:g} s are lost", EXIT_INTERRUPTED)
    return UserError("interrupted: every message published so far was acknowledged", EXIT_INTERRUPTED)


def run_replay(config, realtime: bool = False, ack_timeout: float = 30.0, on_start=None) -> dict:
    """Replay the config's (file) cameras to the end; raise UserError if anything was lost.

    `on_start(age_model)` is called once the models are loaded."""
    service = Service(config, replay=True, realtime=realtime)
    if on_start is not None:
        on_start(service.age_model)
    started = time.perf_counter()
    service.start()
    try:
        service.run_until_stopped()
    except KeyboardInterrupt:
        raise _interrupted(service, ack_timeout) from None
    seconds = time.perf_counter() - started
    delivered = service.stop(ack_timeout)
    stats = service.stats()
    failed = [r.status for r in service.readers if r.status.state == "failed"]
    if failed:
        raise UserError(f"camera {failed[0].camera_id}: {failed[0].last_error}")
    if stats["errors"]:
        raise UserError(f"pipeline failed: {stats['errors'][0]}")
    if stats["inference_errors"]:
        batches = service.batcher.stats
        raise UserError(f"age model failed on {batches.errors} of {batches.errors + batches.calls} calls "
                        f"({stats['inference_errors']} frames without ages): {batches.failing or 'see the log'}")
    publisher, mqtt = service.publisher, config.mqtt
    if publisher.denied:
        raise UserError(f"the MQTT broker at {mqtt.host}:{mqtt.port} refused {publisher.denied} messages "
                        f"(not authorised: check the broker's ACL for this user's topics)")
    if not delivered:
        why = f": {publisher.connection_error}" if publisher.connection_error else ""
        kept = f" ({publisher.kept_on_disk} kept in the outbox {publisher.outbox.path} for the next start)" \
            if publisher.kept_on_disk else ""
        raise UserError(f"MQTT broker at {mqtt.host}:{mqtt.port}{why}; {publisher.unacknowledged()} messages "
                        f"not acknowledged within {ack_timeout:g} s{kept}")
    return {**{k: v for k, v in stats.items() if k != "errors"}, "seconds": round(seconds, 3),
            "fps": round(stats["frames"] / seconds, 1) if seconds else None,
            "provider": service.age_model.providers[0], "age_model": service.age_model.tier,
            **({"provider_fallback": service.provider_fallback.text} if service.provider_fallback else {}),
            "batches": service.batcher.stats.calls}
