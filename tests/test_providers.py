"""A configured GPU provider that does not serve: one line at start, the status topic, and no quiet CPU
without "cpu" in models.providers (README, "CPU or GPU").

The installed ONNX Runtime decides which case is real here: the CPU build (onnxruntime) has no CUDA at all;
onnxruntime-gpu without the CUDA libraries (or without a visible GPU) has CUDA that does not load. A venv holds
one build only, so the onnxruntime-gpu case runs the CLI from `make test`'s second venv, .venv-gpu (onnxruntime-gpu,
no CUDA libraries), where this one has the CPU build."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edge.infer import AgeModel
from edge.runtime import CPU, installed_build, provider_reasons, resolve_providers
from test_cli import one_line_error
from tskit import REPO, run_error, tillsight, write_config

CPU_BUILD = "CUDAExecutionProvider" not in ort.get_available_providers()
cpu_build = pytest.mark.skipif(not CPU_BUILD, reason="onnxruntime-gpu is installed")


@pytest.fixture(scope="session")
def gpu_build_python() -> str:
    """A Python whose environment has onnxruntime-gpu: this one where it has, else .venv-gpu (`make test` builds it
    and names it in TILLSIGHT_GPU_BUILD_PYTHON). Absent: a skip by hand, a failure under `make test` or on CI."""
    if not CPU_BUILD:
        return sys.executable
    named = os.environ.get("TILLSIGHT_GPU_BUILD_PYTHON")
    python = Path(named or REPO / ".venv-gpu" / "bin" / "python")
    if not python.is_file():
        why = f"{python} absent: `make test` builds .venv-gpu (tillsight with onnxruntime-gpu) for this test"
        if named or os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(why)
        pytest.skip(why)
    probe = subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and "CUDAExecutionProvider" in probe.stdout, \
        f"{python} has no onnxruntime-gpu: {probe.stdout.strip()} {probe.stderr.strip()[-500:]}"
    return str(python)


def test_cpu_is_used_only_when_configured_and_always_last():
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    assert resolve_providers(["cpu", "cuda"]) == [p for p in gpu if p != "TensorrtExecutionProvider"] + [CPU]
    assert resolve_providers(["cuda"]) == [p for p in gpu if p == "CUDAExecutionProvider"]


@cpu_build
def test_the_cpu_build_is_the_reason_and_no_problem(age_models):
    assert provider_reasons(["CUDAExecutionProvider"]) == (f"cuda not in this build: {installed_build()} is the "
                                                           "CPU build (onnxruntime-gpu has CUDA: README, 'CPU or GPU')")
    model = AgeModel(age_models[40], ["cuda", "cpu"])
    assert model.providers[0] == CPU and not model.fallback.problem
    assert model.fallback.text == provider_reasons(["CUDAExecutionProvider"]) + "; running on the CPU"
    assert AgeModel(age_models[40], ["cpu"]).fallback is None


@cpu_build
def test_a_cpu_till_with_the_default_providers_says_nothing_on_stderr(tmp_path, age_models):
    image = tmp_path / "till.png"
    cv2.imwrite(str(image), np.zeros((120, 160, 3), np.uint8))
    result = tillsight("predict", str(image), "--age-model", str(age_models[40]))
    assert result.returncode == 0 and result.stderr == ""


@cpu_build
@pytest.mark.parametrize("command", ["run", "replay", "predict"])
def test_without_cpu_in_the_providers_every_command_refuses_in_one_line(tmp_path, age_models, carphone_clip,
                                                                        command):
    config = write_config(tmp_path / "cuda-only.toml", store_id="s", cameras=[{"id": "c", "source": 0}],
                          models={"age_model": str(age_models[40]), "providers": ["cuda"]})
    args = {"run": [], "replay": [str(carphone_clip)], "predict": [str(carphone_clip)]}[command]
    result = tillsight(command, *args, "--config", str(config))
    expected = f"{provider_reasons(['CUDAExecutionProvider'])}; models.providers has no \"cpu\" to fall back on"
    if command == "run":  # its last words are a JSON log line (the journal's log pipeline reads them)
        assert run_error(result, 1)["msg"] == expected and len(result.stderr.strip().splitlines()) == 1
    else:
        assert one_line_error(result) == f"tillsight: error: {expected}"
    assert result.stdout == ""


def test_the_benchmark_serves_the_cpus_variant_when_cuda_does_not_load(tmp_path, gpu_build_python):
    """Before, a GPU build sufficed for the bench to name fp16 (explicitly, so not swapped back): the slowest variant
    of all ran on the CPU. Where CUDA really serves, fp16 is right; the GPU is hidden here so it cannot."""
    for name in ("age.onnx", "age_fp16.onnx", "age_int8.onnx"):
        (tmp_path / name).write_bytes(b"")  # the choice reads which files are there
    probe = subprocess.run([gpu_build_python, "-c", "import sys; from pathlib import Path; from edge.bench import "
                            "served_variant; print(served_variant(Path(sys.argv[1])))", str(tmp_path / "age.onnx")],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert (probe.returncode, probe.stdout.strip()) == (0, "int8"), probe.stderr[-1000:]


def test_cuda_that_does_not_load_is_one_warning_and_the_status_says_degraded(
        tmp_path, broker, subscriber, age_models, carphone_clip, gpu_build_python):
    # Where the CUDA libraries and a GPU are there, hiding the GPU keeps CUDA from starting.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    config = write_config(tmp_path / "gpu.toml", store_id="store-1", daemon_id="till-pc",
                          cameras=[{"id": "unused", "source": 0}], mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": str(age_models[40])}, logging={"level": "info"})
    result = tillsight("replay", str(carphone_clip), "--config", str(config), "--fps", "5", env=env,
                       python=gpu_build_python)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    fallback = summary["provider_fallback"]
    assert summary["provider"] == CPU and fallback.startswith("cuda not loaded: ") and "README" in fallback
    said = [json.loads(line) for line in result.stderr.splitlines() if "cuda not loaded" in line]
    assert [(line["level"], line["msg"]) for line in said] == [("warning", fallback)]  # ONNX Runtime's own log: none
    assert subscriber.wait_for(lambda s: s.json("till-pc/status"))
    status = subscriber.json("till-pc/status")[0]
    assert status["state"] == "degraded" and status["problems"] == [fallback] == [status["provider_fallback"]]
    cuda_only = write_config(tmp_path / "cuda-only.toml", store_id="s", cameras=[{"id": "c", "source": 0}],
                             models={"age_model": str(age_models[40]), "providers": ["cuda"]})
    refused = run_error(tillsight("run", "--config", str(cuda_only), env=env, python=gpu_build_python), 1)["msg"]
    assert refused.startswith("cuda not loaded: ") and refused.endswith('no "cpu" to fall back on')


@cpu_build
def test_the_detector_can_have_providers_of_its_own(tmp_path, age_models):
    """On a store server the detector can run on the cores and leave the GPU to the age model (on the H100, one
    CUDA detector session shared by 16 camera threads served half the frames 16 CPU sessions did: issue 10)."""
    from edge.config import parse_config
    from edge.errors import ModelError
    from edge.service import Service

    def service(**models):
        return Service(parse_config({"store_id": "s", "cameras": [{"id": "a", "source": 0}],
                                     "mqtt": {"host": "localhost"},
                                     "models": {"age_model": str(age_models[40]), **models}}), replay=True)

    own = service(providers=["cuda", "cpu"], detector_providers=["cpu"])
    assert own.detector.fallback is None and own.age_model.fallback is not None  # asked cuda: the CPU build says why
    assert own.status()["detector_provider"] == own.status()["provider"] == CPU
    shared = service(providers=["cuda", "cpu"])  # by default the detector's are the age model's
    assert shared.detector.fallback is not None and shared.detector.fallback.text == shared.age_model.fallback.text
    with pytest.raises(ModelError, match=r'^cuda not in this build: .*; models.detector_providers has no "cpu" to '
                                         r'fall back on$'):
        service(providers=["cpu"], detector_providers=["cuda"])
