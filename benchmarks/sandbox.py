"""Does the unit's sandbox slow the daemon's models? Their speed inside tillsight.service's sandbox, under a real
systemd (a container booted over a throw-away overlay of this machine: tests/container.py), against the same
measurement on this machine outside it, alternating round by round.

    sudo .venv/bin/python benchmarks/sandbox.py [--rounds 3] [--seconds 1.5] [--set ProcSubset=pid] [--out DIR]

The models are the daemon's, built as it builds them from the default config (the age model on the CPU, the face
detector). Prints ms a call for each, each round's sandbox/host ratio, and writes sandbox.json and sandbox.png to
--out (default: a temporary folder). `--set KEY=VALUE` (repeatable) changes a [Service] setting of the unit for the
measurement: `--set ProcSubset=pid` shows what hiding /proc/cpuinfo cost (README, deploy/README.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# What the measuring unit drops from tillsight.service: how the daemon is started and supervised. Every sandbox
# and resource setting stays.
NOT_THE_SANDBOX = ("Type", "NotifyAccess", "WatchdogSec", "ExecStartPre", "ExecStart", "ExecReload", "Restart",
                   "RestartSec", "RestartPreventExitStatus")
RESULT = "sandbox-bench-result "


def measure(seconds: float) -> dict[str, float]:
    """ms a call of the daemon's models, the best of three spells of `seconds` each."""
    from edge.config import parse_config
    from edge.service import build_age_model, build_detector
    models = parse_config({"store_id": "s", "cameras": [{"id": "c", "source": 0}]}).models
    age, detector = build_age_model(models), build_detector(models)
    rng = np.random.default_rng(0)
    size = age.info.input_size
    work = {"age batch 1": (age.predict, rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)),
            "age batch 8": (age.predict, rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)),
            "detector 640x480": (detector, rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))}
    found = {}
    for name, (call, data) in work.items():
        call(data)  # the first call allocates
        spells = []
        for _ in range(3):
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                call(data)
                calls += 1
            spells.append((time.perf_counter() - started) / calls * 1000)
        found[name] = round(min(spells), 3)
    return found


def measuring_unit(settings: list[str], seconds: float) -> str:
    """tillsight.service as a oneshot that runs this script's measurement, with `settings` (KEY=VALUE) applied."""
    from container import UNIT
    kept = [line for line in UNIT.read_text().splitlines() if line.split("=", 1)[0] not in NOT_THE_SANDBOX]
    for setting in settings:
        key = setting.split("=", 1)[0]
        kept = [line for line in kept if not line.startswith(f"{key}=")]
        kept.insert(kept.index("[Service]") + 1, setting)
    command = f"/opt/tillsight/.venv/bin/python {Path(__file__).resolve()} --inner --seconds {seconds}"
    at = kept.index("[Service]") + 1
    return "\n".join(kept[:at] + ["Type=oneshot", f"WorkingDirectory={REPO}", f"ExecStart={command}"] + kept[at:]) + "\n"


def in_sandbox(machine) -> dict[str, float]:
    machine.run("systemctl", "start", "tillsight-bench", timeout=600)
    lines = [line for line in machine.journal("tillsight-bench") if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):])


def on_host(seconds: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--inner", "--seconds", str(seconds)], capture_output=True,
                         text=True, check=True, cwd=REPO, timeout=600).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(RESULT))[len(RESULT):])


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["host_ms"][0])
    fig, axis = plt.subplots(figsize=(7, 3.5))
    for k, (where, color) in enumerate((("host_ms", "tab:blue"), ("sandbox_ms", "tab:orange"))):
        medians = [statistics.median(r[n] for r in report[where]) for n in names]
        bars = axis.bar(np.arange(len(names)) + (k - 0.5) * 0.38, medians, 0.38, color=color,
                        label="this machine" if where == "host_ms" else "in the unit's sandbox")
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("ms a call (median of rounds)")
    changed = ", ".join(report["settings"]) or "as shipped"
    axis.set_title(f"the daemon's models in tillsight.service's sandbox ({changed})", fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="each spell of calls (three a model a round)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [Service] setting of the unit to change for the measurement")
    parser.add_argument("--out", type=Path, help="folder for sandbox.json and sandbox.png")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the measurement itself
    args = parser.parse_args()
    if args.inner:
        print(RESULT + json.dumps(measure(args.seconds)), flush=True)
        return 0
    for setting in args.set:
        if not re.fullmatch(r"[A-Za-z]+=\S.*", setting):
            print(f"sandbox.py: --set {setting!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
    from container import boot_problem, booted
    problem = boot_problem()
    if problem:
        print(f"sandbox.py: cannot boot a container here: {problem}", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": args.set, "host_ms": [], "sandbox_ms": []}
    with tempfile.TemporaryDirectory() as base, booted(Path(base)) as machine:
        (machine.root / "etc/systemd/system/tillsight-bench.service").write_text(measuring_unit(args.set, args.seconds))
        machine.run("systemctl", "daemon-reload")
        for round_ in range(1, args.rounds + 1):
            host, sandbox = on_host(args.seconds), in_sandbox(machine)
            report["host_ms"].append(host)
            report["sandbox_ms"].append(sandbox)
            print(f"round {round_}: " + "; ".join(f"{name} {host[name]:.2f} -> {sandbox[name]:.2f} ms "
                                                  f"({sandbox[name] / host[name]:.2f}x)" for name in host))
    names = list(report["host_ms"][0])
    report["ratio_median"] = {n: round(statistics.median(s[n] / h[n] for h, s in zip(report["host_ms"],
                                                                                     report["sandbox_ms"])), 3)
                              for n in names}
    print("sandbox / this machine, median of rounds: " + ", ".join(f"{n} {r:.2f}x" for n, r in
                                                                    report["ratio_median"].items()))
    (out / "sandbox.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "sandbox.png")
    print(f"wrote {out / 'sandbox.json'} and {out / 'sandbox.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
