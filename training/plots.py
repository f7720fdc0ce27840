"""PNG plots for people who would rather look than read (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history_csv: Path, out: Path) -> None:
    if not history_csv.is_file():
        return
    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    plt = _pyplot()
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", next(k for k in rows[0] if k.endswith("mae") and not k.startswith("val_")))):
        ax.plot(epochs, [float(r[key]) for r in rows], "o-", label="train")
        ax.plot(epochs, [float(r["val_" + key]) for r in rows], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MAE (years)" if key.endswith("mae") else "loss")
        ax.legend()
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_age_histogram(ages: np.ndarray, out: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(ages, bins=np.arange(0, max(101, int(ages.max()) + 2), 2), color="#4477aa")
    ax.axvline(25, color="#cc3311", linestyle="--", label="Challenge 25")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_sample_grid(crops: list[np.ndarray], captions: list[str], out: Path, columns: int = 8) -> None:
    plt = _pyplot()
    rows = max(1, int(np.ceil(len(crops) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6))
    for ax in np.asarray(axes).reshape(-1):
        ax.axis("off")
    for ax, crop, caption in zip(np.asarray(axes).reshape(-1), crops, captions):
        ax.imshow(crop)
        ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_error_by_band(series: dict[str, dict], out: Path) -> None:
    """MAE by true age band, one group of bars per band and one colour per model (name -> mae_by_band)."""
    plt = _pyplot()
    bands = [b for b in next(iter(series.values())) if any(s.get(b) is not None for s in series.values())]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (name, mae_by_band) in enumerate(series.items()):
        xs = np.arange(len(bands)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, [mae_by_band.get(b) or 0 for b in bands], width, label=name,
               color=("#4477aa", "#ee7733", "#228833", "#aa3377")[i % 4])
    ax.set_xticks(np.arange(len(bands)), bands)
    ax.set_xlabel("true age band")
    ax.set_ylabel("MAE (years)")
    ax.set_title("error by age band")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_predicted_vs_true(true: np.ndarray, predicted: np.ndarray, out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, predicted, s=6, alpha=0.5)
    top = float(max(true.max(initial=1), predicted.max(initial=1))) + 5
    ax.plot([0, top], [0, top], color="grey", linewidth=1)
    ax.axhline(25, color="#cc3311", linestyle="--", linewidth=1, label="Challenge 25")
    ax.set_xlabel("true age")
    ax.set_ylabel("estimated age")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_operating_points(points: dict, out: Path) -> None:
    """The two policies' curves: minors flagged against adults challenged, to pick an operating point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label, fmt in (("challenge_age", "Challenge N (N = 16 ... 40)", "o-"),
                            ("risk", f"risk mode (max risk 0.1 % ... 50 %; {points.get('risk_table', '')})", "s-")):
        rows = [p for p in points[key] if p["minors_flagged"] is not None and p["adults_challenged"] is not None]
        ax.plot([100 * p["adults_challenged"] for p in rows], [100 * p["minors_flagged"] for p in rows], fmt,
                markersize=3, label=label)
    for p in points["challenge_age"]:
        # a split of minors alone (or adults alone) has no point to mark: one share of the two is None
        if p["setting"] == 25 and p["minors_flagged"] is not None and p["adults_challenged"] is not None:
            ax.annotate("Challenge 25", (100 * p["adults_challenged"], 100 * p["minors_flagged"]), fontsize=8,
                        textcoords="offset points", xytext=(6, -10))
    ax.set_xlabel("adults 25+ challenged (%)")
    ax.set_ylabel("minors 13-17 flagged (%)")
    ax.set_title("operating points")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
