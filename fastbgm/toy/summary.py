"""The toy's numbers: one seed's runs, and their statistics over seeds."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from .experiment import ToyResult


def seed_statistics(results: list[ToyResult]) -> dict[str, dict[str, float]]:
    """Per run name (and 'adversarial init'): mean and std over seeds of each accuracy,
    and how many seeds saw the adversarial init generalise worse under vanilla SGD."""
    rows: dict[str, dict[str, list[float]]] = {}
    for res in results:
        for run in [res.stage1, *res.runs]:
            row = rows.setdefault(run.name, {"train_acc": [], "test_acc": []})
            row["train_acc"].append(run.train_acc)
            row["test_acc"].append(run.test_acc)
    out: dict[str, dict[str, float]] = {}
    for name, row in rows.items():
        out[name] = {}
        for key, values in row.items():
            out[name][f"{key}_mean"] = statistics.fmean(values)
            out[name][f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def vanilla_gap(result: ToyResult) -> float | None:
    """Test accuracy of random init minus adversarial init under vanilla SGD (points)."""
    if "vanilla" not in result.config.modes:
        return None
    return 100 * (result.run("random", "vanilla").test_acc - result.run("adversarial", "vanilla").test_acc)


def toy_summary(results: list[ToyResult], figure: str | None = None, seconds: float | None = None) -> dict:
    """The JSON written beside the figure: the first seed's runs (the figure's),
    every seed's runs, and the statistics over seeds."""
    first = results[0]
    gaps = [vanilla_gap(r) for r in results]
    config = asdict(first.config)
    config.pop("seed")
    return {
        "figure": figure,
        "seeds": [r.config.seed for r in results],
        "config": config,
        "figure_seed": first.summary() | {"vanilla_gap_points": gaps[0]},
        "per_seed": {str(r.config.seed): [run.summary() for run in [r.stage1, *r.runs]] for r in results},
        "statistics": seed_statistics(results),
        "vanilla_gap_points": gaps,
        "seeds_with_harm": sum(1 for g in gaps if g is not None and g > 0),
        "seconds": seconds,
    }
