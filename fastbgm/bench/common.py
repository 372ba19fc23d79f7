"""Shared helpers for the benchmarks: timing, data fixtures and the result table."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


def wait_for(cond: Callable[[], Any], timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``cond`` until it holds, ``timeout`` passes, or ``proc`` (the launcher) has
    ended: a moment missed because the runs finished first never comes, and waiting out
    the timeout for it cost the suite minutes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ended = proc is not None and proc.poll() is not None
        if cond():
            return True
        if ended:
            return False
        time.sleep(0.05)
    return False


@dataclass
class Row:
    name: str
    images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class RecompileLimitHits(logging.Handler):
    """torch.compile's "hit config.recompile_limit" warnings, while attached: a function
    past the limit runs uncompiled from then on, so what a bench measures after it is not
    the mode its row names."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.hits.append(" ".join(msg.split())[:300])

    def __enter__(self) -> "RecompileLimitHits":
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_images(run_once: Callable[[], int], device: torch.device, min_seconds: float, warmup: int = 1,
                max_rounds: int = 1000) -> float:
    """Call ``run_once`` (returns images processed) until ``min_seconds``; img/s."""
    for _ in range(warmup):
        run_once()
    synchronize(device)
    t0 = time.perf_counter()
    images = 0
    rounds = 0
    while True:
        images += run_once()
        rounds += 1
        synchronize(device)
        if time.perf_counter() - t0 >= min_seconds or rounds >= max_rounds:
            break
    return images / (time.perf_counter() - t0)


def synthetic_beton(root: Path, name: str, n: int, resolution: int, image_format: str) -> Path:
    """A bench dataset written once and reused (with its resident cache)."""
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    out = root / name
    if not (out / "train.beton").exists():
        prepare(synthetic_splits(n, 0, 10, resolution, seed=0), out, image_format=image_format, show_progress=False)
    return out / "train.beton"


def _cell(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, float) and v > 100 else (f"{v:.3g}" if isinstance(v, float) else str(v))


def markdown_table(columns: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """A table's lines in markdown (images/s right-aligned, a cell's ``|`` escaped)."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c == "images/s" else "---" for c in columns) + "|"]
    return lines + ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]


def write_markdown(out: Path | None, name: str, title: str, columns: list[str], rows: Iterable[list[Any]]) -> None:
    """The table as markdown, ``out/<name>.md``: what BENCHMARKS.md takes as it is."""
    if out is None:
        return
    from fastbgm.fileio import atomic_write_text

    lines = [f"{title}", "", *markdown_table(columns, rows)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")


def print_table(title: str, columns: list[str], rows: Iterable[list[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("loader", "model", "what", "case") else "left")
    for r in rows:
        t.add_row(*[_cell(v) for v in r])
    from fastbgm.ui import console

    console().print(t)


def write_json(out: Path | None, name: str, payload: dict[str, Any]) -> None:
    if out is None:
        return
    from fastbgm.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", payload)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        import platform

        info["name"] = platform.processor() or platform.machine()
    return info
