"""The paper's two-dimensional toy example (its Figure 1), trained from scratch.

The same two stages as the image experiments, in two dimensions:

- the data: two Gaussian blobs (class 0 on the left, class 1 on the right), a
  seeded train set and a larger seeded test set;
- stage 1, the adversarial init: the *confusion set* is R copies of every training
  point, copy ``r`` of point ``i`` at virtual index ``r * n + i`` with its own
  uniform random label (``LabelSpec(mode="confusion")``, the table the loader uses)
  and its own input noise. In 2-D the noise is a Gaussian jitter of the copy's
  coordinates (the images' analogue zeroes 10% of the pixel values). The network
  trains on it until it fits every random label;
- stage 2: the clean training points with their true labels, from the adversarial
  init and from a random init, in each regularisation mode (``vanilla``, ``da``,
  ``l2``, ``m`` and their '+' joins, as in the experiment configs). DA is the 2-D
  analogue of random crops: every step sees freshly jittered copies of the points.

The network is a 2-W-W-2 fully connected net whose first activation is
``sin(frequency * z)`` (a SIREN-style layer), then ReLU: a plain ReLU net memorises
random labels in 2-D only after minutes of SGD, this one in about a second. Stage 1
uses SGD with momentum for the same reason (the paper's stage 1 uses plain SGD);
stage 2 is full-batch SGD for a fixed number of steps, like the paper's fixed
epochs. Everything is a pure function of the config: same seed, same numbers.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import ConfigError, check
from ..data.hashing import scalar_seed
from ..data.labels import LabelSpec, make_label_table
from ..experiment.config import INITS, expand_modes, parse_mode

log = logging.getLogger(__name__)

# Independent random streams of the toy (all derived from the one seed).
_DATA, _INIT, _COPY_NOISE, _DA = 0x70D1, 0x70D2, 0x70D3, 0x70D4


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    # data: two blobs, centres at (-separation/2, 0) and (+separation/2, 0)
    train_per_class: int = 50
    test_per_class: int = 500
    separation: float = 1.3
    spread: float = 0.15
    # the network
    width: int = 100
    frequency: float = 30.0
    # stage 1: the confusion set and its training
    copies: int = 2  # R
    copy_noise: float = 0.1  # std of each copy's jitter
    stage1_lr: float = 0.05
    stage1_momentum: float = 0.9
    stage1_max_steps: int = 5000
    # stage 2
    modes: tuple[str, ...] = ("vanilla", "da+l2")
    stage2_lr: float = 0.1
    stage2_steps: int = 500
    da_noise: float = 0.1  # std of the DA jitter
    weight_decay: float = 5e-3  # l2
    momentum: float = 0.9  # m

    def __post_init__(self) -> None:
        for name in ("train_per_class", "test_per_class", "width", "copies", "stage1_max_steps", "stage2_steps"):
            check(int(getattr(self, name)) >= 1, "toy", f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("separation", "spread", "frequency", "stage1_lr", "stage2_lr"):
            check(float(getattr(self, name)) > 0, "toy", f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("copy_noise", "da_noise", "weight_decay"):
            check(float(getattr(self, name)) >= 0, "toy", f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage1_momentum", "momentum"):
            check(0 <= float(getattr(self, name)) < 1, "toy", f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.modes:
            raise ConfigError("toy: modes is empty; give at least one, e.g. vanilla")
        object.__setattr__(self, "modes", tuple(expand_modes(list(self.modes))))


@dataclass
class Points:
    x: torch.Tensor  # [N, 2] float32
    y: torch.Tensor  # [N] int64


@dataclass
class ToyRun:
    """One trained network: the adversarial init itself, or one stage-2 run."""

    name: str
    init: str  # random | adversarial ('' for stage 1)
    mode: str  # the stage-2 mode, or 'stage1'
    steps: int
    train_acc: float  # on the set it trained on (the confusion set for stage 1)
    test_acc: float  # on the test set with its true labels
    seconds: float
    model: nn.Module = field(repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


@dataclass
class ToyResult:
    config: ToyConfig
    train: Points
    test: Points
    confusion: Points
    stage1: ToyRun
    runs: list[ToyRun]  # stage 2, every init x mode

    def run(self, init: str, mode: str) -> ToyRun:
        name = f"{init}/{expand_modes([mode])[0]}"
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no toy run {name}: the runs are {', '.join(r.name for r in self.runs)}")

    def summary(self) -> dict:
        return {"config": asdict(self.config), "stage1": self.stage1.summary(),
                "runs": [r.summary() for r in self.runs]}


def _generator(cfg: ToyConfig, stream: int, *more: int) -> torch.Generator:
    return torch.Generator().manual_seed(scalar_seed(stream, cfg.seed, *more))


def two_blobs(cfg: ToyConfig, per_class: int, split: int) -> Points:
    g = _generator(cfg, _DATA, split)
    y = torch.arange(2).repeat_interleave(per_class)
    x = torch.randn(2 * per_class, 2, generator=g) * cfg.spread
    x[:, 0] += torch.where(y == 1, cfg.separation / 2, -cfg.separation / 2)
    return Points(x, y)


def confusion_set(cfg: ToyConfig, train: Points) -> Points:
    """R jittered copies of the training points, each with its own random label."""
    n = train.y.numel()
    labels = make_label_table(train.y, 2, LabelSpec(mode="confusion", seed=cfg.seed, copies=cfg.copies))
    g = _generator(cfg, _COPY_NOISE)
    x = train.x.repeat(cfg.copies, 1) + cfg.copy_noise * torch.randn(n * cfg.copies, 2, generator=g)
    return Points(x, labels)


class _Sine(nn.Module):
    def __init__(self, frequency: float) -> None:
        super().__init__()
        self.frequency = frequency

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.frequency * z)


def toy_net(cfg: ToyConfig, init_seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(scalar_seed(_INIT, cfg.seed, init_seed))
        return nn.Sequential(nn.Linear(2, cfg.width), _Sine(cfg.frequency), nn.Linear(cfg.width, cfg.width),
                             nn.ReLU(), nn.Linear(cfg.width, 2))


@torch.no_grad()
def accuracy(model: nn.Module, pts: Points) -> float:
    return (model(pts.x).argmax(1) == pts.y).float().mean().item()


def train_stage1(cfg: ToyConfig, confusion: Points) -> tuple[nn.Module, int]:
    """Fit the random labels of the confusion set; returns the net and its steps."""
    model = toy_net(cfg, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.stage1_lr, momentum=cfg.stage1_momentum)
    for step in range(1, cfg.stage1_max_steps + 1):
        loss = nn.functional.cross_entropy(model(confusion.x), confusion.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 and accuracy(model, confusion) == 1.0:
            return model, step
    return model, cfg.stage1_max_steps


def train_stage2(cfg: ToyConfig, model: nn.Module, train: Points, mode: str, stream: int) -> nn.Module:
    regs = parse_mode(mode)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.stage2_lr,
                          momentum=cfg.momentum if "m" in regs else 0.0,
                          weight_decay=cfg.weight_decay if "l2" in regs else 0.0)
    g = _generator(cfg, _DA, stream)
    for _ in range(cfg.stage2_steps):
        x = train.x
        if "da" in regs:
            x = x + cfg.da_noise * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(x), train.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run_toy(cfg: ToyConfig) -> ToyResult:
    """Stage 1, then stage 2 from both inits in every mode (about a second each on a CPU)."""
    train = two_blobs(cfg, cfg.train_per_class, 0)
    test = two_blobs(cfg, cfg.test_per_class, 1)
    confusion = confusion_set(cfg, train)

    t0 = time.perf_counter()
    adversarial, steps = train_stage1(cfg, confusion)
    fit = accuracy(adversarial, confusion)
    stage1 = ToyRun("adversarial init", "", "stage1", steps, fit, accuracy(adversarial, test),
                    time.perf_counter() - t0, adversarial)
    if fit < 1.0:
        log.warning("toy stage 1 fitted %.1f%% of the random labels in %d steps (not all): raise "
                    "stage1_max_steps or stage1_lr", 100 * fit, steps)

    runs = []
    for i, (init, mode) in enumerate((i, m) for i in INITS for m in cfg.modes):
        t0 = time.perf_counter()
        start = copy.deepcopy(adversarial) if init == "adversarial" else toy_net(cfg, 2)
        model = train_stage2(cfg, start, train, mode, i)
        runs.append(ToyRun(f"{init}/{mode}", init, mode, cfg.stage2_steps, accuracy(model, train),
                           accuracy(model, test), time.perf_counter() - t0, model))
    return ToyResult(cfg, train, test, confusion, stage1, runs)
