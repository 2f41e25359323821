"""Helpers shared by the built-in dataset builders: Arrow tables from numpy, split sizes, mixtures, metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, DatasetInfo

# Metadata lives as JSON under this key in every split's `info.description`, so it survives save_to_disk.
METADATA_KEY = "dmil_hf"
SPLITS = ("train", "validation", "test")


def _arrow(values) -> pa.Array:
    """numpy (n,), (n, d), (n, h, w), ... -> (nested fixed-size list) Arrow array; list of str -> string array."""
    if isinstance(values, list):
        return pa.array(values, type=pa.string())
    array = np.ascontiguousarray(values)
    flat = pa.array(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def table_dataset(columns: dict, metadata: dict | None = None) -> Dataset:
    """A `Dataset` built straight from numpy columns (much faster than `Dataset.from_dict` for waveforms)."""
    table = pa.table({name: _arrow(values) for name, values in columns.items()})
    description = json.dumps({METADATA_KEY: metadata}) if metadata is not None else ""
    return Dataset(table, info=DatasetInfo(description=description))


def with_columns(dataset: Dataset, columns: dict, fingerprint: str, drop=()) -> Dataset:
    """`dataset` without the columns `drop`, plus the numpy `columns` (name -> array with one row per row), joined
    side by side. Numeric arrays are not copied (a memory-mapped one stays on disk) nor hashed: `fingerprint` must
    name their content, since `datasets` reuses its `map` cache files by fingerprint. The dataset's format is kept."""
    from datasets import concatenate_datasets

    added = Dataset(pa.table({name: _arrow(values) for name, values in columns.items()}), fingerprint=fingerprint)
    kept = dataset.remove_columns(list(drop)).with_format(None)
    merged = concatenate_datasets([kept, added], axis=1)
    form = dataset.format
    return merged.with_format(form["type"], **form.get("format_kwargs", {})) if form.get("type") else merged


def split_sizes(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(f"validation_fraction ({validation_fraction}) and test_fraction ({test_fraction}) must be in "
                         "(0, 1) and sum to less than 1.")
    n_val, n_test = round(n * validation_fraction), round(n * test_fraction)
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(f"num_samples={n} is too small for non-empty train/validation/test splits.")
    return n - n_val - n_test, n_val, n_test


def mixture_shares(types: tuple, mixture: dict | None) -> dict:
    """Normalised type -> share over `types` (default: equal shares); unknown names or bad shares raise."""
    if mixture is None:
        return {t: 1.0 / len(types) for t in types}
    if not isinstance(mixture, dict):
        raise ValueError(f"mixture must be a dict interaction type -> share; got {type(mixture).__name__}.")
    unknown = sorted(set(mixture) - set(types))
    if unknown:
        raise ValueError(f"mixture names unknown interaction types {unknown}; expected some of {list(types)}.")
    shares = {t: float(mixture.get(t, 0.0)) for t in types}
    if any(not np.isfinite(s) or s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"mixture shares must be non-negative numbers with a positive sum; got {mixture}.")
    total = sum(shares.values())
    return {t: s / total for t, s in shares.items()}


def type_sequence(shares: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` type indices in random order with counts proportional to `shares` (largest remainder rounding)."""
    exact = np.array(list(shares.values())) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def metadata_of(dataset: Dataset) -> dict:
    try:
        stored = json.loads(dataset.info.description or "")
    except (TypeError, ValueError):
        return {}
    return stored.get(METADATA_KEY, {}) if isinstance(stored, dict) else {}


def assemble(splits: dict, metadata: dict) -> DatasetDict:
    """DatasetDict from split name -> column dict; every split carries the same metadata."""
    return DatasetDict({name: table_dataset(splits[name], metadata) for name in SPLITS})
