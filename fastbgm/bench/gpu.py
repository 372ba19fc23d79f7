"""``python -m fastbgm.bench gpu --out DIR [--sections A,B] [--budget S]``: the one
command to run on a GPU machine.

Sections (:data:`SECTIONS`), in the order the open work needs them, each skipped (and
said so) once the time budget is spent; the paper and pack sections keep some of it
for the sections asked for after them (:attr:`Scale.reserve_s`, :attr:`Scale.paper_s`):

- ``train128``: the bare compiled step of ResNet18 and VGG16 at batch 128 (the
  baseline the Trainer is held to);
- ``pack``: K = 1, 2, 4, 8 batch-128 runs on the GPU with torch.compile's CUDA graphs,
  pack mode serial (from threads their captures fail: trainer/loop.py), and how far run 0
  ends from run 0 alone;
- ``pack-stepgraph``: the same with each run's whole step one CUDA graph
  (``speed.step_graph``), pack modes streams and threads;
- ``two-stage``: stage 1 and both stage-2 runs of ResNet18 on real CIFAR-10 through the
  Trainer, alone and packed, with and without step graphs (when ``--data`` holds a
  prepared CIFAR-10, ``<data>/cifar10/train.beton`` or its resident cache, or the JPEG
  archive ``<data>/cifar10-jpeg.tar.xz``, decoded here without ffcv);
- ``trainer/bare``: the Trainer's images/s over the bare step's (goal: >= 90%);
- ``eval``: the Trainer's evaluation (eager, eval mode) of ResNet18 over 20,000
  CIFAR-size images at batch 128 and at the batch ``speed.eval_batch_size = auto`` gives
  on this device (and 8 x 128): what evaluating at the training batch cost;
- ``pack-ceiling``: for each of the paper's four models, K = 1, 2, 4, 8 runs packed as the
  trainer packs them by default (step graphs, streams), each K beside one run at batch
  K x 128: what the packs reach of the rate that packing at no cost would give;
- ``paper``: the paper on all of CIFAR-10, ResNet18 (configs/cifar10-gpu.toml: stage 1
  on R = 2 noisy copies, stage 2 vanilla and DA+L2+M from random and adversarial init,
  4 runs packed on the GPU) through the launcher, stopped when the budget ends, and its
  report (bench/paper.py; ``paper-report.tar.gz`` beside the table). With ``--paper-dir
  DIR`` its runs stay in DIR, and a check run again with the same DIR (a second call on
  a machine still warm) resumes the launch where the budget stopped it;
- ``pack-unsafe``: torch.compile's graphs of 4 runs replayed on 4 streams, the design
  the trainer refuses (their graphs share one memory pool): its difference column;
- ``pack-processes``: K = 4 runs as 4 processes on the GPU, each run as alone, taking
  turns (``processes``) or side by side under CUDA MPS (``mps``; bench/processes.py);
- ``pack-fused``: K = 4, 8 runs fused into one vmapped network (HFTA; trainer/fused.py:
  compiled, the whole fused step one CUDA graph), against the same K = 1 as
  ``pack-stepgraph``, with each pack's relative difference after 3 steps (drift or a
  wrong kernel?); each K compiles anew;
- ``loader``, ``train`` (batch 512, eager / compiled / CUDA graphs, loader in the loop
  or not), ``ddp`` (2 processes, when there are 2+ GPUs);
- ``overhead``: what the training loop adds to a step on the host, ops (eager) and
  microseconds (eager, torch.compile's CUDA graphs, step graphs), for a tiny model
  (bench/overhead.py).

Writes ``gpu.json`` (updated after every section), and at the end the table as
``gpu.md`` (markdown, for BENCHMARKS.md) and on the terminal, and the measured rates as
``throughput-rows.json`` (rows for fastbgm/launch/throughput.json: the launcher's
estimate, packing included).

The sections' sizes are in gpu_scale.py, the sections on the Trainer itself (two-stage,
trainer/bare, eval) in gpu_trainer.py, the pack tables in pack.py, the paper in paper.py.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import RecompileLimitHits, device_info, print_table, time_images, write_json, write_markdown
from .gpu_scale import FULL, SMOKE, Scale
from .gpu_trainer import bare_steps, eval_section, trainer_ips, trainer_vs_bare, two_stage_section

log = logging.getLogger(__name__)


def _loader_section(device: torch.device, seconds: float, scale: Scale = FULL) -> list[list[Any]]:
    from importlib.util import find_spec

    from fastbgm.data import LabelSpec, loader_from_arrays

    from .train import synthetic_arrays

    images, labels = synthetic_arrays(scale.loader_images)
    rows = []
    for bs in (scale.big_batch,):
        spec = LabelSpec("confusion", seed=0, copies=4, zero_ratio=0.1)
        t0 = time.perf_counter()
        L = loader_from_arrays(images, labels, batch_size=bs, device=device, label_spec=spec, augment=True,
                               dtype=torch.bfloat16)
        setup = time.perf_counter() - t0
        ips = time_images(lambda loader=L: sum(len(y) for _, y, _ in loader), device, seconds)
        rows.append(["loader", f"resident confusion R=4 + crop/flip, bf16, batch {bs}", ips,
                     f"setup {setup:.1f}s ({4 * len(labels):,} noised copies)"])
    if find_spec("ffcv") is None:  # (importing it only to ask costs ~10 s)
        rows.append(["loader", "stream (ffcv JPEG)", float("nan"), "skipped: ffcv is not installed here"])
    return rows


def _two_gpu_section(out: Path) -> list[list[Any]]:
    if torch.cuda.device_count() < 2:
        return [["ddp", "resnet18 on 2 processes", float("nan"), "skipped: only one GPU"]]
    code = ("import os, torch; from fastbgm.bench.train import measure; import torch.distributed as d;"
            "d.init_process_group('nccl'); r=d.get_rank(); torch.cuda.set_device(r);"
            "m=measure('resnet18', 512, 'cudagraphs-bf16', torch.device('cuda', r), 30, {'without': None})[0];"
            "print('IPS', m['images_per_s']) if r==0 else None")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-c", code], capture_output=True, text=True, timeout=400)
    ips = next((float(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("IPS")), float("nan"))
    return [["ddp", "resnet18 cudagraphs-bf16 batch 512/GPU, 2 processes (per GPU)", ips,
             "ok" if res.returncode == 0 else res.stderr[-300:]]]


def _overhead_section(device: torch.device, results: dict[str, Any], scale: Scale = FULL) -> list[list[Any]]:
    """The loop's own host cost per step in each step mode (bench/overhead.py)."""
    from .overhead import run as run_overhead

    rows = []
    for mode in ("eager", "cudagraphs", "stepgraph"):
        res = run_overhead(device, scale.overhead_steps, None, mode)
        results.setdefault("overhead", {})[mode] = res["rows"]
        bare, _, loop, own = res["rows"]
        ops = f", {own['ops_per_step']:.1f} ops" if "ops_per_step" in own else ""
        rows.append(["overhead", f"tiny model batch 128 {mode}: the loop's own per step", float("nan"),
                     f"{own['us_per_step']:.0f} us{ops} (bare step {bare['us_per_step']:.0f} us, loop step "
                     f"{loop['us_per_step']:.0f} us)"])
    return rows


