#!/usr/bin/env python3
"""Fill .device/cuda1 ... .device/cudaN (git-ignored) with what the CUDA benchmark's device calls carry
(scripts/device/CUDA-BENCH.md): each folder is one call's `carry`, under the 64 MiB a call takes together
with the working tree.

    cuda1   ORT-GPU part 1, the daemon's pure-Python wheels (cp312), a mosquitto with its libraries,
            the clip and photo the benchmark uses
    cudaK   ORT-GPU part K

ORT-GPU: from the cp312 onnxruntime-gpu wheel (CUDA 13), only what the CUDA path needs: the wheel's
`onnxruntime/` and its dist-info, less `capi/libonnxruntime_providers_tensorrt.so` (TensorRT, not on the
machine) and `capi/libonnxruntime.so.<version>` (the C API library: the Python module does not load it,
readelf -d shows no NEEDED entry for it), in one tar, `xz -9e`, split into parts. The age model is the
shipped one, in the tree (edge/models/age_int8.onnx): the machine makes its fp32 and fp16 files
(scripts/device/bench_models.py).

    .venv/bin/python scripts/device/pack_cuda_bench.py [--wheel FILE] [--check-cp311 WHEEL]

Everything is cached under ~/.cache/tillsight/device-pack (TS_PACK_CACHE; the archive keyed by the wheel's
sha256), so a second run takes seconds. Prints the size of each call (tree + carry) and fails if one is over the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / ".device"
# outside .device: scripts/device/pack.sh (the training plan) starts with `rm -rf .device`
CACHE = Path(os.environ.get("TS_PACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "tillsight" / "device-pack")
CALL_LIMIT = 64 * 2**20  # the working tree plus carried paths, per call
MARGIN = 2 * 2**20  # the tree may grow a little between packing and the calls
ORT_VERSION = "1.31.1"
WHEEL_NAME = f"onnxruntime_gpu-{ORT_VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl"  # CUDA 13 (NEEDED: libcublas.so.13)
DROPPED = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so", f"onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}")
# the daemon's pure-Python (and cp312) dependencies the machine lacks or may hold in another version;
# numpy, opencv-python-headless, onnx, protobuf, flatbuffers, packaging, matplotlib and nvidia-ml-py
# (pynvml) are there
DAEMON_WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
                 "typing-extensions==4.16.0", "paho-mqtt==2.2.0", "cysystemd==2.0.5", "prometheus-client==0.26.0",
                 "py-spy==0.4.3")  # the profiler (a static binary, 2.9 MB): what holds a daemon's GIL (e2e)
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MEDIA = ("short_hamilton_clip.mp4", "two_people.jpg")
GLIBC_LIBS = ("libc.so.6", "libm.so.6", "libresolv.so.2", "libpthread.so.0", "libdl.so.2", "librt.so.1")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(specs: list[str], dest: Path, python_version: str = "3.12") -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + specs, check=True)


def find_wheel(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"wheel not found: {given}")
        return given
    for candidate in (os.environ.get("ORT_GPU_WHEEL"), CACHE / WHEEL_NAME, Path("/tmp/ortgpu") / WHEEL_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    print(f"downloading {WHEEL_NAME} (255 MB)", flush=True)
    pip_download([f"onnxruntime-gpu=={ORT_VERSION}"], CACHE)
    return CACHE / WHEEL_NAME


def ort_archive(wheel: Path) -> tuple[Path, dict]:
    """The CUDA path's files of the wheel as one .tar.xz, cached by the wheel's sha256."""
    wheel_sha = sha256(wheel)
    archive = CACHE / f"ort-cuda-{wheel_sha[:16]}.tar.xz"
    info_path = archive.with_suffix(".json")
    if archive.is_file() and info_path.is_file():
        return archive, json.loads(info_path.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    members = {}
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        kept = [n for n in names if n not in DROPPED]
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in kept:
                data = zf.read(name)
                item = tarfile.TarInfo(name)
                item.size, item.mtime = len(data), 0
                item.mode = 0o755 if name.endswith(".so") or ".so." in name else 0o644
                tar.addfile(item, io.BytesIO(data))
                members[name] = hashlib.sha256(data).hexdigest()
    print(f"compressing {len(kept)} files, {raw.tell() / 1e6:.1f} MB (xz -9e; a few minutes on 2 cores)", flush=True)
    tmp = archive.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        subprocess.run(["xz", "-9e", "-T2", "-c"], input=raw.getvalue(), stdout=out, check=True)
    tmp.rename(archive)
    info = {"wheel": wheel.name, "wheel_sha256": wheel_sha, "tar_bytes": raw.tell(), "files": len(kept),
            "dropped": [n for n in DROPPED if n in names], "archive_bytes": archive.stat().st_size,
            "archive_sha256": sha256(archive), "members_sha256": members}
    info_path.write_text(json.dumps(info, indent=1))
    return archive, info


def mosquitto_bundle() -> Path:
    """The local mosquitto and every library it loads but glibc's, with a wrapper that points the loader there."""
    target = CACHE / "mosquitto.tar.xz"
    if target.is_file():
        return target
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        raise SystemExit("mosquitto not found here: apt-get install mosquitto (make debs)")
    libs = []
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > 2 and parts[2].startswith("/") and parts[0] not in GLIBC_LIBS:
            libs.append(Path(parts[2]))
    wrapper = ("#!/bin/sh\n# mosquitto from Debian with its libraries (scripts/device/pack_cuda_bench.py)\n"
               'here=$(dirname "$(readlink -f "$0")")/..\n'
               'LD_LIBRARY_PATH="$here/lib" exec "$here/sbin/mosquitto" "$@"\n').encode()
    with tarfile.open(target, "w:xz", preset=9) as tar:
        tar.add(binary, "mosquitto/sbin/mosquitto")
        for lib in libs:
            tar.add(lib.resolve(), f"mosquitto/lib/{lib.name}")
        item = tarfile.TarInfo("mosquitto/bin/mosquitto")
        item.size, item.mode = len(wrapper), 0o755
        tar.addfile(item, io.BytesIO(wrapper))
    return target


