"""The resident cache: a split decoded once into a uint8 array kept beside its
``.beton`` (``<split>.resident.npz``), tied to the ``.beton``'s checksum.

A run then starts in about a second instead of re-decoding, and small-image training
works on machines where ffcv cannot be built: with a valid cache, ffcv is not imported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import atomic_path, sha256_file
from . import ffcv_io
from .manifest import BETON_SUFFIX, Manifest
from .sources import DatasetError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_path(beton: str | Path) -> Path:
    beton = Path(beton)
    stem = beton.name[: -len(BETON_SUFFIX)] if beton.name.endswith(BETON_SUFFIX) else beton.name
    return beton.with_name(stem + ".resident.npz")


@dataclass
class ResidentArrays:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    indices: np.ndarray  # int64 [N] sample index stored in the .beton
    beton_sha256: str


def _stat_key(beton: Path) -> dict:
    st = beton.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache(path: Path) -> tuple[dict, np.lib.npyio.NpzFile] | None:
    if not path.exists():
        return None
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta.get("version") != CACHE_VERSION:
            return None
        return meta, z
    except Exception as e:  # a corrupt cache is rebuilt, never trusted
        log.warning("resident cache %s is unreadable (%s); rebuilding", path, e)
        return None


def load_resident(beton: str | Path, rebuild: bool = False, show_progress: bool = False) -> ResidentArrays:
    """Return the decoded split, from the cache when it matches the ``.beton``."""
    beton = Path(beton)
    cpath = cache_path(beton)
    cached = None if rebuild else _read_cache(cpath)
    if cached is not None:
        meta, z = cached
        if not beton.exists():
            # no .beton to check against: the cache must at least be this split's
            arrays = ResidentArrays(z["images"], z["labels"], z["indices"], meta["beton_sha256"])
            _check_against_manifest(beton, cpath, arrays)
            return arrays
        key = _stat_key(beton)
        if key == meta.get("beton_stat") or sha256_file(beton) == meta["beton_sha256"]:
            return ResidentArrays(z["images"], z["labels"], z["indices"], meta["beton_sha256"])
        log.info("%s changed since its resident cache was built; rebuilding", beton)
    if not beton.exists():
        raise DatasetError(
            f"dataset file {beton} does not exist (and no resident cache beside it): "
            "write it with `python -m fastbgm.data prepare ...`"
        )
    if not ffcv_io.ffcv_available():
        raise DatasetError(
            f"{beton} has no valid resident cache, and building one needs ffcv, which is not installed: "
            f"install ffcv (launch/install.sh), or copy {cpath.name} from a machine that built it"
        )
    try:
        return build_cache(beton, show_progress=show_progress)
    except DatasetError:
        raise
    except Exception as e:  # truncated, random bytes, not a .beton
        raise DatasetError(f"{beton} cannot be read as a .beton ({type(e).__name__}: {e}); "
                           "write it again with `python -m fastbgm.data prepare ... --overwrite`") from None


def _check_against_manifest(beton: Path, cpath: Path, arrays: ResidentArrays) -> None:
    """A cache used without its .beton must match the split's manifest: the checksum of
    the .beton it was decoded from, the sample count and the class counts."""
    try:
        m = Manifest.for_beton(beton)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise DatasetError(f"{beton} is missing and its resident cache {cpath.name} cannot be checked ({e}); "
                           "re-run prepare for this dataset") from None
    problems = []
    if m.sha256 and arrays.beton_sha256 and m.sha256 != arrays.beton_sha256:
        problems.append("it was decoded from another .beton (checksums differ)")
    if len(arrays.labels) != m.num_samples:
        problems.append(f"it holds {len(arrays.labels)} samples, the manifest says {m.num_samples}")
    elif np.bincount(arrays.labels, minlength=m.num_classes).tolist() != list(m.class_counts):
        problems.append("its class counts differ from the manifest's")
    if problems:
        raise DatasetError(f"resident cache {cpath} does not belong to {beton.name}: {'; '.join(problems)}. "
                           f"Delete {cpath.name} and restore {beton.name} (or re-run prepare)")


def build_cache(beton: Path, show_progress: bool = False) -> ResidentArrays:
    sha = sha256_file(beton)
    try:
        manifest = Manifest.for_beton(beton)
        if manifest.sha256 and manifest.sha256 != sha:
            log.warning("%s does not match the checksum in its manifest; was it rewritten without prepare?", beton)
    except FileNotFoundError:
        pass
    cols = ffcv_io.beton_columns(beton)
    heights, widths = cols["height"], cols["width"]
    if len(set(heights.tolist())) > 1 or len(set(widths.tolist())) > 1:
        raise DatasetError(
            f"{beton} holds images of different sizes, so it cannot be resident: use placement='stream', "
            "or prepare it with --resolution"
        )
    from rich.progress import Progress

    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"decoding {beton.name}", total=int(len(heights)))
        images, labels, indices = ffcv_io.read_beton_arrays(beton, on_advance=lambda n: progress.advance(task, n))
    meta = {"version": CACHE_VERSION, "beton_sha256": sha, "beton_stat": _stat_key(beton)}
    cpath = cache_path(beton)
    try:
        with atomic_path(cpath) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels, indices=indices, meta=np.array(json.dumps(meta)))
    except OSError as e:  # a read-only dataset folder still trains, just without the cache
        log.warning("could not write resident cache %s (%s)", cpath, e)
    return ResidentArrays(images, labels, indices, sha)
