"""How busy the GPU was over a stretch of training, from NVML (the `nvidia-ml-py` package, whose
module is `pynvml`): a GPU that idles between steps means the input pipeline starves it.
Absent NVML or GPU, every figure is None and nothing fails."""

from __future__ import annotations

import threading


class GpuUse:
    """Mean utilisation (%) of GPU 0 between start() and stop(), sampled every `every_s`."""

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nvml = pynvml
        except Exception:  # no package, no driver or no GPU: nothing to measure
            self.handle = None
        self.samples: list[int] = []
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.handle is None:
            return
        self.samples, self.stopping = [], threading.Event()
        self.thread = threading.Thread(target=self._sample, name="gpu-use", daemon=True)
        self.thread.start()

    def stop(self) -> float | None:
        if self.thread is None:
            return None
        self.stopping.set()
        self.thread.join()
        self.thread = None
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None

    def _sample(self) -> None:
        while not self.stopping.wait(self.every_s):
            try:
                self.samples.append(int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            except Exception:
                return
