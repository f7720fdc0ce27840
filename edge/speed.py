"""`tillsight bench --model-only`: the age model alone, faces/s per precision, batch and way of calling it.

For an ONNX age model and its `_fp16`/`_int8` siblings, on the providers asked for (`--providers`,
default cuda then cpu), at each batch size:

    plain      `session.run` with a float32 NumPy batch, as the model file takes it (the crops go up,
               the ages come back, on every call): what the daemon does on a CPU
    uint8      `session.run` with the crops as uint8, into the model made with a uint8 input (a Cast
               first in the graph, edge.precision): what the daemon does on a GPU, a quarter of the
               bytes up; the ages must be plain's to the bit
    iobinding  the crops uploaded to the provider's device once (`OrtValue.ortvalue_from_numpy(x,
               device, 0)`), the outputs bound to that device and left there (`run_with_iobinding`):
               the network's own speed
    upload     IO binding with the crops bound from host memory on every call (`bind_cpu_input`) and the
               outputs left on the device: the copy up counted, the copy back not (opt-in)
    cudagraph  as iobinding, with CUDA graphs (`enable_cuda_graph`; fixed input and output addresses,
               one session per batch size); only when CUDA serves, skipped with the reason otherwise

Warm-up calls are not timed; each point is timed for `point_seconds` (at least 3 calls). Every
session's `get_providers()` is printed (ONNX Runtime falls back to the CPU silently). When a GPU
provider serves, a CPU session of the same model is measured too (`--cpu-batches`, plain calls),
and every GPU figure is given as a ratio to the CPU figure of the same variant and batch (or, at
batches the CPU was not timed at, to the CPU's best for that variant, marked `*`). GPU utilisation
is sampled through NVML (`pynvml`, the nvidia-ml-py package) while it runs; without it the report
says why. Writes speed.json and speed.png.

GPU utilisation comes from `edge.gpu.GpuSampler`, as in the end-to-end part and in training.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.gpu import GpuSampler

MODES = ("plain", "uint8", "iobinding", "upload", "cudagraph")
DEFAULT_MODES = ("plain", "uint8", "iobinding", "cudagraph")
GPU_BATCHES = (1, 8, 32, 64, 128, 256)
CPU_BATCHES = (1, 8, 32)
TARGET_FACES_PER_S, TARGET_MIN_BATCH = 15_000, 64  # issue 10: the age model alone on the store server's GPU
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class SpeedError(Exception):
    """A sweep that cannot run: one line for the user."""


@dataclass
class SpeedOptions:
    model: Path  # the fp32 ONNX file; its _fp16/_int8 siblings are measured when present
    out: Path
    providers: list[str] = field(default_factory=lambda: ["cuda", "cpu"])
    variants: list[str] | None = None  # None: fp32+fp16 on a GPU, every variant present on a CPU
    batches: list[int] | None = None  # None: GPU_BATCHES on a GPU, CPU_BATCHES on a CPU
    cpu_batches: list[int] | None = None  # the CPU baseline when a GPU serves; None: CPU_BATCHES; []: none
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    cuda_options: list[dict] = field(default_factory=lambda: [{}])  # one sweep per dict of CUDA provider options
    point_seconds: float = 1.0
    threads: int = 0  # intra-op threads of CPU sessions (0: one per core)
    seed: int = 0


# ------------------------------------------------------------------ sessions


_SHORT_OPTIONS = {"cudnn_conv_algo_search": "algo", "prefer_nhwc": "nhwc"}  # the table's column is narrow


def _cuda_label(options: dict) -> str:
    return "cuda" + "".join(f" {_SHORT_OPTIONS.get(k, k)}={v}" for k, v in sorted(options.items()))


def _open(path: Path, providers: list[str], cuda_options: dict, threads: int, graph: bool = False,
          made: bytes | None = None):
    import onnxruntime as ort
    from edge.runtime import fold_int8_weights, resolve_providers, session_options
    chosen = []
    for name in resolve_providers(providers):
        if name == "CUDAExecutionProvider":
            options = {str(k): str(v) for k, v in cuda_options.items()}
            if graph:
                options["enable_cuda_graph"] = "1"
            chosen.append((name, options))
        else:
            chosen.append(name)
    options = session_options(threads) if made else fold_int8_weights(session_options(threads), path)
    options.log_severity_level = 3
    return ort.InferenceSession(made or str(path), options, providers=chosen)


def _device_of(session) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


def _timed(call, seconds: float, min_calls: int = 3, sync=None) -> tuple[int, float]:
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        if calls >= min_calls and time.perf_counter() - started >= seconds:
            break
    if sync is not None:
        sync()
    return calls, time.perf_counter() - started


class _Variant:
    """One model file on one provider setting: the plain/IO-binding session, and per-batch CUDA-graph ones."""

    def __init__(self, path: Path, providers: list[str], cuda_options: dict, threads: int):
        self.path, self.providers_asked, self.cuda_options, self.threads = path, providers, cuda_options, threads
        self.session = _open(path, providers, cuda_options, threads)
        self.device = _device_of(self.session)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.uint8_session = None  # made at the first uint8 point

    def plain(self, x: np.ndarray):
        return lambda: self.session.run(self.outputs, {self.input: x})

    def uint8(self, x: np.ndarray):
        """The daemon's call on a GPU: the model made with a uint8 input (edge.infer.made_for_gpu, without fp16:
        each variant's file as it is), the crops as uint8."""
        from edge.precision import made_for_gpu
        if self.uint8_session is None:
            self.uint8_session = _open(self.path, self.providers_asked, self.cuda_options, self.threads,
                                       made=made_for_gpu(self.path, fp16=False))
        pixels = np.ascontiguousarray(x, np.uint8)
        return lambda: self.uint8_session.run(self.outputs, {self.input: pixels})

    def bound(self, x: np.ndarray, upload_each_call: bool):
        import onnxruntime as ort
        binding = self.session.io_binding()
        if upload_each_call:
            put = lambda: binding.bind_cpu_input(self.input, x)  # noqa: E731
        else:
            value = ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
            binding.bind_ortvalue_input(self.input, value)
            put = None
        for name in self.outputs:
            binding.bind_output(name, self.device, 0)

        def call():
            if put is not None:
                put()
            self.session.run_with_iobinding(binding)
        return call, binding

    def graph(self, x: np.ndarray, reference: list[np.ndarray]):
        """A CUDA-graph session for this batch: input and outputs at fixed device addresses."""
        import onnxruntime as ort
        session = _open(self.path, self.providers_asked, self.cuda_options, self.threads, graph=True)
        binding = session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
        binding.bind_ortvalue_input(self.input, value)
        keep = [value]
        for name, ref in zip(self.outputs, reference):
            out = ort.OrtValue.ortvalue_from_shape_and_type(list(ref.shape), ref.dtype.type, self.device, 0)
            binding.bind_ortvalue_output(name, out)
            keep.append(out)
        return session, binding, keep


