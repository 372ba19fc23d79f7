"""``python -m fastbgm.report runs/<experiment> [runs/<other> ...] [--min-gap POINTS] [--out DIR]``

Writes runs/<experiment>/report/ (report.md, results.csv, figures) and prints the
table and the claim checks. Given several experiments (a study that varies one thing
at a time), it also writes a comparison (comparison.md/.csv and a gap figure) into
``--out``, labelling each row with the config keys that differ between them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbgm.report", description=__doc__)
    p.add_argument("experiments", type=Path, nargs="+", help="experiment folder(s), e.g. runs/cifar10-paper")
    p.add_argument("--out", type=Path, default=Path("runs/comparison"),
                   help="where the comparison of several experiments goes (default: runs/comparison)")
    p.add_argument("--min-gap", type=float, default=1.0, help="smallest gap (points) that counts as harm")
    p.add_argument("--converged", type=float, default=99.0,
                   help="final train accuracy (%%) both inits need before a gap counts")
    args = p.parse_args(argv)
    from rich.table import Table

    from ..ui import console as make_console
    from .build import build_report

    console = make_console()
    reports = []
    for exp in args.experiments:
        try:
            reports.append(build_report(exp, args.min_gap / 100, args.converged / 100))
        except FileNotFoundError as e:
            console.print(f"[red]error:[/] {escape(str(e))}")
            return 2
        except OSError as e:  # a full disk, a read-only folder: every file is written beside, then renamed
            console.print(f"[red]error:[/] cannot write the report of {escape(str(exp))}: {e.strerror or e} "
                          f"({escape(str(e.filename or exp))}); free some space or make it writable, and run "
                          "the same command again (the runs are untouched)")
            return 2
        _print_report(console, reports[-1])
    if len(reports) > 1:
        from .compare import label, write_comparison

        points, out = write_comparison(reports, args.out)
        t = Table(title="comparison: test accuracy (%) and gap (points), mean ± std over seeds")
        for c in ("experiment", "its values of the differing keys", "dataset / model", "mode", "random init",
                  "adversarial init", "gap", "train acc rnd / adv"):
            t.add_column(c)
        for pt in points:
            r = pt.row
            t.add_row(pt.experiment, label(pt), f"{r.dataset} / {r.model}", r.mode,
                      r.test["random"].fmt(), r.test["adversarial"].fmt(), r.gap.fmt(), r.train_pct())
        console.print(t)
        console.print(f"comparison: {out / 'comparison.md'}")
    return 0


def _print_report(console, rep: dict) -> None:
    from rich.table import Table

    for ds, model in sorted({(r.dataset, r.model) for r in rep["rows"]}):
        t = Table(title=f"{ds} / {model}: test accuracy (%), mean ± std over seeds")
        for c in ("mode", "random init", "adversarial init", "gap (points)", "train acc rnd / adv", "not done"):
            t.add_column(c)
        for r in (x for x in rep["rows"] if (x.dataset, x.model) == (ds, model)):
            tr = r.train_pct()
            nd = "; ".join(f"{i}: {', '.join(v)}" for i, v in r.not_done.items() if v)
            t.add_row(r.mode, r.test["random"].fmt(), r.test["adversarial"].fmt(), r.gap.fmt(), tr, nd)
        console.print(t)
    for c in rep["claims"]:
        mark = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]N/A[/]"}[c.passed]
        console.print(f"{mark} {c.text}")
    console.print(f"report: {rep['dir'] / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
