#!/usr/bin/env python3
"""The device side of the CUDA benchmark (scripts/device/CUDA-BENCH.md): one command per call,

    python3 scripts/device/cuda_device.py [VERB] [-- extra tillsight bench arguments]

run in the repo root on the GPU machine (Python 3.12, PyTorch's CUDA 13 wheels, no internet). Every call
first does what the carried folders allow, each step once per machine (markers under /tmp/ts-cuda):

    stash     the ORT-GPU parts of every carried .device/cudaK/ are copied to /tmp/ts-cuda/parts (sha256
              checked against the manifest); a part missing from an earlier call means the machine went
              back in between: it says so and which calls to make again
    setup     (the call carrying .device/cuda1) the wheels into /tmp/site, mosquitto into /tmp/mosquitto,
              the shipped ResNet50 (edge/models/age_int8.onnx, in the tree) made into fp32 and fp16 files
              in /tmp/tsmodels (scripts/device/bench_models.py; fp16 converted with the machine's
              onnxruntime, before it is removed), a smoke test of them; facts about the machine into
              $OUT/probe.txt
    assemble  (once every part is there) the parts joined, checked, unpacked into /tmp/site; the machine's
              CPU onnxruntime uninstalled (tillsight refuses to run with both builds); the CUDA provider's
              libraries resolved (ldd) and a session's get_providers() printed

then VERB:

    (none)    nothing more
    speed     tillsight bench --model-only on CUDA with a CPU baseline, then a short sweep of CUDA provider
              options; $OUT/speed/, $OUT/speed-options/ and logs
    e2e       tillsight bench --skip-model-speed: one camera flat out, then 1-32 simulated cameras at 10 fps
              (batch sizes the batcher formed, GPU utilisation, the daemon's cores), then 24 and 32 cameras
              shared by two daemons, then in one daemon with the detector on the CPU, then 24 cameras in
              one daemon under py-spy --gil (what holds its interpreter lock); $OUT/e2e/, $OUT/e2e-2daemons/,
              $OUT/e2e-cpudetector/ and logs (the profile's summary ends e2e-2daemons.log)
    recheck   the daemon's CUDA options and warm-up (after the first run): scripts/device/cuda_agree.py (CUDA
              against the CPU, in years), a model-only sweep of the options, end to end at 1-32 cameras;
              $OUT/agree.json, $OUT/speed2/, $OUT/e2e2/ and logs
    tail      where the frame->alert p99 goes (session 23, H200: 27.7 ms at 8 cameras a daemon, 243 at 16, 61-133
              at 32 in four daemons): this disk's fsync cost (benchmarks/outbox.py), then one daemon at 8 and 16
              cameras, 32 in four daemons, 30 s a count, each row with its stage line (`total`, `MQTT ack`), the
              daemons' stalls and its slowest alerts; $OUT/tail-1daemon/, $OUT/tail-4daemons/ and tail.log
    env       print the environment the benchmarks run with (to paste into a shell)

Arguments after `--` are added to the tillsight bench command line of the verb.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from pack_cuda_bench import sha256  # noqa: E402  the same check on both machines
ROOT = Path(os.environ.get("TS_DEVICE_ROOT", "/tmp"))  # another root for a rehearsal on a shared machine
WORK = ROOT / "ts-cuda"
PARTS = WORK / "parts"
SITE = ROOT / "site"
MOSQUITTO = ROOT / "mosquitto"
MODELS = ROOT / "tsmodels"
MODEL = MODELS / "bench-resnet50" / "onnx" / "age.onnx"
SHIPPED = REPO / "edge" / "models" / "age_int8.onnx"
OUT = Path(os.environ.get("OUT") or WORK / "out")
NEEDED = ("libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libcudnn.so.9")

SPEED = ["--model-only", "--providers", "cuda,cpu", "--variants", "fp32,fp16", "--batches", "1,8,32,64,128,256",
         "--cpu-batches", "1,8,32", "--modes", "plain,iobinding,cudagraph", "--point-seconds", "1"]
SPEED_OPTIONS = ["--model-only", "--providers", "cuda,cpu", "--variants", "fp16", "--batches", "8,64,256",
                 "--cpu-batches", "none", "--modes", "iobinding", "--point-seconds", "1",
                 "--cuda-options", "default", "--cuda-options", "cudnn_conv_algo_search=HEURISTIC",
                 "--cuda-options", "prefer_nhwc=1"]
# what a store server gets, as only age_int8.onnx ships (the 30 MB budget: issue 7): `auto` serves it on CUDA
# too; its int8 weights are folded into fp32 ones at load (edge/runtime.py), so this should match fp32
SPEED_INT8 = ["--model-only", "--providers", "cuda,cpu", "--variants", "int8", "--batches", "8,64,256",
              "--cpu-batches", "none", "--modes", "plain,iobinding", "--point-seconds", "1"]
# the recheck after the first run (2026-11-26): the daemon's sessions now take heuristic cuDNN choices and
# channels-last convolutions ([models.cuda]) and warm every batch size up at start; does CUDA still answer
# what the CPU does, which options are fastest, and does the daemon now keep up end to end?
SPEED_RECHECK = ["--model-only", "--providers", "cuda,cpu", "--variants", "fp16,fp32,int8", "--batches", "8,64,256",
                 "--cpu-batches", "none", "--modes", "plain,iobinding", "--point-seconds", "1",
                 "--cuda-options", "cudnn_conv_algo_search=HEURISTIC",
                 "--cuda-options", "cudnn_conv_algo_search=HEURISTIC,prefer_nhwc=1"]
E2E_RECHECK = ["--skip-model-speed", "--cameras", "1,4,16,32", "--fps", "10", "--seconds", "10"]
# 2026-11-26 evening, after the per-size sessions: one daemon kept up with 16 cameras, not with 24 or 32, the GPU a
# quarter busy; the whole curve again, then the cameras of 24 and 32 shared by two daemons (is the process the limit?)
E2E = ["--skip-model-speed", "--cameras", "1,8,16,24,32", "--fps", "10", "--seconds", "10"]
E2E_TWO_DAEMONS = ["--skip-model-speed", "--cameras", "24,32", "--daemons", "2", "--fps", "10", "--seconds", "10"]
# and one daemon with the detector on the CPU ([models] detector_providers): 16 camera threads on one CUDA detector
# session served 601 frames/s, 16 CPU sessions 1,177 (scripts/device/cuda_contention.py)
E2E_CPU_DETECTOR = ["--skip-model-speed", "--cameras", "24,32", "--fps", "10", "--seconds", "10",
                    "--set", 'models.detector_providers=["cpu"]']
# then what holds the one daemon's interpreter lock at 24 cameras, where it fell behind (py-spy --gil, a static
# binary carried among the wheels; scripts/device/gil_summary.py): is it the tracking, the detector's Python, MQTT?
GIL_PROFILE = ["--skip-model-speed", "--cameras", "24", "--fps", "10", "--seconds", "20"]
GIL_RATE = 100
# Session 23 (H200): 8 cameras a daemon, spread, met the 30 ms p99 (27.7); 8 in step did not (120.6); 16 in one daemon
# had a stall (p99 242.7, every stage's p99 and the MQTT ack's with it); 32 in four daemons 61-133 ms with every
# daemon's own `total` p99 at most 30 ms. Since then the bench counts only its measuring window (no start, no stop),
# prints the daemons' garbage collections and the slowest alerts with when and which camera,
# and the outbox commits in groups (a slow disk's fsync had every camera wait in line): first this disk's fsync
# cost (the outbox's own benchmark, in the folder the bench's daemons write to), then the same layouts again.
DISK = ["benchmarks/outbox.py", "--messages", "500"]
TAIL = ["--skip-model-speed", "--cameras", "8,16", "--fps", "10", "--seconds", "30"]
TAIL_FOUR_DAEMONS = ["--skip-model-speed", "--cameras", "32", "--daemons", "4", "--fps", "10", "--seconds", "30"]


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def manifest() -> dict | None:
    for path in sorted(REPO.glob(".device/cuda*/manifest.json")) + [WORK / "manifest.json"]:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def nvidia_lib_dirs() -> list[str]:
    """Folders of the machine's nvidia-* wheels (PyTorch's CUDA 13 libraries) that hold shared libraries."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    dirs = set()
    for root in roots:
        for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(lib))
    # the driver's libcuda.so.1, where the image mounts it (torch finds it through the loader's cache)
    return sorted(dirs) + [d for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib") if os.path.isdir(d)]


def environment() -> dict:
    env = dict(os.environ)
    libs = nvidia_lib_dirs()
    env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    env["PYTHONPATH"] = ":".join([str(SITE), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(":") if p])
    env["PATH"] = f"{MOSQUITTO}/bin:{env.get('PATH', '')}"
    env["TILLSIGHT_MODEL_DIR"] = str(MODELS)
    env["PYTHONUNBUFFERED"] = "1"
    env["ORT_DISABLE_TELEMETRY"] = "1"
    return env


def run(cmd: list[str], log: Path | None = None, env: dict | None = None, check: bool = True) -> int:
    say("$ " + " ".join(cmd))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or environment(),
                          cwd=REPO) as proc:
        sink = open(log, "a") if log else None
        for line in proc.stdout:
            sys.stdout.write(line)
            if sink:
                sink.write(line)
        if sink:
            sink.close()
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.returncode


