"""Batched, per-sample augmentation and normalisation on the device.

Images travel as uint8 ``[B, H, W, C]`` until the last step, where they become the
training dtype in NCHW shape with channels-last strides (a permuted NHWC tensor *is*
channels-last, so this costs no copy).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .hashing import STREAM_AUGMENT, hash_keys


def crop_flip(images: torch.Tensor, keys: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, one draw per sample.

    ``keys`` are per-sample 32-bit hashes (``[B]`` int64); they fix the offsets and the
    flip, so the same (seed, epoch, sample) always gets the same crop.
    """
    b, h, w, _ = images.shape
    if b == 0:
        return images
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # zero padding of H and W
    span = 2 * pad + 1
    oy = keys % span
    ox = (keys // span) % span
    flip = ((keys // (span * span)) & 1).bool()
    dev = images.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h[None, :]
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w)[None, :], ox[:, None] + ar_w[None, :])
    bidx = torch.arange(b, device=dev)[:, None, None]
    return padded[bidx, rows[:, :, None], cols[:, None, :]]


def augment_keys(seed: int, epoch: int, sample_index: torch.Tensor) -> torch.Tensor:
    return hash_keys(STREAM_AUGMENT, seed, epoch, sample_index.to(torch.int64))


def flip_only(images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Horizontal flip per sample (for stream batches already randomly cropped)."""
    flip = (keys & 1).bool()
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """uint8 NHWC -> ``dtype`` NCHW (channels-last strides), ``(x/255 - mean) / std``."""
    b, h, w, c = images.shape
    scale, shift = _affine(tuple(mean), tuple(std), h * w, images.device)
    # One scale/shift per element of an image: broadcasting over the batch only keeps
    # the kernel vectorised (a trailing size-3 broadcast is several times slower).
    x = torch.addcmul(shift, images.reshape(b, -1).to(torch.float32), scale)
    return x.to(dtype).view(b, h, w, c).permute(0, 3, 1, 2)


_AFFINE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(mean: tuple, std: tuple, pixels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (mean, std, pixels, str(device))
    if key not in _AFFINE_CACHE:
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
        _AFFINE_CACHE[key] = (scale.repeat(pixels).to(device), shift.repeat(pixels).to(device))
    return _AFFINE_CACHE[key]