# ------------------------------------------------------------------ the sweep


def model_sweep(opts: SpeedOptions, sampler: GpuSampler | None = None) -> dict:
    import onnxruntime as ort
    from edge.contract import ContractError, read_contract
    from edge.tiers import VARIANTS, variant_of
    present = [v for v in VARIANTS if variant_of(opts.model, v).is_file()]
    if not present:  # the shipped ResNet50 is age_int8.onnx alone: `age.onnx` names its family
        raise SpeedError(f"model not found: {opts.model}")
    bad = [m for m in opts.modes if m not in MODES]
    if bad:
        raise SpeedError(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    own_sampler = sampler is None
    sampler = (sampler or GpuSampler()).start()
    report: dict = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                    "gpu": sampler.name, "onnxruntime": ort.__version__,
                    "available_providers": ort.get_available_providers(), "model": str(opts.model),
                    "point_seconds": opts.point_seconds, "sessions": [], "points": [], "skipped": []}
    print(f"onnxruntime {ort.__version__}; available providers: {ort.get_available_providers()}; "
          f"GPU: {sampler.name or 'none (' + str(sampler.reason) + ')'}", flush=True)
    gpu_wanted = any(p.lower() in ("cuda", "tensorrt") for p in opts.providers)
    settings: list[tuple[str, list[str], dict, bool]] = []  # label, providers, CUDA options, baseline?
    if gpu_wanted and "CUDAExecutionProvider" in ort.get_available_providers():
        for options in opts.cuda_options or [{}]:
            settings.append((_cuda_label(options), opts.providers, options, False))
    elif gpu_wanted:
        print("CUDA is not in this onnxruntime build: measuring the CPU only", flush=True)
    rng = np.random.default_rng(opts.seed)
    try:
        info = read_contract(_Variant(variant_of(opts.model, present[0]), ["cpu"], {}, opts.threads).session)
    except ContractError as exc:
        raise SpeedError(f"{opts.model} breaks the model contract: {exc}") from None
    except Exception as exc:  # ONNX Runtime's own exception types for a file that is not a model
        raise SpeedError(f"{opts.model} cannot be loaded: {_first_line(exc)}") from None
    on_gpu = bool(settings)
    variants = [v for v in (opts.variants or (["fp32", "fp16"] if on_gpu else present)) if v in present]
    if not variants and not opts.variants:  # a GPU with only int8 there (the shipped model): what it would serve
        variants = present
    if not variants:
        raise SpeedError(f"none of the variants {opts.variants} is beside {opts.model}")
    batches = opts.batches or list(GPU_BATCHES if on_gpu else CPU_BATCHES)
    cpu_batches = list(CPU_BATCHES) if opts.cpu_batches is None else opts.cpu_batches
    if on_gpu:
        if cpu_batches:  # the baseline: the CPU figure of the same variant and batch, same run, same machine
            settings.append(("cpu", ["cpu"], {}, True))
    else:
        settings.append(("cpu", ["cpu"], {}, False))
    if info.fixed_batch:
        batches, cpu_batches = [info.fixed_batch], [info.fixed_batch] if cpu_batches else []
        print(f"the model has a fixed batch of {info.fixed_batch}: only that batch is measured")
    crops = rng.integers(0, 256, (max(batches + cpu_batches), info.input_size, info.input_size, 3),
                         dtype=np.uint8).astype(np.float32)
    report.update(variants=variants, batches=batches, cpu_batches=cpu_batches if on_gpu else [],
                  input_size=info.input_size, fixed_batch=info.fixed_batch)

    for label, providers, cuda_options, baseline in settings:
        # the CPU baseline adds int8 when it ships: what a till without a GPU serves
        for variant in variants + (["int8"] if baseline and "int8" in present and "int8" not in variants else []):
            path = variant_of(opts.model, variant)
            try:
                model = _Variant(path, providers, cuda_options, opts.threads)
            except Exception as exc:
                _skip(report, label, variant, "*", None, f"session failed: {_first_line(exc)}")
                continue
            used = model.session.get_providers()
            report["sessions"].append({"setting": label, "variant": variant, "file": path.name, "providers": used})
            print(f"[{label}] {variant} {path.name}: session.get_providers() = {used}", flush=True)
            if label.startswith("cuda") and used[0] != "CUDAExecutionProvider":
                print(f"[{label}] {variant}: CUDA was asked for and does NOT serve this session: its figures are the "
                      f"CPU's", flush=True)
                report["cuda_fell_back"] = True
            modes = ["plain"] if baseline else opts.modes
            for batch in (cpu_batches if baseline else batches):
                x = np.ascontiguousarray(crops[:batch])
                _measure(report, sampler, model, label, variant, batch, x, modes, opts.point_seconds)
            del model
    sampler_summary = sampler.window()
    if own_sampler:
        sampler.stop()
    report["gpu_utilisation"] = sampler_summary
    _ratios(report)
    report["target"] = _target(report)
    print_speed(report)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "speed.json").write_text(json.dumps(report, indent=2))
    plot_speed(report, opts.out / "speed.png")
    print(f"wrote {opts.out / 'speed.json'} and {opts.out / 'speed.png'}", flush=True)
    return report


