"""Age inference: one ONNX Runtime session, fed in batches gathered from all cameras.

Every camera pipeline submits the crops of one frame and waits on a Future.
One worker thread takes every request queued (up to `max_batch` crops) into one
session call: what arrives while a call runs is the next batch, so batches grow
with the load and a lone face is never kept waiting. `max_wait_ms` (0 by default)
makes the first request of a batch wait that long for the other cameras' as well,
until every registered camera has one in.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.contract import SPREAD_OUTPUT, AgeModelInfo, ContractError, read_contract
from edge.errors import ModelError
from edge.runtime import CPU, Fallback, is_weights_only_int8, open_session, provider_fallback, resolve_providers, \
    session_options
from edge.tiers import AgeModelChoice, pick_variant, resolve_age_model
from edge.types import AgeEstimate

log = logging.getLogger(__name__)

# The ages, in years, a working age model can answer. A regression head is not clamped: a little under 0 for a baby
# or over 100 for an odd crop does happen and is served (the policy judges it as any estimate). No one is older than
# about 120, so past these bounds, with a wide margin on both sides, the answer comes from a broken model (a diverged
# training, wrong weights, an overflow): 1e30 would pass for an adult, -1e30 make everyone a minor. Such an answer
# fails the call as NaN does.
HUMAN_AGES = (-50.0, 250.0)


class AgeModel:
    """An ONNX age model that follows `edge.contract`."""

    def __init__(self, path: Path | str, providers: list[str] | None = None, tier: str = "file",
                 variant: str = "fp32", threads: int = 0, spinning: bool = False,
                 cuda_options: dict[str, str] | None = None, made: bytes | None = None):
        """made: the model made from the file at `path` in memory (fp16 from the int8 file: edge.precision)."""
        self.path = Path(path)
        self.tier = tier
        self.variant = variant
        self._open = lambda: open_session(self.path, providers, "age", session_options(threads, spinning),
                                          cuda_options, made)
        self.session = self._open()
        # on a GPU, after warm_up: one session per padded batch size (see warm_up); else the one above serves all
        self._sessions: dict[int, ort.InferenceSession] = {}
        self.fallback: Fallback | None = provider_fallback(self.session, providers)
        try:
            self.info: AgeModelInfo = read_contract(self.session)
        except ContractError as exc:
            raise ModelError(f"age model {self.path} breaks the model contract: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        # float32 as the contract says, or uint8 where the model was made for a GPU (edge.precision)
        self.input_dtype = np.uint8 if self.session.get_inputs()[0].type == "tensor(uint8)" else np.float32
        self.output_names = [self.session.get_outputs()[0].name] + ([SPREAD_OUTPUT] if self.info.has_spread else [])
        # the batch sizes calls are padded to (warm_up sets them on a GPU); None: each call as it comes
        self.batch_sizes: list[int] | None = [self.info.fixed_batch] if self.info.fixed_batch else None

    @classmethod
    def load(cls, setting: str | Path | None, providers: list[str] | None = None, variant: str = "auto",
             threads: int = 0, spinning: bool = False, cuda_options: dict[str, str] | None = None) -> "AgeModel":
        """A tier name ('auto', 'light', 'resnet50') or a model file, in the precision that suits the provider."""
        base = resolve_age_model(setting)
        resolved = resolve_providers(providers)
        on_gpu = bool(resolved) and resolved[0] != CPU
        choice = pick_variant(base, variant, on_gpu)
        model = cls(choice.path, providers, choice.tier, choice.variant, threads, spinning, cuda_options)
        if variant == "auto" and choice.variant == "fp16" and model.providers[0] == CPU:
            # CUDA was asked for but did not load (said once, by open_session): fp16 on a CPU is the
            # slowest of all, take the CPU's variant
            log.info("GPU provider unavailable, serving the CPU variant", extra={"asked": choice.path.name})
            choice = pick_variant(base, "auto", on_gpu=False)
            model = cls(choice.path, providers, choice.tier, choice.variant, threads, spinning, cuda_options)
        elif model.providers[0] != CPU:  # only once CUDA really serves: uint8 crops, all on CUDA, fp16 where it pays
            fp16 = fp16_at_load(choice, variant, on_gpu)
            made = made_for_gpu(choice.path, fp16) if fp16 or model.input_dtype != np.uint8 else None
            if made is not None:
                model = cls(choice.path, providers, choice.tier, "fp16" if fp16 else choice.variant, threads,
                            spinning, cuda_options, made)
        return model

    def describe(self) -> dict:
        """Which model answers: logged at start and published in the status topic."""
        kind = self.info.metadata.get("tillsight.kind")
        return {"tier": self.tier, "file": self.path.name, "variant": self.variant,
                "provider": self.providers[0], **({"kind": kind} if kind else {}),
                **({"input": "uint8"} if self.input_dtype == np.uint8 else {})}

    @property
    def providers(self) -> list[str]:
        """The providers ONNX Runtime really uses, not the ones we asked for."""
        return self.session.get_providers()

    def warm_up(self, max_batch: int) -> float:
        """On a GPU, before any customer: from here on every call is padded to a power of two (up to
        `max_batch`), each of those sizes gets a session of its own, and each runs once now. A GPU provider
        prepares each new input shape on its first call (measured on the H100, the shipped ResNet50 in fp16:
        1,194 ms with cuDNN's exhaustive search, 180 ms with its heuristic, then 5-7 ms a call), and the batcher
        forms any size from 1 to `max_batch`: warming all 32 up took longer than a 10 s benchmark run; padding
        costs the GPU next to nothing (1.5 ms at batch 1 and at batch 8). One session per size because the
        CUDA provider prepares again whenever the shape differs from its previous call's (measured on the H100,
        2026-11-26: 2 ms a call at any one size, about 200 ms at every change of size; the daemon, whose
        batches change size from call to call, spent 170-290 ms a call, 4 calls a second; issue 10). Seconds
        taken; 0 on a CPU, where a call costs what its faces cost and the first is not slower: nothing is
        padded there. Run it on the thread that makes the calls (AgeBatcher.warm_up): the provider also
        prepares once per calling thread."""
        sizes = self.warm_up_sizes(max_batch)
        if not sizes:
            return 0.0
        started = time.perf_counter()
        size = self.info.input_size
        ran: dict[int, ort.InferenceSession] = {}
        for batch in sizes:
            try:  # the loaded session serves the first size; ~50 MB of fp16 weights on the GPU for each other
                session = self._open() if ran else self.session
                self._run(np.zeros((batch, size, size, 3), self.input_dtype), session)
            except ModelError as exc:  # e.g. out of GPU memory at a large batch: serve the sizes that ran
                log.warning("age model warm-up failed, batches capped at the largest size that ran",
                            extra={"batch": batch, "error": str(exc), "largest": max(ran) if ran else None})
                break
            ran[batch] = session
        self._sessions = ran
        self.batch_sizes = list(ran) or self.batch_sizes
        seconds = time.perf_counter() - started
        log.info("age model warmed up", extra={"batch_sizes": list(ran), "seconds": round(seconds, 2)})
        return seconds

    def warm_up_sizes(self, max_batch: int) -> list[int]:
        """The batch sizes calls are padded to on a GPU: powers of two and `max_batch` itself (the model's own
        for a fixed-batch one); none on a CPU."""
        if self.providers[0] == CPU:
            return []
        if self.info.fixed_batch:
            return [self.info.fixed_batch]
        return sorted({1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch} | {max_batch})

    def _as_input(self, crops: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.uint8 and crops.dtype != np.uint8:  # float crops (none of ours): nearest pixels
            crops = np.clip(np.rint(crops), 0, 255)
        return np.ascontiguousarray(crops, self.input_dtype)

    def _padded(self, count: int) -> int:
        return next((size for size in self.batch_sizes or [] if size >= count), count)

    def _run(self, chunk: np.ndarray, session: ort.InferenceSession | None = None) -> list:
        session = session or self._sessions.get(len(chunk), self.session)
        try:
            return session.run(self.output_names, {self.input_name: chunk})
        except Exception as exc:  # ONNX Runtime's own errors: the model loads but cannot run
            raise ModelError(f"age model {self.path} failed when run: {(str(exc).splitlines() or [repr(exc)])[0]}") \
                from None

    def predict(self, crops: np.ndarray) -> list[AgeEstimate]:
        """crops: uint8 or float [N, S, S, 3] RGB. ImplausibleAges (a ModelError) if the model's answer for any
        face is no age (NaN, 1e30, a NaN spread): the others' estimates go with it."""
        if len(crops) == 0:
            return []
        step = self.batch_sizes[-1] if self.batch_sizes else len(crops)
        results: list[AgeEstimate | None] = []
        first_problem = None
        for start in range(0, len(crops), step):
            chunk = self._as_input(crops[start : start + step])
            padded = self._padded(len(chunk))  # a fixed-batch model's size, or a warmed-up one on a GPU
            if padded > len(chunk):
                chunk = np.concatenate([chunk, np.zeros((padded - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            outputs = self._run(chunk)
            n = min(step, len(crops) - start)  # the faces of this chunk; the rest is padding
            ages = self._one_per_face(outputs[0], len(chunk), "age")[:n]
            spreads = self._one_per_face(outputs[1], len(chunk), SPREAD_OUTPUT)[:n] if len(outputs) > 1 else None
            for i in range(n):
                problem = self._implausible(float(ages[i]), None if spreads is None else float(spreads[i]))
                first_problem = first_problem or problem
                results.append(None if problem else
                               AgeEstimate(float(ages[i]), None if spreads is None else float(spreads[i])))
        if first_problem is not None:
            raise ImplausibleAges(first_problem, results)
        return results  # type: ignore[return-value]  (no None: none was implausible)

    def _one_per_face(self, output, faces: int, what: str) -> np.ndarray:
        """An output as one value per face of the call: the contract's [N] or [N, 1]. Any other length (one row for
        a whole batch, ten numbers a face) is the model's fault, said in one line (numpy's reshape error was a
        traceback in predict and eval)."""
        values = np.asarray(output, np.float32).reshape(-1)
        if len(values) != faces:
            if len(values) % faces == 0:
                raise ModelError(f"age model {self.path} answered {len(values) // faces} values per face, "
                                 f"not one {what}")
            raise ModelError(f"age model {self.path} answered an {what} output of length {len(values)} for {faces} "
                             f"faces, not one {what} per face")
        return values

    def _implausible(self, age: float, spread: float | None) -> str | None:
        """Why one face's answer is no age, or None. A broken model must not pass for a room of adults (NaN, 1e30)
        nor make everyone a minor (-1e30); a NaN spread is a broken head too (predict printed `"spread": NaN`,
        which is no JSON)."""
        low, high = HUMAN_AGES
        if not np.isfinite(age):
            return f"age model {self.path} answered NaN or infinity for an age"
        if not low <= age <= high:
            return f"age model {self.path} answered {age:g} years for an age, outside the [{low:g}, {high:g}] of " \
                   "any working age model"
        if spread is not None and not np.isfinite(spread):
            return f"age model {self.path} answered NaN or infinity for an {SPREAD_OUTPUT}"
        return None


class ImplausibleAges(ModelError):
    """The model's answer for some faces of a call is no age; `estimates` holds the call's others (None for
    those), so that one absurd answer fails only the frames it came from, not every camera's in the batch."""

    def __init__(self, message: str, estimates: list[AgeEstimate | None]):
        super().__init__(message)
        self.estimates = estimates


def fp16_at_load(choice: AgeModelChoice, variant: str, on_gpu: bool) -> bool:
    """Whether to make fp16 from the file at load: on a GPU, precision "auto", and a tier that ships only the
    int8 weights-only file (the shipped ResNet50: fp16 and fp32 do not fit the repository). Measured on the
    H100 (issue 10), batch 64: fp16 11,763 faces/s with `session.run` (the daemon's call; 18,224 with IO binding),
    the int8 file folded to fp32 8,780 (12,678); ages within 0.08 years of the CPU's. A file named in the
    config, or a variant asked for, is served as it is."""
    return on_gpu and variant == "auto" and choice.tier != "file" and choice.variant == "int8" \
        and is_weights_only_int8(choice.path)


def made_for_gpu(path: Path, fp16: bool) -> bytes | None:
    """The model a GPU serves, made from the file: uint8 crops (a quarter of the upload, the same ages), no shape
    arithmetic left for the CPU (edge.precision.with_whole_reversals_as_gather), and fp16 from the int8 file where
    `fp16`. None, with a warning, if it cannot be made: the file serves as it is."""
    started = time.perf_counter()
    try:
        from edge.precision import made_for_gpu as make  # onnx's protobuf: loaded only where a GPU needs it
        made = make(path, fp16)
    except Exception as exc:  # noqa: BLE001 - onnx's checker, a missing module...: the file itself still serves
        log.warning("age model not made for the GPU, serving its file as it is", extra={
            "file": path.name, "fp16": fp16, "error": (str(exc).splitlines() or [repr(exc)])[0]})
        return None
    log.info("age model made for the GPU", extra={"file": path.name, "input": "uint8", "fp16": fp16,
                                                  "seconds": round(time.perf_counter() - started, 1)})
    return made


@dataclass
class _Request:
    crops: np.ndarray
    future: Future
    submitted: float


@dataclass
class _WarmUp:
    future: Future


@dataclass
class BatchStats:
    calls: int = 0
    crops: int = 0
    max_batch_seen: int = 0
    errors: int = 0  # failed calls
    failing: str | None = None  # the last call's error while the model keeps failing; None once a call works
    busy_since: float | None = None  # monotonic start of the call in progress (the watchdog's stall check)
    last_seconds: float = 0.0  # the last call's duration


class AgeBatcher:
    """Gathers crops from several camera threads into batched `AgeModel` calls."""

    def __init__(self, model: AgeModel, max_batch: int = 32, max_wait_ms: float = 0.0, producers: int = 1):
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.producers = max(1, producers)
        self.stats = BatchStats()
        self.on_call = None  # (faces, seconds) -> None after each successful call: the metrics
        self.problem_level = logging.ERROR  # a replay says it in its closing line instead
        self._requests: queue.Queue[_Request | _WarmUp | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="age-batcher", daemon=True)
        self._thread.start()

    def submit(self, crops: np.ndarray) -> Future:
        future: Future = Future()
        if len(crops) == 0:
            future.set_result([])
        else:
            self._requests.put(_Request(crops, future, time.monotonic()))
        return future

    def warm_up(self) -> float:
        """The model's warm-up (AgeModel.warm_up), run on the batcher's own thread, before the cameras start: the
        CUDA provider prepares once per calling thread as well (measured on the H100: a fresh thread's first
        call 341 ms, then 2 ms). Seconds taken."""
        future: Future = Future()
        self._requests.put(_WarmUp(future))
        while True:  # as long as it takes (loading kernels, a first TensorRT build), while the thread is there
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if not self.alive():
                    raise ModelError("the age batcher stopped before the model's warm-up ran") from None

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, count = [first], len(first.crops)
        deadline = first.submitted + self.max_wait_s
        while count < self.max_batch and len(batch) < self.producers:
            try:
                request = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                return batch, True
            if isinstance(request, _WarmUp):  # next, on its own: this batch runs first
                self._requests.put(request)
                break
            batch.append(request)
            count += len(request.crops)
        return batch, False

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._requests.get()
            if first is None:
                break
            if isinstance(first, _WarmUp):
                try:
                    first.future.set_result(self.model.warm_up(self.max_batch))
                except Exception as exc:  # noqa: BLE001 - said by the caller, on its own thread
                    first.future.set_exception(exc)
                continue
            batch, closing = self._gather(first)
            crops = np.concatenate([r.crops for r in batch])
            self.stats.busy_since = started = time.monotonic()
            try:
                estimates, implausible = self._predict(crops)
            except Exception as exc:  # a failing model must not hang the cameras waiting on it
                self._failed(exc)
                for r in batch:
                    r.future.set_exception(exc)
                continue
            finally:
                self.stats.busy_since = None
                self.stats.last_seconds = time.monotonic() - started
            if implausible is not None:
                self._failed(implausible)
            elif self.stats.failing is not None:
                log.warning("age inference works again", extra={"errors": self.stats.errors})
                self.stats.failing = None
            if self.on_call is not None:
                self.on_call(len(crops), self.stats.last_seconds)
            self.stats.calls += 1
            self.stats.crops += len(crops)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, min(len(crops), self.max_batch))
            start = 0
            for r in batch:
                mine = estimates[start : start + len(r.crops)]
                if None in mine:  # only the frames with a face the model answered no age for
                    r.future.set_exception(implausible)
                else:
                    r.future.set_result(mine)
                start += len(r.crops)

    def _predict(self, crops: np.ndarray) -> tuple[list[AgeEstimate | None], ImplausibleAges | None]:
        """Every crop's estimate, in calls of at most max_batch; None for those the model answered no age for,
        with the first such answer's error."""
        estimates: list[AgeEstimate | None] = []
        implausible = None
        for start in range(0, len(crops), self.max_batch):
            try:
                estimates += self.model.predict(crops[start : start + self.max_batch])
            except ImplausibleAges as exc:
                estimates += exc.estimates
                implausible = implausible or exc
        return estimates, implausible

    def _failed(self, exc: Exception) -> None:
        message = (str(exc).splitlines() or [repr(exc)])[0][:300]
        if self.stats.failing is None:  # once per bout of failures, not per frame
            log.log(self.problem_level, "age inference failing", extra={"error": message})
        self.stats.errors += 1
        self.stats.failing = message
