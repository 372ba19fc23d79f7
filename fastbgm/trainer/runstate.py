"""One run's live objects inside the training loop (:class:`RunState`), and its step:
forward, loss, backward, SGD and the record of its loss, on whatever stream the loop
gives it; the non-finite check that fails the run; its epoch's means over every rank.
The loop (loop.py) decides which runs step when; the trainer (trainer.py) builds one
from a run folder (:meth:`Trainer.open`) and ends its epochs."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data.loader import DeviceLoader
from .speed import Speed, autocast
from .stops import NonFiniteLoss

if TYPE_CHECKING:
    from .trainer import Trainer


CHECK_EVERY = 20  # steps between two looks for a non-finite loss


@dataclasses.dataclass
class RunState:
    """One run's live objects inside the loop."""

    trainer: Trainer
    env: D.DistEnv
    speed: Speed
    module: nn.Module  # the bare model (state, evaluation, checkpoints)
    model: nn.Module  # what trains: DDP and/or compiled around ``module``
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train: DeviceLoader
    train_eval: DeviceLoader
    test: DeviceLoader | None
    init: dict[str, torch.Tensor]
    flops: float | None
    peak: float | None
    epoch: int  # epochs done
    end_epoch: int  # the epoch it stops at unless its stop rule fires first
    stream: Any = None  # its CUDA stream when packed on a GPU
    graphs: Any = None  # its step graphs (speed.step_graph): see stepgraph.py

    def thread(self) -> ThreadPoolExecutor:
        """The one thread this run's epochs run in (pack mode threads), for its whole life:
        torch.compile's CUDA graphs belong to the thread that recorded them."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="fastbgm-run")
        return self._thread

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def __post_init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        dev = self.env.device
        # each step's loss sum and correct count, this epoch: two small writes a step (every
        # launch counts in a host-bound batch-128 step), read once at the epoch's end and
        # for the non-finite check. Allocated once: a captured step writes into them.
        steps = len(self.train)
        self.losses = torch.zeros(steps, dtype=torch.float32, device=dev)
        self.hits = torch.zeros(steps, dtype=torch.int64, device=dev)
        self.sizes: list[int] = []
        self._pending: tuple[torch.Tensor, Any] | None = None  # the last check's flag, on its way to the host
        self.saved_at = time.perf_counter()  # its last checkpoint (speed.checkpoint_every_s): none yet

    def begin_epoch(self) -> Iterator[tuple[int, tuple]]:
        self.model.train()
        self.train.set_epoch(self.epoch)
        self.sizes = self.train.order.global_batch_sizes()
        self._pending = None
        return enumerate(self.train)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on one batch (replayed as one CUDA graph with step graphs)."""
        if self.graphs is not None:
            self.graphs.step(step, x, y)
        else:
            self.body(x, y, self.env.world / self.sizes[step], step)
        last = step == len(self.sizes) - 1
        if step % CHECK_EVERY == CHECK_EVERY - 1 or last:
            self.check_finite(step, wait=last)

    def check_finite(self, step: int = -1, wait: bool = True) -> None:
        """Raise :class:`NonFiniteLoss` when a loss of this epoch up to ``step`` (-1: its
        last) on any rank was not finite. Inside the epoch (``wait`` False) the host reads
        the previous check's flag, copied while the GPU went on, so the step loop never
        waits for the GPU (a wait empties the queue the host had filled ahead); the
        epoch's last step waits, so an epoch that ends is checked whole before its
        checkpoint."""
        bad = ~torch.isfinite(self.losses[: step + 1 if step >= 0 else len(self.sizes)])
        found = bad.any()
        flag = D.all_reduce_sum(torch.stack([found.long(), torch.where(found, bad.int().argmax(), 0)]))
        if not wait:
            host = torch.empty(2, dtype=torch.int64, pin_memory=flag.is_cuda)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event() if flag.is_cuda else None
            if done is not None:
                done.record()
            self._pending, earlier = (host, done), self._pending
            if earlier is None:
                return
            flag, done = earlier
            if done is not None:
                done.synchronize()  # long done: it was recorded CHECK_EVERY steps ago
        if flag[0] > 0:  # (the ranks that saw one: their first steps' mean)
            raise NonFiniteLoss(self.epoch + 1, int(flag[1]) // int(flag[0]))

    def tally(self, step: int | torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """Record one step's loss sum and correct count (``step`` a tensor in a captured step)."""
        if isinstance(step, torch.Tensor):
            at = step.view(1)
            self.losses.index_copy_(0, at, loss_sum.detach().view(1))
            self.hits.index_copy_(0, at, correct.view(1))
        else:
            self.losses[step] = loss_sum.detach()
            self.hits[step] = correct

    def body(self, x: torch.Tensor, y: torch.Tensor, scale: float, step: int | torch.Tensor) -> None:
        """The step's work: forward, loss, backward, SGD, the record of its loss and
        correct count. Everything it keeps is written in place, so that a captured copy
        of it (``step`` then a tensor) can be replayed."""
        with autocast(self.speed):
            out = self.model(x)
        loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
        # sum / global batch x world (``scale``): DDP's gradient average then equals the
        # gradient of the mean loss over the whole global batch
        loss = loss_sum * scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            self.tally(step, loss_sum, (out.argmax(1) == y).sum())

    def epoch_means(self) -> tuple[float, float, int]:
        """The epoch's mean loss and accuracy over every rank's images, and their number."""
        sums = torch.stack([self.losses.double().sum(), self.hits.sum().double()])
        D.all_reduce_sum(sums)
        n = sum(self.sizes)  # the ranks' shares of the global batches add up to these
        loss, hits = sums.tolist()
        return loss / n, hits / n, n