def _skip(report: dict, label: str, variant: str, batch, mode: str | None, reason: str) -> None:
    report["skipped"].append({"setting": label, "variant": variant, "batch": batch, "mode": mode, "reason": reason})
    where = " ".join(x for x in (variant, "" if batch == "*" else f"batch {batch}", mode or "") if x)
    print(f"[{label}] {where}: skipped, {reason}", flush=True)


def _measure(report: dict, sampler: GpuSampler, model: _Variant, label: str, variant: str, batch: int,
             x: np.ndarray, modes: list[str], seconds: float) -> None:
    try:
        plain = model.plain(x)
        reference = plain()
        plain()  # warm-up: the first call of a shape allocates (and on CUDA searches convolution algorithms)
    except Exception as exc:
        _skip(report, label, variant, batch, "plain", f"run failed: {_first_line(exc)}")
        return
    reference = [np.asarray(r) for r in reference]
    for mode in modes:
        keep = None
        try:
            if mode == "plain":
                call, sync, outputs = plain, None, None
            elif mode == "uint8":
                call = model.uint8(x)
                call()  # warm-up, as plain's
                sync, outputs = None, call
            elif mode in ("iobinding", "upload"):
                call, binding = model.bound(x, upload_each_call=mode == "upload")
                call()
                call()
                sync, outputs = binding.synchronize_outputs, lambda b=binding: b.copy_outputs_to_cpu()
            else:  # cudagraph
                if model.device != "cuda":
                    if not any(s["mode"] == "cudagraph" and s["setting"] == label for s in report["skipped"]):
                        _skip(report, label, variant, "*", mode, f"CUDA does not serve this session "
                              f"(providers {model.session.get_providers()})")
                    continue
                session, binding, keep = model.graph(x, reference)
                call = lambda s=session, b=binding: s.run_with_iobinding(b)  # noqa: E731
                for _ in range(3):  # ORT runs once, then captures the graph; later calls replay it
                    call()
                sync, outputs = binding.synchronize_outputs, lambda b=binding: b.copy_outputs_to_cpu()
            diff = 0.0
            if outputs is not None:
                got = outputs()
                diff = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))))
                           for g, r in zip(got, reference))
            since = time.monotonic()
            calls, elapsed = _timed(call, seconds, sync=sync)
            util = sampler.window(since, time.monotonic())
        except Exception as exc:
            _skip(report, label, variant, batch, mode, f"failed: {_first_line(exc)}")
            continue
        finally:
            del keep
        point = {"setting": label, "variant": variant, "mode": mode, "batch": batch,
                 "faces_per_s": round(calls * batch / elapsed, 1), "ms_per_call": round(1000 * elapsed / calls, 3),
                 "calls": calls, "max_abs_diff_vs_plain": diff,
                 "gpu_util_mean_pct": util.get("util_mean_pct"), "gpu_mem_max_mib": util.get("mem_max_mib")}
        report["points"].append(point)
        print(f"[{label}] {variant:<5} {mode:<9} batch {batch:>4}: {point['faces_per_s']:>10.1f} faces/s "
              f"({point['ms_per_call']:.2f} ms/call, {calls} calls"
              + (f", GPU {point['gpu_util_mean_pct']}%" if point["gpu_util_mean_pct"] is not None else "")
              + (f", max |diff| vs plain {diff:.2g}" if mode != "plain" else "") + ")", flush=True)


