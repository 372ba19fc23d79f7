"""The sizes of the GPU check's sections (bench/gpu.py): the real ones for a GPU, and a
toy set that runs the whole check on a CPU in minutes (its smoke test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """The sizes of every section: :data:`FULL` on a GPU; :data:`SMOKE` (``--smoke``) runs
    the whole script's code on a CPU in minutes, so a GPU session spends its minutes
    measuring, not finding a script's bugs."""
    models: tuple[str, ...] = ("resnet18", "vgg16_bn")  # the throughput and pack rows
    # pack-ceiling, K = pack_ks: the table; VGG16 last, its packs measured already
    paper_models: tuple[str, ...] = ("resnet18", "resnet50", "densenet40_bc", "vgg16_bn")
    model_kw: tuple[tuple[str, int], ...] = ()  # their options (small_cnn's width and depth)
    batch: int = 128  # the paper's; the pack rows and the two-stage runs
    big_batch: int = 512  # the ``train`` section
    pack_ks: tuple[int, ...] = (1, 2, 4, 8)
    graph_ks: tuple[int, ...] = (1, 4, 8)  # pack-stepgraph and pack-fused
    process_ks: tuple[int, ...] = (1, 4)  # pack-processes
    unsafe_ks: tuple[int, ...] = (1, 4)
    pack_steps: int = 40  # per run per timed epoch
    train_steps: int = 60  # timed steps of the bare step at ``batch``
    big_steps: int = 40  # ... at ``big_batch``
    trainer_model: str = "resnet18"
    epochs: int = 8  # each two-stage run
    per_class: tuple[int, int] = (1000, 200)  # train / test images per class from the JPEG archive
    loader_images: int = 20000
    eval_images: int = 20000  # the ``eval`` section
    overhead_steps: int = 100
    loader_seconds: float | None = None  # the loader's timing (None: ``--seconds``)
    reserve_s: float = 150.0  # budget the paper and pack sections keep for the asked-for sections after them
    paper_s: float = 360.0  # ... and for the paper section, when it is one of them (BENCHMARKS.md: its needs)
    # the ``paper`` section: all of CIFAR-10 (5,000 / 1,000 images a class) through
    # configs/cifar10-gpu.toml, with these overrides
    paper_per_class: tuple[int, int] = (5000, 1000)
    paper_overrides: tuple[str, ...] = ()


FULL = Scale()
SMOKE = Scale(models=("small_cnn",), paper_models=("small_cnn",), model_kw=(("width", 8), ("depth", 2)), batch=32, big_batch=64,
              pack_ks=(1, 2), graph_ks=(1, 2), process_ks=(1, 2), unsafe_ks=(1, 2), pack_steps=2, train_steps=2, big_steps=2,
              trainer_model="small_cnn", epochs=2, per_class=(12, 4), loader_images=512, eval_images=256, overhead_steps=4,
              loader_seconds=0.2, reserve_s=0.0, paper_s=0.0, paper_per_class=(13, 5),
              paper_overrides=("--models=[small_cnn]", "--model.width=8", "--model.depth=2", "--stage1.max_epochs=2",
                               "--stage1.milestones=[]", "--stage1.check_every=1", "--stage2.max_epochs=2",
                               "--stage2.milestones=[]", "--stage2.eval_every=1", "--stage2.check_every=1",
                               "--cpus-per-task=1", "--runs-per-gpu=2"))
