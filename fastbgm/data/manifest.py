"""The JSON manifest written beside every ``.beton`` split, and the file-name rules."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WRITER_VERSION = 1
BETON_SUFFIX = ".beton"
MANIFEST_SUFFIX = ".manifest.json"


def beton_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}{BETON_SUFFIX}"


def manifest_path(beton: str | Path) -> Path:
    beton = Path(beton)
    return beton.with_name(beton.name[: -len(BETON_SUFFIX)] + MANIFEST_SUFFIX) if beton.name.endswith(
        BETON_SUFFIX
    ) else beton.with_name(beton.name + MANIFEST_SUFFIX)


@dataclass
class Manifest:
    split: str
    num_samples: int
    class_names: list[str]
    class_counts: list[int]
    resolution: list[int] | None  # [H, W] when every image has that size
    mean: list[float]  # per channel, measured on this split, in [0, 1]
    std: list[float]
    normalization: dict[str, list[float]]  # what loaders use: the train split's (or a preset's)
    image_format: str  # raw | jpg
    source: dict[str, Any]
    sha256: str = ""
    writer_version: int = WRITER_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no manifest at {path}: a split written by `python -m fastbgm.data prepare` has one "
                "beside its .beton; re-run prepare for this dataset"
            )
        try:
            data = json.loads(path.read_text())
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            from .sources import DatasetError

            raise DatasetError(f"manifest {path} is unreadable ({type(e).__name__}: {e}); "
                               "write the dataset again with `python -m fastbgm.data prepare ... --overwrite`") from None

    @classmethod
    def for_beton(cls, beton: str | Path) -> "Manifest":
        return cls.load(manifest_path(beton))
