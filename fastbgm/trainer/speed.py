"""How a run computes on its device: the resolved speed switches (compile, CUDA graphs,
channels-last, precision, evaluation batch), and how a pack of runs shares one device
(its pack mode). The trainer, the packed loop, the benchmarks and the launcher's checks
all ask here, so a run is resolved the same way wherever it is planned or trained."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from .config import PACK_MODES, RunConfig


@dataclasses.dataclass(frozen=True)
class Speed:
    """The resolved speed switches (what config.json records)."""

    device: str
    compile: bool
    compile_mode: str
    channels_last: bool
    precision: str
    cudnn_benchmark: bool
    threads: int
    step_graph: bool = False
    eval_batch_size: int = 0  # (0: the training batch)

    @property
    def torch_graphs(self) -> bool:
        """torch.compile records CUDA graphs of its own (CUDA-graph trees, on a GPU)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


EVAL_PIXELS = 1024 * 32 * 32  # an evaluation batch on a GPU: about 1024 CIFAR-size images


def eval_batch_size(cfg: RunConfig, gpu: bool, image_hw: tuple[int, int] | None) -> int:
    """The batch of evaluation: ``speed.eval_batch_size``, or for 0 (auto) on a GPU as many
    images of ``image_hw`` as have the pixels of 1024 at 32x32 (evaluation runs eagerly, and
    an eager step at batch 128 is bound by the host's kernel launches: stepgraph.py), never
    below the training batch; the training batch on a CPU or when the size is unknown."""
    batch = cfg.optim.batch_size
    if cfg.speed.eval_batch_size:
        return cfg.speed.eval_batch_size
    if gpu and image_hw and image_hw[0] * image_hw[1] > 0:
        return max(batch, EVAL_PIXELS // (image_hw[0] * image_hw[1]))
    return batch


def resolve_speed(cfg: RunConfig, device: torch.device, world: int = 1,
                  image_hw: tuple[int, int] | None = None) -> Speed:
    """The speed switches of ``cfg`` resolved for ``device``, a run of ``world`` ranks and
    images of ``image_hw`` (H, W; what the evaluation batch is sized by)."""
    gpu = device.type == "cuda"

    def flag(v: str) -> bool:
        return gpu if v == "auto" else v == "true"

    precision = cfg.speed.precision if cfg.speed.precision != "auto" else ("bf16" if gpu else "fp32")
    mode = cfg.speed.compile_mode
    if cfg.speed.step_graph == "auto":
        # the whole step one graph: exact, and faster than torch.compile's graphs around
        # forward and backward (H200, BENCHMARKS.md); where it can be captured
        step_graph = gpu and world == 1 and precision != "fp16" and mode in ("auto", "default",
                                                                             "max-autotune-no-cudagraphs")
    else:
        step_graph = cfg.speed.step_graph == "true"
    if mode == "auto":
        # CUDA graphs remove the per-kernel launch cost that bounds CIFAR-size steps on a
        # GPU: torch.compile's around forward and backward, unless the whole step is one
        mode = "reduce-overhead" if gpu and not step_graph else "default"
    return Speed(device.type, flag(cfg.speed.compile), mode, flag(cfg.speed.channels_last), precision,
                 flag(cfg.speed.cudnn_benchmark), cfg.speed.threads or torch.get_num_threads(), step_graph,
                 eval_batch_size(cfg, gpu, image_hw))


def autocast(speed: Speed) -> contextlib.AbstractContextManager:
    """Mixed precision as the speed switches say (nothing for fp32)."""
    if speed.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=speed.device, dtype=speed.amp_dtype)


def on_stream(stream: Any) -> contextlib.AbstractContextManager:
    """Work on ``stream`` (a CUDA stream), or where it is when there is none."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


COMPILED_VARIANTS = 64  # what torch.compile may keep of one function (torch's default: 8)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` in ``mode`` (``default``, ``reduce-overhead``, ...), in a process
    that keeps up to :data:`COMPILED_VARIANTS` compiled variants of a function.

    Every run of an architecture in a process shares its model class's ``forward`` code
    object, and each compile mode, precision and batch shape (an epoch's last batch too)
    is a variant of it. Past torch's default of 8 variants, torch runs the function
    uncompiled from then on, with one warning in the log. A pack that trains many runs
    in turn, or the GPU check measuring many modes, would then time later runs uncompiled."""
    config = torch._dynamo.config
    name = recompile_limit_name()
    setattr(config, name, max(getattr(config, name), COMPILED_VARIANTS))
    return torch.compile(model, mode=None if mode == "default" else mode)


