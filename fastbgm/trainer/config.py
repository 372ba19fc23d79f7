"""The typed config of one training run (one ``config.json`` per run folder)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, check
from ..data.labels import LABEL_MODES
from ..models import BN_INITS, MODELS

# how the runs packed in one process share its device (see loop.py)
PACK_MODES = ("auto", "serial", "streams", "threads", "fused")


@dataclass
class DataConfig:
    train: str = ""  # path to the train .beton
    test: str = ""  # path to the test .beton ("" = no test evaluation)
    labels: str = "true"  # true | random | noisy | confusion
    label_seed: int = 0  # fixes the random labels and the confusion noise
    noise_fraction: float = 0.0  # labels = noisy: fraction replaced
    copies: int = 1  # labels = confusion: R copies per image
    zero_ratio: float = 0.0  # labels = confusion: fraction of uint8 values zeroed per copy
    augment: bool = False  # DA: random crop (zero padding crop_padding) + horizontal flip
    crop_padding: int = 4  # the paper's 4 at 32 px; keep the same fraction at other sizes
    subset: int = 0  # train on a class-balanced subset of this many images (0 = all)
    placement: str = "auto"  # auto | resident | stream
    seed: int = 0  # order and augmentation seed

    def __post_init__(self) -> None:
        check(self.labels in LABEL_MODES, "data.labels", f"must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        check(self.copies >= 1, "data.copies", f"must be >= 1, got {self.copies}")
        check(0 <= self.zero_ratio < 1, "data.zero_ratio", f"must be in [0, 1), got {self.zero_ratio}")
        check(0 <= self.noise_fraction <= 1, "data.noise_fraction", f"must be in [0, 1], got {self.noise_fraction}")
        check(self.subset >= 0, "data.subset", f"must be >= 0, got {self.subset}")
        check(self.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {self.crop_padding}")
        check(self.placement in ("auto", "resident", "stream"), "data.placement",
              f"must be auto, resident or stream, got {self.placement!r}")
        if self.labels != "confusion":
            check(self.copies == 1 and self.zero_ratio == 0, "data.copies",
                  "copies and zero_ratio apply only to labels = 'confusion'")


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    bn_init: str = "ones"  # ones | uniform (PyTorch 0.3.1's U(0,1))
    width: int = 32  # small_cnn only
    depth: int = 5  # small_cnn only
    batchnorm: bool = True  # small_cnn only
    sync_bn: str = "auto"  # SyncBatchNorm across ranks: auto (on for a multi-rank GPU run) | true | false

    def __post_init__(self) -> None:
        self.sync_bn = str(self.sync_bn).lower()  # TOML booleans of older configs
        check(self.sync_bn in ("auto", "true", "false"), "model.sync_bn",
              f"must be auto, true or false, got {self.sync_bn!r}")
        check(self.name in MODELS, "model.name", f"unknown model {self.name!r}; choose one of {', '.join(MODELS)}")
        check(self.bn_init in BN_INITS, "model.bn_init", f"must be one of {', '.join(BN_INITS)}, got {self.bn_init!r}")
        check(self.width >= 1 and self.depth >= 1, "model.width", "width and depth must be >= 1")

    def kwargs(self) -> dict:
        if self.name == "small_cnn":
            return {"width": self.width, "depth": self.depth, "batchnorm": self.batchnorm}
        return {}


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    wd_exclude_bn_bias: bool = False  # the authors decayed everything, BN and biases included
    nesterov: bool = False
    batch_size: int = 128  # global batch, split over ranks
    lr_scaling: str = "none"  # none | linear: lr * batch_size / base_batch_size
    base_batch_size: int = 128
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 250])
    gamma: float = 0.1
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr_scaling in ("none", "linear"), "optim.lr_scaling", f"must be none or linear, got {self.lr_scaling!r}")
        check(self.schedule in ("multistep", "cosine", "constant"), "optim.schedule",
              f"must be multistep, cosine or constant, got {self.schedule!r}")
        check(self.milestones == sorted(self.milestones), "optim.milestones", "must be increasing")
        check(0 < self.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {self.gamma}")
        check(not self.nesterov or self.momentum > 0, "optim.nesterov", "needs momentum > 0")

    @property
    def peak_lr(self) -> float:
        return self.lr * (self.batch_size / self.base_batch_size if self.lr_scaling == "linear" else 1.0)


@dataclass
class StopConfig:
    max_epochs: int = 350
    target_train_acc: float = 0.0  # > 0: stop once eval-mode train accuracy reaches it (stage 1: 0.9999)
    train_eval_every: int = 25  # epochs between full-train-set evaluations (eval mode)
    test_eval_every: int = 25  # epochs between test evaluations (the last epoch always)

    def __post_init__(self) -> None:
        check(self.max_epochs >= 1, "stop.max_epochs", f"must be >= 1, got {self.max_epochs}")
        check(0 <= self.target_train_acc <= 1, "stop.target_train_acc", f"must be in [0, 1], got {self.target_train_acc}")
        check(self.train_eval_every >= 1, "stop.train_eval_every", "must be >= 1")
        check(self.test_eval_every >= 1, "stop.test_eval_every", "must be >= 1")


@dataclass
class SpeedConfig:
    """Each switch is 'auto' (on for GPUs, off on CPU) or an explicit value; the
    resolved values are what config.json records."""

    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # auto | true | false
    compile_mode: str = "auto"  # auto (reduce-overhead = CUDA graphs on GPU, default on CPU) | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    cudnn_benchmark: str = "auto"
    threads: int = 0  # CPU threads (0 = torch's default)
    # the whole step (forward, loss, backward, SGD, metrics) as one CUDA graph; one-rank
    # runs, not fp16; compile_mode auto then means default (see trainer/stepgraph.py).
    # auto: on for a one-rank GPU run that is not fp16 and names no graph-recording
    # compile_mode (exact, faster than torch.compile's graphs: BENCHMARKS.md), else off
    step_graph: str = "auto"  # auto | true | false
    # seconds between two checkpoints (last.pt; at most one an epoch, and always at the run's
    # last epoch and when its stop rule fires); 0: every epoch. A kill loses at most this
    # much training (a resumed run recomputes it exactly); a GPU epoch of CIFAR-10 takes
    # about as long as writing ResNet18's checkpoint every epoch would cost
    checkpoint_every_s: float = 60.0
    # images a batch of evaluation (eval mode, no gradients: the batch changes only how fast
    # the same per-image numbers come out). 0 = auto: on a GPU about 1024 images of 32x32
    # (fewer at larger resolutions), at least the training batch, as eager evaluation at
    # batch 128 pays a launch per kernel per batch; on a CPU the training batch
    eval_batch_size: int = 0

    def __post_init__(self) -> None:
        check(self.step_graph in ("auto", "true", "false"), "speed.step_graph",
              f"must be auto, true or false, got {self.step_graph!r}")
        check(self.eval_batch_size >= 0, "speed.eval_batch_size",
              f"must be >= 0 (0: auto), got {self.eval_batch_size}")
        check(self.checkpoint_every_s >= 0, "speed.checkpoint_every_s",
              f"must be >= 0 (0: a checkpoint every epoch), got {self.checkpoint_every_s}")
        for k in ("compile", "channels_last", "cudnn_benchmark"):
            v = getattr(self, k)
            check(v in ("auto", "true", "false"), f"speed.{k}", f"must be auto, true or false, got {v!r}")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"), "speed.precision",
              f"must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        check(self.device in ("auto", "cpu", "cuda"), "speed.device", f"must be auto, cpu or cuda, got {self.device!r}")
        modes = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        check(self.compile_mode in modes, "speed.compile_mode", f"must be one of {', '.join(modes)}, got {self.compile_mode!r}")


@dataclass
class DistConfig:
    """How many ranks one run spans. Part of what a run *is*: the per-rank batch is
    what BatchNorm normalises over (without SyncBatchNorm), so a run is never resumed
    on another world size. 0 = as launched; config.json records the value used."""

    world: int = 0
    per_rank_batch: int = 0  # recorded: ceil(optim.batch_size / world)

    def __post_init__(self) -> None:
        check(self.world >= 0, "dist.world", f"must be >= 0 (0: as launched), got {self.world}")
        check(self.per_rank_batch >= 0, "dist.per_rank_batch", f"must be >= 0, got {self.per_rank_batch}")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0  # model init seed
    init_from: str = ""  # checkpoint to start from (weights + BN statistics, fresh optimizer)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log_every: int = 0  # steps between log lines inside an epoch (0 = per epoch only)
    mfu: bool = True

    def __post_init__(self) -> None:
        if not self.data.train:
            raise ConfigError("data.train: the training .beton is required (e.g. --data.train=data/cifar10/train.beton)")
        if self.dist.world and self.dist.per_rank_batch:
            want = -(-self.optim.batch_size // self.dist.world)
            check(self.dist.per_rank_batch == want, "dist.per_rank_batch",
                  f"is {self.dist.per_rank_batch}, but batch_size {self.optim.batch_size} over "
                  f"{self.dist.world} rank(s) gives {want}")


# Speed switches that change the numbers a run computes; the others (compile, channels
# last, cuDNN autotuning, threads, the checkpoint interval) change only how fast the same maths runs.
MATH_SPEED_KEYS = ("speed.device", "speed.precision")
# What a run says about itself, not what it computes: free to change on resume, like the
# speed switches outside MATH_SPEED_KEYS.
REPORTING_KEYS = ("log_every", "mfu")
# Values that a planned (not yet started) config leaves to be resolved by the trainer.
UNRESOLVED = {"speed.device": "auto", "speed.precision": "auto", "model.sync_bn": "auto",
              "dist.world": 0, "dist.per_rank_batch": 0}


def identity_changes(recorded: dict, new: dict, planned: bool = False) -> tuple[list[str], list[str]]:
    """Compare a run folder's recorded config.json with a config for the same folder.

    Returns ``(changed, harmless)``: the keys whose change makes it another run (the
    folder must be refused), and the speed and reporting switches that changed without
    changing the maths (fine to resume; worth a log line). ``planned``: ``new`` is a
    launcher's plan, whose "auto" values are not resolved yet and so match any recorded value.
    """
    from ..config import config_diff, flatten

    diff = config_diff(recorded, new)
    now = flatten(new)
    harmless = [k for k in diff if (k.startswith("speed.") and k not in MATH_SPEED_KEYS) or k in REPORTING_KEYS]
    changed = [k for k in diff if k not in harmless]
    if planned:
        changed = [k for k in changed if not (k in UNRESOLVED and now.get(k) == UNRESOLVED[k])]
    return changed, harmless


__all__ = ["RunConfig", "DistConfig", "identity_changes", "DataConfig", "ModelConfig", "OptimConfig", "StopConfig", "SpeedConfig"]
