"""The training engine: one :class:`Trainer` runs one run from one :class:`RunConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# name -> the submodule that defines it, imported on first use (PEP 562): a launcher that
# reads run configs and run folders (config, checkpoint's file names) imports no torch
_EXPORTS = {
    "RunConfig": "config", "DataConfig": "config", "ModelConfig": "config", "OptimConfig": "config",
    "StopConfig": "config", "SpeedConfig": "config",
    "Trainer": "trainer", "lr_factor": "trainer", "resolve_speed": "speed",
    "NonFiniteLoss": "stops", "StopRequested": "stops", "request_stop": "stops", "stop_requested": "stops",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, SpeedConfig, StopConfig  # noqa: F401
    from .speed import resolve_speed  # noqa: F401
    from .stops import NonFiniteLoss, StopRequested, request_stop, stop_requested  # noqa: F401
    from .trainer import Trainer, lr_factor  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
