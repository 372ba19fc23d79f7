"""The report's figures (matplotlib, Agg). Each function returns (path, panels)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..fileio import atomic_path
from .analysis import Row, mode_order
from .collect import Run

COLORS = {"random": "#1f77b4", "adversarial": "#d62728"}
MEASURES = [("param_l2", "parameter l2 norm"), ("dist_from_init", "distance from init"),
            ("path_l1", "l1 path norm"), ("path_l2", "l2 path norm")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> tuple[Path, int]:
    """Write the PNG and close the figure; returns the path and the number of panels."""
    fig.tight_layout()
    panels = len(fig.axes)
    try:
        with atomic_path(path) as tmp:  # (a full disk or a kill leaves the previous figure, or none)
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _plt().close(fig)
    return path, panels


def _mean_curve(runs: list[Run], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in r.metrics:
            if row.get(key) is not None:
                by_epoch[row["epoch"]].append(row[key])
    xs = sorted(by_epoch)
    return xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs]


def curves(runs: list[Run], dataset: str, model: str, out: Path) -> tuple[Path, int]:
    """Test accuracy (top row) and train accuracy (bottom row) vs epoch, one column per
    mode, random vs adversarial init (mean over seeds; unfinished runs included)."""
    plt = _plt()
    group = [r for r in runs if r.stage == 2 and (r.dataset, r.model) == (dataset, model)]
    modes = mode_order([r.mode for r in group])
    fig, axes = plt.subplots(2, len(modes), figsize=(3.2 * len(modes), 5.6), squeeze=False, sharey="row")
    for j, mode in enumerate(modes):
        for init in ("random", "adversarial"):
            sel = [r for r in group if r.mode == mode and r.init == init]
            for i, key in enumerate(("test_acc", "train_acc")):
                xs, ys = _mean_curve(sel, key)
                if xs:
                    axes[i, j].plot(xs, [100 * y for y in ys], marker="o" if key == "test_acc" else None,
                                    ms=3, color=COLORS[init], label=f"{init} init")
        axes[0, j].set_title(mode)
        axes[1, j].set_xlabel("epoch")
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("train accuracy (%)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{dataset} / {model}: stage 2 from random vs adversarial init")
    return _save(fig, out / f"curves-{dataset}-{model}.png")


def gap_bars(rows: list[Row], dataset: str, model: str, out: Path) -> tuple[Path, int]:
    plt = _plt()
    sel = [r for r in rows if (r.dataset, r.model) == (dataset, model)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * max(1, len(sel)), 3.6))
    xs = list(range(len(sel)))
    means = [100 * (r.gap.mean or 0.0) for r in sel]
    errs = [100 * (r.gap.std or 0.0) for r in sel]
    ax.bar(xs, means, yerr=errs, color=["#d62728" if r.mode == "vanilla" else "#7f7f7f" for r in sel], capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, [r.mode for r in sel], rotation=45, ha="right")
    ax.set_ylabel("gap: random - adversarial (test acc points)")
    ax.set_title(f"{dataset} / {model}")
    return _save(fig, out / f"gap-{dataset}-{model}.png")


def complexity(runs: list[Run], dataset: str, model: str, out: Path) -> tuple[Path, int]:
    """The complexity measures vs epoch: vanilla runs bold, other modes faint."""
    plt = _plt()
    group = [r for r in runs if r.stage == 2 and (r.dataset, r.model) == (dataset, model)]
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.4 * len(MEASURES), 3.2), squeeze=False)
    for j, (key, label) in enumerate(MEASURES):
        ax = axes[0, j]
        for mode in mode_order([r.mode for r in group]):
            for init in ("random", "adversarial"):
                xs, ys = _mean_curve([r for r in group if r.mode == mode and r.init == init], key)
                if xs:
                    ax.plot(xs, ys, color=COLORS[init], alpha=1.0 if mode == "vanilla" else 0.25,
                            lw=1.8 if mode == "vanilla" else 1.0,
                            label=f"{init} ({mode})" if mode == "vanilla" else None)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        if key.startswith("path"):
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{dataset} / {model}: complexity measures (vanilla bold, other modes faint)")
    return _save(fig, out / f"complexity-{dataset}-{model}.png")
