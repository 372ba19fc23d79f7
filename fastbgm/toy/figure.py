"""The toy example's figure: decision boundaries in the layout of the paper's Figure 1."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import atomic_path
from .experiment import Points, ToyResult, ToyRun

CLASS_COLORS = ("#1f77b4", "#d62728")  # class 0 (left blob), class 1 (right blob)


def panels(result: ToyResult) -> list[tuple[ToyRun, Points, str]]:
    """(run, points drawn on it, title) in the paper's order: random init + vanilla,
    the adversarial init, then every mode from the adversarial init."""
    out = [(result.run("random", "vanilla"), result.train, "random init, vanilla SGD")] \
        if "vanilla" in result.config.modes else []
    out.append((result.stage1, result.confusion, f"adversarial init ({result.config.copies} random-label copies)"))
    for mode in result.config.modes:
        label = "vanilla SGD" if mode == "vanilla" else f"SGD + {mode.upper().replace('+', ' + ')}"
        out.append((result.run("adversarial", mode), result.train, f"adversarial init, {label}"))
    return out


def _grid(result: ToyResult, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pts = torch.cat([result.train.x, result.test.x, result.confusion.x])
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = 0.15 * (hi - lo)
    xs = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), steps)
    ys = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), steps)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def write_figure(result: ToyResult, path: str | Path) -> tuple[Path, int]:
    """One PNG, one panel per picture; returns its path and number of panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    gx, gy, flat = _grid(result)
    chosen = panels(result)
    aspect = float((gy.max() - gy.min()) / (gx.max() - gx.min()))
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.6 * len(chosen), 3.6 * aspect + 0.75), squeeze=False)
    background = ListedColormap(["#c6dbef", "#fcbba1"])
    for ax, (run, pts, title) in zip(axes[0], chosen):
        with torch.no_grad():
            prob = torch.softmax(run.model(flat), 1)[:, 1].reshape(gx.shape)
        ax.contourf(gx.numpy(), gy.numpy(), (prob > 0.5).float().numpy(), levels=[-0.5, 0.5, 1.5], cmap=background)
        ax.contour(gx.numpy(), gy.numpy(), prob.numpy(), levels=[0.5], colors="k", linewidths=0.8)
        for c in (0, 1):
            sel = pts.y == c
            ax.scatter(pts.x[sel, 0].numpy(), pts.x[sel, 1].numpy(), s=7 if pts is result.confusion else 12,
                       c=CLASS_COLORS[c], edgecolors="white", linewidths=0.3)
        fit = "random-label" if run is result.stage1 else "train"
        ax.set_title(f"{title}\n{fit} acc {100 * run.train_acc:.1f}%, test acc {100 * run.test_acc:.1f}%",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return path, len(chosen)
