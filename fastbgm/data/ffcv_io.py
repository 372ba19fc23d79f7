"""Everything that touches ffcv lives here, and ffcv is imported only inside these
functions: ``import fastbgm.data`` and the resident loader work without ffcv when a
resident cache exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

FFCV_MISSING = (
    "ffcv is not installed, and reading or writing a .beton needs it: run launch/install.sh "
    "(Debian/Ubuntu) or see the README's install section"
)


def import_ffcv() -> Any:
    import torch  # (ffcv imports it anyway; a launcher that only names dataset files does not)

    # Importing ffcv calls torch.set_num_threads(1) as a side effect: undo it.
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import ffcv  # noqa: F401
            import ffcv.fields  # noqa: F401
            import ffcv.loader  # noqa: F401
            import ffcv.writer  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ModuleNotFoundError(FFCV_MISSING) from e
    finally:
        torch.set_num_threads(threads)
    return ffcv


def ffcv_available() -> bool:
    try:
        import_ffcv()
    except ModuleNotFoundError:
        return False
    return True


class _ProgressShim:
    """Stands in for the ``tqdm`` that ffcv's writer drives, forwarding to a callback."""

    def __init__(self, on_advance: Callable[[int], None]):
        self._on_advance = on_advance

    def __call__(self, total: int | None = None, **_: Any) -> "_ProgressShim":
        return self

    def update(self, n: int = 1) -> None:
        self._on_advance(n)

    def close(self) -> None:
        pass


def write_beton(
    path: Path,
    dataset: Any,
    image_format: str,
    jpeg_quality: int = 90,
    num_workers: int | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> None:
    """Write ``dataset[i] -> (uint8 HxWx3, label, index)`` to ``path`` with ffcv."""
    import_ffcv()
    import ffcv.writer as fw
    from ffcv.fields import IntField, RGBImageField

    fields = {
        "image": RGBImageField(write_mode=image_format, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    workers = num_workers or max(1, min(os.cpu_count() or 1, 16))
    writer = fw.DatasetWriter(str(path), fields, num_workers=workers)
    shim = _ProgressShim(on_advance or (lambda n: None))
    import multiprocessing

    # shared memory, not a file: the reason may be that the disk is full
    first_error = multiprocessing.Array("c", 1024)
    procs: list[Any] = []

    class _Worker(fw.Process):  # type: ignore[name-defined, misc]
        """ffcv's writer waits forever for samples from a dead worker: each worker
        records why it died, and the wait below stops at the first death."""

        def __init__(self, *a: Any, **kw: Any):
            super().__init__(*a, **kw)
            procs.append(self)

        def run(self) -> None:  # pragma: no cover - runs in the worker process
            try:
                super().run()
            except BaseException as e:  # noqa: BLE001 - the parent reports it
                with first_error.get_lock():
                    if not first_error.value:
                        first_error.value = f"{type(e).__name__}: {e}".encode(errors="replace")[:1023]
                os._exit(1)

    def watchful_sleep(seconds: float) -> None:
        time.sleep(seconds)
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            for p in procs:
                if p.is_alive():
                    p.kill()
            why = first_error.value.decode(errors="replace") or f"exit code {dead[0].exitcode}"
            raise _WriterFailed(why)

    saved = fw.tqdm, fw.Process, fw.sleep
    fw.tqdm, fw.Process, fw.sleep = shim, _Worker, watchful_sleep
    try:
        writer.from_indexed_dataset(dataset, chunksize=max(1, min(100, len(dataset) // (4 * workers) or 1)))
    except _WriterFailed as e:
        with contextlib.suppress(Exception):
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        full = "No space left" in str(e) or "Errno 28" in str(e)
        raise WriteFailed(f"writing {path.name} failed in a writer process ({e})"
                          + ("; free some space or choose another --out" if full else "")) from None
    finally:
        fw.tqdm, fw.Process, fw.sleep = saved


class _WriterFailed(Exception):
    pass


class WriteFailed(OSError):
    """A .beton could not be written; the message says why."""


def read_beton_arrays(
    path: Path, on_advance: Callable[[int], None] | None = None, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a whole fixed-resolution split: (uint8 [N,H,W,3], labels, indices)."""
    import_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    import torch

    threads = torch.get_num_threads()  # ffcv's Loader resets torch's thread count
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=max(1, min(os.cpu_count() or 1, 8)),
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]},
    )
    n = loader.reader.num_samples
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    indices = np.empty(n, dtype=np.int64)
    pos = 0
    batches = iter(loader)
    torch.set_num_threads(threads)
    for img, lab, idx in batches:
        b = img.shape[0]
        if images is None:
            images = np.empty((n, *img.shape[1:]), dtype=np.uint8)
        images[pos : pos + b] = img  # ffcv recycles its buffers: copy out
        labels[pos : pos + b] = lab.reshape(-1)
        indices[pos : pos + b] = idx.reshape(-1)
        pos += b
        if on_advance:
            on_advance(b)
    assert images is not None and pos == n
    return images, labels, indices


def beton_columns(path: Path) -> dict[str, np.ndarray]:
    """Per-sample metadata of a fastbgm ``.beton``, read without decoding any image:
    image ``height`` and ``width`` and the stored ``label``."""
    import_ffcv()
    from ffcv.reader import Reader

    meta = Reader(str(path)).metadata  # fields in write order: image, label, index
    return {"height": meta["f0"]["height"], "width": meta["f0"]["width"],
            "label": np.asarray(meta["f1"], dtype=np.int64).reshape(-1)}


@contextlib.contextmanager
def custom_order(sample_order: Callable[[int], Sequence[int]]) -> Iterator[Any]:
    """Register a traversal order for one Loader (ffcv 1.0.2 rejects order classes
    passed directly, but accepts keys registered in ORDER_MAP)."""
    import_ffcv()
    from ffcv.loader import loader as ffcv_loader
    from ffcv.traversal_order.base import TraversalOrder

    class _Order(TraversalOrder):
        def sample_order(self, epoch: int) -> Sequence[int]:
            return np.asarray(sample_order(epoch), dtype=np.int64)

    key = f"fastbgm-order-{id(_Order)}"
    ffcv_loader.ORDER_MAP[key] = _Order
    try:
        yield key
    finally:
        ffcv_loader.ORDER_MAP.pop(key, None)
