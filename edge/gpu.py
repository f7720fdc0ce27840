"""How busy the GPU is, from NVML (the `nvidia-ml-py` package, module `pynvml`): the benchmarks' and
training's witness that the GPU, not its feeding, is the limit. Without NVML or a GPU nothing fails:
`available` is False and `reason` says why."""

from __future__ import annotations

import os
import threading
import time

import numpy as np


class GpuSampler:
    """GPU utilisation, memory, power and SM clock every `interval` s in a thread, through NVML.

    Without pynvml or a driver, `available` is False and `reason` says why: never an error."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[float, float, float, float, float]] = []  # t, util %, mem MiB, power W, SM MHz
        self.available, self.reason, self.name = False, None, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else name
            self._nvml = pynvml
            self.available = True
        except ImportError:
            self.reason = "pynvml not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, no such GPU...
            self.reason = f"NVML unavailable: {(str(exc).splitlines() or [type(exc).__name__])[0]}"

    def _sample(self) -> None:
        nvml, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(h).gpu
                mem = nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                try:
                    power = nvml.nvmlDeviceGetPowerUsage(h) / 1000
                except Exception:
                    power = float("nan")
                try:
                    clock = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)
                except Exception:
                    clock = float("nan")
                self.samples.append((time.monotonic(), float(util), mem, power, float(clock)))
            except Exception as exc:
                self.reason = f"NVML stopped answering: {exc}"
                return
            self._stop.wait(self.interval)

    def start(self) -> "GpuSampler":
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self, since: float | None = None, until: float | None = None) -> dict:
        """Utilisation (mean, p50, max %), memory used (max MiB), power (mean W), SM clock (max MHz) between two
        `time.monotonic()` marks; {"available": False, "reason": ...} without NVML."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        rows = [s for s in list(self.samples) if (since is None or s[0] >= since) and (until is None or s[0] <= until)]
        if not rows:
            return {"available": True, "gpu": self.name, "samples": 0}
        data = np.array([r[1:] for r in rows], np.float64)
        return {"available": True, "gpu": self.name, "samples": len(rows),
                "util_mean_pct": round(float(data[:, 0].mean()), 1),
                "util_p50_pct": round(float(np.median(data[:, 0])), 1),
                "util_max_pct": round(float(data[:, 0].max()), 1),
                "mem_max_mib": round(float(data[:, 1].max()), 0),
                "power_mean_w": None if np.isnan(data[:, 2]).all() else round(float(np.nanmean(data[:, 2])), 1),
                "sm_clock_max_mhz": None if np.isnan(data[:, 3]).all() else round(float(np.nanmax(data[:, 3])), 0)}