def _ratios(report: dict) -> None:
    """Each GPU point / the CPU's plain figure of the same variant at the same batch (else its best, marked *)."""
    cpu: dict[str, dict[int, float]] = {}
    for p in report["points"]:
        if p["setting"] == "cpu" and p["mode"] == "plain":
            cpu.setdefault(p["variant"], {})[p["batch"]] = p["faces_per_s"]
    for p in report["points"]:
        figures = cpu.get(p["variant"])
        if p["setting"] == "cpu" or not figures:
            continue
        if p["batch"] in figures:
            p["cpu_ratio"], p["cpu_ratio_to"] = round(p["faces_per_s"] / figures[p["batch"]], 1), f"cpu batch {p['batch']}"
        else:
            batch = max(figures, key=figures.get)
            p["cpu_ratio"], p["cpu_ratio_to"] = round(p["faces_per_s"] / figures[batch], 1), f"cpu best (batch {batch})*"


def _target(report: dict) -> dict:
    served = {(s["setting"], s["variant"]) for s in report["sessions"] if s["providers"][0] in GPU_PROVIDERS}
    gpu = [p for p in report["points"] if (p["setting"], p["variant"]) in served and p["batch"] >= TARGET_MIN_BATCH]
    best = max(gpu, key=lambda p: p["faces_per_s"], default=None)
    return {"faces_per_s": TARGET_FACES_PER_S, "min_batch": TARGET_MIN_BATCH,
            "best": None if best is None else {k: best[k] for k in ("setting", "variant", "mode", "batch", "faces_per_s")},
            "met": None if best is None else best["faces_per_s"] >= TARGET_FACES_PER_S}


def _rows(report: dict) -> dict:
    rows: dict[tuple, dict[int, dict]] = {}
    for p in report["points"]:
        rows.setdefault((p["setting"], p["variant"], p["mode"]), {})[p["batch"]] = p
    return rows


