"""What a run measures each epoch: its loss and accuracy over a loader, the complexity
measures of the network, and the throughput accounting (FLOPs, MFU)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data.loader import DeviceLoader
from .speed import Speed, autocast

log = logging.getLogger(__name__)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The l2 norm of all of ``tensors`` together, on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


@torch.no_grad()
def param_l2(model: nn.Module) -> float:
    return float(_total_norm([p.detach().float() for p in model.parameters()]))


@torch.no_grad()
def distance_from(model: nn.Module, init: dict[str, torch.Tensor]) -> float:
    """The l2 distance of the parameters from ``init`` (in float64; ``init`` best on the
    parameters' device, or it is copied there each time)."""
    named = list(model.named_parameters())
    ps = [p.detach().double() for _, p in named]
    return float(_total_norm(torch._foreach_sub(ps, [init[n].to(p.device, torch.float64) for n, p in named])))


@torch.no_grad()
def path_norm(model: nn.Module, p: float, input_shape: tuple[int, ...]) -> float:
    """l_p path norm: forward an all-ones input through the network with its parameters
    replaced by |w|^p (eval mode, fp32), sum the outputs, take the 1/p power."""
    was_training = model.training
    model.eval()
    try:
        powered = {n: w.detach().float().abs().pow(p) for n, w in model.named_parameters()}
        dev = next(iter(powered.values())).device
        out = torch.func.functional_call(model, powered, (torch.ones((1, *input_shape), device=dev),))
    finally:
        model.train(was_training)
    s = float(out.double().sum())
    return s ** (1.0 / p) if s > 0 else float("nan")


def complexity(model: nn.Module, init: dict[str, torch.Tensor], input_shape: tuple[int, ...]) -> dict[str, float]:
    """The paper's complexity measures of ``model`` (its weights now, ``init`` where it
    started); each costs a few kernels and one host sync, per epoch."""
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


@torch.no_grad()
def evaluate(module: nn.Module, loader: DeviceLoader, speed: Speed) -> tuple[float, float]:
    """(mean loss, accuracy) of ``module`` in eval mode over ``loader``, summed over the
    ranks: eager (no compile, no graphs), in ``loader``'s batches."""
    was_training = module.training
    module.eval()
    dev = next(module.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    for x, y, _ in loader:
        if len(y) == 0:
            continue
        with autocast(speed):
            out = module(x)
        sums += torch.stack([F.cross_entropy(out.float(), y, reduction="sum").double(),
                             (out.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), device=dev, dtype=torch.float64)])
    D.all_reduce_sum(sums)
    module.train(was_training)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
