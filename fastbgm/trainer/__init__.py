"""The training engine: one :class:`Trainer` runs one run from one :class:`RunConfig`."""

from .config import DataConfig, ModelConfig, OptimConfig, RunConfig, SpeedConfig, StopConfig
from .trainer import NonFiniteLoss, StopRequested, Trainer, lr_factor, request_stop, resolve_speed, stop_requested

__all__ = ["Trainer", "RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "StopConfig", "SpeedConfig",
           "NonFiniteLoss", "StopRequested", "lr_factor", "request_stop", "resolve_speed",
           "stop_requested"]
