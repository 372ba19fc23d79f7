"""The rich console every command prints through."""

from __future__ import annotations

from rich.console import Console


def console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=180)  # logs and files: do not squeeze tables to 80 columns
    return c
