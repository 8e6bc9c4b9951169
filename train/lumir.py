"""The LUMIR dataset as published with the challenge: its JSON file and NIfTI images.

The JSON (paths relative to the data folder, ``./`` prefixes allowed)::

    {"training":   [{"image": "imagesTr/LUMIRMRI_0000_0000.nii.gz"}, ...],
     "validation": [{"fixed": "imagesVal/...", "moving": "imagesVal/..."}, ...]}

Optional label maps: a training entry's ``"label"``, a validation entry's
``"fixed_label"`` and ``"moving_label"`` (Learn2Reg's spelling); LUMIR ships
none, so pairs carry labels only where both images of the pair have them.
Every listed file and every image header is checked when the reader is built,
so a broken dataset fails at once, naming the file, not hours into training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from lumireg.contract import CANVAS

SPLITS = {"training": ("image",), "validation": ("fixed", "moving")}
LABEL_KEYS = {"image": "label", "fixed": "fixed_label", "moving": "moving_label"}


def _read_entries(json_path: Path, split: str) -> list[dict]:
    """The split's list of entries, each key checked; errors name the JSON file."""
    if not json_path.is_file():
        raise FileNotFoundError(f"LUMIR dataset JSON not found: {json_path}")
    try:
        document = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from err
    entries = document.get(split) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: needs a list under the key {split!r}")
    for n, entry in enumerate(entries):
        keys = SPLITS[split]
        labels = [LABEL_KEYS[k] for k in keys if isinstance(entry, dict) and LABEL_KEYS[k] in entry]
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in (*keys, *labels)):
            raise ValueError(f"{json_path}: {split}[{n}] must be an object with string paths {list(keys)}: {entry!r}")
    return entries


def _volume(entry: dict, key: str, root: Path) -> dict[str, str]:
    """``{"image": path}`` plus ``"label"`` when the entry has one; paths resolved against ``root``."""
    volume = {"image": os.path.normpath(root / entry[key])}
    if LABEL_KEYS[key] in entry:
        volume["label"] = os.path.normpath(root / entry[LABEL_KEYS[key]])
    return volume


def _load(path: str, shape: tuple[int, ...], labels: bool = False) -> torch.Tensor:
    """One volume as ``(1, D, H, W)``: intensities / 255 in float32, or labels in int32."""
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if data.shape != shape:
        raise ValueError(f"{path}: shape {data.shape}, expected {shape}")
    volume = torch.from_numpy(np.rint(data).astype(np.int32) if labels else data / 255)
    return volume[None]


class LumirPairs(Dataset):
    """(fixed, moving) pairs of LUMIR images, read with nibabel.

    Args:
        json_path: the dataset JSON.
        data_dir: the folder its paths are relative to (default: the JSON's folder).
        split: ``"training"``: item ``k`` is a pair of two distinct training
            images drawn from ``(seed, k)`` alone, so any index is valid and
            reproducible; ``"validation"``: item ``k`` is the JSON's ``k``-th pair.
        seed: the training pairs' seed.
        length: number of training items (default: the number of ordered pairs,
            ``n * (n - 1)``); not accepted for ``"validation"``.
        shape: every image must have this ``(D, H, W)`` (default LUMIR's
            160 x 224 x 192); ``None`` accepts any shape shared by all images.

    Items: ``{"fixed", "moving"}``: ``(1, D, H, W)`` float32 stored intensity
    / 255 (LUMIR stores 0..255, so 0..1; not clipped or rescaled);
    ``{"fixed_labels", "moving_labels"}``: ``(1, D, H, W)`` int32 when both
    images have labels; ``{"fixed_path", "moving_path"}``: the files read.

    Raises:
        FileNotFoundError: the JSON or a listed file is missing (all are listed).
        ValueError: malformed JSON, fewer than two training images, or an image
            whose header shape differs from ``shape`` or from the first image's.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        data_dir: str | os.PathLike | None = None,
        split: str = "training",
        seed: int = 0,
        length: int | None = None,
        shape: Sequence[int] | None = CANVAS,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        json_path = Path(json_path)
        root = Path(data_dir) if data_dir is not None else json_path.parent
        entries = _read_entries(json_path, split)
        if split == "training":
            self.images = [_volume(e, "image", root) for e in entries]
            volumes = self.images
        else:
            self.pairs = [(_volume(e, "fixed", root), _volume(e, "moving", root)) for e in entries]
            volumes = [v for pair in self.pairs for v in pair]
        paths = [p for v in volumes for p in v.values()]
        missing = sorted({p for p in paths if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(f"{json_path}: {len(missing)} listed file(s) missing: {', '.join(missing[:5])}")
        self.shape = self._check_shapes(paths, shape)
        self.split, self.seed = split, int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if split == "validation":
            if length is not None:
                raise ValueError("length applies to the training split only")
            self.length = len(self.pairs)
        else:
            if len(self.images) < 2:
                raise ValueError(f"{json_path}: training needs at least two images, got {len(self.images)}")
            self.length = len(self.images) * (len(self.images) - 1) if length is None else int(length)

    @staticmethod
    def _check_shapes(paths: list[str], shape: Sequence[int] | None) -> tuple[int, ...]:
        """The shape all ``paths`` share, from their headers only (no image data is read)."""
        expected = tuple(shape) if shape is not None else None
        for path in paths:
            found = tuple(nib.load(path).shape)
            expected = expected or found
            if found != expected:
                origin = "expected" if shape is not None else "as the first image has"
                raise ValueError(f"{path}: shape {found}, but {origin} {expected}")
        return expected

    def __len__(self) -> int:
        return self.length

    def _pair(self, index: int) -> tuple[dict, dict]:
        """(fixed, moving) volumes of item ``index``."""
        if self.split == "validation":
            return self.pairs[index]
        rng = np.random.default_rng([self.seed, index])
        first = int(rng.integers(len(self.images)))
        second = int(rng.integers(len(self.images) - 1))
        return self.images[first], self.images[second + (second >= first)]

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        index %= self.length
        fixed, moving = self._pair(index)
        sample = {"fixed": _load(fixed["image"], self.shape), "moving": _load(moving["image"], self.shape)}
        if "label" in fixed and "label" in moving:
            sample["fixed_labels"] = _load(fixed["label"], self.shape, labels=True)
            sample["moving_labels"] = _load(moving["label"], self.shape, labels=True)
        sample["fixed_path"], sample["moving_path"] = fixed["image"], moving["image"]
        return sample