def recompile_limit_name() -> str:
    """The name of torch.compile's per-function variant limit in ``torch._dynamo.config``:
    ``recompile_limit`` since torch 2.6, ``cache_size_limit`` before."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def make_sgd(params: Any, lr: float, momentum: float, nesterov: bool, device: torch.device) -> torch.optim.SGD:
    """SGD, fused into one kernel on GPUs where this torch supports it."""
    if device.type == "cuda":
        try:
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, fused=True)
        except (TypeError, RuntimeError):  # older torch: no fused SGD
            pass
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)


# The oldest torch seen compiling runs from several threads at once. torch 2.4 cannot: a
# thread's trace meets another's compiled frame ("Detected that you are using FX to
# symbolically trace a dynamo-optimized function") and the runs fail. Every later minor
# release did it (the pack bench's threads rows, K = 2 and 3, on a CPU; RELIABILITY.md,
# "Torch versions"): 2.5.1, 2.6.0, 2.8.0, 2.9.1, 2.10.0, 2.11.0 and 2.13.0 with inductor,
# 2.7.1 with dynamo and AOT autograd only (its inductor cannot build that model's CPU
# code, threads or not), while 2.4.1 fails the same way under both.
THREADED_COMPILE_FROM = (2, 5)


def threaded_compile_ok() -> bool:
    """Whether runs may compile from several threads at once here (always, when torch.compile
    is switched off: TORCHDYNAMO_DISABLE=1 or TORCH_COMPILE_DISABLE=1)."""
    if "1" in (os.environ.get("TORCHDYNAMO_DISABLE"), os.environ.get("TORCH_COMPILE_DISABLE")):
        return True
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= THREADED_COMPILE_FROM


def resolve_pack_mode(mode: str, device: torch.device, speeds: list[Speed]) -> str:
    """The way a pack shares ``device`` (see the module's docstring)."""
    if mode not in PACK_MODES:
        raise ConfigError(f"pack mode {mode!r} is not one of {', '.join(PACK_MODES)}")
    compiled_in_threads_fails = any(s.compile for s in speeds) and not threaded_compile_ok()
    torch_graphs_on_gpu = device.type == "cuda" and any(s.torch_graphs for s in speeds)
    if mode == "auto":
        if device.type != "cuda":
            return "serial"
        # a run's step graphs replay from one call each: no thread needed to overlap them
        if all(s.step_graph for s in speeds):
            return "streams"
        if torch_graphs_on_gpu:
            return "serial"
        return "streams" if compiled_in_threads_fails else "threads"
    if mode == "threads" and compiled_in_threads_fails:
        raise ConfigError(f"pack mode 'threads' compiles runs from several threads at once, which torch "
                          f"{torch.__version__} cannot (torch >= {'.'.join(map(str, THREADED_COMPILE_FROM))} "
                          "can); use pack mode serial or streams, or speed.compile=false")
    if mode == "threads" and torch_graphs_on_gpu:
        raise ConfigError("pack mode 'threads' cannot record torch.compile's CUDA graphs (speed.compile_mode = "
                          "reduce-overhead) from several threads: their captures meet in one memory pool and "
                          "fail; use speed.step_graph=true (each run's whole step one graph; packs in streams), "
                          "pack mode serial, or speed.compile_mode=default")
    if mode == "fused" and device.type == "cuda":
        raise ConfigError("pack mode 'fused' is refused on a GPU: there K fused runs trained slower than one "
                          "run alone (H200, torch 2.11, 2026-11-30: 0.56-0.65x), and were not shown to end "
                          "where they end alone; use pack mode auto (streams with step graphs: each run exactly "
                          "as alone, 1.4-1.6x one run's images/s at K = 4)")
    graphs = [s for s in speeds if s.torch_graphs]
    if mode == "streams" and device.type == "cuda" and graphs:
        raise ConfigError("pack mode 'streams' cannot replay CUDA graphs (speed.compile_mode = "
                          f"{graphs[0].compile_mode!r}): the runs' graphs share one memory pool and would "
                          "overwrite each other; use speed.step_graph=true (a graph pool per run), pack mode serial, "
                          "or speed.compile_mode=default")
    return mode