def tree_bytes() -> int:
    """What travels besides the carry: tracked and untracked-not-ignored files."""
    listing = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / os.fsdecode(name)).stat().st_size for name in listing
               if name and (REPO / os.fsdecode(name)).is_file())


def split(archive: Path, first: int, rest: int, folder_of) -> list[dict]:
    parts, index = [], 0
    with open(archive, "rb") as f:
        while True:
            data = f.read(first if index == 0 else rest)
            if not data:
                break
            index += 1
            folder = folder_of(index)
            folder.mkdir(parents=True, exist_ok=True)
            name = f"ort-cuda.tar.xz.part{index:02d}"
            (folder / name).write_bytes(data)
            parts.append({"name": name, "call": index, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return parts


def check_cp311(wheel311: Path, info: dict) -> None:
    """The same selection from the cp311 wheel (this machine's Python), unpacked and imported without CUDA."""
    site = CACHE / "site-cp311"
    shutil.rmtree(site, ignore_errors=True)
    with zipfile.ZipFile(wheel311) as zf:
        for name in zf.namelist():
            if name.endswith("/") or name in DROPPED:
                continue
            zf.extract(name, site)
    code = ("import onnxruntime as ort, importlib.metadata as m; "
            "print(ort.__file__, ort.__version__, m.version('onnxruntime-gpu'), ort.get_available_providers())")
    python = REPO / ".venv/bin/python" if (REPO / ".venv/bin/python").is_file() else Path(sys.executable)
    done = subprocess.run([str(python), "-c", code], env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    print("cp311 selection imports:", done.stdout.strip() or done.stderr.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"the cp312 onnxruntime-gpu wheel (default: download {WHEEL_NAME})")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="for media/ (the clip, the photo)")
    parser.add_argument("--check-cp311", type=Path, metavar="WHEEL",
                        help="also unpack the same selection of the cp311 wheel and import it here")
    parser.add_argument("--python-version", default="3.12", help="of the daemon's wheels (3.11: a rehearsal here, "
                        "with --wheel the cp311 onnxruntime-gpu wheel and --into a folder under .device/)")
    parser.add_argument("--into", type=Path, default=DEVICE, help="where the cudaK folders go (default .device)")
    args = parser.parse_args()
    into = args.into if args.into.is_absolute() else REPO / args.into
    ignored = subprocess.run(["git", "check-ignore", "-q", str(into / "x")], cwd=REPO).returncode == 0
    if not ignored:
        raise SystemExit(f"{into} is not git-ignored (add /.device/ to .gitignore or .git/info/exclude)")
    for old in into.glob("cuda[0-9]*"):
        shutil.rmtree(old)

    wheel = find_wheel(args.wheel)
    archive, info = ort_archive(wheel)
    wheels = CACHE / f"whl-py{args.python_version}"
    if not wheels.is_dir() or len(list(wheels.glob("*.whl"))) < len(DAEMON_WHEELS):
        pip_download(list(DAEMON_WHEELS), wheels, args.python_version)
    mosquitto = mosquitto_bundle()
    media = [args.shared / "media" / m for m in MEDIA]
    missing = [m for m in media if not m.is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(map(str, missing))} (--shared DIR)")

    first = into / "cuda1"
    first.mkdir(parents=True)
    (first / "whl").mkdir()
    for wheel_file in sorted(wheels.glob("*.whl")):
        shutil.copy2(wheel_file, first / "whl" / wheel_file.name)
    shutil.copy2(mosquitto, first / mosquitto.name)
    (first / "media").mkdir()
    for m in media:
        shutil.copy2(m, first / "media" / m.name)
    extras = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())

    tree = tree_bytes()
    cap = CALL_LIMIT - tree - MARGIN - 64 * 1024  # the manifest
    total = info["archive_bytes"] + extras
    calls = -(-total // cap)
    per_call = -(-total // calls)
    parts = split(archive, per_call - extras, per_call, lambda k: into / f"cuda{k}")
    manifest = {"calls": len(parts), "archive": archive.name, "archive_bytes": info["archive_bytes"],
                "archive_sha256": info["archive_sha256"], "tar_bytes": info["tar_bytes"], "wheel": info["wheel"],
                "wheel_sha256": info["wheel_sha256"], "dropped": info["dropped"], "parts": parts,
                "members_sha256": info["members_sha256"]}
    for k in range(1, len(parts) + 1):
        (into / f"cuda{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))

    print(f"\nORT-GPU {ORT_VERSION}: {info['files']} files, {info['tar_bytes'] / 1e6:.1f} MB as tar, "
          f"{info['archive_bytes'] / 1e6:.1f} MB as tar.xz (dropped: {', '.join(Path(d).name for d in info['dropped'])})")
    print(f"working tree that travels with every call: {tree / 2**20:.2f} MiB")
    print(f"{'call':<6}{'carry':<16}{'carried MiB':>12}{'with tree MiB':>15}  contents")
    worst = 0
    for k in range(1, len(parts) + 1):
        folder = into / f"cuda{k}"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        worst = max(worst, size + tree)
        what = ", ".join(sorted(p.name for p in folder.iterdir()))
        print(f"{k:<6}{str((folder).relative_to(REPO)):<16}{size / 2**20:>12.2f}{(size + tree) / 2**20:>15.2f}  {what}")
    if worst > CALL_LIMIT:
        raise SystemExit(f"a call would carry {worst / 2**20:.2f} MiB, over {CALL_LIMIT / 2**20:.0f} MiB")
    if args.check_cp311:
        check_cp311(args.check_cp311, info)
    print(f"\nnext: the calls of scripts/device/CUDA-BENCH.md ({len(parts)} carrying calls, then e2e)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