# ------------------------------------------------------------------ steps


def stash(info: dict) -> list[int]:
    """Copy the carried parts to /tmp; returns the part numbers still missing."""
    PARTS.mkdir(parents=True, exist_ok=True)
    (WORK / "manifest.json").write_text(json.dumps(info))
    for part in info["parts"]:
        carried = REPO / ".device" / f"cuda{part['call']}" / part["name"]
        kept = PARTS / part["name"]
        if carried.is_file() and not (kept.is_file() and kept.stat().st_size == part["bytes"]):
            if sha256(carried) != part["sha256"]:
                raise SystemExit(f"{carried}: sha256 differs from the manifest (a damaged transfer? call again)")
            shutil.copyfile(carried, kept)
            say(f"part {part['call']}/{info['calls']} stashed ({part['bytes'] / 2**20:.1f} MiB)")
    return [p["call"] for p in info["parts"] if not (PARTS / p["name"]).is_file()]


def setup() -> None:
    done = WORK / "setup.done"
    first = REPO / ".device" / "cuda1"
    if done.is_file() or not first.is_dir():
        return
    OUT.mkdir(parents=True, exist_ok=True)
    probe = OUT / "probe.txt"
    with open(probe, "w") as f:
        for cmd in (["nvidia-smi", "-L"], ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                           "--format=csv"], ["ldd", "--version"], [sys.executable, "--version"],
                    [sys.executable, "-m", "pip", "list", "--format=freeze"]):
            try:
                done_cmd = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                lines = (done_cmd.stdout + done_cmd.stderr).splitlines()
            except (OSError, subprocess.TimeoutExpired) as exc:
                lines = [f"({exc})"]
            if cmd[-1] == "--format=freeze":
                lines = [l for l in lines if l.lower().split("==")[0] in (
                    "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "opencv-python-headless", "nvidia-ml-py",
                    "prometheus-client", "protobuf", "flatbuffers", "packaging", "matplotlib", "torch",
                    "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-curand")]
            f.write(f"$ {' '.join(cmd)}\n" + "\n".join(lines[:3] if cmd[-1] == "--version" else lines) + "\n")
        f.write("nvidia lib dirs:\n" + "\n".join(nvidia_lib_dirs()) + "\n")
    print(probe.read_text(), flush=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--upgrade", "--target", str(SITE)] + sorted(str(w) for w in (first / "whl").glob("*.whl")), env=dict(os.environ))
    with tarfile.open(first / "mosquitto.tar.xz") as tar:
        tar.extractall(MOSQUITTO.parent, filter="tar")
    version = subprocess.run([str(MOSQUITTO / "bin" / "mosquitto"), "-h"], capture_output=True, text=True)
    say("mosquitto: " + ((version.stdout + version.stderr).strip().splitlines() or ["did not run"])[0])
    # the models, made while the machine's own onnxruntime (CPU) is still there for the fp16 conversion
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "scripts/device/bench_models.py", "shipped", str(SHIPPED), "--out", str(MODEL.parent)],
        env=plain)
    run([sys.executable, "scripts/device/bench_models.py", "smoke", str(MODEL.parent),
         "--faces", str(first / "media" / "two_people.jpg")], env={**plain, "PYTHONPATH": str(REPO)})
    done.write_text("ok")


