"""Batched, per-sample augmentation and normalisation on the device.

Images travel as uint8 ``[B, H, W, C]`` until the last step, where they become the
training dtype in NCHW shape with channels-last strides (a permuted NHWC tensor *is*
channels-last, so this costs no copy).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .hashing import STREAM_AUGMENT, STREAM_RESIZED_CROP, hash_keys


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


def _uniform(seed: int, epoch: int, index: torch.Tensor, which: int) -> torch.Tensor:
    """A float64 in [0, 1) per sample: draw ``which`` of (seed, epoch, sample)."""
    return hash_keys(STREAM_RESIZED_CROP, seed, epoch, index.to(torch.int64), which).double() / 2.0**32


def random_resized_crop(images: torch.Tensor, seed: int, epoch: int, index: torch.Tensor,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style random-resized crop of uint8 ``[B, H, W, C]`` images, back to
    ``H x W`` (bilinear), one draw per sample from (seed, epoch, sample index): the same
    crop on every device, rank and resume. Area fraction ``s`` in ``scale`` and aspect
    ``r`` log-uniform in ``ratio``, clipped to the image (torchvision samples up to ten
    times and falls back to a centre crop; clipping is the pure-function equivalent)."""
    b, h, w, _ = images.shape
    if b == 0:
        return images
    dev = images.device
    s = scale[0] + (scale[1] - scale[0]) * _uniform(seed, epoch, index, 0)
    log_r = torch.log(torch.tensor(ratio[0], dtype=torch.float64)) + \
        (torch.log(torch.tensor(ratio[1] / ratio[0], dtype=torch.float64))) * _uniform(seed, epoch, index, 1)
    r = torch.exp(log_r.to(dev))
    cw = torch.sqrt(s * r).clamp(max=1.0)  # crop size as fractions of the width / height
    ch = torch.sqrt(s / r).clamp(max=1.0)
    cx = (1 - cw) * _uniform(seed, epoch, index, 2)  # top-left corner, fractions
    cy = (1 - ch) * _uniform(seed, epoch, index, 3)
    # affine_grid maps the output to [-1, 1] input coordinates: a scale and a shift
    theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=dev)
    theta[:, 0, 0] = cw.float()
    theta[:, 0, 2] = (2 * cx + cw - 1).float()
    theta[:, 1, 1] = ch.float()
    theta[:, 1, 2] = (2 * cy + ch - 1).float()
    x = images.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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
