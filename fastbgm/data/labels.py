"""Label tables: one table per training set, indexed on the device by sample index,
so a single dataset file serves every stage.

Modes
- ``true``: the dataset's labels.
- ``random``: every sample gets a uniform random label (Zhang et al.).
- ``noisy``: exactly ``round(fraction * n)`` samples, chosen at random, get a label
  drawn uniformly from the *other* classes (so the corrupted fraction is exact).
- ``confusion``: the paper's stage-1 set: sample ``i`` appears as ``copies`` copies,
  copy ``r`` has virtual index ``r * n + i`` and its own fixed uniform random label.

A table depends only on (true labels, mode, seed, ...) and is built on the CPU with a
seeded generator, so it is the same on every rank, device and epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LABEL_MODES = ("true", "random", "noisy", "confusion")


@dataclass(frozen=True)
class LabelSpec:
    """How to label a training set (and, for ``confusion``, how to replicate and noise it)."""

    mode: str = "true"
    seed: int = 0
    fraction: float = 0.0  # noisy: fraction of labels replaced
    copies: int = 1  # confusion: R, copies of each image
    zero_ratio: float = 0.0  # confusion: fraction of uint8 values zeroed per copy

    def __post_init__(self) -> None:
        if self.mode not in LABEL_MODES:
            raise ValueError(f"label mode {self.mode!r} is unknown: use one of {', '.join(LABEL_MODES)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"label fraction must be in [0, 1], got {self.fraction}")
        if self.copies < 1:
            raise ValueError(f"copies (R) must be >= 1, got {self.copies}")
        if not 0.0 <= self.zero_ratio < 1.0:
            raise ValueError(f"zero_ratio must be in [0, 1), got {self.zero_ratio}")
        if self.mode != "confusion" and (self.copies != 1 or self.zero_ratio != 0.0):
            raise ValueError("copies and zero_ratio apply only to label mode 'confusion'")

    @property
    def replicas(self) -> int:
        return self.copies if self.mode == "confusion" else 1


def make_label_table(true_labels: torch.Tensor, num_classes: int, spec: LabelSpec) -> torch.Tensor:
    """Return an int64 table of length ``n * spec.replicas`` (on the CPU)."""
    import torch  # (here: a config that names a label mode, as a launcher reads it, needs no torch)

    from .hashing import STREAM_LABELS, scalar_seed

    y = true_labels.to(torch.int64).cpu()
    n = y.numel()
    g = torch.Generator().manual_seed(scalar_seed(STREAM_LABELS, spec.seed, LABEL_MODES.index(spec.mode)))
    if spec.mode == "true":
        return y.clone()
    if spec.mode == "random":
        return torch.randint(0, num_classes, (n,), generator=g)
    if spec.mode == "noisy":
        table = y.clone()
        k = int(round(spec.fraction * n))
        if k and num_classes > 1:
            which = torch.randperm(n, generator=g)[:k]
            shift = torch.randint(1, num_classes, (k,), generator=g)
            table[which] = (y[which] + shift) % num_classes
        return table
    return torch.randint(0, num_classes, (n * spec.copies,), generator=g)