def print_speed(report: dict) -> None:
    rows = _rows(report)
    batches = sorted({p["batch"] for p in report["points"]})
    ratios = any("cpu_ratio" in p for p in report["points"])
    print("\nage model alone, faces/s" + (" (x: ratio to the CPU, same variant and batch; * to its best batch)"
                                         if ratios else "") + ":")
    width = 18
    print(f"{'setting':<36}{'variant':<8}{'mode':<10}" + "".join(f"{'batch ' + str(b):>{width}}" for b in batches))
    for (label, variant, mode), cells in rows.items():
        text = []
        for b in batches:
            p = cells.get(b)
            if p is None:
                text.append("-")
            elif "cpu_ratio" in p:
                text.append(f"{p['faces_per_s']:.0f} ({p['cpu_ratio']:g}x{'*' if p['cpu_ratio_to'].endswith('*') else ''})")
            else:
                text.append(f"{p['faces_per_s']:.1f}")
        print(f"{label[:35]:<36}{variant:<8}{mode:<10}" + "".join(f"{t:>{width}}" for t in text))
    for s in report["skipped"]:
        if s["batch"] == "*":
            print(f"skipped: [{s['setting']}] {s['variant']} {s['mode'] or ''}: {s['reason']}")
    skipped_points = [s for s in report["skipped"] if s["batch"] != "*"]
    if skipped_points:
        print(f"skipped points: {len(skipped_points)} (see speed.json), first: {skipped_points[0]['reason']}")
    if report.get("cuda_fell_back"):
        print("WARNING: CUDA was asked for and did not serve (session.get_providers() above): the 'cuda' rows ran on "
              "the CPU")
    target = report["target"]
    if target["best"] is not None:
        best = target["best"]
        print(f"target {target['faces_per_s']} faces/s at batch >= {target['min_batch']}: "
              f"{'MET' if target['met'] else 'NOT MET'}, best {best['faces_per_s']:.0f} "
              f"({best['setting']}, {best['variant']}, {best['mode']}, batch {best['batch']})")
    util = report.get("gpu_utilisation", {})
    if util.get("available"):
        print(f"GPU utilisation over the sweep: mean {util.get('util_mean_pct')}%, max {util.get('util_max_pct')}%, "
              f"memory up to {util.get('mem_max_mib')} MiB")
    else:
        print(f"GPU utilisation: not sampled ({util.get('reason')})")


def plot_speed(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _rows(report)
    util = any(p.get("gpu_util_mean_pct") is not None for p in report["points"])
    fig, axes = plt.subplots(1, 2 if util else 1, figsize=(13 if util else 8, 5), squeeze=False)
    left = axes[0][0]
    markers = {"plain": "o", "uint8": "v", "iobinding": "s", "upload": "^", "cudagraph": "D"}
    # one colour per setting and variant, the mode by marker and line (a sweep has up to 12 lines: tab10 repeats)
    palette = plt.get_cmap("tab20").colors
    colours = {key: palette[i % len(palette)] for i, key in enumerate(dict.fromkeys((l, v) for l, v, _ in rows))}

    def line(label: str, mode: str) -> str:
        return ":" if label == "cpu" else "--" if mode in ("plain", "uint8") else "-"

    for (label, variant, mode), cells in rows.items():
        b = sorted(cells)
        left.plot(b, [cells[k]["faces_per_s"] for k in b], marker=markers.get(mode, "o"), color=colours[label, variant],
                  linestyle=line(label, mode), label=f"{label} {variant} {mode}")
    if any(s["providers"][0] in GPU_PROVIDERS for s in report["sessions"]):
        left.axhline(TARGET_FACES_PER_S, color="#cc3311", linewidth=1, linestyle=":",
                     label=f"{TARGET_FACES_PER_S} faces/s target (batch >= {TARGET_MIN_BATCH})")
    batches = sorted({p["batch"] for p in report["points"]})
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    left.yaxis.set_major_formatter(plain)
    values = [p["faces_per_s"] for p in report["points"] if p.get("faces_per_s")]
    if values and max(values) < 10 * min(values):  # within a decade the minor ticks are the only labels; beyond, clutter
        left.yaxis.set_minor_formatter(plain)
    else:
        left.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    left.set_xlabel("batch (faces per call)")
    left.set_ylabel("faces per second")
    left.set_title(f"age model alone: {Path(report['model']).name}, onnxruntime {report['onnxruntime']}\n"
                   f"{report['gpu'] or report['machine']}", fontsize=9)
    left.legend(fontsize=7)
    left.grid(True, which="both", alpha=0.3)
    if util:
        right = axes[0][1]
        for (label, variant, mode), cells in rows.items():
            b = [k for k in sorted(cells) if cells[k].get("gpu_util_mean_pct") is not None]
            if b and label != "cpu":
                right.plot(b, [cells[k]["gpu_util_mean_pct"] for k in b], marker=markers.get(mode, "o"),
                           color=colours[label, variant], linestyle=line(label, mode), label=f"{label} {variant} {mode}")
        right.set_xscale("log", base=2)
        right.set_xticks(batches, [str(b) for b in batches])
        right.set_ylim(0, 105)
        right.set_xlabel("batch (faces per call)")
        right.set_ylabel("GPU utilisation, NVML (%)")
        right.legend(fontsize=7)
        right.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
