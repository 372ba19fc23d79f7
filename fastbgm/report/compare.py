"""Several experiments side by side: what each changed and how the gaps moved.

A study varies one thing at a time (training-set size, R, width ...) and runs each
point as its own experiment. ``compare`` lines their tables up, one row per
(experiment, dataset, model, mode), and labels each row with the config keys whose
values differ between the experiments (from each experiment.json), so the
table says what was varied without anyone retyping it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import flatten
from ..fileio import atomic_write_json, atomic_write_text
from .analysis import Row

# keys that name or place an experiment or change only its speed, and the grid axes
# the table already shows as columns (mode, init) or as n (seeds)
IGNORED = ("name", "runs_dir", "speed.", "resources.", "seeds", "modes", "inits")


@dataclass
class Point:
    experiment: str
    varied: dict[str, Any]  # the differing config keys and this experiment's values
    row: Row


def varied_keys(configs: list[dict[str, Any]]) -> list[str]:
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if not k.startswith(IGNORED) and len({repr(f.get(k)) for f in flat}) > 1]


def compare(reports: list[dict[str, Any]]) -> list[Point]:
    """Points from built reports (``build_report``'s results): their tables are reused, not re-read."""
    keys = varied_keys([rep["config"] for rep in reports])
    points = []
    for rep in reports:
        flat = flatten(rep["config"])
        varied = {k: flat.get(k) for k in keys}
        points += [Point(rep["name"], varied, row) for row in rep["rows"]]
    return points


def label(p: Point) -> str:
    """What sets this experiment apart, e.g. ``stage1.copies=8, model.width=16``."""
    return ", ".join(f"{k}={v}" for k, v in p.varied.items()) or "-"


def markdown(points: list[Point]) -> str:
    keys = list(points[0].varied) if points else []
    out = ["# Comparison", "",
           "Gap = test accuracy from random init minus adversarial init (points), paired by seed; mean ± std "
           "over seeds. Config keys that differ between the experiments: "
           + (", ".join(f"`{k}`" for k in keys) or "none") + ".", "",
           "| experiment | its values | dataset / model | mode | random init | adversarial init | gap (points) "
           "| final train acc random / adv. | epochs to 100% train random / adv. |",
           "|---" * 9 + "|"]
    for p in points:
        r = p.row
        to = " / ".join(r.to100[i].fmt(1, 0) for i in ("random", "adversarial"))
        out.append(f"| {p.experiment} | {label(p)} | {r.dataset} / {r.model} | {r.mode} | {r.test['random'].fmt()} | "
                   f"{r.test['adversarial'].fmt()} | {r.gap.fmt()} | {r.train_pct()} | {to} |")
    return "\n".join(out) + "\n"


def to_csv(points: list[Point]) -> str:
    keys = list(points[0].varied) if points else []
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["experiment", *keys, "dataset", "model", "mode", "test_random", "test_adversarial", "gap", "gap_std",
                "n", "train_random", "train_adversarial"])
    for p in points:
        r = p.row
        f = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
        w.writerow([p.experiment, *(p.varied[k] for k in keys), r.dataset, r.model, r.mode,
                    f(r.test["random"].mean), f(r.test["adversarial"].mean), f(r.gap.mean), f(r.gap.std), r.gap.n,
                    f(r.train["random"].mean), f(r.train["adversarial"].mean)])
    return buf.getvalue()


def _tick(p: Point) -> str:
    return "\n".join([p.experiment, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in p.varied.items())])


def gap_figure(points: list[Point], path: Path) -> Path:
    from .figures import _plt, _save

    plt = _plt()
    modes = sorted({p.row.mode for p in points}, key=lambda m: (m != "vanilla", m))
    counts = [max(1, sum(1 for p in points if p.row.mode == m and p.row.gap.n)) for m in modes]
    fig, axes = plt.subplots(1, len(modes), figsize=(sum(1.3 * c + 1.2 for c in counts), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": counts})
    for ax, mode in zip(axes[0], modes):
        sel = [p for p in points if p.row.mode == mode and p.row.gap.n]
        xs = list(range(len(sel)))
        ax.bar(xs, [100 * p.row.gap.mean for p in sel], yerr=[100 * (p.row.gap.std or 0) for p in sel],
               color="#d62728", alpha=0.8, capsize=3)
        ax.set_xticks(xs, [_tick(p) for p in sel], fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("gap: random - adversarial (points)")
        ax.set_title(mode, fontsize=10)
    fig.suptitle("gap per experiment (error bars: std over seeds)", fontsize=10)
    return _save(fig, path)[0]


def write_comparison(reports: list[dict[str, Any]], out_dir: str | Path) -> tuple[list[Point], Path]:
    points = compare(reports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gap_figure(points, out / "comparison-gaps.png")
    atomic_write_text(out / "comparison.md", markdown(points) + "\n![gaps](comparison-gaps.png)\n")
    atomic_write_text(out / "comparison.csv", to_csv(points))
    atomic_write_json(out / "comparison.json", [{"experiment": p.experiment, "varied": p.varied, "mode": p.row.mode,
                                                 "dataset": p.row.dataset, "model": p.row.model,
                                                 "gap": p.row.gap.values} for p in points])
    return points, out
