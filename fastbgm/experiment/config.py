"""An experiment: datasets x models x seeds, the stage-1 set, and the stage-2
regularisation modes run from random and adversarial init. One TOML file each
(see configs/); any key overridable as ``--section.key=value``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, check
from ..models import MODELS
from ..trainer.config import ModelConfig, SpeedConfig

REGULARISERS = ("da", "l2", "m")  # data augmentation, weight decay, momentum
INITS = ("random", "adversarial")


def parse_mode(mode: str) -> tuple[str, ...]:
    """'vanilla' -> (); 'm+da' -> ('da', 'm'): canonical order, validated."""
    m = mode.strip().lower()
    if m in ("vanilla", "none", ""):
        return ()
    parts = [p.strip() for p in m.replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in REGULARISERS]
    if bad:
        raise ConfigError(f"modes: unknown regulariser {bad[0]!r} in {mode!r}; use vanilla or a '+' join of da, l2, m")
    return tuple(r for r in REGULARISERS if r in parts)


def mode_name(regs: tuple[str, ...]) -> str:
    return "+".join(regs) if regs else "vanilla"


def expand_modes(modes: list[str]) -> list[str]:
    """Canonical names; 'all' = the 8 on/off combinations of DA, L2, M."""
    out: list[str] = []
    for m in modes:
        if m.strip().lower() == "all":
            names = [mode_name(tuple(r for r, on in zip(REGULARISERS, bits) if on))
                     for bits in itertools.product((0, 1), repeat=3)]
        else:
            names = [mode_name(parse_mode(m))]
        out.extend(n for n in names if n not in out)
    return out


@dataclass
class DatasetEntry:
    name: str = ""
    train: str = ""  # the train .beton
    test: str = ""  # the test .beton
    subset: int = 0  # class-balanced subset of the training set (0 = all)
    placement: str = "auto"
    crop_padding: int = 4  # DA's zero padding: the paper's 4 at 32 px (2 keeps that fraction at 16 px)
    prepare: str = ""  # a source that needs no input files (digits, synthetic): written when missing
    prepare_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of that source

    def __post_init__(self) -> None:
        check(self.prepare in ("", "digits", "synthetic"), "datasets.prepare",
              f"must be digits or synthetic (sources that need no files), got {self.prepare!r}")
        check(bool(self.name) and "/" not in self.name, "datasets.name", "each dataset needs a name without '/'")
        check(bool(self.train), "datasets.train", f"dataset {self.name!r} needs a train .beton path")


@dataclass
class Stage1Config:
    """The paper's stage 1: SGD on the confusion set until it is memorised."""

    copies: int = 10
    zero_ratio: float = 0.1
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 250])
    max_epochs: int = 350
    target_train_acc: float = 0.9999
    check_every: int = 25

    def __post_init__(self) -> None:
        check(self.copies >= 1, "stage1.copies", f"must be >= 1, got {self.copies}")
        check(0 <= self.zero_ratio < 1, "stage1.zero_ratio", f"must be in [0, 1), got {self.zero_ratio}")


@dataclass
class Stage2Config:
    """Stage 2 with the true labels; ``weight_decay``/``momentum`` are the values used
    when L2 / M are on (off = 0)."""

    lr: float = 0.1
    batch_size: int = 128
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 250])
    max_epochs: int = 350
    eval_every: int = 25  # test-set evaluation, every K epochs
    target_train_acc: float = 0.0  # the authors' code never stops stage 2 early
    check_every: int = 0  # full-train-set check for target_train_acc every K epochs (0: = eval_every)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    wd_exclude_bn_bias: bool = False

    def __post_init__(self) -> None:
        check(self.eval_every >= 1, "stage2.eval_every", f"must be >= 1, got {self.eval_every}")
        check(self.check_every >= 0, "stage2.check_every", f"must be >= 0 (0: same as eval_every), got {self.check_every}")


@dataclass
class Resources:
    """Per run. ``gpus`` = GPUs per node (0: CPU tasks); ``nodes`` > 1 = one DDP job
    across nodes. Small runs (one GPU) are separate jobs, so Slurm packs one per GPU."""

    nodes: int = 1
    gpus: int = 1
    tasks_per_node: int = 0  # 0: one per GPU (or 1 on CPU)
    cpus_per_task: int = 4
    mem_gb: int = 0
    time: str = "12:00:00"
    partition: str = ""

    def __post_init__(self) -> None:
        check(self.nodes >= 1, "resources.nodes", "must be >= 1")
        check(self.gpus >= 0 and self.cpus_per_task >= 1, "resources.gpus", "gpus >= 0 and cpus_per_task >= 1")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus)

    @property
    def timeout_min(self) -> int:
        parts = [int(p) for p in self.time.replace("-", ":").split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        days = parts[0] if len(parts) == 4 else 0
        h, m, s = parts[-3:]
        return days * 1440 + h * 60 + m + (1 if s else 0)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    runs_dir: str = "runs"
    datasets: list[DatasetEntry] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["resnet18"])
    seeds: list[int] = field(default_factory=lambda: [0])
    modes: list[str] = field(default_factory=lambda: ["vanilla", "da+l2+m"])
    inits: list[str] = field(default_factory=lambda: list(INITS))
    model: ModelConfig = field(default_factory=ModelConfig)  # shared options (bn_init, small_cnn size)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        check(bool(self.datasets), "datasets", "declare at least one [[datasets]] table with name and train")
        for m in self.models:
            check(m in MODELS, "models", f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        for i in self.inits:
            check(i in INITS, "inits", f"unknown init {i!r}; use random and/or adversarial")
        check(bool(self.seeds), "seeds", "at least one seed")
        self.modes = expand_modes(self.modes)
        names = [d.name for d in self.datasets]
        check(len(set(names)) == len(names), "datasets", "dataset names must be unique")
