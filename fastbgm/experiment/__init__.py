"""Experiments: a config of datasets x models x seeds x modes x inits, expanded into
runs with dependencies and a stable folder layout. Knows nothing of Slurm."""

from .config import (INITS, REGULARISERS, DatasetEntry, ExperimentConfig, Resources, Stage1Config, Stage2Config,
                     expand_modes, mode_name, parse_mode)
from .plan import RunSpec, experiment_dir, plan, run_status, write_plan

__all__ = ["ExperimentConfig", "DatasetEntry", "Stage1Config", "Stage2Config", "Resources", "RunSpec", "plan",
           "run_status", "write_plan", "experiment_dir", "expand_modes", "parse_mode", "mode_name", "INITS",
           "REGULARISERS"]
