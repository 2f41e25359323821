"""Degraded copies of a split: one modality replaced by noise, or dropped.

- `noise`: the modality's column is replaced by noise of the same shape and type: uniform random pixels (same size
  and channels), white noise with each clip's length and RMS level, text of the same number of words drawn at
  random from the split's own vocabulary, Gaussian vectors with each feature dimension's mean and std. The model
  still sees the modality, but it carries nothing about the label.
- `missing`: the column is dropped (with `audio_sampling_rate` for audio). `encode_split` then produces no input
  for that modality and the model treats it as absent (DMIL masks it out of the decomposition and the gate).
"""

from __future__ import annotations

import zlib

import numpy as np
from datasets import Dataset, DatasetDict, Image
from PIL import Image as PILImage

from ..configuration_dmil import TOWERS, column_of
from .schema import inspect_dataset

MODES = ("noise", "missing")


def _column(dataset: Dataset, modality: str) -> str:
    column = column_of(modality)
    if column not in dataset.column_names:
        raise ValueError(f"modality {modality!r} (column {column!r}) is not in this split; its columns are "
                         f"{dataset.column_names}.")
    return column


def _random_image(image, rng):
    """Uniform random pixels with the image's size and channels: a PIL image for a PIL image, else a uint8 array."""
    if isinstance(image, PILImage.Image):
        mode = image.mode if image.mode in ("L", "RGB", "RGBA") else "RGB"
        shape = np.asarray(image.convert(mode)).shape
        return PILImage.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
    return rng.integers(0, 256, size=np.asarray(image).shape, dtype=np.uint8)


def _noise_batch(column, seed, vocabulary, mean, std):
    def replace(batch, indices):
        rng = np.random.default_rng([seed, zlib.crc32(column.encode()), indices[0]])
        values = batch[column]
        if column == "text":
            out = [" ".join(rng.choice(vocabulary, size=max(1, len(text.split())))) for text in values]
        elif column == "image":
            out = [_random_image(image, rng) for image in values]
        elif column == "audio":
            out = []
            for clip in values:
                clip = np.asarray(clip, dtype=np.float32)
                level = float(np.sqrt(np.mean(clip ** 2))) if clip.size else 0.0
                out.append(np.clip(rng.normal(0.0, level or 0.05, clip.shape), -1, 1).astype(np.float32))
        else:
            out = list((mean + std * rng.normal(size=(len(values), len(mean)))).astype(np.float32))
        return {column: out}

    return replace


def degrade_split(dataset: Dataset, modality: str, mode: str, seed: int = 0) -> Dataset:
    """A copy of `dataset` with `modality` (`text`, `vision`, `audio` or a feature modality name) replaced by noise
    (`mode="noise"`) or dropped (`mode="missing"`); see the module docstring. Deterministic in `seed`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}.")
    column = _column(dataset, modality)
    if mode == "missing":
        rate_column = TOWERS[modality].rate_column if modality in TOWERS else None
        return dataset.remove_columns([column] + ([rate_column] if rate_column else []))
    vocabulary = mean = std = None
    if column == "text":
        vocabulary = sorted({word for text in dataset["text"] for word in text.split()}) or ["_"]
    elif modality not in TOWERS:
        values = np.asarray(dataset[column], dtype=np.float64)
        mean, std = values.mean(0), values.std(0)
    if isinstance(dataset.features[column], Image) and not dataset.features[column].decode:
        dataset = dataset.cast_column(column, Image())  # the noise needs each image's size and channels
    features = dataset.features.copy()
    return dataset.map(_noise_batch(column, seed, vocabulary, mean, std), batched=True, batch_size=64,
                       with_indices=True, features=features, desc=f"noise_{modality}", load_from_cache_file=False)


def degraded_test_sets(dsd: DatasetDict, seed: int = 0) -> dict[str, Dataset]:
    """`noise_<m>` and `missing_<m>` copies of the test split for every modality `m` of the dataset."""
    schema = inspect_dataset(dsd)
    out = {}
    for modality in schema.modalities:
        for mode in MODES:
            out[f"{mode}_{modality}"] = degrade_split(dsd["test"], modality, mode, seed=seed)
    return out


__all__ = ["MODES", "degrade_split", "degraded_test_sets"]
