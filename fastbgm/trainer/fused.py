"""K runs of one architecture trained as one network (HFTA, MLSys'21): pack mode
``fused`` of loop.py, one of the candidate ways to share a GPU that ``bench pack
--pack-modes fused`` measures against the others (opt-in, and refused on a GPU, where it
measured slower than one run: loop.py).

Why: at the paper's batch 128 one run's kernels are too small to fill a GPU. K runs
in threads or on streams still launch K times as many small kernels; fused, their
parameters are stacked (one tensor per parameter, runs first) and the step is
``torch.func.vmap`` over the run dimension, so a convolution of K runs is one grouped
convolution and a BatchNorm of K runs one BatchNorm over K times the channels: kernels
K times the size, as many as one run launches. On a GPU the whole fused step
(forward, loss, backward, SGD, each run's record of its loss and correct count) is one
CUDA graph.

Each run keeps its own data (its loader's batch), initial weights, BatchNorm
statistics, loss scale, learning rate, momentum, Nesterov switch and weight decay
(per parameter group); they must share the architecture and the batch shape.

Exactness: the same operations per run, but other kernels (a grouped convolution's
backward is not a plain one's), so a fused run equals the run alone to float
tolerance, not bitwise, even on a CPU (what the bench's difference column shows).
Runs share no parameter, so one run's NaN reaches no other. Which kernels a run's step
takes depends on its packmates at that epoch, so a resumed fused run also equals the
uninterrupted one to float tolerance only.
"""

from __future__ import annotations

import copy
import logging
import types
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from .speed import on_stream

if TYPE_CHECKING:
    from .runstate import RunState

log = logging.getLogger("fastbgm.trainer")

WARMUP = 3  # eager fused steps before the capture (cuDNN/cuBLAS set-up, momentum buffers)


def _hyper(group: dict[str, Any]) -> tuple[float, float, float, bool]:
    return float(group["lr"]), float(group["momentum"]), float(group["weight_decay"]), bool(group["nesterov"])


def signature(module: nn.Module) -> tuple:
    """What runs must share to be fused: the architecture (class, parameter and buffer shapes)."""
    return (type(module).__qualname__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in module.named_buffers()))


def fusion_key(s: "RunState") -> tuple | None:
    """Runs with equal keys can be fused (same architecture, speed switches and batch
    shapes, step by step); None: this run cannot be (it spans several ranks, or trains
    in fp16)."""
    if s.env.world != 1 or s.speed.precision == "fp16":  # fp16 needs a GradScaler: its checks are host syncs
        return None
    return signature(s.module), s.speed, tuple(s.train.order.global_batch_sizes()), s.train.image_shape


_BASES: dict[tuple, nn.Module] = {}  # one storage-less copy per architecture: compiled code is reused
_COMPILED: dict[tuple, Callable] = {}  # per architecture, precision and number of runs (see _forward_for)