# a pack's difference from alone that still counts as the same run (bf16 runs, other
# kernels: float noise after the bench's steps); a larger one is not written as a rate
PACK_TOLERANCE = 1e-2


def throughput_rows(results: dict[str, Any], scale: Scale = FULL) -> list[dict[str, Any]]:
    """This check's measurements as rows of the launcher's estimate table
    (fastbgm/launch/throughput.json): the bare batch-128 step, the Trainer's images/s,
    the Trainer's evaluation at its auto batch,
    and for each K > 1 and pack mode that ends where alone ends, the K runs' images/s and
    their ratio to K = 1 measured beside them (``x_alone``, what the estimate reads)."""
    info = results["info"]
    common = {"card": info["name"], "precision": "bf16", "date": time.strftime("%Y-%m-%d"),
              "command": "bash launch/gpu-check.sh" + (" --smoke" if scale == SMOKE else "")}
    rows = [{"model": r["model"], "batch": r["batch"], "images_per_s": round(r["images_per_s"]), "kind": "step",
             **common} for r in bare_steps(results, scale)]
    # the Trainer in its default step mode on a GPU (step graphs), else as torch.compile's graphs
    trainer = trainer_ips(results, "step graphs") or trainer_ips(results, "compiled (reduce-overhead)")
    if trainer is not None:
        rows.append({"model": scale.trainer_model, "batch": scale.batch, "kind": "trainer",
                     "images_per_s": round(trainer), **common})
    # the Trainer's evaluation at its auto batch: what the estimate counts an evaluated image at
    rows += [{"model": r["model"], "batch": r["batch"], "images_per_s": round(r["images_per_s"]), "kind": "eval",
              **common} for r in results.get("eval", []) if r["auto"]]
    for key, steps in (("pack", "cudagraphs"), ("pack_stepgraph", "stepgraph"), ("pack_ceiling", "stepgraph")):
        # (fused: refused on a GPU)
        for r in results.get(key, []):
            if "failed" in r:
                continue
            if r.get("ceiling"):  # one run at K x batch: a step row of that batch
                rows.append({"model": r["model"], "batch": r["batch"], "images_per_s": round(r["images_per_s"]),
                             "kind": "step", "step": steps, **common})
            elif r["K"] > 1 and not r["unsafe"] and r["max_abs_diff"] <= PACK_TOLERANCE:
                rows.append({"model": r["model"], "batch": r["batch"], "runs_per_gpu": r["K"],
                             "pack_mode": r["pack_mode"], "step": steps, "kind": "pack",
                             "images_per_s": round(r["images_per_s"]), "x_alone": round(r["x_k1"], 3),
                             "max_abs_diff": r["max_abs_diff"], **common})
    return rows


