"""Assemble the report folder: report.md, results.csv, figures, figures.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, atomic_write_text
from . import figures as F
from .analysis import Claim, Row, claims, stage1_rows, table
from .collect import Run, collect


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def results_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    cols = ["key", "dataset", "model", "seed", "stage", "init", "mode", "status", "epochs", "train_acc", "test_acc",
            "epochs_to_100_train", "reason"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in runs:
        w.writerow([r.key, r.dataset, r.model, r.seed, r.stage, r.init, r.mode, r.status, r.epochs or "",
                    "" if r.train_acc is None else f"{r.train_acc:.6f}", "" if r.test_acc is None else f"{r.test_acc:.6f}",
                    r.epochs_to_100 or "", r.result.get("reason", "")])
    return buf.getvalue()


def provenance(runs: list[Run], exp_config: dict[str, Any]) -> list[str]:
    envs = [r.env for r in runs if r.env]
    def uniq(f):  # noqa: E306
        return sorted({str(f(e)) for e in envs if f(e) is not None})
    lines = []
    data = {}
    for e in envs:
        for k in ("train_data", "test_data"):
            if e.get(k):
                data[e[k]["path"]] = e[k].get("sha256", "")
    for p, sha in sorted(data.items()):
        lines.append(f"- dataset `{p}` sha256 `{sha[:16]}…`")
    lines.append(f"- code: fastbgm {', '.join(uniq(lambda e: e.get('fastbgm')))}, git commit "
                 f"{', '.join(c[:10] for c in uniq(lambda e: e.get('git_commit'))) or 'unknown'}")
    lines.append(f"- device: {', '.join(uniq(lambda e: e.get('device')))}; world size "
                 f"{', '.join(uniq(lambda e: e.get('world')))}; torch {', '.join(uniq(lambda e: e.get('torch')))}")
    speeds = uniq(lambda e: ", ".join(f"{k}={v}" for k, v in sorted(e.get("speed", {}).items())))
    lines.append(f"- speed switches: {' | '.join(speeds) or '-'}")
    lines.append(f"- BatchNorm init: {', '.join(uniq(lambda e: e.get('bn_init')))}")
    lines.append(f"- seeds: {', '.join(uniq(lambda e: e.get('seed')))}")
    if exp_config:
        s1 = exp_config.get("stage1", {})
        lines.append(f"- stage 1: R={s1.get('copies')} copies, zero ratio {s1.get('zero_ratio')}, lr {s1.get('lr')}, "
                     f"stop at {s1.get('target_train_acc')} train accuracy checked every {s1.get('check_every')} epochs")
    return lines


def markdown(name: str, runs: list[Run], rows: list[Row], cl: list[Claim], figs: list[dict[str, Any]],
             prov: list[str], min_gap: float) -> str:
    out = [f"# Report: {name}", ""]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    out.append("Runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".")
    out += ["", "## Claims", "", f"Gap = test accuracy from random init minus adversarial init (points), paired by "
            f"seed; within noise = gap <= max(2 standard errors, {100 * min_gap:.1f} point); a gap counts once both "
            f"inits reached the convergence threshold in final train accuracy.", ""]
    for c in cl:
        mark = {True: "PASS", False: "FAIL", None: "N/A"}[c.passed]
        out.append(f"- **{mark}** {c.text}")
    for ds, model in sorted({(r.dataset, r.model) for r in rows}):
        out += ["", f"## {ds} / {model}", "",
                "| mode | test acc, random init | test acc, adversarial init | gap (points) | train acc random / adv. "
                "| epochs to 100% train random / adv. | not done |",
                "|---|---|---|---|---|---|---|"]
        for r in (x for x in rows if (x.dataset, x.model) == (ds, model)):
            nd = "; ".join(f"{i}: {', '.join(v)}" for i, v in r.not_done.items() if v) or ""
            out.append(f"| {r.mode} | {r.test['random'].fmt()} | {r.test['adversarial'].fmt()} | {r.gap.fmt()} | "
                       f"{_pct(r.train['random'].mean)} / {_pct(r.train['adversarial'].mean)} | "
                       f"{r.to100['random'].fmt(1, 0)} / {r.to100['adversarial'].fmt(1, 0)} | {nd} |")
        for f in (x for x in figs if x["dataset"] == ds and x["model"] == model):
            out += ["", f"![{f['kind']}]({f['file']})"]
    s1 = stage1_rows(runs)
    if s1:
        out += ["", "## Stage 1 (the adversarial initialisation)", "",
                "| run | status | epochs | random-label train acc (eval mode) | target reached |", "|---|---|---|---|---|"]
        for r in s1:
            out.append(f"| {r['run']} | {r['status']} | {r['epochs'] or '-'} | {_pct(r['random_label_train_acc'])} | "
                       f"{r['target_reached']} |")
    bad = [r for r in runs if r.status != "done"]
    if bad:
        out += ["", "## Runs not done", ""]
        out += [f"- {r.key}: **{r.status}**" + (f" ({r.result['reason']})" if r.result.get("reason") else "")
                for r in bad]
    out += ["", "## Provenance", "", *prov, "", "Per-run numbers: [results.csv](results.csv).", ""]
    return "\n".join(out)


def build_report(exp_dir: str | Path, min_gap: float = 0.01, converged: float = 0.99) -> dict[str, Any]:
    root = Path(exp_dir)
    runs, exp_config = collect(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = table(runs)
    cl = claims(rows, min_gap, converged)
    figs: list[dict[str, Any]] = []
    for ds, model in sorted({(r.dataset, r.model) for r in runs if r.stage == 2}):
        for kind, fn, arg in (("curves", F.curves, runs), ("gap", F.gap_bars, rows), ("complexity", F.complexity, runs)):
            path, panels = fn(arg, ds, model, out)
            figs.append({"kind": kind, "dataset": ds, "model": model, "file": path.name, "panels": panels})
    atomic_write_json(out / "figures.json", figs)
    atomic_write_text(out / "results.csv", results_csv(runs))
    atomic_write_text(out / "report.md", markdown(root.name, runs, rows, cl, figs, provenance(runs, exp_config), min_gap))
    atomic_write_json(out / "claims.json", [{"passed": c.passed, "text": c.text} for c in cl])
    return {"name": root.name, "config": exp_config, "runs": runs, "rows": rows, "claims": cl, "figures": figs,
            "dir": out}
