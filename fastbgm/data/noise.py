"""Stage-1 input noise of the paper's confusion set, applied on the device.

Each copy ``v`` gets exactly ``floor(ratio * C*H*W)`` of its uint8 values set to 0,
positions drawn without replacement. Positions are the ``k`` smallest keys of a
counter-based hash of (seed, v, position): a pure function, so the same copy is
noised identically in every epoch, on every rank and device, and after a resume,
and different copies are independent.
"""

from __future__ import annotations

import math

import torch

from .hashing import STREAM_NOISE, hash_keys


def zero_count(ratio: float, numel: int) -> int:
    return int(math.floor(ratio * numel + 1e-9))


def zero_positions(copy_index: torch.Tensor, seed: int, numel: int, k: int) -> torch.Tensor:
    """``[B, k]`` flat positions in ``[0, numel)``, distinct within each row."""
    pos = torch.arange(numel, device=copy_index.device, dtype=torch.int64)
    keys = hash_keys(STREAM_NOISE, seed, copy_index.to(torch.int64)[:, None], pos[None, :])
    # Unique keys (hash in the high bits, position in the low bits) make the chosen
    # set independent of how topk breaks ties on a given device.
    shift = max(1, (numel - 1).bit_length())
    keys = (keys << shift) | pos[None, :]
    return torch.topk(keys, k, dim=1, largest=False, sorted=False).indices


def apply_zero_noise(images: torch.Tensor, copy_index: torch.Tensor, seed: int, ratio: float) -> torch.Tensor:
    """Zero ``floor(ratio*numel)`` values of each uint8 image ``[B, ...]`` in place."""
    if ratio <= 0 or images.shape[0] == 0:
        return images
    b = images.shape[0]
    flat = images.view(b, -1)
    k = zero_count(ratio, flat.shape[1])
    if k:
        flat.scatter_(1, zero_positions(copy_index, seed, flat.shape[1], k), 0)
    return images
