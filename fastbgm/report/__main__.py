"""``python -m fastbgm.report runs/<experiment> [--min-gap POINTS]``

Writes runs/<experiment>/report/ (report.md, results.csv, figures) and prints the
table and the claim checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbgm.report", description=__doc__)
    p.add_argument("experiment", type=Path, help="the experiment folder, e.g. runs/cifar10-paper")
    p.add_argument("--min-gap", type=float, default=1.0, help="smallest gap (points) that counts as harm")
    p.add_argument("--converged", type=float, default=99.0,
                   help="final train accuracy (%%) both inits need before a gap counts")
    args = p.parse_args(argv)
    from rich.table import Table

    from ..ui import console as make_console
    from .build import build_report

    console = make_console()
    try:
        rep = build_report(args.experiment, args.min_gap / 100, args.converged / 100)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    for ds, model in sorted({(r.dataset, r.model) for r in rep["rows"]}):
        t = Table(title=f"{ds} / {model}: test accuracy (%), mean ± std over seeds")
        for c in ("mode", "random init", "adversarial init", "gap (points)", "train acc rnd / adv", "not done"):
            t.add_column(c)
        for r in (x for x in rep["rows"] if (x.dataset, x.model) == (ds, model)):
            tr = " / ".join("-" if r.train[i].mean is None else f"{100 * r.train[i].mean:.1f}"
                            for i in ("random", "adversarial"))
            nd = "; ".join(f"{i}: {', '.join(v)}" for i, v in r.not_done.items() if v)
            t.add_row(r.mode, r.test["random"].fmt(), r.test["adversarial"].fmt(), r.gap.fmt(), tr, nd)
        console.print(t)
    for c in rep["claims"]:
        mark = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]N/A[/]"}[c.passed]
        console.print(f"{mark} {c.text}")
    console.print(f"report: {rep['dir'] / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
