"""One training run, from a resolved :class:`RunConfig` and a run folder.

The trainer knows nothing of experiments, stages or Slurm: stage 2 is simply a run
with ``init_from`` pointing at stage 1. Read :meth:`Trainer.run` top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .. import distributed as D
from ..config import ConfigError, flatten, to_dict
from ..data import LabelSpec, Manifest, make_loader
from ..data.loader import DeviceLoader
from ..fileio import append_line, atomic_torch_save, atomic_write_json, read_jsonl
from ..models import build_model, count_parameters
from . import checkpoint as C
from .config import RunConfig, identity_changes
from .measures import complexity, evaluate, peak_flops, train_flops_per_image
from .provenance import provenance
from .runstate import RunState
from .speed import Speed, compile_model, make_sgd, resolve_speed
from .stops import NonFiniteLoss, PeerLost, lost_peer, out_of_memory, run_failure

log = logging.getLogger("fastbgm.trainer")

# How long rank 0, having lost a peer, waits for that rank to say why it failed.
PEER_REASON_WAIT_S = 10.0


def lr_factor(cfg: RunConfig, epoch: int) -> float:
    """LR multiplier for (0-based) ``epoch``: warmup, then multistep / cosine / constant."""
    o = cfg.optim
    if o.warmup_epochs and epoch < o.warmup_epochs:
        return (epoch + 1) / o.warmup_epochs
    if o.schedule == "multistep":
        return o.gamma ** sum(epoch >= m for m in o.milestones)
    if o.schedule == "cosine":
        span = max(1, cfg.stop.max_epochs - o.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))
    return 1.0


def _first_line(e: BaseException) -> str:
    """What ``e`` says, cut to its first line (a collective's error runs on for lines)."""
    return (str(e).splitlines() or [""])[0][:200]


class Trainer:
    """Runs one run. Callable (``Trainer(cfg, run_dir)()``), so submitit can pickle it."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.hosts: list[str] = []
        self.env: D.DistEnv | None = None  # set by the loop that trains it
        self.pack: list[str] = [str(self.run_dir)]  # the runs trained in this process with it

    def __call__(self) -> dict[str, Any]:
        return self.run()

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Train this run (resuming it, or doing nothing when it is done); its result."""
        from .loop import train_runs

        return train_runs([self])[0]

    def check(self, env: D.DistEnv) -> Speed:
        """The resolved speed switches, once this config may run in this folder (identity
        first: a finished run must not stand for a config it was not trained with)."""
        speed = resolve_speed(self.cfg, env.device, env.world, self._image_hw())
        problem = self._config_problem(speed, env) if env.is_main else None
        problem = D.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
        return speed

    def finished_result(self) -> dict[str, Any] | None:
        p = self.run_dir / C.RESULT
        if p.exists():
            try:
                res = json.loads(p.read_text())
            except json.JSONDecodeError:
                return None  # torn by a crash of older code; the run resumes and rewrites it
            if res.get("status") == "done":
                return res
        return None

    def open(self, env: D.DistEnv, speed: Speed) -> RunState:
        """Everything one run needs, built and resumed from its folder."""
        cfg = self.cfg
        self.speed = speed
        C.rank_failure_path(self.run_dir, env.rank).unlink(missing_ok=True)  # an earlier attempt's
        if speed.device == "cpu" and cfg.speed.threads:
            torch.set_num_threads(cfg.speed.threads)
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark
        if env.is_main:
            atomic_write_json(self.run_dir / C.CONFIG, to_dict(self.resolved_config(speed, env)))
        D.barrier()
        train, train_eval, test = self._loaders(env, speed)
        self.input_shape = train.image_shape
        module = self._build_model(train.num_classes, env, speed)
        # kept on the device: the distance from it is measured every epoch, without a copy
        init = {k: v.to(env.device) for k, v in self._initial_weights(module, env).items()}
        optimizer = self._optimizer(module)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
        scaler = torch.amp.GradScaler("cuda") if speed.precision == "fp16" and env.device.type == "cuda" else None
        start_epoch, stopped = C.resume(self.run_dir, module, optimizer, scheduler, scaler, train, env.is_main)
        flops = train_flops_per_image(module, self.input_shape, env.device) if cfg.mfu else None
        self.hosts = D.all_gather_object(socket.gethostname())  # where each rank ran
        if env.is_main:
            atomic_write_json(self.run_dir / C.ENV, provenance(self.cfg, env, speed, module, flops, self.hosts,
                                                                self.pack))
            self._write_result({"status": "running", "epoch": start_epoch})
        return RunState(self, env, speed, module, self._wrap(module, env, speed), optimizer, scheduler, scaler,
                        train, train_eval, test, init, flops, peak_flops(env.device, speed.precision),
                        epoch=start_epoch, end_epoch=start_epoch if stopped else cfg.stop.max_epochs)

    def end_epoch(self, s: RunState, loss: float, acc: float, n: int, seconds: float) -> bool:
        """After one epoch of training: evaluate when due, log, checkpoint. True when the
        run stops here (its stop rule fired, or its last epoch)."""
        cfg, env, epoch = self.cfg, s.env, s.epoch
        t0 = time.perf_counter()
        lr = s.optimizer.param_groups[0]["lr"]
        s.scheduler.step()
        ips = n / seconds
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_acc": acc,
                               "images_per_s": ips, "epoch_seconds": seconds}
        if s.flops and s.peak:
            row["mfu"] = s.flops * ips / env.world / s.peak
        if s.graphs is not None:  # how many steps were replays, and how many captures it took
            row["graph_steps"], row["graph_captures"] = s.graphs.replays, s.graphs.captures
        t_measures = time.perf_counter()
        row.update(complexity(s.module, s.init, self.input_shape))
        row["measures_seconds"] = time.perf_counter() - t_measures
        last = epoch + 1 == cfg.stop.max_epochs
        stop = False
        # under DDP each rank's BatchNorm buffers saw only its own batches: every rank
        # evaluates (and final.pt holds) rank 0's model
        D.broadcast_buffers(s.module)
        if (epoch + 1) % cfg.stop.train_eval_every == 0 or last:
            row["train_eval_loss"], row["train_eval_acc"] = evaluate(s.module, s.train_eval, s.speed)
            stop = cfg.stop.target_train_acc > 0 and row["train_eval_acc"] >= cfg.stop.target_train_acc
        if s.test is not None and ((epoch + 1) % cfg.stop.test_eval_every == 0 or last or stop):
            row["test_loss"], row["test_acc"] = evaluate(s.module, s.test, s.speed)
        row["eval_seconds"] = time.perf_counter() - t0  # the measures and the evaluations
        if env.is_main:
            # the checkpoint carries its epoch's row, so that its seconds can be in the row: a
            # kill between the two is mended on resume (the row comes back from last.pt)
            t_ckpt = time.perf_counter()
            if stop or last or t_ckpt - s.saved_at >= cfg.speed.checkpoint_every_s:
                row["checkpointed"] = True  # (C.checkpointed_epochs: what a resume keeps)
                C.save_last(self.run_dir, s.module, s.optimizer, s.scheduler, s.scaler, epoch + 1, stop, row)
                s.saved_at = time.perf_counter()
                row["checkpoint_seconds"] = s.saved_at - t_ckpt
            append_line(self.run_dir / C.METRICS, json.dumps(row))
            self._log_epoch(row)
        D.barrier()
        s.epoch = epoch + 1
        if stop:
            log.info("%s: target train accuracy %.4f reached at epoch %d", cfg.name, cfg.stop.target_train_acc,
                     epoch + 1)
        return stop or s.epoch >= s.end_epoch

    def fail(self, s: RunState | None, e: BaseException, record: bool = True) -> dict[str, Any]:
        """Record why this run failed (a non-finite loss says where; running out of
        memory says what to change). ``s`` is None when it failed while being set up;
        ``record`` False when its folder is not this trainer's to write (it failed before
        taking the folder's lock): then the reason is only logged and returned.

        Under DDP the rank that fails first is the one that knows why: a rank other than
        0 writes its reason beside the run (``failed-rank<r>.json``), and rank 0, which
        then only sees its peer go, records that reason in result.json. A peer that went
        with no reason given (killed by a signal, its node lost) fails nothing: the
        ranks that saw it go raise :class:`PeerLost`, and the run resumes."""
        env = s.env if s is not None else self.env
        result: dict[str, Any] = {"status": "failed", "reason": self.failure_reason(e)}
        if isinstance(e, NonFiniteLoss):
            result.update(epoch=e.epoch, step=e.step)
        elif s is not None:
            result["epoch"] = s.epoch + 1
        peers_may_know = env is not None and env.world > 1 and not run_failure(e)  # why this rank saw its error
        lost = peers_may_know and lost_peer(e)
        if env is not None and not env.is_main:
            if lost:  # (whichever rank failed says why, rank 0 included)
                raise self._peer_lost(env, e)
            atomic_write_json(C.rank_failure_path(self.run_dir, env.rank), {"rank": env.rank, **result})
        elif record:
            if peers_may_know:
                peer = self._peer_failure()
                if peer is not None:
                    result.update(reason=f"{C.rank_failure_reason(peer)} (rank 0 then saw: {type(e).__name__}: "
                                         f"{_first_line(e)})", failed_rank=peer["rank"])
                elif lost:
                    raise self._peer_lost(env, e)
            self._write_result(result)
        log.error("%s: %s", self.run_dir, result["reason"])
        return result

    def failure_reason(self, e: BaseException) -> str:
        if isinstance(e, NonFiniteLoss):
            return str(e)
        if not out_of_memory(e):
            return f"{type(e).__name__}: {e}"
        env = self.env
        world = env.world if env is not None else max(1, self.cfg.dist.world)
        device = env.device if env is not None else self.cfg.speed.device
        packed = f", packed with {len(self.pack) - 1} other run(s)" if len(self.pack) > 1 else ""
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        return (f"out of memory on {device}: {self.cfg.model.name} at {self.cfg.optim.batch_size // world} images "
                f"per rank{packed} does not fit ({detail}); lower optim.batch_size, pack fewer runs per GPU "
                "(resources.runs_per_gpu), or spread the run over more ranks (resources.ranks_per_run)")

    def _peer_lost(self, env: D.DistEnv, e: BaseException) -> PeerLost:
        return PeerLost(f"{self.run_dir}: rank {env.rank} lost a peer that gave no reason (killed by a signal, "
                        f"the OOM killer say, or its node lost; rank {env.rank} saw {type(e).__name__}: "
                        f"{_first_line(e)}): the run is interrupted, not failed, and resumes from its last checkpoint")

    def _peer_failure(self) -> dict[str, Any] | None:
        deadline = time.monotonic() + PEER_REASON_WAIT_S
        while True:
            found = C.rank_failures(self.run_dir)
            if found or time.monotonic() >= deadline:
                return found[0] if found else None
            time.sleep(0.2)

    # ------------------------------------------------------------------ pieces
    def _config_problem(self, speed: Speed, env: D.DistEnv) -> str | None:
        """Why this config may not run in this folder (None: it may)."""
        want = self.cfg.dist.world
        if speed.step_graph:
            why = ("it spans several ranks (DDP's gradient hooks are not captured)" if env.world > 1 else
                   "fp16 needs a GradScaler, whose checks are host syncs" if speed.precision == "fp16" else
                   f"speed.compile_mode = {speed.compile_mode!r} captures CUDA graphs of its own"
                   if speed.torch_graphs else None)
            if why:
                return (f"speed.step_graph = true does not work for {self.cfg.name}: {why}; "
                        "use speed.step_graph=false")
        if want and want != env.world:
            return (f"{self.cfg.name} is a {want}-rank run (dist.world = {want}) but was started with {env.world} "
                    f"rank(s); start it with {want}, or give it another run folder")
        p = self.run_dir / C.CONFIG
        if not p.exists() or not C.has_training(self.run_dir):
            return None  # nothing trained under it (say, a start that failed on a missing dataset)
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # never fully written: this run rewrites it
        new = to_dict(self.resolved_config(speed, env))
        changed, harmless = identity_changes(old, new)
        if changed:
            was, now = flatten(old), flatten(new)
            what = ", ".join(f"{k} {was.get(k, '(not recorded)')} -> {now.get(k)}" for k in changed[:8])
            return (f"{self.run_dir} holds a run with a different config ({what}); "
                    "choose a new run folder, or delete this one to start over")
        if harmless:
            log.info("%s: speed or reporting switches changed (%s); they do not change what is computed",
                     self.run_dir, ", ".join(harmless))
        return None

    def resolved_config(self, speed: Speed, env: D.DistEnv) -> RunConfig:
        b = lambda v: "true" if v else "false"  # noqa: E731
        s = dataclasses.replace(self.cfg.speed, device=speed.device, compile=b(speed.compile),
                                compile_mode=speed.compile_mode,
                                channels_last=b(speed.channels_last), precision=speed.precision,
                                cudnn_benchmark=b(speed.cudnn_benchmark), threads=speed.threads,
                                step_graph=b(speed.step_graph), eval_batch_size=speed.eval_batch_size)
        dist = dataclasses.replace(self.cfg.dist, world=env.world,
                                   per_rank_batch=-(-self.cfg.optim.batch_size // env.world))
        model = dataclasses.replace(self.cfg.model, sync_bn=b(self._sync_bn(env)))
        return dataclasses.replace(self.cfg, speed=s, dist=dist, model=model)

    def _sync_bn(self, env: D.DistEnv) -> bool:
        """SyncBatchNorm for a multi-rank GPU run unless the config says false (it is a
        CUDA-only module: CPU ranks normalise over their own batches)."""
        want = self.cfg.model.sync_bn
        if not env.distributed or want == "false":
            return False
        if env.device.type != "cuda":
            if want == "true":
                raise ConfigError("model.sync_bn = true needs GPUs (SyncBatchNorm is CUDA-only); "
                                  "use model.sync_bn=false on CPU ranks")
            return False
        return True

    def _image_hw(self) -> tuple[int, int] | None:
        """(H, W) of the training images as the loaders will give them (a stream loader makes
        images of mixed sizes 224 px square); None when the manifest cannot be read (the
        loaders then say why)."""
        try:
            res = Manifest.for_beton(self.cfg.data.train).resolution
        except Exception:
            return None
        return (int(res[0]), int(res[1])) if res else (224, 224)

    def _loaders(self, env: D.DistEnv, speed: Speed) -> tuple[DeviceLoader, DeviceLoader, DeviceLoader | None]:
        d = self.cfg.data
        eval_batch = speed.eval_batch_size or self.cfg.optim.batch_size
        spec = LabelSpec(d.labels, seed=d.label_seed, fraction=d.noise_fraction,
                         copies=d.copies if d.labels == "confusion" else 1,
                         zero_ratio=d.zero_ratio if d.labels == "confusion" else 0.0)
        img_dtype = torch.bfloat16 if speed.precision == "bf16" else torch.float32
        common = dict(device=env.device, dtype=img_dtype, placement=d.placement, rank=env.rank, world=env.world,
                      channels_last=speed.channels_last, subset=d.subset or None)
        train = make_loader(d.train, batch_size=self.cfg.optim.batch_size, labels=spec, augment=d.augment,
                            train=True, seed=d.seed, pad=d.crop_padding, **common)
        try:
            train_eval = train.eval_view(batch_size=eval_batch)
        except NotImplementedError:
            train_eval = make_loader(d.train, batch_size=eval_batch, labels=spec, train=False, **common)
        test = None
        if d.test:
            norm = train.manifest.normalization  # the training split's statistics, always
            test = make_loader(d.test, batch_size=max(eval_batch, 256), train=False,
                               normalization=norm, **{**common, "subset": None})
        return train, train_eval, test

    def _build_model(self, num_classes: int, env: D.DistEnv, speed: Speed) -> nn.Module:
        m = self.cfg.model
        torch.manual_seed(self.cfg.seed)  # the same init on every rank
        module = build_model(m.name, num_classes, m.bn_init, **m.kwargs())
        if self.cfg.init_from:
            ckpt = C.load(C.resolve_init(self.cfg.init_from))
            try:
                module.load_state_dict(C.model_state(ckpt))  # weights + BN running statistics
            except RuntimeError as e:
                raise ConfigError(f"init_from: {self.cfg.init_from} does not fit model {m.name!r}: {e}") from None
        if self._sync_bn(env):
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module = module.to(env.device)
        if speed.channels_last:
            module = module.to(memory_format=torch.channels_last)
        log.info("model %s: %.2f M parameters", m.name, count_parameters(module) / 1e6)
        return module

    def _initial_weights(self, module: nn.Module, env: D.DistEnv) -> dict[str, torch.Tensor]:
        p = self.run_dir / C.INIT
        if p.exists():
            return C.load(p)["params"]
        init = {k: v.detach().cpu().clone() for k, v in module.named_parameters()}
        if env.is_main:
            atomic_torch_save({"params": init, "model": module.state_dict()}, p)
        return init

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.wd_exclude_bn_bias and o.weight_decay:
            decay = [p for p in module.parameters() if p.ndim > 1]
            no_decay = [p for p in module.parameters() if p.ndim <= 1]
            groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        else:
            groups = [{"params": list(module.parameters()), "weight_decay": o.weight_decay}]
        return make_sgd(groups, o.peak_lr, o.momentum, o.nesterov, next(module.parameters()).device)

    def _wrap(self, module: nn.Module, env: D.DistEnv, speed: Speed) -> nn.Module:
        model: nn.Module = module
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if speed.compile:
            model = compile_model(model, speed.compile_mode)
        return model

    def _finish(self, module: nn.Module, env: D.DistEnv, speed: Speed) -> dict[str, Any]:
        rows = read_jsonl(self.run_dir / C.METRICS) if env.is_main else []
        result: dict[str, Any] = {"status": "done"}
        if env.is_main:
            atomic_torch_save({"model": module.state_dict(), "config": to_dict(self.cfg)}, self.run_dir / C.FINAL)
            last = rows[-1] if rows else {}
            first_full = C.epochs_to_full_train(rows)
            result.update({
                "epochs": last.get("epoch"),
                "train_acc": last.get("train_eval_acc", last.get("train_acc")),
                "train_loss": last.get("train_eval_loss", last.get("train_loss")),
                "test_acc": last.get("test_acc"),
                "test_loss": last.get("test_loss"),
                "epochs_to_100_train": first_full,
                "target_reached": bool(self.cfg.stop.target_train_acc)
                and last.get("train_eval_acc", 0) >= self.cfg.stop.target_train_acc,
                "wall_seconds": sum(r.get("epoch_seconds", 0) + r.get("eval_seconds", 0)
                                    + r.get("checkpoint_seconds", 0) for r in rows),
                "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
                "speed": dataclasses.asdict(speed),
            })
            self._write_result(result)
        D.barrier()
        return result

    def _write_result(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.run_dir / C.RESULT, {"name": self.cfg.name, **result, "written": time.time()})

    @contextlib.contextmanager
    def _progress(self, label: str, total: int, env: D.DistEnv) -> Iterator[Any]:
        from rich.console import Console

        console = Console(stderr=True)
        if not env.is_main or not console.is_terminal:
            yield lambda n: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn(f"[bold]{self.cfg.name}[/] {label}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task(label, total=total)
            yield lambda n: progress.advance(task, n)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        parts = [f"{self.cfg.name} epoch {row['epoch']}", f"lr {row['lr']:.4g}", f"loss {row['train_loss']:.4f}",
                 f"acc {row['train_acc']:.4f}", f"{row['images_per_s']:,.0f} img/s"]
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if "train_eval_acc" in row:
            parts.append(f"train-eval acc {row['train_eval_acc']:.4f}")
        if "test_acc" in row:
            parts.append(f"test acc {row['test_acc']:.4f}")
        log.info(" | ".join(parts))
