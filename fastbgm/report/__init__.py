"""The report: the paper's tables, claim checks and figures from run folders.
Reads run folders only; never imports the trainer or the launcher."""

from .analysis import Claim, claims, table
from .build import build_report
from .collect import Run, collect

__all__ = ["build_report", "collect", "table", "claims", "Run", "Claim"]
