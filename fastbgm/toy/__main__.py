"""``python -m fastbgm.toy --out DIR [--seeds K] [--key=value ...]``

Reproduces the paper's Figure 1 from scratch on a CPU: two Gaussian blobs, stage 1
on random labels of R jittered copies of the points, stage 2 from a random and from
the adversarial init in each mode. Writes DIR/toy.png (decision boundaries, each
panel titled with its train and test accuracy) and DIR/toy.json (the numbers), and
prints the table. ``--seeds K`` repeats it for seeds seed .. seed+K-1 (the figure is
the first seed's) and adds mean and std over seeds. Any field of ToyConfig is an
override: ``--seed=3``, ``--copies=4``, ``--modes=vanilla,da+l2,m``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from rich.markup import escape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbgm.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/toy"), help="output folder (default: runs/toy)")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on (default 1)")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch
    from rich.table import Table

    from ..config import ConfigError, from_dict, parse_overrides
    from ..fileio import atomic_write_json
    from ..ui import console as make_console
    from . import ToyConfig, run_toy, toy_summary, write_figure

    console = make_console()
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        cfg = from_dict(ToyConfig, parse_overrides(rest))
        args.out.mkdir(parents=True, exist_ok=True)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))} (the keys are ToyConfig's: "
                      f"{', '.join(f.name for f in dataclasses.fields(ToyConfig))})")
        return 2
    except OSError as e:
        console.print(f"[red]error:[/] cannot write to {escape(str(args.out))}: {escape(e.strerror or str(e))}; "
                      "choose another --out")
        return 2

    torch.set_num_threads(1)  # tiny full-batch steps: one thread is the fastest on any CPU
    t0 = time.perf_counter()
    results = [run_toy(dataclasses.replace(cfg, seed=cfg.seed + k)) for k in range(args.seeds)]
    try:
        figure, _ = write_figure(results[0], args.out / "toy.png")
        summary = toy_summary(results, figure.name, round(time.perf_counter() - t0, 2))
        atomic_write_json(args.out / "toy.json", summary)
    except OSError as e:
        console.print(f"[red]error:[/] cannot write to {escape(str(args.out))}: {escape(e.strerror or str(e))}")
        return 2

    stats = summary["statistics"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    t = Table(title=f"toy example: accuracy (%), seed{'s' if args.seeds > 1 else ''} {seeds}"
                    + (", mean ± std" if args.seeds > 1 else ""))
    for c in ("run", "fits", "train acc", "test acc"):
        t.add_column(c)
    for name, row in stats.items():
        fits = "random labels (confusion set)" if name == "adversarial init" else "true labels"
        cell = (lambda k: f"{100 * row[k + '_mean']:.1f} ± {100 * row[k + '_std']:.1f}") if args.seeds > 1 \
            else (lambda k: f"{100 * row[k + '_mean']:.1f}")
        t.add_row(name, fits, cell("train_acc"), cell("test_acc"))
    console.print(t)
    gaps = [g for g in summary["vanilla_gap_points"] if g is not None]
    if gaps:
        console.print(f"vanilla SGD from the adversarial init: test accuracy {sum(gaps) / len(gaps):.1f} points "
                      f"below the random init (mean of {len(gaps)} seed(s); worse in "
                      f"{summary['seeds_with_harm']} of {len(gaps)})")
    console.print(f"wrote {escape(str(args.out / 'toy.png'))} and toy.json in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