def assemble(info: dict) -> None:
    if (SITE / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so").is_file() and (WORK / "assembled").is_file():
        return
    archive = WORK / info["archive"]
    say(f"joining {len(info['parts'])} parts")
    digest = hashlib.sha256()
    with open(archive, "wb") as out:
        for part in info["parts"]:
            data = (PARTS / part["name"]).read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != info["archive_sha256"]:
        raise SystemExit("the joined archive's sha256 differs from the manifest: call again with the parts")
    SITE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if shutil.which("xz"):
        subprocess.run(f"xz -T0 -dc {archive} | tar -x -C {SITE}", shell=True, check=True)
    else:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(SITE, filter="tar")
    say(f"unpacked into {SITE} in {time.monotonic() - started:.1f} s")
    bad = [n for n, h in info["members_sha256"].items() if not (SITE / n).is_file()]
    if bad:
        raise SystemExit(f"{len(bad)} files missing after unpacking, first {bad[0]}")
    archive.unlink()
    # tillsight refuses to start with both onnxruntime builds installed (edge/runtime.check_single_onnxruntime)
    cpu = subprocess.run([sys.executable, "-m", "pip", "show", "onnxruntime"], capture_output=True, text=True)
    if cpu.returncode == 0:
        gone = subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "onnxruntime"],
                              capture_output=True, text=True)
        if gone.returncode != 0:  # a read-only environment: hide its metadata instead
            for dist in glob.glob(os.path.join(site.getsitepackages()[0], "onnxruntime-*.dist-info")):
                os.rename(dist, dist + ".hidden")
        say("the machine's CPU onnxruntime removed (tillsight runs with exactly one build)")
    (WORK / "assembled").write_text("ok")