SECTIONS = ("train128", "pack", "pack-stepgraph", "two-stage", "trainer/bare", "eval", "pack-ceiling", "paper",
            "pack-unsafe", "pack-processes", "pack-fused", "loader", "train", "ddp", "overhead")


def reserve_after(name: str, sections: tuple[str, ...], scale: Scale = FULL) -> float:
    """What section ``name`` leaves of the budget for the sections asked for after it:
    :attr:`Scale.paper_s` when the paper is one of them, :attr:`Scale.reserve_s` when
    others are, nothing when none is (the last section asked for may spend it all)."""
    later = [x for x in SECTIONS[SECTIONS.index(name) + 1:] if x in sections]
    return max([scale.paper_s if x == "paper" else scale.reserve_s for x in later], default=0.0)


def run(device: torch.device, data: Path, out: Path | None, seconds: float, budget_s: float = 420.0,
        sections: tuple[str, ...] = SECTIONS, scale: Scale = FULL, paper_dir: Path | None = None) -> dict:
    """The sections asked for, in :data:`SECTIONS`' order (what the open work needs first),
    each skipped once ``budget_s`` is spent; sizes from ``scale`` (:data:`SMOKE`: the whole
    script at toy size, for a CPU). ``paper_dir``: the paper's launch folder, kept (a check
    given the same folder again resumes the launch where the budget stopped it); None: a
    temporary one, removed at the end."""
    from ..trainer.fused import uncompiled_fused_steps

    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown GPU-check section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    start = time.time()
    deadline = start + budget_s
    info = device_info(device)
    info["cuda_devices"] = torch.cuda.device_count()
    results: dict[str, Any] = {"info": info, "rows": [], "skipped": [], "train": [],
                               "scale": "smoke" if scale == SMOKE else "full"}
    rows: list[list[Any]] = [["device", f"{info['name']}; torch {info['torch']}; CUDA {info.get('cuda')}",
                              float("nan"), f"{info['cuda_devices']} GPU(s)"]]

    current = [""]  # the section under way

    def reserve() -> float:
        return reserve_after(current[0], sections, scale)

    def section(name: str, fn, *a) -> None:
        if name not in sections:
            return
        current[0] = name
        if time.time() > deadline:
            rows.append([name, "-", float("nan"), "skipped: time budget spent"])
            return
        t0 = time.time()
        eager_before = uncompiled_fused_steps()
        try:
            with RecompileLimitHits() as hits:
                rows.extend(fn(*a))
        except Exception as e:  # a failing section must not lose the others
            log.exception("section %s failed", name)
            rows.append([name, "-", float("nan"), f"failed: {type(e).__name__}: {e}"[:300]])
        for hit in hits.hits:  # its later rows may have run uncompiled: say so beside them
            rows.append([name, "torch.compile's recompile limit hit", float("nan"), f"failed: {hit}"])
            results.setdefault("recompile_limit_hits", []).append({"section": name, "warning": hit})
        for key, why in uncompiled_fused_steps().items():  # its fused rows ran uncompiled: say so beside them
            if key not in eager_before:
                rows.append([name, "fused step ran uncompiled", float("nan"), f"failed: torch cannot compile it: {why}"])
                results.setdefault("fused_uncompiled", []).append({"section": name, "why": why})
        results["rows"] = rows
        results.setdefault("section_seconds", {})[name] = time.time() - t0
        write_json(out, "gpu", results)

    def train_rows(batch: int, modes: list[str], loader_modes: tuple[str, ...], steps: int) -> list[list[Any]]:
        from .train import run as run_train

        res = run_train(device, data, list(scale.models), [batch], modes, steps, None,
                        loader_modes=loader_modes, deadline=deadline - 120, loader_images=scale.loader_images,
                        model_kw=dict(scale.model_kw))
        out_rows = []
        for r in res["rows"]:
            note = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "MFU -"
            if "loader_overhead" in r:
                note += f", loader overhead {100 * r['loader_overhead']:.1f}%"
            out_rows.append(["train", f"{r['model']} batch {r['batch']} {r['mode']} "
                             f"{'loader in loop' if r['loader'] else 'fixed batch'}", r["images_per_s"],
                             note + f", warm-up {r['warmup_s']:.0f}s"])
        results["train"] += res["rows"]
        results["skipped"] += res["skipped"]
        return out_rows

    def pack_rows(key: str, models: tuple[str, ...], ks: tuple[int, ...], mode: str, pack_modes: tuple[str, ...],
                  keep: Any = lambda r: True, ceiling: bool = False) -> list[list[Any]]:
        """A pack table; no measurement starts once only :func:`reserve_after` seconds of
        the budget are left for the sections after it."""
        from .pack import run as run_pack

        res = [r for r in run_pack(device, list(models), list(ks), scale.batch, scale.pack_steps, None, mode,
                                   pack_modes, deadline=deadline - reserve(), baselines=baselines,
                                   model_kw=dict(scale.model_kw), ceiling=ceiling) if keep(r)]
        results[key] = res

        def notes(r: dict[str, Any]) -> str:
            if r.get("ceiling"):
                return f"x{r['x_k1']:.2f} of K=1: the rate {r['K']} packed runs would reach if packing cost nothing"
            return (f"x{r['x_k1']:.2f} of K=1" + (f", {100 * r['of_ceiling']:.0f}% of one run at batch "
                                                   f"{r['K'] * scale.batch}" if r.get("of_ceiling") else "")
                    + f", max |dw| vs alone {r['max_abs_diff']:.2g} ({r['max_rel_diff']:.2g} relative"
                    + (f"; {r['early_rel_diff']:.2g} after 3 steps" if "early_rel_diff" in r else "") + ")")

        return [["pack", f"{r['model']} batch {r['batch']} {mode}, K={r['K']} {r['pack_mode']}", float("nan"),
                 f"failed: {r['failed']}"] if "failed" in r else
                ["pack", f"{r['model']} batch {r['batch']} {mode}, "
                 + (f"K={r['K']} {r['pack_mode']}" if not r.get("ceiling") else "one run")
                 + (" (unsafe)" if r["unsafe"] else ""), r["images_per_s"], notes(r)] for r in res]

    # (a prepared full CIFAR-10 at full scale only: a smoke never reads the real thing)
    paper_prepared = ("cifar10-full", "cifar10") if scale == FULL else ()

    def paper_rows() -> list[list[Any]]:
        from .paper import run as run_paper

        rows, record = run_paper(data, paper_dir or work / "paper", out, deadline - reserve(), scale.paper_per_class,
                                 scale.paper_overrides, paper_prepared, info, decoding)
        results["paper"] = record
        return rows

    baselines: dict = {}  # K = 1 of a model and mode, measured once for every section
    work = Path(tempfile.mkdtemp(prefix="fastbgm-gpu-"))  # the two-stage runs' folders
    decoding = None  # the paper's data, decoded while the sections before it measure the GPU
    if "paper" in sections and (scale.paper_per_class != scale.per_class or "two-stage" not in sections):
        from .paper import decode_in_background  # (not when two-stage decodes the same folder first)

        decoding = decode_in_background(data, scale.paper_per_class, paper_prepared, work / "decode.log")
    try:
        section("train128", train_rows, scale.batch, ["cudagraphs-bf16"], ("without",), scale.train_steps)
        # torch.compile's CUDA graphs: runs in turn (from threads their captures fail: loop.py)
        section("pack", pack_rows, "pack", scale.models, scale.pack_ks, "cudagraphs", ("serial",))
        # each run's whole step one CUDA graph, replayed on its own stream
        section("pack-stepgraph", pack_rows, "pack_stepgraph", scale.models, scale.graph_ks, "stepgraph",
                ("streams", "threads"))
        section("two-stage", two_stage_section, device, data, work, results, deadline, scale)
        section("trainer/bare", trainer_vs_bare, results, scale)
        # what the Trainer's evaluation costs at batch 128 and at its auto batch
        section("eval", lambda: eval_section(device, scale, deadline - reserve(), results))
        # the trainer's default packing of every paper model, beside one run at K x the batch
        section("pack-ceiling", pack_rows, "pack_ceiling", scale.paper_models, scale.pack_ks, "stepgraph",
                ("streams",), lambda r: True, True)
        # the paper on all of CIFAR-10 through the launcher, 4 runs packed on the GPU
        section("paper", paper_rows)
        # the design the trainer refuses, measured once: torch.compile's graphs of 4 runs on 4 streams
        section("pack-unsafe", pack_rows, "pack_unsafe", scale.models[:1], scale.unsafe_ks, "cudagraphs", ("streams",),
                lambda r: r["K"] > 1)
        # K runs as K processes (each run as alone), taking turns on the GPU or side by side under CUDA MPS
        section("pack-processes", pack_rows, "pack_processes", scale.models, scale.process_ks, "stepgraph",
                ("processes", "mps"))
        # K runs as one vmapped network (HFTA), its whole step one CUDA graph
        section("pack-fused", pack_rows, "pack_fused", scale.models, scale.graph_ks, "stepgraph", ("fused",))
        section("loader", _loader_section, device, scale.loader_seconds or seconds, scale)
        section("train", train_rows, scale.big_batch, ["eager-bf16", "compiled-bf16", "cudagraphs-bf16"],
                ("without", "with"), scale.big_steps)
        section("ddp", _two_gpu_section, out or Path("."))
        section("overhead", _overhead_section, device, results, scale)
    finally:
        if decoding is not None and decoding.poll() is None:  # (the paper was skipped; its caches are written
            decoding.kill()                                   # whole or not at all)
            decoding.wait()
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = time.time() - start
    write_json(out, "gpu", results)
    # ready for fastbgm/launch/throughput.json, which the launcher's --dry-run estimate reads
    write_json(out, "throughput-rows", {"rows": throughput_rows(results, scale)})
    title = f"fastbgm GPU check ({results['wall_seconds']:.0f} s{', smoke' if scale == SMOKE else ''})"
    columns = ["section", "what", "images/s", "notes"]
    write_markdown(out, "gpu", title, columns, rows)
    print_table(title, columns, rows)
    return results
