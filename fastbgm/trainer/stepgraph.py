"""One run's whole training step as one CUDA graph (``speed.step_graph = true``).

At the paper's batch 128 a GPU step is bound by the host, not the GPU: even with
``torch.compile``'s CUDA graphs around forward and backward, the loss, the optimizer and
the metrics are launched kernel by kernel from Python. Here the *whole* step (forward,
loss, backward, SGD, the record of the step's loss and correct count) is captured once and
then replayed: one launch per step, plus copying the batch into the graph's inputs.

Exactness: a replay runs the very kernels, with the very arguments, that the captured
eager step launched, so a run with step graphs computes what it computes without them.
What a graph bakes in is its key: the batch shape, the loss scale (the global batch
size) and every group's learning rate. A key is captured the second time it is seen
(the first run's first key after :data:`WARMUP` eager steps: compilation, cuBLAS
workspaces and the momentum buffers come first; any other key after one, so that a new
batch shape is compiled before, not during, a capture); the last, smaller batch of an
epoch and each new learning rate get graphs of their own, the oldest given up beyond
:data:`MAX_GRAPHS`.

Each run's graphs share one private memory pool and are replayed on the run's own
stream, so the runs of a pack may replay theirs on their streams side by side (pack
mode ``streams``): unlike the graphs of ``torch.compile(mode="reduce-overhead")``, no
two runs share memory.

On a CPU there is nothing to capture: the same static-input step is *called* where a
GPU would replay it, so every piece of the logic but the capture itself is tested there.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import torch

from .speed import on_stream

if TYPE_CHECKING:
    from .runstate import RunState

log = logging.getLogger("fastbgm.trainer")

WARMUP = 3  # eager steps before the first capture (one before any later key's)
MAX_GRAPHS = 4  # per run: the full batch, the last batch, and a change of learning rate
_CAPTURE = threading.Lock()  # one capture at a time in a process (pack mode threads)


class _Replay:
    """One captured step: its static inputs, and how to run it again."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, run: Callable[[], None]):
        self.x, self.y, self.run = x, y, run


class StepGraphs:
    """The captured steps of one run, by key; :meth:`step` runs one training step."""

    def __init__(self, state: "RunState"):
        self.s = state
        self.device = state.env.device
        self.cuda = self.device.type == "cuda"
        self.graphs: OrderedDict[tuple, _Replay] = OrderedDict()
        self.seen: dict[tuple, int] = {}  # eager steps taken per key
        self.captures = 0
        self.replays = 0
        self.pool: Any = None
        self.static_step = torch.zeros((), dtype=torch.int64, device=self.device)
        # the stream the run's steps go on: the pack's stream for this run, or its own
        self.stream = state.stream if state.stream is not None or not self.cuda else torch.cuda.Stream(self.device)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.s
        scale = s.env.world / s.sizes[step]
        own = self.cuda and self.stream is not s.stream  # the caller's stream is not ours: order both ways
        if own:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with on_stream(self.stream):
            key = (tuple(x.shape), x.dtype, tuple(y.shape), scale,
                   tuple((g["lr"], g["momentum"], g["weight_decay"]) for g in s.optimizer.param_groups))
            g = self.graphs.get(key)
            if g is None and self.seen.get(key, 0) < (WARMUP if self.captures == 0 else 1):
                self.seen[key] = self.seen.get(key, 0) + 1
                s.body(x, y, scale, step)
            else:
                if g is None:
                    g = self._capture(key, x, y, scale)
                g.x.copy_(x)
                g.y.copy_(y)
                self.static_step.fill_(step)
                g.run()
                self.replays += 1
        if own:  # (the batch's memory is then reused only after our copy of it)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor, scale: float) -> _Replay:
        while len(self.graphs) >= MAX_GRAPHS:  # e.g. a learning rate no later step uses again
            self.graphs.popitem(last=False)
        sx, sy = torch.empty_like(x), torch.empty_like(y)
        body = self.s.body
        if self.cuda:
            graph = torch.cuda.CUDAGraph()
            # the capture launches nothing: it records the step, which then replays.
            # thread_local: other runs' threads may go on launching while this one captures
            with _CAPTURE, torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                            capture_error_mode="thread_local"):
                body(sx, sy, scale, self.static_step)
            self.pool = graph.pool()  # this run's graphs share one pool (they never run at once)
            g = _Replay(sx, sy, graph.replay)
        else:
            g = _Replay(sx, sy, lambda: body(sx, sy, scale, self.static_step))
        self.graphs[key] = g
        self.captures += 1
        log.debug("%s: step graph %d captured for batch %s, lr %s", self.s.trainer.cfg.name if self.s.trainer else "",
                  self.captures, tuple(x.shape), key[-1])
        return g
