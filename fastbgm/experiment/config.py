"""An experiment: datasets x models x seeds, the stage-1 set, and the stage-2
regularisation modes run from random and adversarial init. One TOML file each
(see configs/); any key overridable as ``--section.key=value``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, check
from ..models import MODELS
from ..trainer.config import PACK_MODES, ModelConfig, SpeedConfig

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


def check_training(section: str, c: Any) -> None:
    """The optimisation keys both stages share, checked when the experiment is loaded and
    named as the user wrote them (not as the run config they become)."""
    check(c.lr > 0, f"{section}.lr", f"must be > 0, got {c.lr}")
    check(c.batch_size >= 1, f"{section}.batch_size", f"must be >= 1, got {c.batch_size}")
    check(0 <= c.momentum < 1, f"{section}.momentum", f"must be in [0, 1), got {c.momentum}")
    check(c.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {c.weight_decay}")
    check(c.max_epochs >= 1, f"{section}.max_epochs", f"must be >= 1, got {c.max_epochs}")
    check(c.milestones == sorted(c.milestones), f"{section}.milestones", f"must be increasing, got {c.milestones}")
    check(c.schedule in ("multistep", "cosine", "constant"), f"{section}.schedule",
          f"must be multistep, cosine or constant, got {c.schedule!r}")
    check(0 <= c.target_train_acc <= 1, f"{section}.target_train_acc", f"must be in [0, 1], got {c.target_train_acc}")


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
        check_training("stage1", self)
        check(self.check_every >= 1, "stage1.check_every", f"must be >= 1, got {self.check_every}")


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
        check_training("stage2", self)
        check(self.eval_every >= 1, "stage2.eval_every", f"must be >= 1, got {self.eval_every}")
        check(self.check_every >= 0, "stage2.check_every", f"must be >= 0 (0: same as eval_every), got {self.check_every}")


TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def parse_time(text: str) -> int:
    """Seconds in a time limit written as sbatch reads ``--time``: ``30`` is 30 minutes,
    ``2-12`` two and a half days. Raises ConfigError on anything else."""
    t = str(text).strip()
    days, _, rest = t.rpartition("-") if "-" in t else ("", "", t)
    parts = rest.split(":")
    ok = all(p.isdigit() for p in parts) and ("-" not in t or days.isdigit()) and 1 <= len(parts) <= 3
    if not ok:
        raise ConfigError(f"resources.time: {text!r} is not a Slurm time limit; write {TIME_FORMS} "
                          "(e.g. 30 for half an hour, 12:00:00, 2-12 for two and a half days)")
    n = [int(p) for p in parts]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, s = (n + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(n) == 1:  # MM
        return n[0] * 60
    if len(n) == 2:  # MM:SS
        return n[0] * 60 + n[1]
    return (n[0] * 60 + n[1]) * 60 + n[2]  # HH:MM:SS


JOB_MODES = ("allocation", "per-run")


@dataclass
class Resources:
    """Where the experiment runs. ``nodes`` x ``gpus`` is the allocation it may occupy at
    once (``--nodes 4 --gpus-per-node 8``: at most 32 GPUs); how many of them one run
    takes is ``ranks_per_run``, a property of the run (it never changes with the
    allocation: a run's global and per-rank batch stay what its config says).

    ``jobs = "allocation"``: on Slurm, one job for the whole experiment, its runs packed
    onto the allocation as job steps. ``"per-run"``: one job per run (job arrays), for
    clusters that prefer short jobs. On CPU-only nodes (``gpus = 0``) a rank is a CPU
    task of ``cpus_per_task`` cores, and a node holds ``tasks_per_node`` of them."""

    nodes: int = 1
    # Slurm: the fewest nodes a new allocation may start on when some of the partition's
    # are down or drained (0: all of ``nodes``; the allocation then waits for them)
    min_nodes: int = 0
    gpus: int = 1  # GPUs per node (0: CPU-only nodes)
    ranks_per_run: int = 1  # processes (GPUs) one run spans: > 1 is one DDP run
    runs_per_gpu: int = 1  # one-rank runs packed onto one GPU (or CPU slot), in one process
    pack_mode: str = "auto"  # how they share it: fastbgm.trainer.config.PACK_MODES (fused: one network)
    ranks_per_node: int = 0  # of one run, on one node (0: as many as a node holds)
    tasks_per_node: int = 0  # CPU-only nodes: rank slots per node (0: 1)
    cpus_per_task: int = 4
    mem_gb: int = 0
    time: str = "12:00:00"  # per job, as sbatch reads --time
    partition: str = ""
    jobs: str = "allocation"  # allocation | per-run
    # seconds a training process may go without progress (a step, a set-up, an epoch's
    # end) before the launch takes it as hung, kills it and starts its runs again from
    # their last checkpoint (0: never); locally and in an allocation, not per-run jobs
    stall_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        check(self.nodes >= 1, "resources.nodes", f"must be >= 1, got {self.nodes}")
        check(self.gpus >= 0, "resources.gpus", f"must be >= 0, got {self.gpus}")
        check(self.cpus_per_task >= 1, "resources.cpus_per_task", f"must be >= 1, got {self.cpus_per_task}")
        check(self.ranks_per_run >= 1, "resources.ranks_per_run", f"must be >= 1, got {self.ranks_per_run}")
        check(self.ranks_per_node >= 0 and self.tasks_per_node >= 0, "resources.ranks_per_node",
              "ranks_per_node and tasks_per_node must be >= 0")
        check(self.jobs in JOB_MODES, "resources.jobs", f"must be allocation or per-run, got {self.jobs!r}")
        check(self.runs_per_gpu >= 1, "resources.runs_per_gpu", f"must be >= 1, got {self.runs_per_gpu}")
        check(self.pack_mode in PACK_MODES, "resources.pack_mode",
              f"must be one of {', '.join(PACK_MODES)}, got {self.pack_mode!r}")
        check(self.runs_per_gpu == 1 or self.jobs == "allocation", "resources.runs_per_gpu",
              "packs runs inside an allocation (or locally); with jobs = per-run each run is its own job")
        check(self.stall_timeout_s >= 0, "resources.stall_timeout_s",
              f"must be >= 0 seconds (0: never take a run as hung), got {self.stall_timeout_s}")
        parse_time(self.time)
        per_node = self.run_ranks_per_node
        check(self.ranks_per_run % per_node == 0, "resources.ranks_per_run",
              f"{self.ranks_per_run} ranks do not split evenly into {per_node} per node; set "
              "resources.ranks_per_node to a divisor")
        check(per_node <= self.slots_per_node, "resources.ranks_per_node",
              f"{per_node} ranks per node, but a node holds {self.slots_per_node} "
              f"({'GPUs' if self.gpus else 'tasks'}); lower it or raise --gpus-per-node")
        check(self.run_nodes <= self.nodes, "resources.ranks_per_run",
              f"one run spans {self.run_nodes} node(s) ({self.ranks_per_run} ranks, {per_node} per node) but the "
              f"allocation has {self.nodes}; raise --nodes or lower ranks_per_run")
        check(0 <= self.min_nodes <= self.nodes, "resources.min_nodes",
              f"must be between 0 (all of --nodes) and --nodes ({self.nodes}), got {self.min_nodes}")
        check(self.least_nodes >= self.run_nodes, "resources.min_nodes",
              f"one run spans {self.run_nodes} node(s), so an allocation of {self.min_nodes} could never train it; "
              f"raise --min-nodes to {self.run_nodes}")

    @property
    def least_nodes(self) -> int:
        """The fewest nodes an allocation may start on."""
        return self.min_nodes or self.nodes

    @property
    def slots_per_node(self) -> int:
        """Ranks one node holds at once: its GPUs, or its CPU task slots."""
        return self.gpus or self.tasks_per_node or 1

    @property
    def slots(self) -> int:
        return self.nodes * self.slots_per_node

    @property
    def run_ranks_per_node(self) -> int:
        return self.ranks_per_node or min(self.ranks_per_run, self.slots_per_node)

    @property
    def run_nodes(self) -> int:
        return self.ranks_per_run // self.run_ranks_per_node

    @property
    def timeout_min(self) -> int:
        return -(-parse_time(self.time) // 60)


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