def preflight() -> bool:
    """The CUDA provider's libraries (ldd) and a session's providers; True when CUDA serves it."""
    env = environment()
    provider = SITE / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    ldd = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, env=env).stdout
    missing = [l.split()[0] for l in ldd.splitlines() if "not found" in l]
    found = {n: next((l.split("=>")[1].split()[0] for l in ldd.splitlines()
                      if l.strip().startswith(n) and "not found" not in l), None) for n in NEEDED[:4] + ("libcuda.so.1",)}
    say(f"CUDA provider libraries: {found}" + (f"; NOT FOUND: {missing}" if missing else ""))
    code = ("import onnxruntime as ort, importlib.metadata as m, sys; "
            "print('onnxruntime', ort.__version__, ort.__file__); "
            "print('builds installed:', [d for d in ('onnxruntime', 'onnxruntime-gpu') if "
            "any(x.metadata['Name'] == d for x in m.distributions())]); "
            "print('available providers:', ort.get_available_providers()); "
            f"s = ort.InferenceSession('{MODEL.with_name('age_fp16.onnx')}', "
            "providers=['CUDAExecutionProvider', 'CPUExecutionProvider']); "
            "print('session.get_providers():', s.get_providers()); "
            "import numpy as np; i = s.get_inputs()[0]; "
            "print('one run, batch 2:', s.run(None, {i.name: np.zeros([2] + i.shape[1:], np.float32)})[0].ravel()); "
            "sys.exit(0 if s.get_providers()[0] == 'CUDAExecutionProvider' else 3)")
    return run([sys.executable, "-c", code], env=env, check=False) == 0