def _forward(base: nn.Module, low: tuple[str, ...], dtype: torch.dtype | None, params: dict, buffers: dict,
             x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every run's summed loss and correct count; its BatchNorm statistics updated in place.

    Mixed precision by hand: autocast does not reach inside ``vmap`` (its batching rules
    run below it), so the parameters of the layers autocast would run in ``dtype``
    (``low``: convolutions and linear layers) are cast here, as autocast casts them; the
    rest stays in float32, BatchNorm computes in float32 (``_FusedNorm``), and the
    loss is taken in float32."""
    if dtype is not None:
        params = {n: p.to(dtype) if n in low else p for n, p in params.items()}

    def one(p: dict, b: dict, xk: torch.Tensor, yk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.func.functional_call(base, (p, b), (xk,))
        return F.cross_entropy(out.float(), yk, reduction="sum"), (out.argmax(1) == yk).sum()

    return torch.func.vmap(one)(params, buffers, x, y)


class _FusedNorm:
    """BatchNorm as the fused step runs it: ``torch.native_batch_norm`` itself, not the
    composite ``batch_norm`` of ``nn.BatchNorm2d``, whose cuDNN eligibility check asks a
    vmapped (BatchedTensor) input whether it is channels-last contiguous, which vmap
    refuses ("NYI: querying is_contiguous inside of vmap"): every fused step on a GPU
    failed so (H200, torch 2.11, 2026-11-30). ``native_batch_norm`` has a batching rule
    (a BatchNorm of K runs is one over K x the channels) and is the kernel the composite
    picks on a CPU anyway. A low-precision input is taken in float32, as autocast's
    BatchNorm does (under ``vmap`` a bfloat16 input with float32 statistics is refused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if m.momentum is None:  # a cumulative average needs 1 / num_batches_tracked on the host
            return super().forward(xf).to(x.dtype)  # type: ignore[misc]
        m._check_input_dim(x)
        stats = m.track_running_stats and m.running_mean is not None
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
        out = torch.native_batch_norm(xf, m.weight, m.bias, m.running_mean if stats else None,
                                      m.running_var if stats else None, m.training or not stats, m.momentum,
                                      m.eps)[0]
        return out.to(x.dtype)


class _FusedGlobalPool:
    """``AdaptiveAvgPool2d(1)`` as the mean over height and width that it computes: on a
    channels-last input the composite op also restrides its output with ``as_strided_``,
    which has no batching rule, so under ``vmap`` torch ran it run by run (with a warning
    per trace). The values are the same; only the strides of a 1 x 1 map differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


_FUSED_CLASSES: dict[type, type] = {}


def _as(m: nn.Module, mixin: type) -> None:
    cls = type(m)
    m.__class__ = _FUSED_CLASSES.setdefault(cls, type(f"{cls.__name__}Fused", (mixin, cls), {}))


def _fused_layers(module: nn.Module) -> nn.Module:
    """``module`` with the layers the fused step runs its own way (in place)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FusedNorm):
            _as(m, _FusedNorm)
        elif (isinstance(m, nn.AdaptiveAvgPool2d) and not isinstance(m, _FusedGlobalPool)
              and m.output_size in (1, (1, 1))):
            _as(m, _FusedGlobalPool)
    return module


def low_precision_params(module: nn.Module) -> tuple[str, ...]:
    """The parameters autocast runs in low precision: those of convolutions and linear layers."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return tuple(f"{m}.{n}" if m else n for m, mod in module.named_modules() if isinstance(mod, kinds)
                 for n, _ in mod.named_parameters(recurse=False))


def _forward_for(speed: Any, key: tuple) -> Callable:
    """The fused forward: inductor's kernels when the runs compile, but never torch.compile's
    own CUDA graphs (the whole fused step is captured here).

    One compiled function per ``key`` (architecture, precision, number of runs), each on
    a code object of its own: torch.compile keeps a function's compiled variants on its
    code object, at most ``recompile_limit`` (8) of them, and runs it uncompiled past
    that. A pack that lives long sees many groups (runs join and leave, of several
    architectures); one shared function would fall back to eager once it had seen 8."""
    if not speed.compile:
        return _forward
    if key not in _COMPILED:
        code = _forward.__code__.replace(co_name=f"_forward_{len(_COMPILED)}")
        fn = types.FunctionType(code, _forward.__globals__, code.co_name, _forward.__defaults__)
        _COMPILED[key] = CompiledOrEager(fn)
    return _COMPILED[key]


def uncompiled_fused_steps() -> dict[tuple, str]:
    """The fused forwards of this process that this torch could not compile: {key: why}."""
    return {k: f.why_not for k, f in _COMPILED.items() if isinstance(f, CompiledOrEager) and f.why_not}


class CompiledOrEager:
    """The fused forward compiled whole (``fullgraph``), or, where this torch cannot trace
    it, uncompiled with one warning that says so. torch 2.4's dynamo does not inline
    ``vmap`` over ``functional_call`` of a module: it would break the graph and run the
    step eagerly without a word (every release from 2.5 on compiles it whole: seen on
    2.5.1, 2.6.0, 2.7.1, 2.8.0, 2.9.1, 2.10.0, 2.11.0 and 2.13.0). A graph break
    is found while tracing, before anything runs, so falling back loses no step."""

    def __init__(self, fn: Callable):
        self.compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        self.why_not: str | None = None  # why this torch runs it uncompiled

    def __call__(self, *args: Any) -> Any:
        if self.why_not is None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.Unsupported as e:
                self.why_not = str(e).strip().splitlines()[0]
                # (not "use pack mode threads": on torch 2.4 that is refused for compiled runs)
                log.warning("torch %s cannot compile the fused step (%s): pack mode fused runs it uncompiled, "
                            "slower; use torch >= 2.5 (which compiles it) or another resources.pack_mode",
                            torch.__version__, self.why_not)
        return _forward(*args)


class FusedRuns:
    """The runs of ``states`` (same architecture, batch and speed) stepped as one.

    Between epochs each run's module and optimizer hold its state: :meth:`load` stacks
    them into the fused tensors (in place: a captured step stays valid), :meth:`write_back`
    puts each run's slice back (weights, BatchNorm statistics, momentum buffers)."""

    def __init__(self, states: list["RunState"]):
        if not states:
            raise ValueError("FusedRuns needs at least one run")
        self.states = states
        first = states[0]
        self.device, self.speed = first.env.device, first.speed
        self.cuda = self.device.type == "cuda"
        keys = [fusion_key(s) for s in states]
        if None in keys:
            raise ConfigError("fused runs train on one device each (dist.world = 1), not in fp16")
        for s, key in zip(states, keys):
            if key[0] != keys[0][0]:
                raise ConfigError("fused runs must share one architecture: "
                                  f"{type(s.module).__name__} differs from {type(first.module).__name__}")
            if key != keys[0]:  # (so every step's batches stack: no check per step)
                raise ConfigError(f"fused runs must share the speed switches and batch shapes: {s.speed}, "
                                  f"images {s.train.image_shape} vs {self.speed}, images {first.train.image_shape}")
        sig = keys[0][0]
        self.names = [n for n, _ in first.module.named_parameters()]
        # each run's own tensors by name (a run keeps them for life: resume loads in place)
        self._params = [dict(s.module.named_parameters()) for s in states]
        self._buffers = [dict(s.module.named_buffers()) for s in states]
        key = (sig, self.speed.amp_dtype)
        if key not in _BASES:  # the architecture without storage: functional_call fills it per run
            base = copy.deepcopy(first.module).to("meta").train()
            _BASES[key] = _fused_layers(base)
        self.base = _BASES[key]
        self.forward = _forward_for(self.speed, (*key, len(states)))
        self.low = low_precision_params(first.module)
        k = len(states)
        with torch.no_grad():  # filled by load()
            self.params = {n: torch.stack([p[n].detach() for p in self._params]).requires_grad_(True)
                           for n in self.names}
            self.buffers = {n: torch.stack([b[n] for b in self._buffers]) for n in self._buffers[0]}
            self.momentum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # per run and parameter: its group's hyper-parameters, as tensors the step reads
        # (so that a new learning rate needs no new graph)
        self.lr = {n: torch.zeros(k, device=self.device) for n in self.names}
        self.wd = {n: torch.zeros(k, device=self.device) for n in self.names}
        self.mom = torch.zeros(k, device=self.device)
        self.nesterov = torch.zeros(k, dtype=torch.bool, device=self.device)
        self.scale = torch.zeros(k, device=self.device)
        self._hyper_now: Any = None
        self.graph: Any = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.static_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.eager_steps = 0
        self.full: tuple[int, ...] | None = None  # the shape of a full fused batch
        self.replays = 0
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.load()

    @torch.no_grad()
    def load(self) -> None:
        """Each run's module and optimizer state into the fused tensors. A run with no
        momentum buffer yet gets zeros: torch's first step (buffer = update) is then the
        same step as every other (buffer = momentum x 0 + update)."""
        def momentum(s: "RunState", p: torch.Tensor) -> torch.Tensor:
            buf = s.optimizer.state.get(p, {}).get("momentum_buffer")
            return buf if buf is not None else torch.zeros_like(p)

        for n in self.names:
            self.params[n].copy_(torch.stack([p[n] for p in self._params]))
            self.momentum[n].copy_(torch.stack([momentum(s, p[n]) for s, p in zip(self.states, self._params)]))
        for n, b in self.buffers.items():
            b.copy_(torch.stack([own[n] for own in self._buffers]))

    # ---------------------------------------------------------------- the step
    def step(self, step: int, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """One optimizer step of every run, run k on batch (xs[k], ys[k])."""
        self._set_hyper(step)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with on_stream(self.stream):
            if self.graph is not None and self.static is not None and self.static[0].shape[1:] == xs[0].shape:
                for k, (x, y) in enumerate(zip(xs, ys)):
                    self.static[0][k].copy_(x)
                    self.static[1][k].copy_(y)
                self.static_step.fill_(step)
                self.graph.replay()
                self.replays += 1
            elif not self.cuda or self.eager_steps < WARMUP or self.graph is not None:
                # a CPU; the warm-up; or a batch of another shape than the graph's (the
                # epoch's last): eager
                self._body(torch.stack(xs), torch.stack(ys), step)
                self.eager_steps += 1
            else:
                self._capture(xs, ys, step)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _capture(self, xs: list[torch.Tensor], ys: list[torch.Tensor], step: int) -> None:
        sx, sy = torch.stack(xs), torch.stack(ys)
        self.static = (sx, sy)
        self.static_step.fill_(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._body(sx, sy, self.static_step)
        self.graph = graph
        graph.replay()  # the capture recorded the step without running it
        self.replays += 1

    def _body(self, x: torch.Tensor, y: torch.Tensor, step: int | torch.Tensor) -> None:
        for p in self.params.values():
            p.grad = None
        x = x if self.speed.amp_dtype is None else x.to(self.speed.amp_dtype)
        # the compiled forward for the epoch's full batch only: the last, smaller batch runs
        # uncompiled rather than costing a second compilation (of every fused group)
        self.full = self.full or tuple(x.shape)
        forward = self.forward if tuple(x.shape) == self.full else _forward
        loss_sum, correct = forward(self.base, self.low, self.speed.amp_dtype, self.params, self.buffers, x, y)
        (loss_sum * self.scale).sum().backward()  # runs share no parameter: each gets its own gradient
        self._sgd()
        with torch.no_grad():
            for k, s in enumerate(self.states):
                s.tally(step, loss_sum[k], correct[k])

    @torch.no_grad()
    def _sgd(self) -> None:
        """torch.optim.SGD's update (no dampening), with each run's own hyper-parameters."""
        names = self.names
        params = [self.params[n] for n in names]
        grads = [self.params[n].grad for n in names]

        def per_run(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return v.view(-1, *([1] * (like.ndim - 1)))

        d = torch._foreach_add(grads, torch._foreach_mul(params, [per_run(self.wd[n], p) for n, p in
                                                                 zip(names, params)]))
        bufs = [self.momentum[n] for n in names]
        torch._foreach_mul_(bufs, [per_run(self.mom, b) for b in bufs])
        torch._foreach_add_(bufs, d)
        upd = [torch.where(per_run(self.nesterov, b), g + per_run(self.mom, b) * b, b) for g, b in zip(d, bufs)]
        torch._foreach_sub_(params, torch._foreach_mul(upd, [per_run(self.lr[n], p) for n, p in zip(names, params)]))

    def _set_hyper(self, step: int) -> None:
        """The runs' current hyper-parameters into the step's tensors (when they changed)."""
        now = tuple((s.env.world / s.sizes[step],) + tuple(_hyper(g) for g in s.optimizer.param_groups)
                    for s in self.states)
        if now == self._hyper_now:
            return
        self._hyper_now = now
        group_of = [{id(p): g for g in s.optimizer.param_groups for p in g["params"]} for s in self.states]
        for n in self.names:
            hyper = [_hyper(group_of[k][id(own[n])]) for k, own in enumerate(self._params)]
            self.lr[n].copy_(torch.tensor([h[0] for h in hyper]))
            self.wd[n].copy_(torch.tensor([h[2] for h in hyper]))
        first = [_hyper(s.optimizer.param_groups[0]) for s in self.states]  # one momentum per run (make_sgd)
        self.mom.copy_(torch.tensor([h[1] for h in first]))
        self.nesterov.copy_(torch.tensor([h[3] for h in first]))
        self.scale.copy_(torch.tensor([w[0] for w in now]))

    # ---------------------------------------------------------------- state
    @torch.no_grad()
    def write_back(self) -> None:
        """Each run's slice of the stacked state into its own module and optimizer."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for k, (s, own) in enumerate(zip(self.states, self._params)):
            momentum = s.optimizer.param_groups[0]["momentum"] != 0  # torch keeps no buffer without
            for n in self.names:
                own[n].copy_(self.params[n][k])
                if momentum:
                    s.optimizer.state[own[n]]["momentum_buffer"] = self.momentum[n][k].clone()
            for n, b in self._buffers[k].items():
                b.copy_(self.buffers[n][k])
            # the fused step did this optimizer's steps: say so to its LR scheduler, which
            # otherwise warns that it was stepped before the optimizer
            s.optimizer._opt_called = True  # type: ignore[attr-defined]


def fused_epoch(fused: FusedRuns) -> Iterator[int]:
    """One epoch of the fused runs, their batches in lockstep; yields each step. A run's
    non-finite loss is in its record (:meth:`RunState.check_finite`), and harms no other
    run: they share no parameter, so its NaNs reach only its own slice."""
    epochs = [s.begin_epoch() for s in fused.states]
    for batches in zip(*epochs, strict=True):
        step = batches[0][0]
        fused.step(step, [b[1][0] for b in batches], [b[1][1] for b in batches])
        yield step

