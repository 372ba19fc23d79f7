"""Complexity measures of a network and the throughput accounting (FLOPs, MFU)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@torch.no_grad()
def param_l2(model: nn.Module) -> float:
    return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in model.parameters())))


@torch.no_grad()
def distance_from(model: nn.Module, init: dict[str, torch.Tensor]) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        total += ((p.detach().double() - init[name].to(p.device).double()) ** 2).sum().cpu()
    return float(torch.sqrt(total))


@torch.no_grad()
def path_norm(model: nn.Module, p: float, input_shape: tuple[int, ...]) -> float:
    """l_p path norm: forward an all-ones input through a copy whose parameters are
    replaced by |w|^p (eval mode, fp32), sum the outputs, take the 1/p power."""
    m = copy.deepcopy(model).float().eval()
    for param in m.parameters():
        param.copy_(param.abs().pow(p))
    dev = next(m.parameters()).device
    out = m(torch.ones((1, *input_shape), device=dev))
    s = float(out.double().sum())
    return s ** (1.0 / p) if s > 0 else float("nan")


def complexity(model: nn.Module, init: dict[str, torch.Tensor], input_shape: tuple[int, ...]) -> dict[str, float]:
    return {
        "param_l2": param_l2(model),
        "dist_from_init": distance_from(model, init),
        "path_l1": path_norm(model, 1.0, input_shape),
        "path_l2": path_norm(model, 2.0, input_shape),
    }


def train_flops_per_image(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> float | None:
    """Forward FLOPs of one image x 3 (forward + backward), counted by torch."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - old torch
        return None
    m = copy.deepcopy(model).float().eval()
    x = torch.zeros((2, *input_shape), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    return 3.0 * counter.get_total_flops() / 2


# Dense bf16/fp16 tensor-core peaks (FLOP/s) per GPU, by name fragment.
_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peak in _PEAK_BF16.items():
        if frag in name:
            # fp32 runs on TF32 tensor cores at half the bf16 rate on these parts
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def epochs_to_full_train(rows: list[dict]) -> int | None:
    """The first epoch whose running (train-mode) training accuracy reached 100%: when
    SGD first fits the whole training set (the paper's "epochs to 100% train")."""
    return next((r["epoch"] for r in rows if r.get("train_acc", 0) >= 1.0), None)