def bench(verb: str, extra: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tool = [sys.executable, "-m", "edge", "bench"]
    if verb == "speed":
        run(tool + SPEED + ["--model", str(MODEL), "--out", str(OUT / "speed")] + extra, log=OUT / "speed.log",
            check=False)
        if os.environ.get("TS_SPEED_OPTIONS", "1") != "0":  # TS_SPEED_OPTIONS=0: skip it when time is short
            run(tool + SPEED_OPTIONS + ["--model", str(MODEL), "--out", str(OUT / "speed-options")] + extra,
                log=OUT / "speed-options.log", check=False)
        if os.environ.get("TS_SPEED_INT8", "1") != "0":  # about 20 s; its log joins the options' ($OUT: 8 files)
            run(tool + SPEED_INT8 + ["--model", str(MODEL), "--out", str(OUT / "speed-int8")] + extra,
                log=OUT / "speed-options.log", check=False)
        return
    video = REPO / ".device" / "cuda1" / "media" / "short_hamilton_clip.mp4"
    if not video.is_file():
        video = WORK / "media" / "short_hamilton_clip.mp4"
    if verb == "recheck":  # $OUT: 8 files, its limit
        run([sys.executable, "scripts/device/cuda_agree.py", str(MODEL.parent), "--faces", str(video),
             "--out", str(OUT / "agree.json")], log=OUT / "agree.log", check=False)
        run(tool + SPEED_RECHECK + ["--model", str(MODEL), "--out", str(OUT / "speed2")] + extra,
            log=OUT / "speed2.log", check=False)
        run(tool + E2E_RECHECK + ["--model", str(MODEL), "--video", str(video), "--out", str(OUT / "e2e2")] + extra,
            log=OUT / "e2e2.log", check=False)
    elif verb == "tail":  # $OUT: 5 files
        run([sys.executable] + DISK, log=OUT / "tail.log", check=False)
        for name, args in (("tail-1daemon", TAIL), ("tail-4daemons", TAIL_FOUR_DAEMONS)):
            run(tool + args + ["--model", str(MODEL), "--video", str(video), "--out", str(OUT / name)] + extra,
                log=OUT / "tail.log", check=False)
    elif verb == "e2e":
        run(tool + E2E + ["--model", str(MODEL), "--video", str(video), "--out", str(OUT / "e2e")] + extra,
            log=OUT / "e2e.log", check=False)
        run(tool + E2E_TWO_DAEMONS + ["--model", str(MODEL), "--video", str(video), "--out", str(OUT / "e2e-2daemons")]
            + extra, log=OUT / "e2e-2daemons.log", check=False)
        run(tool + E2E_CPU_DETECTOR + ["--model", str(MODEL), "--video", str(video), "--out",
                                       str(OUT / "e2e-cpudetector")] + extra, log=OUT / "e2e-2daemons.log",
            check=False)  # its log joins the last one's ($OUT: 8 files)
        gil_profile(tool + GIL_PROFILE + ["--model", str(MODEL), "--video", str(video)] + extra,
                    log=OUT / "e2e-2daemons.log")  # and so does the profile's summary


def gil_profile(bench_cmd: list[str], log: Path) -> None:
    """The bench under py-spy --gil (its daemons are the bench's children), summarised into `log`."""
    spy = SITE / "bin" / "py-spy"
    if not spy.is_file():
        say(f"no {spy}: the GIL profile is skipped (pack again: py-spy is among the wheels)")
        return
    raw, out = WORK / "gil-raw.txt", WORK / "gil-bench"
    run([str(spy), "record", "--gil", "--subprocesses", "--nonblocking", "--rate", str(GIL_RATE), "--format", "raw",
         "--output", str(raw), "--"] + bench_cmd + ["--out", str(out)], log=log, check=False)
    try:
        frames = sum(row.get("frames", 0) for row in json.loads((out / "bench.json").read_text())["cameras"])
    except (OSError, ValueError, KeyError, TypeError):
        frames = 0
    run([sys.executable, "scripts/device/gil_summary.py", str(raw), "--rate", str(GIL_RATE)]
        + (["--frames", str(frames)] if frames else []), log=log, check=False)


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    verb = argv[0] if argv else ""
    if verb not in ("", "speed", "e2e", "recheck", "tail", "env"):
        raise SystemExit(f"unknown verb {verb!r}: speed, e2e, recheck, tail, env or none")
    if verb == "env":
        env = environment()
        for key in ("LD_LIBRARY_PATH", "PYTHONPATH", "PATH", "TILLSIGHT_MODEL_DIR"):
            print(f"export {key}={env[key]}")
        return 0
    info = manifest()
    if info is None:
        raise SystemExit("no .device/cuda*/manifest.json carried and none stashed: run "
                         "scripts/device/pack_cuda_bench.py here and carry .device/cuda1 first")
    missing = stash(info)
    setup()
    if not (WORK / "setup.done").is_file():
        raise SystemExit(f"setup has not run on this machine ({WORK}/setup.done missing): the machine went back "
                         "since call 1 (30 s idle is enough), or call 1 failed: start again with call 1")
    media = REPO / ".device" / "cuda1" / "media"
    if media.is_dir():
        shutil.copytree(media, WORK / "media", dirs_exist_ok=True)
    if missing:
        say(f"parts still missing: {missing} (calls {', '.join(f'.device/cuda{k}' for k in missing)})")
        if verb:
            raise SystemExit(f"cannot run {verb}: ORT-GPU incomplete; if the machine went back between calls "
                             f"(markers under {WORK} gone), start again with call 1")
        return 0
    assemble(info)
    cuda = preflight()
    if verb and not cuda and not os.environ.get("TS_ALLOW_CPU"):
        raise SystemExit(f"CUDA does not serve (see above): {verb} not run, to save device time "
                         "(TS_ALLOW_CPU=1 runs it anyway)")
    if verb:
        bench(verb, extra)
    for f in sorted(OUT.rglob("*")) if OUT.is_dir() else []:
        if f.is_file():
            say(f"$OUT/{f.relative_to(OUT)}: {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
