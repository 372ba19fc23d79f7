"""ImageNet class indices and the Restricted ImageNet super-classes (Tsipras et al.)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

# Inclusive ranges of ILSVRC-2012 class indices, in the order of the paper's table.
RESTRICTED_RANGES: dict[str, tuple[int, int]] = {
    "dog": (151, 268),
    "cat": (281, 285),
    "frog": (30, 32),
    "turtle": (33, 37),
    "bird": (80, 100),
    "primate": (365, 382),
    "fish": (389, 397),
    "crab": (118, 121),
    "insect": (300, 319),
}
RESTRICTED_CLASSES = list(RESTRICTED_RANGES)


@lru_cache(maxsize=1)
def synsets() -> list[tuple[str, str]]:
    """The 1,000 (wnid, name) pairs in canonical ILSVRC-2012 order (line k = class k)."""
    text = resources.files("fastbgm.data").joinpath("imagenet_synsets.txt").read_text()
    out = []
    for line in text.splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            out.append((wnid, name))
    assert len(out) == 1000, "the shipped synset list must have 1,000 lines"
    return out


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {w: i for i, (w, _) in enumerate(synsets())}


def restricted_class(imagenet_index: int) -> int | None:
    """Super-class index of an ImageNet class index, or None when outside all ranges."""
    for k, (lo, hi) in enumerate(RESTRICTED_RANGES.values()):
        if lo <= imagenet_index <= hi:
            return k
    return None
