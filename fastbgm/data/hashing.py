"""A counter-based hash on torch tensors, so random draws are pure functions of
(seed, stream, counters) and identical on every device, rank, epoch and resume.

``mix32`` is the lowbias32 integer finaliser (a bijection on 32-bit values). The
multipliers are below 2**31, so every intermediate fits in int64 without overflow
and the result is bit-identical on CPU and CUDA.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x68E31DA5  # below 2**31 on purpose (see module docstring)

# Distinct streams keep independent draws independent (labels, noise, crops, order).
STREAM_LABELS = 0x1B873593
STREAM_NOISE = 0x2545F491
STREAM_AUGMENT = 0x3C6EF372
STREAM_ORDER = 0x5BD1E995
STREAM_RESIZED_CROP = 0x6A09E667


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 16)
    return x


def hash_keys(*parts: torch.Tensor | int) -> torch.Tensor:
    """Hash a sequence of int64 tensors/ints (broadcast together) into [0, 2**32),
    on the device of the tensor parts (plain ints follow them there)."""
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
    h: torch.Tensor | None = None
    for p in parts:
        t = torch.as_tensor(p, dtype=torch.int64, device=device)
        h = mix32(t) if h is None else mix32(h ^ (t & _M32))
    assert h is not None
    return h


def scalar_seed(*parts: int) -> int:
    """A 63-bit integer seed derived from integers (for torch/numpy generators)."""
    hi = int(hash_keys(*parts, 1))
    lo = int(hash_keys(*parts, 2))
    return ((hi << 31) ^ lo) & ((1 << 63) - 1)
