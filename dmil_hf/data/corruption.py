"""Corrupted training samples: what teaches a model to tell a broken modality from a working one.

`add_training_corruption(split, modalities)` appends to a training split, for every modality `m`, copies of a random
`fraction` of its rows in which `m` alone is degraded with one of `dmil_hf.data.degrade.TRAINING_DEGRADATIONS` (noise
mixed into the signal at a level, or noise replacing it), and a column `modality_corruption` (float32, one level per
modality in the order of `modalities`: 0 clean, 1 nothing left of the signal) that says what was done. The labels stay true: a model
trained on these rows learns to predict from the modalities that still work. DMIL also learns from the column a
per-sample, per-modality reliability (`outputs.modality_reliability`) and treats an unreliable modality as missing.

The corruptions are drawn once (deterministic in `seed`), on the raw columns, so they pass through the processor and
through frozen towers (whose outputs the embedding cache stores) exactly as test-time corruption does. `blank` inputs
and the natural corruptions (blur, occlusion, background noise, word dropout) are not used by default: they stay held
out. `degradations=` may add `blank` (an all-zero vector, a black image, a silent clip, an empty string); measured in
BENCHMARKS.md ("Blank inputs in training"): it closes the blank gaps on feature data but costs `digits-pretrained`
clean accuracy, where the dataset's own empty canvases and silent clips are clean inputs.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasets import Dataset, concatenate_datasets

from ..configuration_dmil import CORRUPTION_INPUT, column_of
from ._build import with_columns
from .degrade import CORRUPTION_KINDS, TRAINING_DEGRADATIONS, degrade_split

def add_training_corruption(split: Dataset, modalities, fraction: float = 0.15,
                            degradations=TRAINING_DEGRADATIONS, seed: int = 0) -> Dataset:
    """`split` plus its corrupted copies and the `modality_corruption` column (see the module docstring).

    Args:
        split: a training split in the dataset schema.
        modalities: the modalities present, in the model's order (`config.modalities`): the order of the column.
        fraction: the share of rows copied with each modality corrupted (`0` adds the column only).
        degradations: the [`Degradation`]s to draw from, each with equal probability (kinds of
            `CORRUPTION_KINDS`; the level written to the column is the degradation's level, 1 for `noise` and `blank`).
            A degradation listed twice is drawn twice as often.
        seed: the draw of rows, levels and noise.
    """
    modalities = list(modalities)
    missing = [m for m in modalities if column_of(m) not in split.column_names]
    if missing:
        raise ValueError(f"modalities {missing} have no column in this split (its columns: {split.column_names}).")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1]; got {fraction!r}.")
    degradations = tuple(degradations)
    if not degradations or any(d.kind not in CORRUPTION_KINDS or not 0.0 < d.level <= 1.0 for d in degradations):
        raise ValueError(f"degradations must be a non-empty list of `Degradation`s of the kinds "
                         f"{list(CORRUPTION_KINDS)} with levels in (0, 1]; got {degradations!r}.")
    if CORRUPTION_INPUT in split.column_names:
        raise ValueError(f"split already has a {CORRUPTION_INPUT!r} column: it was corrupted before.")
    parts = [_with_levels(split, np.zeros(len(modalities), dtype=np.float32))]
    count = int(round(float(fraction) * len(split)))
    rng = np.random.default_rng([seed, 7])
    for position, modality in enumerate(modalities):
        if count == 0:
            break
        rows = np.sort(rng.choice(len(split), size=count, replace=False))
        drawn = rng.choice(len(degradations), size=count)
        for degradation in dict.fromkeys(degradations):  # each distinct degradation once, in order
            picked = [i for i, d in enumerate(degradations) if d == degradation]
            chosen = rows[np.isin(drawn, picked)].tolist()
            if not chosen:
                continue
            corrupted = degrade_split(split.select(chosen), modality, degradation, seed=seed + 1000 * position)
            corrupted = corrupted.cast(split.features)
            value = np.zeros(len(modalities), dtype=np.float32)
            value[position] = degradation.level
            parts.append(_with_levels(corrupted, value))
    return concatenate_datasets(parts)


def _with_levels(split: Dataset, levels: np.ndarray) -> Dataset:
    """`split` plus the column `modality_corruption` holding `levels` in every row, built as one Arrow array (a Python
    list per row would cost about a hundred bytes a row, and datasets would hash it for the fingerprint)."""
    column = np.broadcast_to(levels, (len(split), len(levels)))
    content = f"{CORRUPTION_INPUT}:{len(split)}:{levels.tobytes().hex()}".encode()
    return with_columns(split, {CORRUPTION_INPUT: column}, fingerprint=hashlib.sha256(content).hexdigest()[:16])


__all__ = ["add_training_corruption"]
