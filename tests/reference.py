"""Reference computations the tests compare the engine against."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastbgm.data import LabelSpec, make_loader
from fastbgm.models import build_model


def reference_ddp_training(data_dir: Path, *, world: int, batch_size: int, epochs: int, lr: float,
                           momentum: float = 0.0, labels: LabelSpec | str = "true", augment: bool = True,
                           seed: int = 0, width: int = 16, depth: int = 3) -> tuple[torch.nn.Module, list]:
    """What a ``world``-rank DDP run of a BatchNorm small_cnn computes, in one process:
    each rank's batch goes through the model on its own (BatchNorm normalises over that
    rank's images; DDP keeps rank 0's running statistics), and the step uses the
    gradient of the mean loss over the global batch."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, "ones", width=width, depth=depth, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shards = [make_loader(data_dir / "train.beton", batch_size=batch_size, labels=labels, augment=augment,
                          rank=r, world=world, seed=seed, channels_last=False) for r in range(world)]
    model.train()
    for epoch in range(epochs):
        for ld in shards:
            ld.set_epoch(epoch)
        for batches in zip(*shards):
            total, count = 0.0, 0
            params = dict(model.named_parameters())
            rank0_buffers: dict[str, torch.Tensor] = {}
            for r, (x, y, _) in enumerate(batches):
                # each rank's forward updates its own copy of the running statistics
                bufs = {k: v.clone() for k, v in model.named_buffers()}
                out = torch.func.functional_call(model, {**params, **bufs}, (x,))
                total = total + F.cross_entropy(out, y, reduction="sum")
                count += len(y)
                rank0_buffers = rank0_buffers or bufs
            opt.zero_grad()
            (total / count).backward()
            opt.step()
            with torch.no_grad():
                for k, v in model.named_buffers():  # DDP keeps rank 0's
                    v.copy_(rank0_buffers[k])
    return model, shards
