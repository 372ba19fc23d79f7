"""Which samples each rank sees in each epoch.

The global order of an epoch is a permutation that depends only on (seed, epoch), so
runs are reproducible and a resumed run continues the same order. ``batch_size`` is
the *global* batch: each global batch is split into ``world`` contiguous shares
(sizes differ by at most one), so every rank takes the same number of steps, shares
are disjoint, and together they cover the epoch. When shuffling (training), a last
batch smaller than the world size cannot give every rank a sample and is dropped;
in file order (evaluation) nothing is dropped and a rank's last share may be empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hashing import STREAM_ORDER, scalar_seed


@dataclass(frozen=True)
class EpochOrder:
    num_items: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < self.world:
            raise ValueError(
                f"global batch size {self.batch_size} is smaller than the world size {self.world}: "
                "every rank needs at least one sample per step"
            )
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        if rest and not self.drop_last and (rest >= self.world or not self.shuffle):
            return full + 1
        return full

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        g = torch.Generator().manual_seed(scalar_seed(STREAM_ORDER, self.seed, epoch))
        return torch.randperm(self.num_items, generator=g)

    def rank_batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's share of each global batch of ``epoch`` (CPU int64 tensors)."""
        perm = self.permutation(epoch)
        out = []
        for step in range(len(self)):
            glob = perm[step * self.batch_size : (step + 1) * self.batch_size]
            out.append(torch.tensor_split(glob, self.world)[self.rank])
        return out

    def global_batch_sizes(self) -> list[int]:
        return [min(self.batch_size, self.num_items - s * self.batch_size) for s in range(len(self))]
