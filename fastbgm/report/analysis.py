"""The paper's table and its claims, computed from runs.

Gap = test accuracy from random init minus from adversarial init, in percentage
points, paired by seed. "Within noise" means ``gap <= noise`` with
``noise = max(2 x standard error of the paired gaps, min_gap)`` (``min_gap``
defaults to 1 point, since a single seed has no standard error). A gap counts only
when both inits reached ``converged`` final train accuracy (default 99%): before
that it says more about speed than about the minimum reached.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ..experiment.config import expand_modes
from .collect import Run


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def se(self) -> float | None:
        return self.std / math.sqrt(self.n) if self.std is not None else None

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if not self.values:
            return "-"
        s = f"{self.mean * scale:.{digits}f}"
        if self.std is not None:
            s += f" ± {self.std * scale:.{digits}f}"
        return s + f" (n={self.n})"


@dataclass
class Row:
    dataset: str
    model: str
    mode: str
    test: dict[str, Stat]  # init -> test accuracy (0-1)
    train: dict[str, Stat]  # init -> final train accuracy
    to100: dict[str, Stat]  # init -> epochs to 100% train accuracy
    gap: Stat  # paired, in accuracy units (0-1)
    not_done: dict[str, list[str]]  # init -> statuses of runs that are not done

    def train_pct(self) -> str:
        """Final train accuracy, random / adversarial, in percent."""
        return " / ".join("-" if self.train[i].mean is None else f"{100 * self.train[i].mean:.1f}"
                          for i in ("random", "adversarial"))


def mode_order(modes: list[str]) -> list[str]:
    canon = expand_modes(["all"])
    return sorted(set(modes), key=lambda m: canon.index(m) if m in canon else 99)


def table(runs: list[Run]) -> list[Row]:
    rows = []
    stage2 = [r for r in runs if r.stage == 2]
    for ds, model in sorted({(r.dataset, r.model) for r in stage2}):
        group = [r for r in stage2 if (r.dataset, r.model) == (ds, model)]
        for mode in mode_order([r.mode for r in group]):
            cell = [r for r in group if r.mode == mode]
            test, train, to100, not_done = {}, {}, {}, {}
            by_seed: dict[str, dict[int, float]] = {}
            for init in ("random", "adversarial"):
                done = [r for r in cell if r.init == init and r.status == "done" and r.test_acc is not None]
                test[init] = Stat([r.test_acc for r in done])
                train[init] = Stat([r.train_acc for r in done if r.train_acc is not None])
                to100[init] = Stat([float(r.epochs_to_100) for r in done if r.epochs_to_100 is not None])
                not_done[init] = [f"seed{r.seed}: {r.status}" for r in cell if r.init == init and r.status != "done"]
                by_seed[init] = {r.seed: r.test_acc for r in done}
            paired = sorted(set(by_seed["random"]) & set(by_seed["adversarial"]))
            gap = Stat([by_seed["random"][s] - by_seed["adversarial"][s] for s in paired])
            rows.append(Row(ds, model, mode, test, train, to100, gap, not_done))
    return rows


def stage1_rows(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for r in sorted((r for r in runs if r.stage == 1), key=lambda r: r.key):
        out.append({"run": r.key, "status": r.status, "epochs": r.epochs, "random_label_train_acc": r.train_acc,
                    "target_reached": r.result.get("target_reached")})
    return out


@dataclass
class Claim:
    passed: bool | None  # None: not enough data to say
    text: str


def _unconverged(row: Row, converged: float) -> str:
    fits = {i: row.train[i].mean for i in ("random", "adversarial")}
    if all(f is not None and f >= converged for f in fits.values()):
        return ""
    return ("not converged (final train acc " + ", ".join(
        f"{i} {'-' if f is None else f'{100 * f:.1f}%'}" for i, f in fits.items())
        + f" < {100 * converged:.0f}%): the gap does not count yet")


def claims(rows: list[Row], min_gap: float = 0.01, converged: float = 0.99) -> list[Claim]:
    out: list[Claim] = []
    for ds, model in sorted({(r.dataset, r.model) for r in rows}):
        group = {r.mode: r for r in rows if (r.dataset, r.model) == (ds, model)}
        where = f"{ds}/{model}"
        van = group.get("vanilla")
        if van is None or van.gap.n == 0:
            out.append(Claim(None, f"{where}: no finished vanilla pair (random + adversarial) yet: the harm claim "
                                   "cannot be checked"))
        elif _unconverged(van, converged):
            out.append(Claim(None, f"{where}: vanilla: {_unconverged(van, converged)} "
                                   f"(gap so far {100 * van.gap.mean:.1f} points, n={van.gap.n})"))
        else:
            noise = max(2 * (van.gap.se or 0.0), min_gap)
            ok = van.gap.mean > noise
            out.append(Claim(ok, f"{where}: vanilla SGD from the adversarial init generalises "
                                 f"{'worse' if ok else 'no worse than noise'}: gap {100 * van.gap.mean:.1f} points "
                                 f"(random {100 * van.test['random'].mean:.1f}% vs adversarial "
                                 f"{100 * van.test['adversarial'].mean:.1f}%, n={van.gap.n}) "
                                 f"{'>' if ok else '<='} noise {100 * noise:.1f}"))
        if van is not None and van.train["adversarial"].mean is not None:
            fit = van.train["adversarial"].mean
            out.append(Claim(fit >= 0.999, f"{where}: vanilla SGD from the adversarial init "
                                          f"{'reaches' if fit >= 0.999 else 'does not reach'} 100% train accuracy "
                                          f"(final {100 * fit:.2f}%)"))
        for mode, row in group.items():
            if mode == "vanilla":
                continue
            if row.gap.n == 0:
                out.append(Claim(None, f"{where}: {mode}: no finished pair yet"))
                continue
            if _unconverged(row, converged):
                out.append(Claim(None, f"{where}: {mode}: {_unconverged(row, converged)} "
                                       f"(gap so far {100 * row.gap.mean:.1f} points, n={row.gap.n})"))
                continue
            noise = max(2 * (row.gap.se or 0.0), min_gap)
            ok = row.gap.mean <= noise
            fits = [row.train[i].mean for i in ("random", "adversarial") if row.train[i].mean is not None]
            conv = f"; train acc {', '.join(f'{100 * f:.1f}%' for f in fits)}" if fits else ""
            out.append(Claim(ok, f"{where}: with {mode.upper()} the adversarial init "
                                 f"{'does no harm' if ok else 'still hurts'}: gap {100 * row.gap.mean:.1f} points "
                                 f"(n={row.gap.n}) {'<=' if ok else '>'} noise {100 * noise:.1f}{conv}"))
    return out
