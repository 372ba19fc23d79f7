"""The training engine: one :class:`Trainer` runs one run from one :class:`RunConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# name -> the submodule that defines it, imported on first use (PEP 562): a launcher that
# reads run configs and run folders (config, checkpoint's file names) imports no torch
_EXPORTS = {
    "RunConfig": "config", "DataConfig": "config", "ModelConfig": "config", "OptimConfig": "config",
    "StopConfig": "config", "SpeedConfig": "config",
    "Trainer": "trainer", "NonFiniteLoss": "trainer", "StopRequested": "trainer", "lr_factor": "trainer",
    "request_stop": "trainer", "resolve_speed": "trainer", "stop_requested": "trainer",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, SpeedConfig, StopConfig  # noqa: F401
    from .trainer import (NonFiniteLoss, StopRequested, Trainer, lr_factor, request_stop,  # noqa: F401
                          resolve_speed, stop_requested)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
